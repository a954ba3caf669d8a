"""`isles demo`: partition digits, start a bootstrap node, volunteers and an aggregator on 127.0.0.1, sample."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import typer

from isles.protocol.errors import IslesError

from . import output


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    experts: int = typer.Option(None, "--experts", min=2, help="Number of expert shards (default 4; 2 with --text)."),
    volunteers: int = typer.Option(None, "--volunteers", min=1, help="Number of volunteer processes (default 2)."),
    quick: bool = typer.Option(False, "--quick", help="Tiny recipe: under 2 minutes on 2 CPU cores."),
    text: bool = typer.Option(
        False,
        "--text",
        help="Text-to-image: captioned procedural items, PixArt experts, a grid per prompt (~35 min).",
    ),
    work_dir: Path = typer.Option(
        None, "--work-dir", help="Folder for the store, logs and models (default: a new temp folder)."
    ),
    video: bool = typer.Option(
        False,
        "--video",
        help="Text-to-video: procedural moving digits and shapes, Wan experts, a GIF of clips per prompt (~1 h).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for the partition and every recipe."),
    quiet: bool = typer.Option(False, "--quiet", help="Do not echo the processes' logs."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
) -> None:
    """The whole system on one machine: every role is its own process talking over a real DHT on 127.0.0.1."""
    from isles.client.demo import FULL, QUICK, TEXT_FULL, TEXT_QUICK, VIDEO_FULL, VIDEO_QUICK, DemoConfig, run_demo

    if text and video:
        raise IslesError("pick --text or --video, not both", hint="isles demo --video --quick")
    if video:
        recipe = VIDEO_QUICK if quick else VIDEO_FULL
    elif text:
        recipe = TEXT_QUICK if quick else TEXT_FULL
    else:
        recipe = QUICK if quick else FULL
    experts = experts or recipe.experts
    volunteers = volunteers or recipe.volunteers
    recipe = dataclasses.replace(recipe, experts=experts, volunteers=volunteers)
    if work_dir is None:
        work_dir = Path(tempfile.mkdtemp(prefix="isles-demo-"))
    elif work_dir.exists() and any(work_dir.iterdir()):
        raise IslesError(f"--work-dir {work_dir} is not empty", hint="choose a new folder, or delete that one first")
    config = DemoConfig(
        work_dir=work_dir, recipe=recipe, experts=experts, volunteers=volunteers, seed=seed, echo=not quiet
    )

    def log(line: str) -> None:
        output.stderr.print(line, markup=False, highlight=False)

    from isles.client.handoff import StopSignals

    with StopSignals("stopping the demo's processes") as signals:
        summary = run_demo(config, log, stop=signals.event)
    if as_json:
        output.print_json(summary)
        return
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    table = Table(title=f"isles demo: run {summary.get('run_id')}")
    for column in ("unit", "trained by", "steps", "resumed from", "train s", "val loss", "threshold"):
        table.add_column(column)
    for unit in summary.get("units", []):
        table.add_row(
            unit["unit"],
            str(unit.get("trained_by", "-")),
            str(unit.get("steps", "-")),
            str(unit.get("resumed_from_step") or "-"),
            _fmt(unit.get("wall_s"), ".1f"),
            _fmt(unit.get("val_loss"), ".4f"),
            _fmt(unit.get("threshold"), ".4f"),
        )
    output.stdout.print(table)
    output.stdout.print(f"ensemble: {summary.get('ensemble')}")
    output.stdout.print(f"samples:  {summary.get('samples')}")
    if summary.get("prompt_grid"):
        output.stdout.print(f"prompts:  {summary['prompt_grid']} (one row per prompt)")
    if summary.get("clips_gif"):
        output.stdout.print(
            f"clips:    {summary['clips_gif']} ({summary['clips_mp4']}; frame by frame: {summary['clips_frames']})"
        )
    output.stdout.print(
        f"store:    {summary.get('store_uri')} repo {summary.get('repo')} rev {summary.get('revision')}"
    )
    output.stdout.print(f"logs:     {summary.get('logs')}")
    output.stdout.print(
        f"took {summary.get('wall_s')} s. Sample again: isles sample {summary.get('ensemble')} --out grid.png"
    )


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)
