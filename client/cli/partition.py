"""`isles partition SOURCE --experts K --out DIR`: cluster a data set into shards and write the run manifest.

`isles partition digits --experts 4 --out runs/digits --preset unet-tiny --steps 2000 --objectives mixed:1`
`isles partition captions/ --conditioning text --text-encoder clip --vae hf:stabilityai/sd-vae-ft-mse ...`
"""

from __future__ import annotations

from pathlib import Path

import typer

from . import output


def register(app: typer.Typer) -> None:
    app.command("partition")(partition)


def partition(
    source: str = typer.Argument(
        ...,
        help="digits, procedural[:N], procedural-video[:N], a folder of images (class subfolders; or captions in "
        "metadata.jsonl / .txt), WebDataset tars (a .tar, a folder of them, or shards-{0000..0009}.tar), or "
        "hf:<dataset>[:split]; with --frames, videos (mp4, webm, ...) in a folder, tars or an hf data set.",
    ),
    experts: int = typer.Option(..., "--experts", "-k", help="Number of clusters = experts."),
    out: Path = typer.Option(..., "--out", help="Run folder: manifest.json, shards/, clusters/ and the local store."),
    store: str = typer.Option(None, "--store", help="Where shards are published: hf://<namespace> or a folder."),
    name: str = typer.Option(None, "--name", help="Run name (default: from the source)."),
    encoder: str = typer.Option("pixels", "--encoder", help="pixels, pixels:D, dinov2, clip or hf:<model id>."),
    resolution: int = typer.Option(None, "--resolution", help="Resize items to this size (default: the source's)."),
    preset: str = typer.Option("unet-tiny", "--preset", help="Expert model preset (see `isles presets`)."),
    steps: int = typer.Option(2000, "--steps", min=1, help="Training steps of every expert (the mean, if split)."),
    steps_split: str = typer.Option(
        "equal", "--steps-split", help="equal (every expert --steps) or proportional (to its shard; same total)."
    ),
    objectives: str = typer.Option(
        "fm", "--objectives", help="fm, ddpm, ddpm-v, mixed:N or mixed-v:N (N DDPM or DDPM-v experts)."
    ),
    global_batch: int = typer.Option(64, "--batch", min=1, help="Global batch of every expert."),
    lr: float = typer.Option(2e-4, "--lr", help="Expert learning rate."),
    router_preset: str = typer.Option("cnn-small", "--router-preset", help="cnn-tiny, cnn-small or cnn-base."),
    router_steps: int = typer.Option(2000, "--router-steps", min=1, help="Training steps of the router."),
    router_text: bool = typer.Option(
        False, "--router-text", help="Text runs: the router also reads the prompt (the papers' router does not)."
    ),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Share of every cluster held out."),
    seed: int = typer.Option(0, "--seed", help="Seed of the encoder fit, k-means, splits and recipes."),
    conditioning: str = typer.Option(
        None, "--conditioning", help="class, text (captions) or none (default: class if labelled, else none)."
    ),
    text_encoder: str = typer.Option(
        "clip", "--text-encoder", help="Caption encoder: clip (CLIP ViT-L/14), minilm (offline), hf:<id> or a folder."
    ),
    text_max_length: int = typer.Option(None, "--text-max-length", min=1, help="Tokens per caption (default: 77)."),
    caption_dropout: float = typer.Option(0.1, "--caption-dropout", help="Share of captions (or labels) dropped."),
    hflip: bool = typer.Option(
        False, "--hflip", help="Experts train on random left-right flips (not if captions name left and right)."
    ),
    vae: str = typer.Option(None, "--vae", help="Encode items once with this AutoencoderKL (hf:<id> or a folder)."),
    image_column: str = typer.Option(None, "--image-column", help="hf: and tar sources: the image column."),
    caption_column: str = typer.Option(None, "--caption-column", help="The caption column (default: text/caption)."),
    limit: int = typer.Option(None, "--limit", min=1, help="Read at most this many items of the source."),
    frames: int = typer.Option(
        None, "--frames", min=2, help="Video: frames per clip (the source holds videos; procedural-video: 16)."
    ),
    fps: float = typer.Option(
        None, "--fps", min=0.1, help="Video files: frames sampled per second (default: every frame of the file)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the run id, manifest path and clusters as JSON."),
    identity: Path = typer.Option(
        None, "--identity", metavar="DIR", help="The run owner's identity, which signs the manifest (default: yours)."
    ),
    progress_timeout: float = typer.Option(
        900.0, "--progress-timeout", min=1.0, help="Seconds a lease holder may go without a verified checkpoint."
    ),
    aggregators: list[str] = typer.Option(
        None,
        "--aggregator",
        metavar="KEY",
        help="An aggregator's public key (ssh-rsa ...) or identity folder; repeatable (default: the owner).",
    ),
) -> None:
    """Embed every item, cluster with k-means, write and publish one shard per cluster, write the run manifest."""
    from isles.experts.presets import get_preset, is_text_preset
    from isles.protocol.errors import IslesError
    from isles.protocol.identity import parse_owner_key
    from isles.router.model import ROUTER_PRESETS
    from isles.router.partition import PartitionConfig, parse_objectives, split_steps
    from isles.router.partition import partition as run_partition

    from .sample import image_grid, save_png

    parse_objectives(objectives, max(experts, 1))  # fail fast, before loading any data
    split_steps(steps, [1], steps_split)
    if router_preset not in ROUTER_PRESETS:
        raise IslesError(f"unknown router preset {router_preset!r}", hint=f"use one of: {', '.join(ROUTER_PRESETS)}")
    get_preset(preset)  # fail fast on an unknown preset too
    if conditioning is not None and conditioning not in ("class", "text", "none"):
        raise IslesError(f"unknown conditioning {conditioning!r}", hint="use class, text or none")
    if is_text_preset(preset) != (conditioning == "text"):
        hint = "pixart-tiny with --conditioning text" if conditioning == "text" else "a unet-*/dit-* preset"
        raise IslesError(f"preset {preset} does not fit {conditioning or 'class'} conditioning", hint=f"use {hint}")
    from isles.experts.presets import is_video_preset
    from isles.experts.procedural_video import is_procedural_video

    video = frames is not None or is_procedural_video(source)
    if is_video_preset(preset) != video:
        if video:
            raise IslesError(
                f"{source} holds clips, {preset} is an image preset",
                hint="use a video preset: unet-frames-tiny or wan-tiny",
            )
        raise IslesError(
            f"{preset} is a video preset, {source} holds images",
            hint="pass --frames N for a source of videos, or pick an image preset",
        )
    if not 0.0 <= caption_dropout < 1.0:
        raise IslesError(f"--caption-dropout must be in [0, 1), got {caption_dropout}")
    config = PartitionConfig(
        source=source,
        experts=experts,
        out=out,
        store=store,
        name=name,
        encoder=encoder,
        resolution=resolution,
        val_fraction=val_fraction,
        seed=seed,
        preset=preset,
        objectives=objectives,
        steps=steps,
        steps_split=steps_split,
        global_batch=global_batch,
        lr=lr,
        router_preset=router_preset,
        router_steps=router_steps,
        router_text=router_text,
        conditioning=conditioning,
        text_encoder=text_encoder,
        text_max_length=text_max_length,
        cond_dropout=caption_dropout,
        hflip=hflip,
        vae=vae,
        image_column=image_column,
        caption_column=caption_column,
        limit=limit,
        frames=frames,
        fps=fps,
        identity=identity,
        progress_timeout=progress_timeout,
        aggregators=tuple(parse_owner_key(a) for a in aggregators or ()),
    )
    with output.progress(transient=True) as bar:
        tasks: dict[str, object] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, info="")
            bar.update(tasks[stage], completed=done)

        result = run_partition(config, on_progress)

    strips = []
    for c, examples in enumerate(result.examples):
        path = out / "clusters" / f"cluster-{c}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = _preview(examples)
        if pixels.ndim == 5:  # clips: a looping GIF of them and a sheet of their frames
            from isles.experts.video_files import save_clip_grid_gif, save_frame_sheet

            clips = pixels.float() / 127.5 - 1
            save_clip_grid_gif(clips, path.with_suffix(".gif"), nrow=len(clips), scale=max(1, 32 // clips.shape[-1]))
            save_frame_sheet(clips, path, scale=max(1, 32 // clips.shape[-1]))
        else:
            save_png(image_grid(pixels, cols=len(pixels), scale=max(1, 32 // pixels.shape[-1])), path)
        strips.append(str(path))
    manifest = result.manifest
    total = sum(result.sizes)
    rows = []
    for c, (size, val, counts) in enumerate(zip(result.sizes, result.val_sizes, result.class_counts, strict=True)):
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
        rows.append(
            {
                "cluster": c,
                "items": size,
                "share": size / total,
                "val_items": val,
                "objective": manifest.experts[c].objective,
                "top_classes": {str(k): v for k, v in top},
                "examples": strips[c],
                "captions": result.captions[c] if result.captions else [],
            }
        )
    if as_json:
        output.print_json(
            {
                "run_id": manifest.run_id,
                "manifest": str(result.manifest_path),
                "store": manifest.store,
                "items": total,
                "skipped": result.skipped,
                "skipped_examples": result.skipped_examples or [],
                "skipped_short": result.skipped_short,
                "clusters": rows,
            }
        )
        return
    from rich.table import Table

    table = Table(title=f"run {manifest.run_id}: {manifest.name}, {len(rows)} clusters of {total} items")
    for column in ("cluster", "items", "share", "held out", "objective", "main classes", "a caption"):
        table.add_column(column)
    for row in rows:
        classes = ", ".join(f"{k} ({v})" for k, v in row["top_classes"].items()) or "-"
        table.add_row(
            str(row["cluster"]),
            str(row["items"]),
            f"{row['share']:.1%}",
            str(row["val_items"]),
            row["objective"],
            classes,
            (row["captions"] or ["-"])[0],
        )
    output.stdout.print(table)
    if result.skipped:
        examples = ", ".join(result.skipped_examples or [])
        output.stdout.print(f"skipped:  {result.skipped} items that could not be decoded ({examples})")
    if result.skipped_short:
        output.stdout.print(f"skipped:  {result.skipped_short} videos shorter than half of --frames (shorter: padded)")
    output.stdout.print(f"run id:   {manifest.run_id}")
    output.stdout.print(f"manifest: {result.manifest_path}")
    output.stdout.print(f"examples: {Path(strips[0]).parent}/cluster-<i>.png")
    output.stdout.print(f"shards:   {manifest.shards[0].repo}@{manifest.shards[0].revision[:12]} in {manifest.store}")


def _preview(items):
    """uint8 pixels as they are; float latents as their first channel, min-max scaled (a rough look, not a decode)."""
    import torch

    if items.dtype == torch.uint8:
        return items
    x = items[:, :1].float()
    lo, hi = x.amin(), x.amax()
    return ((x - lo) / (hi - lo + 1e-8) * 255).round().to(torch.uint8)
