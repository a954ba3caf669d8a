"""The procedural benchmark data set: 32x32 RGB items from four very different families, deterministic from a seed.

Families (18 classes): coloured digits at varied positions, scales and angles (0-9), geometric shapes (circle, square,
triangle, ring), textures (stripes, checkerboard) and gradients (linear, radial). Item i depends only on (seed,
stream, i): `generate(1000)` is the first 1000 items of `generate(50000)`. Every item also has attributes read off its
drawn parameters (class, colour, position, size) and a caption made from them, "a small red 7 at the top left", for
text-to-image. Try `python -m isles.experts.procedural`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from isles.protocol.errors import IslesError

CLASS_NAMES = (
    [f"digit-{d}" for d in range(10)]
    + ["circle", "square", "triangle", "ring"]
    + ["stripes", "checkerboard"]
    + ["linear-gradient", "radial-gradient"]
)
NUM_CLASSES = len(CLASS_NAMES)
FAMILIES = {"digits": range(0, 10), "shapes": range(10, 14), "textures": range(14, 16), "gradients": range(16, 18)}
DEFAULT_ITEMS = 50_000
DEFAULT_SEED = 0
# Independent random streams: the training data, the held-out FID reference and the feature network's own training
# data never share an item (FID must not be measured with a network trained on its reference).
STREAMS = {"data": 0, "reference": 1, "features": 2}
_CHUNK = 1024  # items drawn per random-generator chunk; fixes the item order independently of how many are asked for
_CENTER_RANGE = (0.3, 0.7)  # item centre, as a fraction of the side
_SCALE_RANGE = (0.45, 0.9)  # item size, as a fraction of the side (digits span it; shapes are about half of it)

# Attributes: one integer per item and attribute, -1 where it does not apply to the item's class.
ATTRIBUTES = ("class", "colour", "position", "size")
# Foreground hue buckets: the upper edge in degrees of each name (red also takes 345-360). The foreground is drawn
# with saturation 0.55-1 and value 0.7-1, so its hue names it; the background is dark (value <= 0.35).
COLOUR_NAMES = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
_HUE_EDGES = np.array([15, 45, 75, 160, 200, 250, 295, 345])
# A 3x3 grid over the centre's range (row-major, top-left first); rows come from y, pixel rows growing downwards.
POSITION_NAMES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
_POSITION_PHRASES = ("at the top left", "at the top", "at the top right", "on the left", "in the center")
_POSITION_PHRASES += ("on the right", "at the bottom left", "at the bottom", "at the bottom right")
SIZE_NAMES = ("small", "large")  # the scale below / above the middle of its range
# Where position and size are visible: digits and shapes are objects; a radial gradient is centred on its dark spot
# (its scale only sets how fast it fades). Textures only shift their phase with the centre; a linear gradient only
# slides along its axis: neither has a position or a size.
_HAS_POSITION = np.array([True] * 14 + [False, False, False, True])
_HAS_SIZE = np.array([True] * 14 + [False] * 4)
_NOUNS = [str(d) for d in range(10)] + ["circle", "square", "triangle", "ring", "stripes", "checkerboard"]
_NOUNS += ["linear gradient", "radial gradient"]


def generate(
    n: int, seed: int = DEFAULT_SEED, stream: str = "data", resolution: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` items of a stream: (uint8 pixels [n, 3, R, R], int64 class labels [n])."""
    pixels, labels, _ = _generate(n, seed, stream, resolution)
    return pixels, labels


def generate_captioned(
    n: int, seed: int = DEFAULT_SEED, stream: str = "data", resolution: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """`generate` plus each item's attributes (int64 [n, 4] in ATTRIBUTES order, -1 = not applicable) and caption."""
    pixels, labels, attributes = _generate(n, seed, stream, resolution)
    return pixels, labels, attributes, [caption(row) for row in attributes.tolist()]


def attribute_names() -> dict[str, list[str]]:
    """The value names of each attribute: value v of attribute a is `attribute_names()[a][v]`."""
    values = (list(CLASS_NAMES), list(COLOUR_NAMES), list(POSITION_NAMES), list(SIZE_NAMES))
    return dict(zip(ATTRIBUTES, values, strict=True))


def caption(attributes) -> str:
    """The English caption of one attribute row [class, colour, position, size]: "a small red 7 at the top left",
    "a large blue ring in the center", "green stripes", "a purple radial gradient at the bottom"."""
    label, colour, position, size = (int(v) for v in attributes)
    words = ([SIZE_NAMES[size]] if size >= 0 else []) + [COLOUR_NAMES[colour], _NOUNS[label]]
    if position >= 0:
        words.append(_POSITION_PHRASES[position])
    text = " ".join(words)
    if label == 14:  # plural: "green stripes"
        return text
    return ("an " if text[0] in "aeiou" else "a ") + text


def _generate(n: int, seed: int, stream: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if n < 0:
        raise IslesError(f"cannot generate {n} items", hint="ask for a positive item count")
    if stream not in STREAMS:
        raise IslesError(f"unknown procedural stream {stream!r}", hint=f"one of {', '.join(STREAMS)}")
    pixels, labels, attributes = [], [], []
    for chunk in range(math.ceil(n / _CHUNK)):
        rng = np.random.default_rng([seed, STREAMS[stream], chunk])
        x, y, params = _render_chunk(rng, _CHUNK, resolution)
        pixels.append(x)
        labels.append(y)
        attributes.append(_attributes(y.numpy(), **params))
    if not pixels:
        empty = torch.zeros(0, dtype=torch.int64)
        return torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8), empty, empty.reshape(0, len(ATTRIBUTES))
    return torch.cat(pixels)[:n], torch.cat(labels)[:n], torch.from_numpy(np.concatenate(attributes)[:n])


def _attributes(labels: np.ndarray, hue: np.ndarray, center: np.ndarray, scale: np.ndarray, **pose) -> np.ndarray:
    """[n, 4] int64 attributes from the drawn parameters: the foreground hue's bucket, the 3x3 cell of where the item
    looks centred (the centre's range split in thirds) and the scale's half of its range."""
    colour = np.searchsorted(_HUE_EDGES, hue * 360, side="right") % len(COLOUR_NAMES)
    low, high = _CENTER_RANGE
    seen = _ink_center(labels, center, scale, pose["angle"], pose["glyph"])
    cell = np.clip(np.floor((seen - low) / (high - low) * 3).astype(np.int64), 0, 2)  # [n, (column, row)]
    position = np.where(_HAS_POSITION[labels], cell[:, 1] * 3 + cell[:, 0], -1)
    size = np.where(_HAS_SIZE[labels], (scale >= sum(_SCALE_RANGE) / 2).astype(np.int64), -1)
    return np.stack([labels, colour, position, size], axis=1).astype(np.int64)


def parse_spec(
    spec: str, prefix: str = "procedural", default_items: int = DEFAULT_ITEMS, what: str = "procedural data set"
) -> tuple[int, int]:
    """`procedural`, `procedural:N` or `procedural:N:SEED` -> (items, seed); `prefix` names another generated set
    (procedural-video)."""
    parts = spec.split(":")
    if parts[0] != prefix or len(parts) > 3:
        hint = f"use {prefix}, {prefix}:N or {prefix}:N:SEED"
        raise IslesError(f"not a {what} name: {spec!r}", hint=hint)
    try:
        n = int(parts[1]) if len(parts) > 1 and parts[1] else default_items
        seed = int(parts[2]) if len(parts) > 2 else DEFAULT_SEED
    except ValueError as exc:
        raise IslesError(f"bad {what} name {spec!r}: {exc}", hint=f"e.g. {prefix}:2000:0") from None
    if n <= 0:
        raise IslesError(f"{what} needs at least one item, got {n}", hint=f"e.g. {prefix}:2000")
    return n, seed


def is_procedural(source: str) -> bool:
    return source == "procedural" or source.startswith("procedural:")


def load(spec: str = "procedural", resolution: int | None = None):
    """The data set named `spec` as one ShardData (cluster ids 0, no validation split yet): the hook for
    `experts.data.load_source`, which sets the validation mask like for any other source."""
    n, seed = parse_spec(spec)
    return _shard(spec, seed, *generate(n, seed=seed, resolution=resolution or 32))


def load_captioned(spec: str = "procedural", resolution: int | None = None):
    """`load(spec, resolution)` plus the items' attributes (int64 [n, 4]) and captions, from one generation pass."""
    n, seed = parse_spec(spec)
    pixels, labels, attributes, captions = generate_captioned(n, seed=seed, resolution=resolution or 32)
    return _shard(spec, seed, pixels, labels), attributes, captions


def _shard(spec: str, seed: int, pixels: torch.Tensor, labels: torch.Tensor):
    from .data import ShardData

    n = len(labels)
    return ShardData(
        items=pixels,
        labels=labels,
        clusters=torch.zeros(n, dtype=torch.long),
        val_mask=torch.zeros(n, dtype=torch.bool),
        meta={"source": spec, "num_classes": NUM_CLASSES, "class_names": list(CLASS_NAMES), "seed": seed},
    )


def _render_chunk(rng: np.random.Generator, n: int, res: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """n items drawn from `rng`: (uint8 pixels, labels, the parameters their attributes are read from)."""
    # 1. Family uniform, class uniform within the family: each family is a quarter of the data.
    family = rng.integers(0, 4, n)
    first = np.array([0, 10, 14, 16])[family]
    width = np.array([10, 4, 2, 2])[family]
    labels = first + (rng.random(n) * width).astype(np.int64)
    # 2. Every parameter is drawn for every item, whatever its class, so the stream never depends on branch taken.
    hue = rng.random(n)
    fg = _hsv(hue, rng.uniform(0.55, 1.0, n), rng.uniform(0.7, 1.0, n))
    bg = _hsv(rng.random(n), rng.uniform(0.2, 1.0, n), rng.uniform(0.0, 0.35, n))
    center = rng.uniform(*_CENTER_RANGE, (n, 2))  # (x, y)
    scale = rng.uniform(*_SCALE_RANGE, n)
    angle = rng.uniform(-math.pi, math.pi, n)
    freq = rng.uniform(2.5, 6.0, n)
    phase = rng.uniform(0, 2 * math.pi, n)
    glyph = rng.integers(0, 10_000, n)
    pixels = paint(labels, fg, bg, center, scale, angle, freq, phase, glyph, res)
    params = {"hue": hue, "center": center, "scale": scale, "angle": angle, "glyph": glyph}
    return pixels, torch.from_numpy(labels), params


def paint(
    labels: np.ndarray,
    fg: np.ndarray,
    bg: np.ndarray,
    center: np.ndarray,
    scale: np.ndarray,
    angle: np.ndarray,
    freq: np.ndarray,
    phase: np.ndarray,
    glyph: np.ndarray,
    res: int,
) -> torch.Tensor:
    """uint8 pixels [n, 3, res, res] of n items from their drawn parameters (class, colours [n, 3] in [0, 1], centre
    (x, y), scale, angle, texture frequency and phase, glyph pick); the video set paints each frame with it."""
    n = len(labels)
    t = torch.from_numpy
    grid = (torch.arange(res, dtype=torch.float32) + 0.5) / res  # pixel centres in [0, 1]
    py, px = torch.meshgrid(grid, grid, indexing="ij")
    dx = px[None] - t(center[:, 0]).float()[:, None, None]
    dy = py[None] - t(center[:, 1]).float()[:, None, None]
    cos, sin = (t(np.cos(angle)).float()[:, None, None], t(np.sin(angle)).float()[:, None, None])
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # coordinates in the item's rotated frame
    s = t(scale).float()[:, None, None]
    alpha = torch.zeros(n, res, res)
    lab = t(labels)
    # 3. Digits: an 8x8 scikit-learn glyph, sampled through a rotation + scale + shift (30 degrees at most).
    m = lab < 10
    if m.any():
        pose = (t(center[m]).float(), t(scale[m]).float(), t(angle[m] / 6).float())
        alpha[m] = _digit_alpha(lab[m], t(glyph[m]), *pose, res)
    # 4. Shapes: signed distances (negative inside), anti-aliased over about one pixel.
    r = s * 0.5
    shapes = {
        10: torch.sqrt(dx**2 + dy**2) - r * 0.8,
        11: torch.maximum(u.abs(), v.abs()) - r * 0.7,
        12: _triangle_sd(u / (r * 0.9), v / (r * 0.9)) * r * 0.9,
        13: (torch.sqrt(dx**2 + dy**2) - r * 0.65).abs() - r * 0.18,
    }
    for k, sd in shapes.items():
        m = lab == k
        alpha[m] = (0.5 - sd[m] * res).clamp(0, 1)
    # 5. Textures: periodic patterns in the rotated frame, soft-thresholded into two colours.
    f = t(freq).float()[:, None, None] * 2 * math.pi
    ph = t(phase).float()[:, None, None]
    m = lab == 14
    alpha[m] = (torch.sin(f * u + ph)[m] * 3 + 0.5).clamp(0, 1)
    m = lab == 15
    alpha[m] = (torch.sin(f * u * 0.7 + ph)[m] * torch.sin(f * v * 0.7)[m] * 4 + 0.5).clamp(0, 1)
    # 6. Gradients: a ramp along the rotated axis, or with the distance from a random centre.
    m = lab == 16
    alpha[m] = (u / (s * 1.2) + 0.5)[m].clamp(0, 1)
    m = lab == 17
    alpha[m] = (torch.sqrt(dx**2 + dy**2) / (s * 0.9))[m].clamp(0, 1)
    # 7. Composite foreground over background colour, quantise to uint8 like any image data set.
    fg_t, bg_t = t(fg).float()[:, :, None, None], t(bg).float()[:, :, None, None]
    img = bg_t + (fg_t - bg_t) * alpha[:, None]
    return (img * 255).round().clamp(0, 255).to(torch.uint8)


_GLYPHS: torch.Tensor | None = None


def _glyphs() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 scikit-learn digit bitmaps ([N, 1, 8, 8] in [0, 1]) and their labels; they ship with the package."""
    global _GLYPHS
    if _GLYPHS is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        _GLYPHS = (torch.from_numpy(d.images).float()[:, None] / 16.0, torch.from_numpy(d.target).long())
    return _GLYPHS


def _digit_alpha(
    digit: torch.Tensor, pick: torch.Tensor, center: torch.Tensor, scale: torch.Tensor, angle: torch.Tensor, res: int
) -> torch.Tensor:
    src = _glyphs()[0][_glyph_index(digit, pick)]
    # affine_grid maps output coords in [-1, 1] to input coords (x_in = A x_out + b); the glyph spans `scale` of it.
    cos, sin = torch.cos(angle), torch.sin(angle)
    inv = 1.0 / scale
    theta = torch.zeros(len(digit), 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * inv, sin * inv
    theta[:, 1, 0], theta[:, 1, 1] = -sin * inv, cos * inv
    c = center * 2 - 1
    theta[:, 0, 2] = -(theta[:, 0, 0] * c[:, 0] + theta[:, 0, 1] * c[:, 1])
    theta[:, 1, 2] = -(theta[:, 1, 0] * c[:, 0] + theta[:, 1, 1] * c[:, 1])
    grid = F.affine_grid(theta, [len(digit), 1, res, res], align_corners=False)
    g = F.grid_sample(src, grid, mode="bicubic", padding_mode="zeros", align_corners=False)[:, 0]
    return ((g - 0.25) * 2.5).clamp(0, 1)  # sharpen the upsampled 8x8 strokes


def _glyph_index(digit: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """The (pick mod count)-th glyph of each wanted digit: deterministic and varied handwriting."""
    targets = _glyphs()[1]
    index = torch.empty_like(digit)
    for d in digit.unique().tolist():
        of_d = torch.nonzero(targets == d).flatten()
        sel = digit == d
        index[sel] = of_d[pick[sel] % len(of_d)]
    return index


def _ink_center(labels: np.ndarray, center: np.ndarray, scale: np.ndarray, angle: np.ndarray, glyph: np.ndarray):
    """Where each item looks centred, (x, y) in [0, 1]: shapes and gradients on `center`; a digit on its glyph's ink
    centroid carried through the glyph's pose (handwriting sits up to ~2 pixels off-centre in its box at 32x32)."""
    out = center.copy()
    m = labels < 10
    if m.any():
        images = _glyphs()[0][_glyph_index(torch.from_numpy(labels[m]), torch.from_numpy(glyph[m]))][:, 0]
        ink = ((images - 0.25) * 2.5).clamp(0, 1).double().numpy()  # the sharpening of _digit_alpha
        coords = (np.arange(8) + 0.5) / 4 - 1  # glyph pixel centres in [-1, 1]
        gx = (ink.sum(1) * coords).sum(1) / ink.sum((1, 2))
        gy = (ink.sum(2) * coords).sum(1) / ink.sum((1, 2))
        # _digit_alpha samples the glyph at x_in = R(-a) (x_out - c) / scale in [-1, 1] coordinates, so the glyph's
        # ink centroid g lands at c + scale / 2 * R(a) g in [0, 1] coordinates.
        cos, sin, half = np.cos(angle[m] / 6), np.sin(angle[m] / 6), scale[m] / 2
        out[m, 0] += half * (cos * gx - sin * gy)
        out[m, 1] += half * (sin * gx + cos * gy)
    return out


def _triangle_sd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Signed distance to an equilateral triangle of circumradius ~1 (Inigo Quilez's formula)."""
    k = math.sqrt(3.0)
    x = x.abs() - 1.0
    y = -y + 1.0 / k
    flip = (x + k * y) > 0
    x, y = torch.where(flip, (x - k * y) / 2, x), torch.where(flip, (-k * x - y) / 2, y)
    x = x - x.clamp(-2.0, 0.0)
    return -torch.sqrt(x**2 + y**2) * torch.sign(y)


def _hsv(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, [n, 3] in [0, 1]."""
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, w = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(c, 1) for c in ((v, w, p), (q, v, p), (p, v, w), (p, q, v), (w, p, v), (v, p, q))])
    return table[i, np.arange(len(h))]


def preview(path: str, n: int = 64, seed: int = DEFAULT_SEED) -> None:
    """Write a grid of the first `n` items as a PNG (to look at the data set)."""
    from PIL import Image

    pixels, _ = generate(n, seed)
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    sheet = torch.zeros(3, rows * 34, cols * 34, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        sheet[:, r * 34 + 1 : r * 34 + 33, c * 34 + 1 : c * 34 + 33] = pixels[i]
    Image.fromarray(sheet.permute(1, 2, 0).numpy()).resize((cols * 68, rows * 68), Image.NEAREST).save(path)


def preview_captioned(path: str, n: int = 24, seed: int = DEFAULT_SEED, resolution: int = 32) -> None:
    """Write the first `n` items with their captions as a PNG (to check that captions say what the pictures show)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixels, _, _, captions = generate_captioned(n, seed, resolution=resolution)
    cols = 6
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(cols * 2.4, math.ceil(n / cols) * 2.6), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(pixels[i].permute(1, 2, 0).numpy(), interpolation="nearest")
            words = captions[i].split(" ")
            half = (len(words) + 1) // 2
            ax.set_title(" ".join(words[:half]) + "\n" + " ".join(words[half:]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":  # python -m isles.experts.procedural [GRID.png [CAPTIONED.png]]
    import sys
    import time

    start = time.perf_counter()
    x, y = generate(10_000)
    print(f"10,000 items in {time.perf_counter() - start:.1f}s; class counts {torch.bincount(y).tolist()}")
    preview(sys.argv[1] if len(sys.argv) > 1 else "procedural.png")
    preview_captioned(sys.argv[2] if len(sys.argv) > 2 else "procedural_captions.png")
