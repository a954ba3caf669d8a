"""`isles eval MODEL`: FID (beside its real-vs-real floor), class accuracy, diversity and cost, one row per routing;
text models add text-image agreement on the procedural set (and a CLIP score with --clip-model).

`isles eval ./ensemble --n 1000 --routing top1 --routing full --json-out eval.json`; MODEL may also be one expert's
folder (a diffusers folder with expert.json), or a repo of --store.
"""

from __future__ import annotations

from pathlib import Path

import typer

from . import output


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)


def eval_command(
    model: str = typer.Argument(..., help="Ensemble folder, one expert's folder, or a repo name in --store."),
    n: int = typer.Option(1000, "--n", min=2, help="Samples per row, and held-out real items in the reference."),
    routing: list[str] = typer.Option(
        None, "--routing", help="Routing mode to evaluate, repeatable: top1, top2, topk:K, full, threshold:P."
    ),
    data: str = typer.Option(
        None, "--data", help="Data set for the reference: digits, procedural[:N[:SEED]], a folder (default: recorded)."
    ),
    steps: int = typer.Option(30, "--steps", min=1, help="Solver steps per sample."),
    solver: str = typer.Option("euler", "--sampler", help="ODE solver: euler, heun, dpm++2m or unipc."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    guidance: float = typer.Option(
        None, "--guidance", help="Classifier-free guidance per expert (1 = off; default: 4.5 for text models, else 1)."
    ),
    clip_model: str = typer.Option(
        None, "--clip-model", help="Text models: also the CLIP score with this CLIP (clip, clip-l, hf:<id>, folder)."
    ),
    batch_size: int = typer.Option(250, "--batch-size", min=1, help="Samples generated at once."),
    inception: bool = typer.Option(
        False, "--inception", help='Also the Inception FID (needs: pip install "isles\\[fid]").'
    ),
    store: str = typer.Option(None, "--store", help="Store holding MODEL as a repo (hf://<namespace> or a folder)."),
    revision: str = typer.Option(None, "--revision", help="Revision of the repo (default: the newest)."),
    device: str = typer.Option(None, "--device", help="cpu, cuda or mps (default: the best available)."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Feature-network cache (default: user cache dir)."),
    json_out: Path = typer.Option(None, "--json-out", help="Also write the rows to this JSON file."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON on stdout instead of a table."),
) -> None:
    """Evaluate a model or an ensemble against held-out real items; prints one row per routing mode."""
    from isles.experts.device import pick_device
    from isles.experts.solvers import check_solver
    from isles.protocol.errors import IslesError
    from isles.protocol.files import atomic_write_json
    from isles.router.evaluate import (
        EvalConfig,
        build_reference,
        evaluate,
        load_sampler,
        sampler_frames,
        sampler_shape,
    )
    from isles.router.sampling import parse_routing

    routings = tuple(str(parse_routing(r)) for r in (routing or ["top1", "top2", "full"]))
    solver = check_solver(solver)
    if not Path(model).exists() and store is None:
        raise IslesError(f"no model at {model}", hint="pass an ensemble or expert folder, or a repo with --store")
    dev = str(pick_device(device))
    with output.stderr.status(f"loading {model}"):
        sampler, recorded = load_sampler(model, store=store, revision=revision, device=dev)
    if guidance is None:
        guidance = 4.5 if sampler.conditioning == "text" else 1.0
    config = EvalConfig(
        n=n, routings=routings, steps=steps, solver=solver, seed=seed, batch_size=batch_size, guidance_scale=guidance,
        inception=inception, device=dev, cache_dir=cache_dir, clip_model=clip_model,
    )  # fmt: skip
    source = data or recorded
    if not source:
        raise IslesError("the model does not record its data set", hint="pass --data (e.g. --data digits)")
    channels, resolution = sampler_shape(sampler)
    with output.stderr.status(f"reference: {n} held-out items of {source} (may train the feature network once)"):
        reference = build_reference(
            source, n, channels, resolution, cache_dir=cache_dir, device=dev, frames=sampler_frames(sampler)
        )
    metric = "FVD (classifier features)" if reference.is_video else "FID"
    output.stderr.print(
        f"reference: {reference.n} items of {source}; real-vs-real {metric} floor {reference.floor:.3f}"
    )
    rows = evaluate(sampler, reference, config)
    result = {"model": model, "data": source, "rows": rows}
    if json_out is not None:
        atomic_write_json(json_out, result)
        output.stderr.print(f"wrote {json_out}")
    if as_json:
        output.print_json(result)
        return
    output.stdout.print(rows_table(rows, title=f"isles eval {model} on {source}"))


def rows_table(rows: list[dict], title: str = ""):
    """A rich table of evaluation rows; the caption gives what real held-out items score."""
    from rich.table import Table

    caption = ""
    if rows:
        r = rows[0]
        metric = "FVD" if r.get("video") else "FID"
        caption = f"n = {r['n']}, {r['steps']} {r.get('solver', 'euler')} steps; real held-out items: {metric} floor "
        caption += f"{_fmt(r['fid_floor'], '.3f')}, "
        caption += f"accuracy {_fmt(r['real_accuracy'], '.3f')}, diversity {_fmt(r['real_diversity'], '.2f')}"
    table = Table(title=title, caption=caption)
    columns = [
        ("routing", "routing", "s"),
        ("FVD" if any(r.get("video") for r in rows) else "FID", "fid", ".3f"),
        ("floor", "fid_floor", ".3f"),
        ("accuracy", "accuracy", ".3f"),
        ("diversity", "diversity", ".2f"),
        ("s/sample", "seconds_per_sample", ".4f"),
        ("expert calls/sample", "expert_calls_per_sample", ".1f"),
    ]
    if any("inception_fid" in r for r in rows):
        columns.insert(3, ("Inception FID", "inception_fid", ".2f"))
    if any("agreement" in r for r in rows):  # text models on the procedural sets
        names = [k for k in rows[0]["agreement"] if k != "all"]
        for attribute in ["all", *names]:
            columns.insert(-2, (f"agree {attribute}", f"agreement.{attribute}", ".3f"))
    if any("clip_score" in r for r in rows):
        columns.insert(-2, ("CLIP score", "clip_score", ".2f"))
    for name, _, _ in columns:
        table.add_column(name, justify="left" if name == "routing" else "right")
    for row in rows:
        table.add_row(*[_fmt(_get(row, key), fmt) for _, key, fmt in columns])
    if rows and "agreement" in rows[0]:
        chance, real = rows[0]["agreement_chance"], rows[0]["real_agreement"]
        table.caption += f"; agreement: real items {real:.3f}, chance " + ", ".join(
            f"{k} {v:.3f}" for k, v in chance.items()
        )
    return table


def _get(row: dict, key: str):
    """row[key], where "a.b" reads row["a"]["b"]."""
    for part in key.split("."):
        row = row.get(part) if isinstance(row, dict) else None
    return row


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "-"
    return format(value, fmt) if fmt != "s" else str(value)
