"""`isles join`: volunteer this machine to a run: claim a unit, train it, publish it, repeat until the run is done."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from . import options, output


def register(app: typer.Typer) -> None:
    app.command("join")(join)


def swarm_config(peers, identity, client_mode, host_maddrs, announce_maddrs, startup_timeout):
    """The DHT config of `join` and `aggregate`: the identity defaults to the persistent one in the user's config
    dir, so a restarted volunteer keeps its peer id and its claims."""
    return options.dht_config(
        peers=peers,
        identity=identity,
        host_maddrs=host_maddrs,
        announce_maddrs=announce_maddrs,
        client_mode=client_mode,
        startup_timeout=startup_timeout,
    )


def join(
    peers: options.Peers = None,
    run: str = typer.Option(None, "--run", help="Run id (default: the swarm's only open run)."),
    store: str = typer.Option(
        None, "--store", help="Artifact store: hf://<namespace> or a folder (default: the run's)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    max_units: int = typer.Option(None, "--max-units", min=1, help="Stop after training this many units."),
    work_dir: Path = options.work_dir_option("join", "Shards, checkpoints and exports go here."),
    identity: options.IdentityDir = None,
    checkpoint_period: float = typer.Option(180.0, "--checkpoint-period", help="Seconds between checkpoint pushes."),
    lease_ttl: options.LeaseTtl = 60.0,
    heartbeat_period: options.HeartbeatPeriod = 15.0,
    settle_period: options.SettlePeriod = 3.0,
    name: str = typer.Option("", "--name", help="Your name in model cards (default: your peer id)."),
    client_mode: options.ClientMode = True,
    host_maddrs: options.HostMaddrs = None,
    announce_maddrs: options.AnnounceMaddrs = None,
    startup_timeout: options.StartupTimeout = 30.0,
    contact_timeout: float = typer.Option(
        120.0, "--contact-timeout", min=0.0, help="Seconds to keep retrying unreachable --peers (0: try once)."
    ),
    micro_batch: int = typer.Option(None, "--micro-batch", min=1, help="Items per forward pass (default: auto)."),
    max_unit_hours: float = typer.Option(
        None,
        "--max-unit-hours",
        min=0.0,
        help="Leave units a measured training step says would take longer than this here (default: no limit).",
    ),
    gpus: int = typer.Option(1, "--gpus", min=1, help="Train each unit data-parallel on N GPUs (under torchrun)."),
    plain: bool = typer.Option(None, "--plain/--live", help="Plain log lines or the live panel (default: by tty)."),
    as_json: options.Json = False,
) -> None:
    """Volunteer this machine: claim a unit of the run with a lease, train it, publish it, and take the next one.

    Ctrl-C or SIGTERM hands the current unit back cleanly (checkpoint, push, withdraw) and exits 0.
    """
    from isles.client.handoff import StopSignals
    from isles.client.join import JoinConfig
    from isles.client.join_ranks import run_ranks
    from isles.experts.distributed import exec_torchrun

    options.lease_settings(lease_ttl, heartbeat_period, settle_period)  # bad periods: one clear error line
    config = JoinConfig(
        swarm=swarm_config(peers, identity, client_mode, host_maddrs, announce_maddrs, startup_timeout),
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
        max_unit_hours=max_unit_hours,
        contact_timeout=contact_timeout,
    )
    if gpus > 1 and "WORLD_SIZE" not in os.environ:
        exec_torchrun(gpus, sys.argv[1:])  # does not return: each rank runs this command again under torchrun
    with StopSignals() as signals:
        outcomes = run_ranks(config, output.stderr, signals.event)
    if outcomes is None:  # a follower rank of --gpus N: rank 0 reports
        return
    if signals.received:
        output.stderr.print(f"{signals.received}: handed back cleanly.")
    if as_json:
        output.print_json([o.__dict__ for o in outcomes])
        return
    for o in outcomes:
        resumed = f", resumed from step {o.resumed_from_step}" if o.resumed_from_step else ""
        where = f" -> {o.revision[:12]}" if o.revision else ""
        output.stdout.print(f"{o.unit}: {o.state} at step {o.step}{resumed}{where}", markup=False, highlight=False)
