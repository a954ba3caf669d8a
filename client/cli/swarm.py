"""`isles bootstrap` and `isles status`: keep the swarm findable and show it at a glance.

isles bootstrap --manifest runs/digits/manifest.json      # prints "To join: isles join --peers ..."
isles status --peers /ip4/.../tcp/31337/p2p/... [--run ID] [--json]
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import options, output

log = logging.getLogger("isles.bootstrap")


def register(app: typer.Typer) -> None:
    app.command("bootstrap")(bootstrap)
    app.command("status")(status)


def bootstrap(
    manifest: Annotated[
        list[Path] | None,
        typer.Option("--manifest", metavar="FILE", help="Run manifest to publish and keep alive (repeatable)."),
    ] = None,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port to listen on.")] = 31337,
    peers: options.Peers = None,
    identity: options.IdentityDir = None,
    host_maddrs: options.HostMaddrs = None,
    announce_maddrs: options.AnnounceMaddrs = None,
    announce_period: Annotated[
        float, typer.Option("--announce-period", min=1.0, help="Seconds between re-announcements of the manifests.")
    ] = 600.0,
    log_period: Annotated[
        float, typer.Option("--log-period", min=1.0, help="Seconds between log lines with peer and run counts.")
    ] = 60.0,
    adopt_runs: Annotated[
        bool, typer.Option("--adopt-runs/--own-runs-only", help="Also keep alive runs other nodes announced.")
    ] = True,
    startup_timeout: options.StartupTimeout = 30.0,
) -> None:
    """Run a long-lived DHT node that volunteers join through, and keep run manifests alive.

    Stops cleanly on Ctrl-C or SIGTERM. Several bootstrap nodes back each other up: start the next with --peers.
    """
    from isles.protocol.bootstrap import BootstrapNode, BootstrapSettings
    from isles.protocol.errors import IslesError
    from isles.protocol.records import load_manifest_json

    manifests = []
    for path in manifest or ():
        if not path.is_file():
            raise IslesError(f"manifest file {path} not found", hint="pass the manifest.json `isles partition` wrote")
        manifests.append(load_manifest_json(path.read_text(), source=str(path)))
    config = options.dht_config(
        peers=peers,
        identity=identity,
        host_maddrs=host_maddrs,
        announce_maddrs=announce_maddrs,
        startup_timeout=startup_timeout,
        default_host_maddrs=(f"/ip4/0.0.0.0/tcp/{port}",),
    )
    node = BootstrapNode(config, manifests, BootstrapSettings(announce_period, log_period, adopt_runs))
    received: list[str] = []

    def on_signal(signum, _frame) -> None:
        received.append(signal.Signals(signum).name)
        node.stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        node.start()
        output.stderr.print(f"Bootstrap node {node.node.peer_id} listening on:")
        for maddr in node.maddrs:
            output.stderr.print(f"  {maddr}")
        for m in manifests:
            output.stderr.print(f"Announcing run {m.run_id} ({m.name}, {len(m.units)} units)")
        sys.stdout.write(node.join_line() + "\n")  # stdout, one line to paste
        sys.stdout.flush()
        log.info(node.status_line())
        node.serve()
    finally:
        node.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    output.stderr.print(f"Stopped ({received[0] if received else 'done'}).")


def status(
    peers: options.Peers = None,
    run: Annotated[str | None, typer.Option("--run", metavar="ID", help="Show only this run.")] = None,
    as_json: options.Json = False,
    startup_timeout: options.StartupTimeout = 30.0,
) -> None:
    """Show each run's units (open / claimed / released), their owners, progress, rate and ETA, and peers online."""
    from isles.protocol.dht import open_dht
    from isles.protocol.errors import IslesError
    from isles.protocol.swarm import Swarm
    from isles.protocol.swarm_view import read_run

    if not peers:
        raise IslesError("no peer to ask", hint="isles status --peers <multiaddr printed by `isles bootstrap`>")
    config = options.dht_config(peers=peers, ephemeral=True, client_mode=True, startup_timeout=startup_timeout)
    with open_dht(config) as node:
        swarm = Swarm(node)
        if run:
            view = read_run(swarm, run)
            if view is None:
                known = ", ".join(e.run_id for e in swarm.list_runs()) or "none"
                raise IslesError(
                    f"run {run} not found in the swarm (runs it knows: {known})",
                    hint="`isles status --peers ...` without --run lists the runs; is its bootstrap node running?",
                )
            views = [view]
        else:
            views = [v for entry in swarm.list_runs() if (v := read_run(swarm, entry.run_id)) is not None]
    if as_json:
        output.print_json({"runs": [v.to_json() for v in views]})
        return
    if not views:
        output.stdout.print("No runs announced in this swarm yet (publish one: isles bootstrap --manifest FILE).")
    for view in views:
        _print_run(view)


def _short(peer_id: str | None) -> str:
    return "-" if not peer_id else f"…{peer_id[-8:]}"


def _print_run(view) -> None:
    from rich.markup import escape
    from rich.table import Table

    from isles.protocol.swarm_view import format_eta

    # Names, peer ids and reasons come from other peers' records: escaped, so markup in them is shown, never parsed
    # (an unmatched "[/x]" would otherwise crash `isles status` for everyone).
    counts = view.counts
    output.stdout.print(
        f"[bold]Run {escape(view.run_id)}[/bold] {escape(view.name)} ({escape(view.dataset)}): "
        f"{len(view.peers_online)} peers online; "
        f"{counts['released']} released, {counts['claimed']} claimed, {counts['open']} open"
    )
    table = Table(show_edge=False, pad_edge=False)
    for column in ("unit", "state", "owner", "progress", "samples/s", "ETA", "heartbeat"):
        table.add_column(column, no_wrap=True)
    for u in view.units:
        progress = (
            f"{u.step}/{u.steps}" if u.steps else ("-" if u.checkpoint_step is None else f"ckpt {u.checkpoint_step}")
        )
        table.add_row(
            escape(u.unit),
            u.state
            + (f" ({u.claimants} racing)" if u.claimants > 1 else "")
            + (f" ({len(u.stalled)} stalled: {', '.join(_short(p) for p in u.stalled)})" if u.stalled else ""),
            escape(_short(u.owner)),
            progress,
            f"{u.samples_per_s:.1f}" if u.samples_per_s else "-",
            format_eta(u.eta_s),
            "-" if u.heartbeat_age_s is None else f"{u.heartbeat_age_s:.0f}s ago",
        )
    output.stdout.print(table)
    states = {p["peer_id"]: p for p in view.presence}
    if view.peers_online:
        described = []
        for peer in view.peers_online:
            p = states.get(peer)
            described.append(_short(peer) + (f" ({p['state']}{' ' + p['unit'] if p['unit'] else ''})" if p else ""))
        output.stdout.print("Peers online: " + escape(", ".join(described)))
    if view.ensemble:
        e = view.ensemble
        output.stdout.print(escape(f"Ensemble: {e['repo']}@{e['revision'][:12]} ({len(e['experts'])} experts)"))
    for r in view.rejections:
        line = f"Rejected: {r['unit']} {r['revision'][:12]} by {_short(r['owner'])}: {r['reason']}"
        output.stdout.print(escape(line))
