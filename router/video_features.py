"""The video classifier behind isles' FVD-style metric: a small 3D CNN that reads a clip's class, colour and motion.

Trained by this code, deterministically, on the procedural video set's "features" stream (never the data or the
reference), and cached like the FID feature network (router/features.py). Its 64-d features (before the last
non-linearity) give the Frechet video distance; its heads give the share of samples whose content and motion read back
as the prompt asked (`clip_agreement`). `python -m isles.router.video_features [FRAMES RESOLUTION]` trains (or loads)
it and prints its held-out accuracy per head: the ceiling for samples.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from isles.experts import procedural_video
from isles.protocol.files import canonical_json

from . import features

log = logging.getLogger(__name__)
VERSION = 2  # bump when the architecture or training procedure changes: old cache entries are then ignored
# 2: trained on one CPU thread (features.load_or_fit), whatever the caller's thread count
HEADS = {name: len(values) for name, values in procedural_video.attribute_names().items()}  # class, colour, motion


@dataclass(frozen=True)
class VideoFeatureSpec:
    """Everything that determines the classifier's weights (its hash names the cache entry)."""

    frames: int = 16
    resolution: int = 32
    train_items: int = 6_000  # clips of the procedural video set's "features" stream
    epochs: int = 4
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    width: int = 16
    feature_dim: int = 64  # small: Frechet covariances must be estimable from a few hundred samples
    version: int = VERSION

    def key(self) -> str:
        return "video-" + hashlib.sha256(canonical_json(asdict(self))).hexdigest()[:16]


class VideoFeatureNet(nn.Module):
    """Clips [B, 3, F, H, W] in [-1, 1] -> 3D conv-BN-ReLU x4 (pooling space first, then space and time) -> global
    average -> linear (the features) -> ReLU -> one linear head per attribute. Motion is read by the space-time
    kernels; the class head comes first, so `features_and_logits` serves FID-style code unchanged."""

    def __init__(self, width: int = 16, feature_dim: int = 64):
        super().__init__()
        widths = [3, width, width * 2, width * 4, width * 4]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv3d(a, b, 3, padding=1), nn.BatchNorm3d(b), nn.ReLU())
            for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.embed = nn.Linear(widths[-1], feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, size) for name, size in HEADS.items()})

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i < len(self.blocks) - 1:
                time_pool = 2 if i > 0 and h.shape[2] >= 2 else 1  # keep full frame rate for the first layer
                space_pool = 2 if min(h.shape[-2:]) >= 2 else 1
                h = F.max_pool3d(h, (time_pool, space_pool, space_pool))
        return self.embed(h.mean(dim=(-3, -2, -1)))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, D], class logits [B, classes])."""
        feats = self._features(x)
        return feats, self.heads["class"](F.relu(feats))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = F.relu(self._features(x))
        return {name: head(hidden) for name, head in self.heads.items()}

    def embed_all(self, x: torch.Tensor, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and class logits of many clips (model space, any device), batched; CPU out."""
        return features.embed_all(self, x, batch_size)

    @torch.no_grad()
    def read(self, x: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """[B, 3] predicted (class, colour, motion) of clips in model space."""
        device = next(self.parameters()).device
        self.eval()
        out = []
        for i in range(0, len(x), batch_size):
            logits = self(x[i : i + batch_size].to(device, torch.float32))
            out.append(torch.stack([logits[name].argmax(-1) for name in HEADS], dim=1).cpu())
        return torch.cat(out)


def load_or_train(spec: VideoFeatureSpec, cache_dir: Path | None = None, device: str = "cpu") -> VideoFeatureNet:
    """The cached classifier for `spec`, training (and caching) it first on a cache miss."""
    net = features.seeded(spec.seed, lambda: VideoFeatureNet(spec.width, spec.feature_dim))

    def fit() -> None:
        clips, attributes, _ = procedural_video.generate_clips(
            spec.train_items, stream="features", resolution=spec.resolution, frames=spec.frames
        )
        x_all = clips.float() / 127.5 - 1.0

        def batch_loss(idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            logits = net(x_all[idx])
            return sum(F.cross_entropy(logits[name], attributes[idx, j]) for j, name in enumerate(HEADS))

        features.fit_one_cycle(net, len(x_all), spec, batch_loss)

    return features.load_or_fit(net, features.cache_file(spec.key(), cache_dir), fit).to(device).eval()


def clip_agreement(net: VideoFeatureNet, clips: torch.Tensor, attributes: torch.Tensor) -> dict:
    """The share of clips whose class, colour and motion read back as `attributes` asked, and all three at once;
    "chance" is what a model that ignores the prompt scores (the asked values' frequencies, squared and summed)."""
    read = net.read(clips)
    asked = attributes[: len(read)]
    hits = read == asked
    out = {name: float(hits[:, j].float().mean()) for j, name in enumerate(HEADS)}
    out["all"] = float(hits.all(dim=1).float().mean())
    chance = {}
    for j, name in enumerate(HEADS):
        freq = torch.bincount(asked[:, j], minlength=HEADS[name]).float() / len(asked)
        chance[name] = float((freq**2).sum())
    joint = torch.unique(asked, dim=0, return_counts=True)[1].float() / len(asked)
    chance["all"] = float((joint**2).sum())
    out["chance"] = chance
    return out


if __name__ == "__main__":  # python -m isles.router.video_features [FRAMES RESOLUTION]
    import sys

    logging.basicConfig(level=logging.INFO)
    frames = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    res = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    began = time.perf_counter()
    net = load_or_train(VideoFeatureSpec(frames=frames, resolution=res))
    clips, attrs, _ = procedural_video.generate_clips(1000, stream="reference", resolution=res, frames=frames)
    result = clip_agreement(net, clips.float() / 127.5 - 1, attrs)
    print({k: round(v, 3) for k, v in result.items() if k != "chance"}, f"({time.perf_counter() - began:.0f}s)")
