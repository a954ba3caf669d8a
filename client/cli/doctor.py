"""`isles doctor`: one screen that says what this machine can do for a run and what to fix, with numbered steps.

isles doctor [--peers MADDR] [--store URI] [--json]      # exit 1 when something must be fixed (healthchecks)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import options, output


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)


def doctor(
    peers: options.Peers = None,
    store: Annotated[
        str | None, typer.Option("--store", metavar="URI", help="Check this store: hf://<namespace> or a folder.")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    preset: Annotated[
        list[str] | None,
        typer.Option("--preset", metavar="NAME", help="Measure a training step of this preset (repeatable)."),
    ] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Batch of the measured training steps.")] = 8,
    measure: Annotated[
        bool, typer.Option("--measure/--no-measure", help="Measure training steps (off: a quick healthcheck).")
    ] = True,
    work_dir: Path = options.work_dir_option("join", "The folder whose disk is checked."),
    host_maddrs: options.HostMaddrs = None,
    announce_maddrs: options.AnnounceMaddrs = None,
    startup_timeout: options.StartupTimeout = 30.0,
    as_json: options.Json = False,
) -> None:
    """Check this machine for volunteering: device and memory, a measured training step per preset, free disk, the p2p
    daemon, the peers (latency, clock skew), this peer's reachability, the store and its auth.

    Every problem comes with numbered steps to fix it. Exits 1 when something must be fixed.
    """
    from isles.client.doctor import DoctorConfig, run_doctor, to_json
    from isles.experts.presets import get_preset

    for name in preset or ():
        get_preset(name)  # an unknown preset: one error line with the list
    config = DoctorConfig(
        peers=options.parse_peers(peers),
        store=store,
        device=device,
        work_dir=work_dir,
        presets=tuple(preset or ()),
        batch=batch,
        measure=measure,
        host_maddrs=options.parse_maddrs(host_maddrs, "--host-maddrs") or ("/ip4/0.0.0.0/tcp/0",),
        announce_maddrs=options.parse_maddrs(announce_maddrs, "--announce-maddrs"),
        startup_timeout=startup_timeout,
    )
    checks = run_doctor(config)
    if as_json:
        output.print_json(to_json(checks))
    else:
        _print(checks)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


def _print(checks) -> None:
    problems = [c for c in checks if not c.ok]
    width = max(len(c.name) for c in checks)
    out = output.stdout
    for c in checks:
        mark = "ok  " if c.ok else "FAIL"
        out.print(f"{mark} {c.name:<{width}}  {c.detail}", markup=False, highlight=False)
        for i, step in enumerate(c.fix, 1):
            out.print(f"     {'':<{width}}  {i}. {step}", markup=False, highlight=False)
    summary = (
        "everything needed works"
        if not problems
        else f"{len(problems)} to fix: " + ", ".join(c.name for c in problems)
    )
    out.print(summary, markup=False, highlight=False)
