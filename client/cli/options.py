"""CLI options shared by every command that joins the swarm (--peers, --identity, maddrs, lease periods, --json,
--work-dir), and the functions that turn them into the frozen configs protocol/ takes. Imports nothing heavy at
module level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from isles.protocol.errors import IslesError

Peers = Annotated[
    list[str] | None,
    typer.Option(
        "--peers", metavar="MADDR", help="Multiaddr of a swarm peer, as `isles bootstrap` prints it (repeatable)."
    ),
]
IdentityDir = Annotated[
    Path | None,
    typer.Option(
        "--identity", metavar="DIR", help="Identity folder: peer id + signing key (default: your config dir)."
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
HostMaddrs = Annotated[
    list[str] | None, typer.Option("--host-maddrs", metavar="MADDR", help="Addresses to listen on (repeatable).")
]
AnnounceMaddrs = Annotated[
    list[str] | None,
    typer.Option(
        "--announce-maddrs", metavar="MADDR", help="Public addresses to announce, for NAT or Docker (repeatable)."
    ),
]
ClientMode = Annotated[
    bool,
    typer.Option("--client-mode/--reachable", help="Outbound connections only (behind NAT), or accept inbound ones."),
]
StartupTimeout = Annotated[
    float, typer.Option("--startup-timeout", min=1.0, help="Seconds to wait for the p2p daemon and first peers.")
]
LeaseTtl = Annotated[float, typer.Option("--lease-ttl", min=1.0, help="Seconds a claim lives without a heartbeat.")]
HeartbeatPeriod = Annotated[float, typer.Option("--heartbeat-period", min=0.1, help="Seconds between lease renewals.")]
SettlePeriod = Annotated[float, typer.Option("--settle-period", min=0.0, help="Seconds to wait for racing claims.")]


def work_dir_option(command: str, help: str):
    """`--work-dir DIR`; without it, `command`'s folder in the user data dir (never the current folder)."""
    from isles.protocol.installation import default_work_dir

    return typer.Option(
        ...,
        "--work-dir",
        metavar="DIR",
        default_factory=lambda: default_work_dir(command),
        show_default=str(default_work_dir(command)),
        help=help,
    )


def parse_peers(peers: list[str] | None) -> tuple[str, ...]:
    from isles.protocol.dht import parse_multiaddr

    return tuple(parse_multiaddr(p) for p in peers or ())


def parse_maddrs(maddrs: list[str] | None, option: str) -> tuple[str, ...]:
    from isles.protocol.dht import parse_multiaddr

    parsed = []
    for text in maddrs or ():
        try:
            parsed.append(parse_multiaddr(text, need_peer_id=False))
        except IslesError as exc:
            raise IslesError(f"{option}: {exc.message}", hint="e.g. /ip4/0.0.0.0/tcp/31337") from None
    return tuple(parsed)


def dht_config(
    peers: list[str] | None = None,
    identity: Path | None = None,
    ephemeral: bool = False,
    host_maddrs: list[str] | None = None,
    announce_maddrs: list[str] | None = None,
    client_mode: bool = False,
    startup_timeout: float = 30.0,
    default_host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",),
):
    """A DHTConfig from CLI options; `ephemeral` makes a throwaway identity (readers such as `isles status`)."""
    from isles.protocol.dht import DHTConfig
    from isles.protocol.identity import default_identity_dir

    return DHTConfig(
        initial_peers=parse_peers(peers),
        host_maddrs=parse_maddrs(host_maddrs, "--host-maddrs") or default_host_maddrs,
        announce_maddrs=parse_maddrs(announce_maddrs, "--announce-maddrs"),
        client_mode=client_mode,
        identity_dir=None if ephemeral else (identity or default_identity_dir()),
        startup_timeout=startup_timeout,
    )


def lease_settings(lease_ttl: float, heartbeat_period: float, settle_period: float):
    from isles.protocol.leases import LeaseSettings

    try:
        return LeaseSettings(ttl_period=lease_ttl, heartbeat_period=heartbeat_period, settle_period=settle_period)
    except ValueError as exc:
        raise IslesError(str(exc), hint="e.g. --lease-ttl 60 --heartbeat-period 15 --settle-period 3") from None
