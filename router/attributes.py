"""Text-image agreement on the procedural set: a small CNN reads class, colour, position and size back from images.

The reader is trained by this code on the generator's "features" stream (never the data or the FID reference) and
cached like the FID feature network (router/features.py). `attribute_agreement(images, attributes)` is the share of
samples whose attributes read back as asked. `python -m isles.router.attributes [RESOLUTION]` trains (or loads) it and
prints its accuracy on held-out real items: the ceiling for samples.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from isles.experts import procedural
from isles.protocol.errors import IslesError
from isles.protocol.files import canonical_json

from . import features

VERSION = 2  # bump when the architecture or training procedure changes: old cache entries are then ignored
HEAD_SIZES = {name: len(values) for name, values in procedural.attribute_names().items()}


@dataclass(frozen=True)
class ReaderSpec:
    """Everything that determines the reader's weights (its hash names the cache entry)."""

    resolution: int = 32
    train_items: int = 24_000  # from the procedural "features" stream, digits kept up to half (see training_items)
    epochs: int = 4  # ~40 s on one CPU core; held-out: class 0.97, colour 0.96, position 0.94, size 0.95
    batch_size: int = 64
    lr: float = 6e-3
    seed: int = 0
    width: int = 24
    hidden: int = 128
    version: int = VERSION

    def key(self) -> str:
        return "attributes-" + hashlib.sha256(canonical_json(asdict(self))).hexdigest()[:16]


class AttributeReader(nn.Module):
    """Inputs -> (conv-BN-ReLU, max-pool) x3 -> conv-BN-ReLU -> global average, + hue -> linear-ReLU -> a head per
    attribute.

    The inputs are the image average-pooled to about 16x16 (the digits are upsampled 8x8 glyphs: 16x16 keeps them
    legible, at a quarter of the cost), a foreground channel and two coordinate channels. The foreground channel is
    max(R, G, B) stretched to [0, 1] per image: the foreground is drawn bright and the background dark, so it shows
    shape, position and size whatever the colours. The coordinates (x, y in [-1, 1]) let the global average tell
    where the foreground is. The hue of the brightest pixels joins the pooled features: convolutions learn hue
    boundaries only roughly (0.94 colour accuracy without it, 0.96 with it).
    """

    def __init__(self, width: int = 24, hidden: int = 128):
        super().__init__()
        widths = [3 + 1 + 2, width, width * 2, width * 4, width * 4]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU())
            for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.hidden = nn.Sequential(nn.Linear(width * 4 + 3, hidden), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, size) for name, size in HEAD_SIZES.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x in [-1, 1], [B, 3, H, W] -> logits per attribute name, [B, values]."""
        if x.shape[-1] >= 32:
            x = F.avg_pool2d(x, x.shape[-1] // 16)
        b, _, h, w = x.shape
        value = x.amax(dim=1, keepdim=True)
        low, high = value.amin(dim=(-2, -1), keepdim=True), value.amax(dim=(-2, -1), keepdim=True)
        foreground = (value - low) / (high - low + 0.1)
        weight = foreground**8
        colour = (x * weight).sum(dim=(-2, -1)) / weight.sum(dim=(-2, -1)).clamp_min(1e-6)  # [B, 3]
        hue = _hue(colour) * (2 * math.pi)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy")).expand(b, -1, -1, -1)  # [B, 2 (x, y), H, W]
        z = torch.cat([x, foreground * 2 - 1, grid], dim=1)
        for i, block in enumerate(self.blocks):
            z = block(z)
            if i < len(self.blocks) - 1 and min(z.shape[-2:]) >= 2:
                z = F.max_pool2d(z, 2)
        hue_features = torch.stack([hue / math.pi - 1, hue.cos(), hue.sin()], dim=1)
        z = self.hidden(torch.cat([z.mean(dim=(-2, -1)), hue_features], dim=1))
        return {name: head(z) for name, head in self.heads.items()}

    @torch.no_grad()
    def read(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """The most likely value of every attribute, int64 [N, 4] in procedural.ATTRIBUTES order (CPU out)."""
        device = next(self.parameters()).device
        self.eval()
        out = []
        for i in range(0, len(x), batch_size):
            logits = self(x[i : i + batch_size].to(device, torch.float32))
            out.append(torch.stack([logits[a].argmax(dim=-1) for a in procedural.ATTRIBUTES], dim=1).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(procedural.ATTRIBUTES), dtype=torch.int64)


def load_or_train(
    spec: ReaderSpec | None = None, cache_dir: Path | None = None, device: str = "cpu"
) -> AttributeReader:
    """The cached attribute reader for `spec` (default: 32x32), training (and caching) it first if needed."""
    spec = spec or ReaderSpec()
    net = features.seeded(spec.seed, lambda: AttributeReader(spec.width, spec.hidden))

    def fit() -> None:  # only on a cache miss
        train(net, *training_items(spec), spec)

    return features.load_or_fit(net, features.cache_file(spec.key(), cache_dir), fit).to(device).eval()


def training_items(spec: ReaderSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 pixels, attributes) of `spec.train_items` items of the "features" stream, half of them digits.

    Digits are the hard part (10 of the 18 classes share a quarter of the data): of the first 2 * train_items items,
    the first digits fill up to half and the first other items the rest, in stream order.
    """
    n = spec.train_items
    pixels, labels, attributes, _ = procedural.generate_captioned(2 * n, stream="features", resolution=spec.resolution)
    digits = torch.nonzero(labels < 10).flatten()[: n // 2]
    others = torch.nonzero(labels >= 10).flatten()[: n - len(digits)]
    keep = torch.cat([digits, others]).sort().values
    return pixels[keep], attributes[keep]


def train(net: AttributeReader, pixels: torch.Tensor, attributes: torch.Tensor, spec: ReaderSpec) -> None:
    """Adam on the sum of the heads' cross-entropies (-1 targets: not applicable, ignored); fixed seed for data order.
    The same spec gives the same weights on CPU."""
    x_all = pixels.float() / 127.5 - 1.0

    def batch_loss(idx: torch.Tensor, _generator: torch.Generator) -> torch.Tensor:
        logits, target = net(x_all[idx]), attributes[idx]
        return sum(
            F.cross_entropy(logits[a], target[:, k], ignore_index=-1) for k, a in enumerate(procedural.ATTRIBUTES)
        )

    features.fit_one_cycle(net, len(x_all), spec, batch_loss)


def attribute_agreement(
    images: torch.Tensor,
    attributes: torch.Tensor,
    reader: AttributeReader | None = None,
    cache_dir: Path | None = None,
    device: str = "cpu",
) -> dict:
    """How often images show the attributes they were asked for (rows of procedural attributes, -1 = not asked).

    Returns, per attribute and for "all" (every asked attribute right): the share of images where the reader reads
    the asked value, over the images that ask for it; under "chance", the share a constant guess of the most frequent
    asked value would score; under "n", how many images ask for it. Images are [N, 3, R, R] in [-1, 1] (or uint8);
    without a `reader`, the cached one for resolution R is loaded (trained on first use).
    """
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1.0
    attributes = attributes.to(torch.int64).cpu()
    if len(images) != len(attributes) or attributes.shape[1:] != (len(procedural.ATTRIBUTES),):
        shape = tuple(attributes.shape)
        raise IslesError(f"{len(images)} images but attribute rows of shape {shape}", hint="one [4] row per image")
    reader = reader or load_or_train(ReaderSpec(resolution=images.shape[-1]), cache_dir, device)
    read = reader.read(images)
    asked = attributes >= 0
    right = (read == attributes) | ~asked
    majority = torch.stack([_majority(attributes[:, k]) for k in range(attributes.shape[1])])
    guess_right = (attributes == majority) | ~asked
    result: dict = {"chance": {}, "n": {}}
    for k, name in enumerate(procedural.ATTRIBUTES):
        m = asked[:, k]
        result[name] = _share(right[m, k])
        result["chance"][name] = _share(guess_right[m, k])
        result["n"][name] = int(m.sum())
    result["all"] = _share(right.all(dim=1))
    result["chance"]["all"] = _share(guess_right.all(dim=1))
    result["n"]["all"] = len(attributes)
    return result


def reader_accuracy(reader: AttributeReader, n: int = 4000, resolution: int = 32) -> dict:
    """The reader's agreement on n held-out real items (the "reference" stream) with their own attributes."""
    pixels, _, attributes, _ = procedural.generate_captioned(n, stream="reference", resolution=resolution)
    return attribute_agreement(pixels, attributes, reader=reader)


def _hue(rgb: torch.Tensor) -> torch.Tensor:
    """The HSV hue in [0, 1) of colours [B, 3] (unchanged by adding one number to all channels or scaling them)."""
    r, g, b = rgb.unbind(dim=1)
    high, low = rgb.amax(dim=1), rgb.amin(dim=1)
    span = (high - low).clamp_min(1e-6)
    sector = torch.where(
        high == r, ((g - b) / span) % 6, torch.where(high == g, (b - r) / span + 2, (r - g) / span + 4)
    )
    return sector / 6


def _majority(values: torch.Tensor) -> torch.Tensor:
    values = values[values >= 0]
    return torch.bincount(values).argmax() if len(values) else torch.tensor(-1)


def _share(right: torch.Tensor) -> float:
    return float(right.float().mean()) if len(right) else math.nan


if __name__ == "__main__":  # train (or load) the reader and report its accuracy on held-out real items
    import sys

    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)  # small convolutions: more threads mostly wait on each other
    resolution = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    start = time.perf_counter()
    net = load_or_train(ReaderSpec(resolution=resolution))
    print(f"reader ready in {time.perf_counter() - start:.0f}s")
    print(canonical_json(reader_accuracy(net, resolution=resolution)).decode())
