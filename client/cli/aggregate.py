"""`isles aggregate`: verify every release of a run, keep one per unit, and publish the ensemble as it grows."""

from __future__ import annotations

from pathlib import Path

import typer

from . import options, output
from .join import swarm_config


def register(app: typer.Typer) -> None:
    app.command("aggregate")(aggregate)


def aggregate(
    peers: options.Peers = None,
    run: str = typer.Option(None, "--run", help="Run id (default: the swarm's only open run)."),
    store: str = typer.Option(None, "--store", help="Store the releases are in (default: the run's)."),
    to: str = typer.Option(None, "--to", help="Ensemble repo to publish (default: <run id>-ensemble)."),
    to_store: str = typer.Option(None, "--to-store", help="Publish the ensemble to this store (default: --store)."),
    once: bool = typer.Option(False, "--once", help="One pass over the releases, then exit."),
    until_complete: bool = typer.Option(False, "--until-complete", help="Exit once every unit is published."),
    poll_period: float = typer.Option(10.0, "--poll-period", help="Seconds between passes."),
    sample_steps: int = typer.Option(30, "--sample-steps", min=1, help="Euler steps of the model card's samples."),
    replay_fraction: float = typer.Option(
        0.1, "--replay-fraction", min=0.0, max=1.0, help="Share of pushed checkpoints verified by replaying training."
    ),
    work_dir: Path = options.work_dir_option("aggregate", "Pulled releases and the ensemble."),
    identity: options.IdentityDir = None,
    summary: Path = typer.Option(None, "--summary", help="Also write the summary JSON to this file."),
    client_mode: options.ClientMode = True,
    host_maddrs: options.HostMaddrs = None,
    announce_maddrs: options.AnnounceMaddrs = None,
    startup_timeout: options.StartupTimeout = 30.0,
    as_json: options.Json = False,
) -> None:
    """Verify releases (hashes, config, finite weights, held-out loss) and publish the ensemble whenever it grows.

    Rejected releases are recorded with the reason (see `isles status`). Restarting is harmless: the state is rebuilt
    from the DHT and the store, and the same releases give the same ensemble revision.
    """
    from isles.client.aggregate import AggregateConfig, run_aggregator
    from isles.client.handoff import StopSignals

    config = AggregateConfig(
        swarm=swarm_config(peers, identity, client_mode, host_maddrs, announce_maddrs, startup_timeout),
        run_id=run,
        store=store,
        to=to,
        to_store=to_store,
        work_dir=work_dir,
        once=once,
        until_complete=until_complete,
        poll_period=poll_period,
        sample_steps=sample_steps,
        replay_fraction=replay_fraction,
        summary=summary,
    )
    with StopSignals("stopping after this pass") as signals:
        result = run_aggregator(config, stop=signals.event)
    if as_json:
        output.print_json(result)
    else:
        output.stdout.print(
            f"ensemble: {result['ensemble']}  ({result['repo']}@{(result['revision'] or '-')[:12]}, "
            f"{sum(u['state'] == 'accepted' for u in result['units'])}/{len(result['units'])} units, "
            f"{len(result['rejections'])} rejected)"
        )
