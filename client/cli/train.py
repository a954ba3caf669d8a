"""`isles train-expert`: train one expert (or a monolithic baseline) locally, resumable; `isles presets`: model sizes.

Run `isles train-expert --data digits --preset tiny --steps 2000 --out runs/digits`; run it again to resume.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer

from . import output

log = logging.getLogger("isles.train")


def train_expert(
    data: str = typer.Option(..., "--data", help="Shard file or source: digits, an image folder, hf:<name>."),
    out: str = typer.Option(..., "--out", help="Output folder (checkpoints/, model/); reused to resume."),
    preset: str = typer.Option("tiny", "--preset", help="Model preset (see `isles presets`)."),
    objective: str = typer.Option(
        "fm", "--objective", help="fm (flow matching), ddpm (eps prediction, cosine) or ddpm-v (v prediction, cosine)."
    ),
    steps: int = typer.Option(2000, "--steps", help="Optimizer steps to completion."),
    batch: int = typer.Option(64, "--batch", help="Global batch size (the same on any hardware)."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak AdamW learning rate (constant after warmup)."),
    warmup: int = typer.Option(100, "--warmup", help="Linear warmup steps."),
    ema: float = typer.Option(0.999, "--ema", help="EMA decay of the exported weights."),
    seed: int = typer.Option(0, "--seed", help="Seed for init, data order and noise."),
    sha256: str | None = typer.Option(None, "--sha256", help="Refuse the shard file unless its sha256 matches."),
    unconditional: bool = typer.Option(False, "--unconditional", help="Ignore class labels."),
    label_dropout: float = typer.Option(
        0.1, "--cond-dropout", "--label-dropout", help="Share of labels or captions dropped (for CFG)."
    ),
    micro_batch: int | None = typer.Option(None, "--micro-batch", help="Items per forward pass (default: auto)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, mps (default: the best present)."),
    precision: str = typer.Option(
        "auto",
        "--precision",
        help="auto (bf16 on newer GPUs, fp16 + grad scaler on older ones, else fp32), bf16, fp16, fp32.",
    ),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's choice)."),
    gpus: int = typer.Option(
        1, "--gpus", min=1, help="Data parallel over N GPUs (N processes under torchrun; gloo processes on CPU)."
    ),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="Checkpoint every N steps."),
    checkpoint_minutes: float = typer.Option(10.0, "--checkpoint-minutes", help="... and at least every M minutes."),
    grid: str | None = typer.Option(None, "--grid", help="After training, save a PNG grid of samples here."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Train one expert on a shard (or a monolithic baseline on a whole data set) to completion."""
    import torch

    from isles.experts.conditioning import TextCondition
    from isles.experts.data import load_data
    from isles.experts.distributed import exec_torchrun, init_from_env, leave, local_device
    from isles.experts.expert import ExpertTask, sample_expert, save_grid
    from isles.experts.trainer import TrainRecipe, train
    from isles.protocol.files import sha256_file

    if gpus > 1 and "WORLD_SIZE" not in os.environ:
        exec_torchrun(gpus, sys.argv[1:])  # does not return: each rank runs this command again under torchrun
    if threads:
        torch.set_num_threads(threads)  # several trainers on one machine: one thread each avoids thrashing
    device = local_device(device or "auto")  # each rank its own GPU under torchrun
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    # Followers wait in leave()'s barrier while rank 0 saves, validates and exports: longer than torch's default
    # collective timeout (NCCL 10 min) for a large model. A rank that dies is still caught: torchrun stops the rest.
    world = init_from_env("cuda" if cuda else "cpu", timeout_period=6 * 3600.0)
    if world.size > 1:
        from isles.client.lifetime import die_with_parent

        die_with_parent()  # a killed torchrun takes its ranks along
    device = None if device == "auto" else device
    recipe = TrainRecipe(
        steps=steps,
        global_batch=batch,
        lr=lr,
        warmup_steps=warmup,
        ema_decay=ema,
        seed=seed,
        checkpoint_every_steps=checkpoint_every,
        checkpoint_every_seconds=checkpoint_minutes * 60,
    )
    shard = load_data(data, sha256)
    if sha256 is None and Path(data).is_file():  # the checkpoint identity covers the data: no resuming on other bytes
        sha256 = sha256_file(data)
    task = ExpertTask(
        shard,
        preset=preset,
        objective=objective,
        label_dropout=label_dropout,
        conditioning="none" if unconditional else "auto",
        shard_info={"data": data, "sha256": sha256, "items": len(shard)},
        recipe={**recipe.to_dict(), "preset": preset, "objective": objective},
    )
    output.stderr.print(
        f"training {task.preset} ({objective}) on {len(shard)} items of shape {list(shard.shape)}, "
        f"{steps} steps x {batch}"
    )
    with output.progress() as bar:
        job = bar.add_task("train", total=steps, info="")

        def on_progress(p) -> None:
            bar.update(job, completed=p.step, info=f"loss {p.loss:.4f}  {p.samples_per_s:.0f} samples/s")
            if not output.stderr.is_terminal:
                log.info("step %d/%d loss %.4f %.0f samples/s", p.step, p.steps, p.loss, p.samples_per_s)

        result = train(
            task, recipe, out, device=device, micro_batch=micro_batch, precision=precision, progress=on_progress
        )
    leave(world)  # the ranks' last collective was in train()
    if not world.leader:
        return  # rank 0 exports, samples and reports

    summary = {
        "completed": result.completed,
        "step": result.step,
        "model": str(result.export_dir) if result.export_dir else None,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "metrics": result.metrics,
    }
    if grid and result.export_dir is not None:
        from isles.experts.presets import load_model

        model = load_model(result.export_dir).to(result.metrics["hardware"]["device"])
        labels = None
        if task.num_classes:
            labels = torch.arange(task.num_classes).repeat_interleave(max(1, 100 // task.num_classes))[:100]
        elif task.conditioning == "text":  # the held-out items' captions
            val = shard.val_split() if shard.val_mask.any() else shard
            rows = torch.arange(min(100, len(val)))
            labels = TextCondition.from_rows(val.text[rows], val.text_mask[rows])
        n = 100 if labels is None else len(labels)
        clip = None if shard.is_latent else 1.0
        scale = 2.0 if labels is not None else 1.0
        generator = torch.Generator().manual_seed(seed)
        images = sample_expert(
            model, objective, n, 50, labels, scale, generator, clip_x0=clip, null_cond=task.null_condition()
        )
        if shard.is_latent:
            output.stderr.print("the data are latents: the grid shows latent channels, not decoded images")
            images = images[:, :3].clamp(-1, 1)
        save_grid(images, grid, nrow=10)
        summary["grid"] = grid
    if as_json:
        output.print_json(summary)
    else:
        m = result.metrics
        output.stdout.print(
            f"{'done' if result.completed else 'stopped'} at step {result.step}: final loss {m.get('final_loss')}, "
            f"validation loss {m.get('val_loss')}, {m.get('wall_time_s')} s; model in {summary['model']}",
            markup=False,  # a path may hold brackets
        )


def presets(
    channels: int = typer.Option(4, "--channels", help="Data channels (4: SD-VAE latents, 3: RGB, 1: gray)."),
    resolution: int = typer.Option(32, "--resolution", help="Data height = width."),
    num_classes: int | None = typer.Option(1000, "--num-classes", help="Classes (0: unconditional)."),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
) -> None:
    """List the model presets with parameter counts and training FLOPs per sample for a data shape."""
    from isles.experts.presets import describe_presets

    rows = describe_presets(channels, resolution, num_classes or None)
    if as_json:
        output.print_json(rows)
        return
    from rich.table import Table

    table = Table("preset", "params (M)", "train GFLOPs/sample", "note")
    for r in rows:
        if "error" in r:
            table.add_row(r["preset"], "-", "-", r["error"])
        else:
            params, flops = f"{r['parameters'] / 1e6:.1f}", f"{r['train_flops_per_sample'] / 1e9:.2f}"
            table.add_row(r["preset"], params, flops, r["note"])
    output.stdout.print(table)


def register(app: typer.Typer) -> None:
    app.command("train-expert")(train_expert)
    app.command("presets")(presets)
