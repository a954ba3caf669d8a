"""`isles verify`: check that a checkpoint really comes from training, by replaying the segment before it.

`isles verify --manifest run/manifest.json --unit expert-0 ckpt-000000200.isles ckpt-000000400.isles`
replays the recipe from the first checkpoint on the unit's shard to the second's step and compares the weights:
exact on a CPU, within `--tolerance` (a fraction of the segment's update) across hardware. Exit 0: verified.
Given one checkpoint, the replay starts from the recipe's seeded initial weights (step 0).
"""

from __future__ import annotations

from pathlib import Path

import typer

from . import options, output


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)


def verify(
    first: Path = typer.Argument(..., help="The earlier checkpoint (a ckpt-<step>.isles file), or the only one."),
    second: Path = typer.Argument(
        None, help="The later checkpoint, claimed to follow from the earlier by training (none: from step 0)."
    ),
    manifest: Path = typer.Option(..., "--manifest", metavar="FILE", help="The run's manifest.json."),
    unit: str = typer.Option(..., "--unit", help="The unit the checkpoints are of: expert-<i> or router."),
    store: str = typer.Option(None, "--store", help="Where to pull the shard from (default: the run's store)."),
    tolerance: float = typer.Option(
        0.0, "--tolerance", min=0.0, help="Allowed error, as a fraction of the segment's update (0: exact, on CPU)."
    ),
    work_dir: Path = options.work_dir_option("verify", "Shards and the replay go here."),
    as_json: options.Json = False,
) -> None:
    """Replay training between two checkpoints of a unit and check it lands on the second one."""
    from isles.client.run_access import shard_stores, unit_task
    from isles.experts.replay import replay_segment
    from isles.experts.trainer import TrainRecipe
    from isles.protocol.artifacts import open_store
    from isles.protocol.errors import IslesError
    from isles.protocol.records import load_manifest_json

    start, end = (first, second) if second is not None else (None, first)
    for path in (manifest, start, end):
        if path is not None and not path.is_file():
            raise IslesError(f"{path} not found", hint="pass the run's manifest.json and one or two checkpoint files")
    m = load_manifest_json(manifest.read_text(), source=str(manifest))
    if unit not in m.units:
        raise IslesError(f"run {m.run_id} has no unit {unit!r}", hint=f"use one of: {', '.join(m.units)}")
    stores = shard_stores(m.store, open_store(store or m.store), None)
    work = Path(work_dir) / m.run_id
    task, r = unit_task(m, unit, stores, work / "shards")
    recipe = TrainRecipe(
        steps=r.steps, global_batch=r.global_batch, lr=r.lr, warmup_steps=r.warmup_steps, ema_decay=r.ema_decay,
        seed=r.seed, checkpoint_every_steps=None, checkpoint_every_seconds=None,
    )  # fmt: skip
    result = replay_segment(task, recipe, start, end, work / "replay", tolerance=tolerance)
    summary = {
        "unit": unit,
        "start_step": result.start_step,
        "end_step": result.end_step,
        "relative_error": result.relative_error,
        "exact": result.exact,
        "verified": result.ok,
    }
    if as_json:
        output.print_json(summary)
    else:
        output.stdout.print(f"{unit}: steps {result.start_step} -> {result.end_step}: {result.verdict}", markup=False)
    if not result.ok:
        raise IslesError(
            f"{end.name} is not what training {unit} from {start.name if start else 'step 0'} on its shard gives "
            f"(relative error {result.relative_error:.3g} > tolerance {tolerance:g})",
            hint="these checkpoints were not trained on this unit's shard under its recipe (or on other hardware: "
            "pass --tolerance, e.g. 0.01)",
        )
