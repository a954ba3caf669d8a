"""`isles join`: volunteer this machine to a run: claim a unit, train it, publish it, repeat until the run is done."""

from __future__ import annotations

from pathlib import Path

import typer

from . import output

PEERS_HELP = "Multiaddr of a swarm peer (repeatable), as printed by `isles bootstrap`."


def register(app: typer.Typer) -> None:
    app.command("join")(join)


def swarm_options(peers, identity, reachable, host_maddrs, announce_maddrs, startup_timeout=30.0):
    from isles.client.join import SwarmOptions

    return SwarmOptions(
        peers=tuple(peers or ()),
        identity=identity,
        client_mode=not reachable,
        host_maddrs=tuple(host_maddrs or ("/ip4/0.0.0.0/tcp/0",)),
        announce_maddrs=tuple(announce_maddrs or ()),
        startup_timeout=startup_timeout,
    )


def join(
    peers: list[str] = typer.Option(None, "--peers", help=PEERS_HELP),
    run: str = typer.Option(None, "--run", help="Run id (default: the swarm's only open run)."),
    store: str = typer.Option(
        None, "--store", help="Artifact store: hf://<namespace> or a folder (default: the run's)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    max_units: int = typer.Option(None, "--max-units", min=1, help="Stop after training this many units."),
    work_dir: Path = typer.Option(Path("isles-work"), "--work-dir", help="Shards, checkpoints and exports go here."),
    identity: Path = typer.Option(None, "--identity", help="Identity folder (peer id + signing key)."),
    checkpoint_period: float = typer.Option(180.0, "--checkpoint-period", help="Seconds between checkpoint pushes."),
    lease_ttl: float = typer.Option(60.0, "--lease-ttl", help="Seconds a claim lives without a heartbeat."),
    heartbeat_period: float = typer.Option(15.0, "--heartbeat-period", help="Seconds between lease renewals."),
    settle_period: float = typer.Option(3.0, "--settle-period", help="Seconds to wait for racing claims."),
    name: str = typer.Option("", "--name", help="Your name in model cards (default: your peer id)."),
    reachable: bool = typer.Option(False, "--reachable/--client-mode", help="Accept inbound connections."),
    host_maddrs: list[str] = typer.Option(None, "--host-maddrs", help="Listen addresses (with --reachable)."),
    announce_maddrs: list[str] = typer.Option(None, "--announce-maddrs", help="Public addresses to announce."),
    micro_batch: int = typer.Option(None, "--micro-batch", min=1, help="Items per forward pass (default: auto)."),
    plain: bool = typer.Option(None, "--plain/--live", help="Plain log lines or the live panel (default: by tty)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was trained as JSON on stdout at the end."),
) -> None:
    """Volunteer this machine: claim a unit of the run with a lease, train it, publish it, and take the next one.

    Ctrl-C or SIGTERM hands the current unit back cleanly (checkpoint, push, withdraw) and exits 0.
    """
    from isles.client.join import JoinConfig, StopSignals, Volunteer

    config = JoinConfig(
        swarm=swarm_options(peers, identity, reachable, host_maddrs, announce_maddrs),
        run_id=run,
        store=store,
        device=device,
        max_units=max_units,
        work_dir=work_dir,
        checkpoint_period=checkpoint_period,
        lease_ttl=lease_ttl,
        heartbeat_period=heartbeat_period,
        settle_period=settle_period,
        name=name,
        plain=plain,
        micro_batch=micro_batch,
    )
    with StopSignals() as signals:
        outcomes = Volunteer(config, output.stderr, stop=signals.event).run()
    if signals.received:
        output.stderr.print(f"{signals.received}: handed back cleanly.")
    if as_json:
        output.print_json([o.__dict__ for o in outcomes])
        return
    for o in outcomes:
        resumed = f", resumed from step {o.resumed_from_step}" if o.resumed_from_step else ""
        where = f" -> {o.revision[:12]}" if o.revision else ""
        output.stdout.print(f"{o.unit}: {o.state} at step {o.step}{resumed}{where}", markup=False, highlight=False)
