"""The procedural captioned video set: digits and shapes that move, bounce, grow, shrink or change colour, 16 frames on
a 32x32 canvas by default, deterministic from a seed, no download (the Paris 2.0 recipe's stand-in for real clips).

Each clip has a class (10 digits, 4 shapes), a starting colour and a motion, and a caption made from them: "a red 3
moving right", "an orange ring growing". Content and motion both matter: the same digit moves in eight ways, and
every motion happens to every class. Clips are uint8 [3, F, H, W] (channels, frames, height, width: the layout of
diffusers' video models). Clip i depends only on (seed, stream, i). Try `python -m isles.experts.procedural_video`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from isles.protocol.errors import IslesError

from . import procedural
from .procedural import _NOUNS, COLOUR_NAMES, STREAMS, _hsv, paint
from .procedural import CLASS_NAMES as IMAGE_CLASS_NAMES

CLASS_NAMES = IMAGE_CLASS_NAMES[:14]  # digits 0-9, circle, square, triangle, ring: things that can move
NUM_CLASSES = len(CLASS_NAMES)
MOTION_NAMES = (
    "moving right",
    "moving left",
    "moving up",
    "moving down",
    "bouncing",
    "growing",
    "shrinking",
    "changing colour",
)
ATTRIBUTES = ("class", "colour", "motion")  # colour: the hue bucket of the first frame
DEFAULT_CLIPS = 8_000
DEFAULT_SEED = 0
DEFAULT_FRAMES = 16
DEFAULT_RESOLUTION = 32
SPEC_PREFIX = "procedural-video"
_CHUNK = 256  # clips per random-generator chunk: the clip order does not depend on how many are asked for
_TRAVEL = 0.35  # how far a moving item travels over the clip, as a fraction of the side
_HUE_EDGES = np.array([15, 45, 75, 160, 200, 250, 295, 345])  # as procedural.py: red also takes 345-360


def generate_clips(
    n: int,
    seed: int = DEFAULT_SEED,
    stream: str = "data",
    resolution: int = DEFAULT_RESOLUTION,
    frames: int = DEFAULT_FRAMES,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first `n` clips of a stream: (uint8 clips [n, 3, F, R, R], int64 attributes [n, 3] in ATTRIBUTES order,
    captions)."""
    if n < 0:
        raise IslesError(f"cannot generate {n} clips", hint="ask for a positive clip count")
    if stream not in STREAMS:
        raise IslesError(f"unknown procedural stream {stream!r}", hint=f"one of {', '.join(STREAMS)}")
    if frames < 2 or resolution < 8:
        raise IslesError(f"clips need at least 2 frames of 8x8 (asked: {frames} of {resolution}x{resolution})")
    clips, attributes = [], []
    for chunk in range(math.ceil(n / _CHUNK)):
        rng = np.random.default_rng([seed, STREAMS[stream], 1000 + chunk])  # never the image set's generator state
        x, a = _render_chunk(rng, min(_CHUNK, n - chunk * _CHUNK), resolution, frames)
        clips.append(x)
        attributes.append(a)
    if not clips:
        return torch.zeros(0, 3, frames, resolution, resolution, dtype=torch.uint8), torch.zeros(0, 3).long(), []
    attributes = torch.cat(attributes)
    return torch.cat(clips), attributes, [caption(row) for row in attributes.tolist()]


def caption(attributes) -> str:
    """The caption of one attribute row [class, colour, motion]: "a red 3 moving right", "an orange ring growing"."""
    label, colour, motion = (int(v) for v in attributes)
    text = f"{COLOUR_NAMES[colour]} {_NOUNS[label]} {MOTION_NAMES[motion]}"
    return ("an " if text[0] in "aeiou" else "a ") + text


def attribute_names() -> dict[str, list[str]]:
    """The value names of each attribute: value v of attribute a is `attribute_names()[a][v]`."""
    return {"class": list(CLASS_NAMES), "colour": list(COLOUR_NAMES), "motion": list(MOTION_NAMES)}


def _render_chunk(rng: np.random.Generator, n: int, res: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n clips drawn from `rng` (always _CHUNK clips' worth of numbers, so a chunk's clips do not depend on n)."""
    m = _CHUNK
    # 1. What moves and how: class and motion uniform and independent, so every motion happens to every class.
    labels = rng.integers(0, NUM_CLASSES, m)
    motion = rng.integers(0, len(MOTION_NAMES), m)
    hue = rng.random(m)
    sat, val = rng.uniform(0.6, 1.0, m), rng.uniform(0.75, 1.0, m)
    bg = _hsv(rng.random(m), rng.uniform(0.2, 1.0, m), rng.uniform(0.0, 0.3, m))
    scale = rng.uniform(0.45, 0.65, m)
    angle = rng.uniform(-math.pi, math.pi, m)
    glyph = rng.integers(0, 10_000, m)
    start = rng.uniform(0.25, 0.4, (m, 2))  # where a moving item starts along its axis (mirrored for left / up)
    across = rng.uniform(0.35, 0.65, (m, 2))  # where it sits on the other axis
    bounce_phase = rng.uniform(0, 0.25, m)
    keep = slice(0, n)
    labels, motion, hue, sat, val, bg = labels[keep], motion[keep], hue[keep], sat[keep], val[keep], bg[keep]
    scale, angle, glyph, start, across, bounce_phase = (
        scale[keep],
        angle[keep],
        glyph[keep],
        start[keep],
        across[keep],
        bounce_phase[keep],
    )
    # 2. Each frame's parameters: u runs from 0 (first frame) to 1 (last).
    u = np.linspace(0.0, 1.0, frames)[None, :]  # [1, F]
    cx = np.repeat(across[:, :1], frames, 1)
    cy = np.repeat(across[:, 1:], frames, 1)
    size = np.repeat(scale[:, None], frames, 1)
    hues = np.repeat(hue[:, None], frames, 1)
    along = start[:, :1] + _TRAVEL * u  # [n, F]
    cx = np.where((motion == 0)[:, None], along, cx)
    cx = np.where((motion == 1)[:, None], 1.0 - along, cx)
    cy = np.where((motion == 2)[:, None], 1.0 - (start[:, 1:] + _TRAVEL * u), cy)  # pixel rows grow downwards
    cy = np.where((motion == 3)[:, None], start[:, 1:] + _TRAVEL * u, cy)
    floor = 0.7
    hop = floor - 0.4 * np.abs(np.sin(2 * math.pi * (u + bounce_phase[:, None])))  # two hops per clip
    cy = np.where((motion == 4)[:, None], hop, cy)
    size = np.where((motion == 5)[:, None], 0.35 + 0.5 * u, size)
    size = np.where((motion == 6)[:, None], 0.85 - 0.5 * u, size)
    hues = np.where((motion == 7)[:, None], (hue[:, None] + 0.5 * u) % 1.0, hues)
    # 3. Paint all n x F frames in one batch with the image set's painter.
    flat = lambda a: a.reshape(n * frames, *a.shape[2:])  # noqa: E731
    per_frame = lambda a: np.repeat(a, frames, axis=0)  # noqa: E731
    fg = _hsv(flat(hues), per_frame(sat), per_frame(val))
    center = np.stack([flat(cx), flat(cy)], axis=1)
    ones = np.ones(n * frames)
    labels_f, bg_f, angle_f, glyph_f = per_frame(labels), per_frame(bg), per_frame(angle), per_frame(glyph)
    pixels = paint(labels_f, fg, bg_f, center, flat(size), angle_f, ones, ones * 0, glyph_f, res)
    clips = pixels.reshape(n, frames, 3, res, res).permute(0, 2, 1, 3, 4).contiguous()  # [n, C, F, H, W]
    colour = np.searchsorted(_HUE_EDGES, hue * 360, side="right") % len(COLOUR_NAMES)
    attributes = torch.from_numpy(np.stack([labels, colour, motion], axis=1).astype(np.int64))
    return clips, attributes


# --- as a data source ------------------------------------------------------------------------------------------------


def is_procedural_video(source: str) -> bool:
    return source == SPEC_PREFIX or source.startswith(SPEC_PREFIX + ":")


def parse_spec(spec: str) -> tuple[int, int]:
    """`procedural-video`, `procedural-video:N` or `procedural-video:N:SEED` -> (clips, seed)."""
    return procedural.parse_spec(spec, SPEC_PREFIX, DEFAULT_CLIPS, "procedural video set")


def load_clips(spec: str, resolution: int | None = None, frames: int | None = None):
    """The set named `spec` as (ShardData with class labels, attributes [n, 3], captions)."""
    from .data import ShardData

    n, seed = parse_spec(spec)
    clips, attributes, captions = generate_clips(
        n, seed, resolution=resolution or DEFAULT_RESOLUTION, frames=frames or DEFAULT_FRAMES
    )
    shard = ShardData(
        items=clips,
        labels=attributes[:, 0].clone(),
        clusters=torch.zeros(n, dtype=torch.long),
        val_mask=torch.zeros(n, dtype=torch.bool),
        meta={"source": spec, "num_classes": NUM_CLASSES, "class_names": list(CLASS_NAMES), "seed": seed},
    )
    return shard, attributes, captions


if __name__ == "__main__":  # python -m isles.experts.procedural_video [OUT.gif]
    import sys
    import time

    from .video_files import save_clip_grid_gif

    began = time.perf_counter()
    clips, attrs, caps = generate_clips(1000)
    print(f"1,000 clips in {time.perf_counter() - began:.1f}s; motions {torch.bincount(attrs[:, 2]).tolist()}")
    save_clip_grid_gif(clips[:16].float() / 127.5 - 1, sys.argv[1] if len(sys.argv) > 1 else "procedural_video.gif")
    print("\n".join(caps[:16]))
