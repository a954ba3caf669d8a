"""The feature network for FID on the built-in data sets: a small CNN classifier, trained deterministically.

Trained by this code (never downloaded) on data disjoint from the FID reference, and cached as safetensors in the
user cache dir, keyed by everything that determines its weights. Features are taken before the last non-linearity.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from isles.protocol.errors import IslesError
from isles.protocol.files import atomic_write_bytes, canonical_json

log = logging.getLogger(__name__)
M = TypeVar("M", bound=nn.Module)
VERSION = 2  # bump when the architecture or training procedure changes: old cache entries are then ignored
# 2: trained on one CPU thread (load_or_fit), so the weights no longer depend on the caller's thread count


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that determines the feature network's weights (its hash names the cache entry)."""

    source: str  # "procedural" (trained on its own generator stream) or a data set name + data hash
    channels: int
    resolution: int
    num_classes: int
    train_items: int = 20_000  # procedural only: items drawn from the generator's "features" stream
    epochs: int = 3  # 97% held-out accuracy on procedural; about 2 minutes on one CPU core
    batch_size: int = 128
    lr: float = 3e-3
    seed: int = 0
    width: int = 32
    feature_dim: int = 64  # small: FID covariances must be estimable from a few hundred samples
    data_sha256: str = ""  # for data passed in: a hash of the training pixels and labels
    version: int = VERSION

    def key(self) -> str:
        return hashlib.sha256(canonical_json(asdict(self))).hexdigest()[:16]


class FeatureNet(nn.Module):
    """(conv-BN-ReLU, max-pool) x3 -> conv-BN-ReLU -> global average -> linear (the features) -> ReLU -> linear."""

    def __init__(self, channels: int, num_classes: int, width: int = 32, feature_dim: int = 64):
        super().__init__()
        widths = [channels, width, width * 2, width * 4, width * 4]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU())
            for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.embed = nn.Linear(width * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [-1, 1], [B, C, H, W] -> (features [B, D] before the last ReLU, logits [B, classes])."""
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i < len(self.blocks) - 1 and min(h.shape[-2:]) >= 2:
                h = F.max_pool2d(h, 2)
        features = self.embed(h.mean(dim=(-2, -1)))
        return features, self.head(F.relu(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]

    def embed_all(self, x: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        return embed_all(self, x, batch_size)


@torch.no_grad()
def embed_all(net: nn.Module, x: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and logits (`net.features_and_logits`) of many inputs (model space, any device), batched, on the
    network's device; CPU out."""
    device = next(net.parameters()).device
    feats, logits = [], []
    net.eval()
    for i in range(0, len(x), batch_size):
        f, lg = net.features_and_logits(x[i : i + batch_size].to(device, torch.float32))
        feats.append(f.cpu())
        logits.append(lg.cpu())
    return torch.cat(feats), torch.cat(logits)


def default_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("isles")) / "features"


def procedural_spec(**overrides) -> FeatureSpec:
    from isles.experts import procedural

    return replace(FeatureSpec("procedural", 3, 32, procedural.NUM_CLASSES), **overrides)


def data_spec(source: str, pixels: torch.Tensor, labels: torch.Tensor, num_classes: int, **overrides) -> FeatureSpec:
    """The spec of a feature network trained on given pixels (e.g. the training split of `digits`)."""
    digest = hashlib.sha256(pixels.contiguous().numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
    # Small data sets (digits: ~900 training items) need many epochs to reach a few hundred optimizer steps.
    epochs = max(FeatureSpec.epochs, math.ceil(30_000 / max(1, len(pixels))))
    base = FeatureSpec(source, pixels.shape[1], pixels.shape[-1], num_classes, epochs=epochs, data_sha256=digest)
    return replace(base, **overrides)


def load_or_train(
    spec: FeatureSpec,
    pixels: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    cache_dir: Path | None = None,
    device: str = "cpu",
) -> FeatureNet:
    """The cached feature network for `spec`, training (and caching) it first if needed.

    Procedural specs draw their own training items; any other spec needs the uint8 `pixels` and `labels` it hashes.
    """
    net = seeded(spec.seed, lambda: FeatureNet(spec.channels, spec.num_classes, spec.width, spec.feature_dim))

    def fit() -> None:  # only on a cache miss
        train(net, *_training_data(spec, pixels, labels), spec)

    return load_or_fit(net, cache_file(spec.key(), cache_dir), fit).to(device).eval()


def _training_data(
    spec: FeatureSpec, pixels: torch.Tensor | None, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.source == "procedural":
        from isles.experts import procedural

        return procedural.generate(spec.train_items, seed=0, stream="features", resolution=spec.resolution)
    if pixels is None or labels is None:
        raise IslesError(f"no training data for the feature network of {spec.source!r}", hint="pass pixels and labels")
    return pixels, labels


def seeded(seed: int, build: Callable[[], M]) -> M:
    """`build()` (a network's initialisation) under `seed`, without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def cache_file(key: str, cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"{key}.safetensors"


def load_or_fit(net: M, path: Path, fit: Callable[[], None]) -> M:
    """`net` with the weights cached at `path`; without a readable entry, `fit()` trains it and writes the entry."""
    from safetensors.torch import load_file, save

    if path.exists():
        initial = {k: v.clone() for k, v in net.state_dict().items()}
        try:
            net.load_state_dict(load_file(path))
            return net
        except Exception as exc:  # a truncated or stale cache entry: retrain (from the seeded init) rather than fail
            log.warning("ignoring unreadable cached network %s (%s)", path, exc)
            net.load_state_dict(initial)
    start = time.perf_counter()
    # One CPU thread whatever the caller set: a multi-threaded run sums floats in an order that depends on the thread
    # count, and a network trained with 2 threads differed from one trained with 1 by up to 0.39 in a weight, which
    # moved the FID floor of the same benchmark from 2.91 to 2.60.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit()
    finally:
        torch.set_num_threads(threads)
    log.info("trained %s in %.0fs; cached at %s", type(net).__name__, time.perf_counter() - start, path)
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in net.state_dict().items()}))
    return net


def train(net: FeatureNet, pixels: torch.Tensor, labels: torch.Tensor, spec: FeatureSpec) -> None:
    """Adam on cross-entropy, fixed seed for init and data order: the same spec gives the same weights on CPU."""
    x_all = pixels.float() / 127.5 - 1.0

    def batch_loss(idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = x_all[idx]
        if spec.source != "procedural":  # little data: random shifts of up to 1/8 of the side against overfitting
            x = _random_shift(x, generator)
        return F.cross_entropy(net(x), labels[idx])

    fit_one_cycle(net, len(x_all), spec, batch_loss)


def fit_one_cycle(net: nn.Module, n: int, spec, batch_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor]):
    """Adam with a one-cycle learning rate over spec.epochs seeded permutations of n items, in batches of
    spec.batch_size: `batch_loss(indices, generator)` gives each batch's loss (the generator is the data order's,
    for augmentations). Deterministic for a spec (seed, lr, epochs, batch_size) on the CPU."""
    generator = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.Adam(net.parameters(), lr=spec.lr)
    steps = spec.epochs * max(1, n // spec.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=steps, pct_start=0.15)
    net.train()
    step = 0
    for _ in range(spec.epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(0, len(order) - spec.batch_size + 1, spec.batch_size):
            if step >= steps:
                break
            loss = batch_loss(order[i : i + spec.batch_size], generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    net.eval()


def _random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    pad = max(1, x.shape[-1] // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


if __name__ == "__main__":  # train (or load) the procedural feature network and report its held-out accuracy
    from isles.experts import procedural

    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    net = load_or_train(procedural_spec())
    x, y = procedural.generate(5000, stream="reference")
    _, logits = net.embed_all(x.float() / 127.5 - 1)
    print(f"held-out accuracy {(logits.argmax(1) == y).float().mean():.3f} ({time.perf_counter() - t0:.0f}s)")
