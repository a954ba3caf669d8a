"""`isles sample MODEL`: images from an ensemble (a local folder or a store repo) as a PNG grid; clips from a video
ensemble as an animated GIF, an MP4 and a PNG sheet of their frames (one row per clip).

`isles sample ./ensemble --class 3 --n 16 --routing top2 --steps 30 --seed 0 --out grid.png --show-routing`
`isles sample ./ensemble --prompt "a small red 7 at the top left" --guidance 4.5` (text ensembles; --prompts FILE
gives one labelled row per line)
`isles sample ./video-ensemble --prompt "a red 3 moving right" --out clips.gif --show-routing`
"""

from __future__ import annotations

from pathlib import Path

import typer

from . import output

# One colour per expert for the routing strip (tab10), and its name for the legend.
COLOUR_NAMES = ["blue", "orange", "green", "red", "purple", "brown", "pink", "grey", "olive", "cyan"]
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("sample")(sample)


def image_grid(images, cols: int | None = None, scale: int = 1, pad: int = 1):
    """uint8 [N, C, H, W] (C = 1 or 3) -> a PIL image laid out in a grid with `pad` pixels between items."""
    import math

    import numpy as np
    from PIL import Image

    arr = images.cpu().numpy()
    n, c, h, w = arr.shape
    if c == 1:
        arr = np.repeat(arr, 3, axis=1)
    elif c != 3:
        arr = np.repeat(arr[:, :1], 3, axis=1)  # latents or odd channel counts: show the first channel
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = arr[i].transpose(1, 2, 0)
    image = Image.fromarray(grid)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return image


def labelled_rows(image, labels: list[str], row_height: int, width: int = 360):
    """The grid `image` with a text label left of each row (one row per prompt)."""
    from PIL import Image, ImageDraw

    out = Image.new("RGB", (image.width + width, image.height), (255, 255, 255))
    out.paste(image, (width, 0))
    draw = ImageDraw.Draw(out)
    for i, label in enumerate(labels):
        text = label if len(label) <= 56 else label[:55] + "…"
        draw.text((6, i * row_height + row_height // 2 - 6), text, fill=(0, 0, 0))
    return out


def save_prompt_grid(images, prompts: list[str], per_prompt: int, path: Path, scale: int = 0) -> None:
    """Model-space images, `per_prompt` of each prompt in order, as a PNG with one labelled row per prompt."""
    from isles.experts.data import to_pixels

    scale = scale or max(1, 64 // images.shape[-1])
    grid = image_grid(to_pixels(images), cols=per_prompt, scale=scale)
    save_png(labelled_rows(grid, prompts, row_height=grid.height // len(prompts)), path)


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    from isles.protocol.errors import IslesError

    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise IslesError(
            f"cannot read prompts from {path}: {exc}", hint="pass a text file, one prompt a line"
        ) from None
    if not prompts:
        raise IslesError(f"{path} holds no prompt", hint="write one prompt per line")
    return prompts


def save_png(image, path: Path) -> None:
    """Write a PIL image as PNG atomically, whatever the file's suffix (a bare `--out grid` too)."""
    import io

    from isles.protocol.files import atomic_write_bytes

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def routing_strip(choices, num_experts: int, cell: int = 12):
    """[steps, n] expert indices -> a PIL image: one row per sample, one coloured cell per step (left = noise)."""
    import numpy as np
    from PIL import Image

    steps, n = choices.shape
    strip = np.zeros((n * cell, steps * cell, 3), dtype=np.uint8)
    for s in range(steps):
        for i in range(n):
            strip[i * cell : (i + 1) * cell, s * cell : (s + 1) * cell] = PALETTE[int(choices[s, i]) % len(PALETTE)]
    return Image.fromarray(strip)


def sample(
    model: str = typer.Argument(..., help="Ensemble folder, or a repo name in --store (hf://ns/repo works too)."),
    class_label: int = typer.Option(None, "--class", help="Class to sample (class-conditional ensembles)."),
    prompt: str = typer.Option(None, "--prompt", help="What to draw (text ensembles)."),
    prompts_file: Path = typer.Option(None, "--prompts", help="A file of prompts, one per line: a row per prompt."),
    n: int = typer.Option(16, "--n", min=1, help="Number of images (per prompt with --prompts)."),
    routing: str = typer.Option(
        "top1", "--routing", help="top1, top2, topk:K, full, threshold:P; calibrated[:MODE] weighs by reliability."
    ),
    steps: int = typer.Option(30, "--steps", min=1, help="Solver steps from noise to data."),
    sampler: str = typer.Option(
        "euler", "--sampler", help="ODE solver: euler, heun (2 expert calls a step), dpm++2m or unipc (multistep)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives the same images."),
    guidance: float = typer.Option(
        None,
        "--guidance",
        help="Guidance scale, per expert (1 = off; default 4.5 with prompts, else 1).",
    ),
    out: Path = typer.Option(
        Path("grid.png"), "--out", help="Where to write the PNG grid (clips: OUT.gif, OUT.mp4 and OUT-frames.png)."
    ),
    show_routing: bool = typer.Option(False, "--show-routing", help="Also write OUT-routing.png and print usage."),
    store: str = typer.Option(None, "--store", help="Store holding MODEL as a repo (hf://<namespace> or a folder)."),
    revision: str = typer.Option(None, "--revision", help="Revision of the repo (default: the newest)."),
    skip_broken: bool = typer.Option(False, "--skip-broken", help="Leave out missing or corrupt experts."),
    scale: int = typer.Option(0, "--scale", min=0, help="Upscale factor of the PNG (default: to ~64 px per item)."),
    device: str = typer.Option(None, "--device", help="cpu, cuda or mps (default: the best available)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON on stdout."),
) -> None:
    """Sample an ensemble: every step mixes the routed experts' velocities; writes a PNG grid."""
    import torch

    from isles.experts.data import to_pixels
    from isles.experts.solvers import check_solver
    from isles.protocol.errors import IslesError
    from isles.router.ensemble import EnsemblePipeline
    from isles.router.sampling import parse_routing

    routing_mode = parse_routing(routing)  # a bad mode or sampler fails before any download
    sampler = check_solver(sampler)
    prompts = read_prompts(prompts_file) if prompts_file is not None else None
    if prompt is not None and prompts is not None:
        raise IslesError("pass --prompt or --prompts, not both")
    if (prompt is not None or prompts is not None) and class_label is not None:
        raise IslesError("pass a prompt or a class, not both", hint="text ensembles take prompts, class ones --class")
    asked = [p for p in (prompts or []) for _ in range(n)] if prompts else prompt
    if guidance is None:
        guidance = 4.5 if asked is not None else 1.0
    _quiet_diffusers()
    source, the_store = _resolve(model, store)
    with output.stderr.status(f"loading {model}"):
        pipe = EnsemblePipeline.from_pretrained(
            source, store=the_store, revision=revision, device=device, skip_broken=skip_broken
        )
    if not pipe.is_video and out.suffix.lower() in (".gif", ".mp4"):
        raise IslesError(
            f"this ensemble makes images, not clips: it cannot write {out.name}",
            hint="write a PNG grid (--out grid.png), or sample a video ensemble",
        )
    kind = f"clips of {pipe.frames} frames" if pipe.is_video else "images"
    output.stderr.print(
        f"ensemble: {pipe.num_experts} experts ({len(pipe.experts)} present) making {kind}, routing {routing_mode}, "
        f"{steps} {sampler} steps"
    )
    result = pipe(
        n=n,
        class_labels=class_label,
        prompt=asked,
        routing=routing_mode,
        steps=steps,
        solver=sampler,
        seed=seed,
        guidance_scale=guidance,
        return_routing=show_routing,
    )
    scale = scale or max(1, 64 // pipe.resolution)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = {
        "grid": str(out),
        "n": n,
        "class": class_label,
        "routing": str(routing_mode),
        "sampler": sampler,
        "seed": seed,
    }
    if asked is not None:
        written.update(prompts=prompts or [prompt], guidance=guidance)
    if result.latents is not None:  # decoded by the ensemble's VAE; the latents are kept beside the picture
        from safetensors.torch import save

        from isles.protocol.files import atomic_write_bytes

        latents_path = out.with_suffix(".safetensors")
        atomic_write_bytes(latents_path, save({"latents": result.latents.float().cpu().contiguous()}))
        written["latents"] = str(latents_path)
    if pipe.is_video:
        written.update(_save_clips(result.images, out, asked, n if prompts else None, scale))
    elif prompts is not None:  # one labelled row per prompt
        save_prompt_grid(result.images, prompts, n, out, scale)
    elif result.latents is not None:
        save_png(image_grid(to_pixels(result.images), scale=scale or max(1, 64 // result.images.shape[-1])), out)
    elif pipe.config.get("data_kind") == "latents":
        # Latent ensembles: the samples are saved as safetensors for a VAE to decode; the PNG is only a preview.
        from safetensors.torch import save

        from isles.protocol.files import atomic_write_bytes

        latents_path = out.with_suffix(".safetensors")
        atomic_write_bytes(latents_path, save({"latents": result.images.float().cpu().contiguous()}))
        written["latents"] = str(latents_path)
        x = result.images[:, :1].float()
        preview = (x - x.amin()) / (x.amax() - x.amin() + 1e-8) * 2 - 1
        save_png(image_grid(to_pixels(preview), scale=scale), out)
    else:
        save_png(image_grid(to_pixels(result.images), scale=scale), out)
    if show_routing:
        choices = result.choices
        strip_path = out.with_name(out.stem + "-routing.png")
        save_png(routing_strip(choices, pipe.num_experts), strip_path)
        usage = torch.bincount(choices.reshape(-1), minlength=pipe.num_experts).tolist()
        written["routing_strip"] = str(strip_path)
        written["steps_per_expert"] = usage
        per_step = [[int(c) for c in row] for row in choices.T]
        written["choices"] = per_step
        output.stderr.print(f"routing strip: {strip_path} (rows = samples, columns = steps from noise to data)")
    if as_json:
        output.print_json(written)
        return
    output.stdout.print(f"wrote {out}")
    if show_routing:
        for i, count in enumerate(written["steps_per_expert"]):
            colour = COLOUR_NAMES[i % len(COLOUR_NAMES)]
            output.stdout.print(f"expert_{i} ({colour} in the strip): served {count} sample-steps")


def _save_clips(clips, out: Path, asked, per_prompt: int | None, scale: int) -> dict:
    """A video ensemble's samples: OUT.gif (a grid of the clips, looping), OUT.mp4 and OUT-frames.png (one row per
    clip, one column per frame, labelled with its prompt)."""
    from isles.experts.video_files import save_clip_grid_gif, save_clip_grid_mp4, save_frame_sheet

    base = out.with_suffix("") if out.suffix.lower() in (".png", ".gif", ".mp4") else out
    gif, mp4, sheet = base.with_suffix(".gif"), base.with_suffix(".mp4"), base.with_name(base.name + "-frames.png")
    nrow = per_prompt or min(4, len(clips))
    save_clip_grid_gif(clips, gif, nrow=nrow, scale=scale)
    save_clip_grid_mp4(clips, mp4, nrow=nrow, scale=scale)
    labels = [asked] * len(clips) if isinstance(asked, str) else list(asked) if asked else None
    save_frame_sheet(clips, sheet, scale=max(1, scale // 2), labels=labels, max_clips=len(clips))
    return {"grid": str(gif), "gif": str(gif), "mp4": str(mp4), "frames": str(sheet)}


def _quiet_diffusers() -> None:
    # diffusers warns on every load that `accelerate` is absent; that is expected here and not the user's concern.
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    except ImportError:
        pass


def _resolve(model: str, store: str | None):
    """(source, store or None): a local folder, `hf://namespace/repo[@rev]`, or a repo name in --store."""
    from isles.protocol.artifacts import open_store
    from isles.protocol.errors import IslesError

    if store is None and model.startswith(("hf://", "huggingface://")):
        rest = model.split("://", 1)[1].strip("/")
        if "/" not in rest:
            raise IslesError(f"{model} names no repo", hint="use hf://<namespace>/<repo>")
        namespace, repo = rest.rsplit("/", 1)
        return repo, open_store(f"hf://{namespace}")
    if store is not None:
        return model, open_store(store)
    if not Path(model).exists():
        raise IslesError(
            f"no ensemble at {model}",
            hint="pass the folder written by `isles aggregate`, or a repo with --store <uri>",
        )
    return model, None
