"""Partition a data set into a run: embed every item, cluster with k-means, write one shard per cluster (with a
held-out split), publish the shards to the artifact store and build the run manifest. `isles partition` wraps it.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from isles.protocol.errors import IslesError
from isles.protocol.files import atomic_write_json

log = logging.getLogger(__name__)

OBJECTIVES_HELP = "fm, ddpm, or mixed:N (N DDPM experts, the rest flow matching)"
MINIBATCH_ABOVE = 20_000  # items; above this, mini-batch k-means (one pass over a sample per step) instead of Lloyd


@dataclass(frozen=True)
class PartitionConfig:
    """Everything `isles partition` decides; the manifest records what the experts and router must train."""

    source: str
    experts: int
    out: Path
    store: str | None = None  # default: a local store under out/store
    name: str | None = None  # default: from the source
    encoder: str = "pixels"
    resolution: int | None = None  # default: the source's own
    val_fraction: float = 0.1
    seed: int = 0
    embed_batch: int = 1024
    # The expert recipe, the same for every shard except the objective.
    preset: str = "unet-tiny"
    objectives: str = "fm"
    steps: int = 2000
    global_batch: int = 64
    lr: float = 2e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    # The router recipe (a small classifier: a few % of the experts' compute).
    router_preset: str = "cnn-small"
    router_steps: int = 2000
    router_batch: int = 128
    router_lr: float = 1e-3
    description: str = ""
    device: str | None = None  # for DINOv2 / CLIP encoders; default: the best available


@dataclass
class PartitionResult:
    manifest: object  # protocol.records.RunManifest
    manifest_path: Path
    sizes: list[int]
    val_sizes: list[int]
    class_counts: list[dict[int, int]]  # per cluster: {class: items}, empty when unlabelled
    shard_paths: list[Path]
    examples: list[torch.Tensor]  # per cluster: a few items (uint8 or latents) for a preview strip


def parse_objectives(spec: str, k: int) -> list[str]:
    """'fm' | 'ddpm' | 'mixed:N' -> one objective per shard; mixed:N gives DDPM to the first N experts."""
    text = spec.strip().lower()
    if text in ("fm", "ddpm"):
        return [text] * k
    if match := re.fullmatch(r"mixed:(\d+)", text):
        n = int(match.group(1))
        if n > k:
            raise IslesError(f"mixed:{n} asks for more DDPM experts than the {k} experts", hint=f"use mixed:{k // 2}")
        return ["ddpm"] * n + ["fm"] * (k - n)
    raise IslesError(f"unknown objectives {spec!r}", hint=f"use one of: {OBJECTIVES_HELP}")


def kmeans(features: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Cluster ids [N] from k-means, relabelled so that cluster 0 is the largest (deterministic for a seed)."""
    n = features.shape[0]
    if k < 1:
        raise IslesError(f"--experts must be at least 1, got {k}")
    if k > n:
        raise IslesError(f"cannot make {k} clusters from {n} items", hint=f"use --experts {max(1, n // 10)} or fewer")
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if n > MINIBATCH_ABOVE:
        model = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=4096, n_init=3, max_no_improvement=20)
    else:
        model = KMeans(n_clusters=k, random_state=seed, n_init=4)
    with warnings.catch_warnings():  # duplicate points: reported below as empty clusters, in one line
        warnings.simplefilter("ignore")
        ids = model.fit_predict(features.astype(np.float32)).astype(np.int64)
    sizes = np.bincount(ids, minlength=k)
    if (sizes == 0).any():
        raise IslesError(
            f"k-means left cluster(s) {np.flatnonzero(sizes == 0).tolist()} empty ({k} clusters of {n} items)",
            hint="use fewer --experts, or another --encoder",
        )
    order = np.argsort(-sizes, kind="stable")  # old id of the largest cluster first
    relabel = np.empty(k, dtype=np.int64)
    relabel[order] = np.arange(k)
    return relabel[ids]


def cluster_split(clusters: torch.Tensor, k: int, fraction: float, seed: int) -> torch.Tensor:
    """A validation mask held out inside every cluster separately, so each shard has its own held-out items."""
    from isles.experts.data import split_mask

    val = torch.zeros(clusters.shape[0], dtype=torch.bool)
    for c in range(k):
        idx = (clusters == c).nonzero(as_tuple=True)[0]
        val[idx] = split_mask(idx.numel(), fraction, seed=seed + c)
    return val


def default_name(source: str) -> str:
    # "hf:user/cifar10:train" -> "cifar10-train", "procedural:2000" -> "procedural-2000", "/data/faces/" -> "faces"
    base = source.removeprefix("hf:").rstrip("/").split("/")[-1] or "run"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._") or "run"


def partition(config: PartitionConfig, on_progress: Callable[[str, int, int], None] | None = None) -> PartitionResult:
    """Run the whole partition and write out/manifest.json; `on_progress(stage, done, total)` reports progress."""
    from isles.experts.data import load_source, save_shard
    from isles.protocol.artifacts import open_store
    from isles.protocol.records import ExpertRecipe, RouterRecipe, RunManifest, ShardRef

    from .encoders import embed_items, make_encoder

    k = config.experts
    objectives = parse_objectives(config.objectives, k)
    if not 0.0 <= config.val_fraction < 1.0:
        raise IslesError(f"--val-fraction must be in [0, 1), got {config.val_fraction}")
    data = load_source(config.source, resolution=config.resolution)
    n = len(data)
    if k > n:
        raise IslesError(f"cannot make {k} clusters from {n} items", hint=f"use --experts {max(1, n // 10)} or fewer")

    # 1. Embed every item (in batches) and cluster.
    from isles.experts.device import pick_device

    encoder = make_encoder(config.encoder, device=pick_device(config.device), seed=config.seed)
    done = 0

    def step(batch_items: int) -> None:
        nonlocal done
        done += batch_items
        if on_progress:
            on_progress("embedding", done, n)

    features = embed_items(data.items, encoder, batch_size=config.embed_batch, on_batch=step)
    clusters = torch.from_numpy(kmeans(features, k, seed=config.seed))
    val_mask = cluster_split(clusters, k, config.val_fraction, config.seed)

    # 2. One shard per cluster, written atomically and published as one dataset revision.
    out = Path(config.out)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    for stale in shard_dir.glob("shard-*.safetensors"):
        stale.unlink()
    name = config.name or default_name(config.source)
    channels, height, _ = data.shape
    meta = dict(data.meta)
    shard_paths, hashes, sizes, val_sizes, class_counts, examples = [], [], [], [], [], []
    for c in range(k):
        member = clusters == c
        shard = data.subset(member)
        shard.clusters = torch.full((len(shard),), c, dtype=torch.long)
        shard.val_mask = val_mask[member]
        shard = shard.with_meta(**meta, cluster=c, num_clusters=k, run_name=name, encoder=config.encoder)
        path = shard_dir / f"shard-{c}.safetensors"
        hashes.append(save_shard(shard, path))
        shard_paths.append(path)
        sizes.append(len(shard))
        val_sizes.append(int(shard.val_mask.sum()))
        if shard.labels is not None:
            values, counts = torch.unique(shard.labels, return_counts=True)
            class_counts.append({int(v): int(m) for v, m in zip(values, counts, strict=True)})
        else:
            class_counts.append({})
        examples.append(shard.items[:8])
        if on_progress:
            on_progress("shards", c + 1, k)

    store_uri = config.store or str((out / "store").resolve())
    store = open_store(store_uri)
    repo = f"{name}-shards"
    revision = store.publish(repo, shard_dir, kind="dataset", message=f"isles partition: {k} shards of {name}")
    log.info("published %d shards to %s as %s@%s", k, store_uri, repo, revision[:12])

    # 3. The manifest: shards + one recipe per shard + the router recipe. run_id covers all of it.
    num_classes = data.num_classes if data.labels is not None else None
    experts = [
        ExpertRecipe(
            preset=config.preset,
            objective=objectives[c],
            channels=channels,
            resolution=height,
            num_classes=num_classes,
            steps=config.steps,
            global_batch=config.global_batch,
            lr=float(config.lr),
            warmup_steps=config.warmup_steps,
            ema_decay=float(config.ema_decay),
            seed=config.seed + c,
        )
        for c in range(k)
    ]
    router = RouterRecipe(
        preset=config.router_preset,
        steps=config.router_steps,
        global_batch=config.router_batch,
        lr=float(config.router_lr),
        warmup_steps=min(100, config.router_steps // 10),
        ema_decay=0.999,
        seed=config.seed,
        # Class-aware router r(x_t, t, c) when the data has labels: k-means clusters mix classes.
        class_conditional=num_classes is not None,
    )
    shards = [
        ShardRef(
            repo=repo,
            revision=revision,
            path=path.name,
            sha256=digest,
            items=size,
            val_items=val,
            cluster=c,
        )
        for c, (path, digest, size, val) in enumerate(zip(shard_paths, hashes, sizes, val_sizes, strict=True))
    ]
    description = config.description or (
        f"{config.source}: {n} items {channels}x{height}x{height}"
        + (f", {num_classes} classes" if num_classes else ", unlabelled")
        + f"; {k} clusters by k-means on {config.encoder} features"
    )
    manifest = RunManifest.create(
        name=name,
        dataset=config.source,
        description=description,
        store=store_uri,
        shards=shards,
        experts=experts,
        router=router,
        created_time=float(time.time()),
    )
    manifest_path = out / "manifest.json"
    atomic_write_json(manifest_path, manifest.dict())
    return PartitionResult(manifest, manifest_path, sizes, val_sizes, class_counts, shard_paths, examples)
