"""Partition a data set into a run: embed every item, cluster with k-means, write one shard per cluster (with a
held-out split), publish the shards to the artifact store and build the run manifest. `isles partition` wraps it.

It streams: one pass reads the source in batches (VAE-encoding items into latents and embedding captions with the
text encoder, each once, here), spooling rows to disk and keeping only the small clustering features; a second pass
copies the spooled rows into one shard per cluster. Memory stays at a few batches, whatever the data set's size.
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

from isles.experts.data import item_layout
from isles.protocol.errors import IslesError
from isles.protocol.files import atomic_write_json

log = logging.getLogger(__name__)

OBJECTIVES_HELP = "fm, ddpm, ddpm-v, mixed:N or mixed-v:N (N DDPM or DDPM-v experts, the rest flow matching)"
COPY_CHUNK_BYTES = 64 << 20  # rows copied from the spool into the shards at a time
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
    steps: int = 2000  # per expert; with steps_split "proportional", the mean over experts (the total is fixed)
    steps_split: str = "equal"  # "equal" (DDM) or "proportional": each expert's steps in proportion to its shard
    global_batch: int = 64
    lr: float = 2e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    # The router recipe (a small classifier: a few % of the experts' compute).
    router_preset: str = "cnn-small"
    router_steps: int = 2000
    router_batch: int = 128
    router_lr: float = 1e-3
    router_text: bool = False  # text runs: the router also reads the prompt (the papers' does not)
    description: str = ""
    device: str | None = None  # for DINOv2 / CLIP encoders, the VAE and the text encoder; default: the best available
    # What the experts are conditioned on: "class" (labelled data), "text" (captions), "none"; None: class if labelled.
    conditioning: str | None = None
    text_encoder: str = "clip"  # minilm (offline), clip (Paris 1.0: CLIP ViT-L/14), hf:<id> or a folder
    text_max_length: int | None = None  # tokens per caption (default: the encoder's, 77 at most)
    cond_dropout: float = 0.1  # captions (or labels) replaced by the null condition this often (Paris: 0.1)
    hflip: bool = False  # experts train on random horizontal flips (not for captions that name left and right)
    vae: str | None = None  # a diffusers AutoencoderKL (hf:<id>, repo id or folder): shards hold its latents
    image_column: str | None = None  # hf: captioned data sets
    caption_column: str | None = None
    limit: int | None = None  # read at most this many items of the source
    frames: int | None = None  # video sources: frames per clip (default: 16)
    fps: float | None = None  # video files: frames sampled per second (default: the file's own rate)
    # The run authority: the owner's identity folder signs the manifest (default: the user's identity); ensembles and
    # rejections count only from the aggregator keys (`[owner:ssh-rsa ...]`, default: the owner's).
    identity: Path | None = None
    aggregators: tuple[str, ...] = ()
    progress_timeout: float = 900.0  # a lease holder without verified progress this long loses its unit


@dataclass
class PartitionResult:
    manifest: object  # protocol.records.RunManifest
    manifest_path: Path
    sizes: list[int]
    val_sizes: list[int]
    class_counts: list[dict[int, int]]  # per cluster: {class: items}, empty when unlabelled
    shard_paths: list[Path]
    examples: list[torch.Tensor]  # per cluster: a few items (uint8 or latents) for a preview strip
    skipped: int = 0  # items of the source that could not be decoded (skipped)
    skipped_examples: list[str] | None = None
    captions: list[list[str]] | None = None  # per cluster: the captions of the examples (text runs)
    skipped_short: int = 0  # videos too short to pad to the frame count (skipped)


def parse_objectives(spec: str, k: int) -> list[str]:
    """'fm' | 'ddpm' | 'ddpm-v' | 'mixed:N' | 'mixed-v:N' -> one objective per shard; mixed:N gives DDPM (eps
    prediction) to the first N experts, mixed-v:N DDPM with v prediction."""
    text = spec.strip().lower()
    if text in ("fm", "ddpm", "ddpm-v"):
        return [text] * k
    if match := re.fullmatch(r"mixed(-v)?:(\d+)", text):
        n, ddpm = int(match.group(2)), "ddpm-v" if match.group(1) else "ddpm"
        if n > k:
            raise IslesError(f"{text} asks for more DDPM experts than the {k} experts",
                             hint=f"use mixed{match.group(1) or ''}:{k // 2}")  # fmt: skip
        return [ddpm] * n + ["fm"] * (k - n)
    raise IslesError(f"unknown objectives {spec!r}", hint=f"use one of: {OBJECTIVES_HELP}")


STEPS_SPLITS = ("equal", "proportional")


def split_steps(steps: int, sizes: list[int], mode: str) -> list[int]:
    """Steps per expert: `steps` each ("equal", as DDM does), or the same total, k x steps, split in proportion to
    the shards' sizes ("proportional": a shard twice as large gets twice the steps; at least one step each)."""
    if mode not in STEPS_SPLITS:
        raise IslesError(f"unknown steps split {mode!r}", hint=f"use one of: {', '.join(STEPS_SPLITS)}")
    k = len(sizes)
    if mode == "equal" or k == 0 or sum(sizes) == 0:
        return [steps] * k
    total = steps * k
    exact = [total * s / sum(sizes) for s in sizes]
    out = [max(1, int(e)) for e in exact]
    # Largest remainders get the steps rounding left over, so the total stays k x steps (where k x 1 allows).
    for i in sorted(range(k), key=lambda i: exact[i] - int(exact[i]), reverse=True)[: max(0, total - sum(out))]:
        out[i] += 1
    return out


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
    from isles.experts.device import pick_device
    from isles.protocol.artifacts import open_store

    from .encoders import ClipEncoder, make_encoder
    from .partition_sources import SourceOptions, open_batches

    k = config.experts
    objectives = parse_objectives(config.objectives, k)
    split_steps(config.steps, [1] * k, config.steps_split)  # an unknown split fails before any data is read
    if not 0.0 <= config.val_fraction < 1.0:
        raise IslesError(f"--val-fraction must be in [0, 1), got {config.val_fraction}")
    if config.conditioning not in (None, "class", "text", "none"):
        raise IslesError(f"unknown conditioning {config.conditioning!r}", hint="use class, text or none")
    text = config.conditioning == "text"
    if config.router_text and not text:
        raise IslesError(
            "a text-aware router (--router-text) needs captions", hint="add --conditioning text, or leave it out"
        )
    device = pick_device(config.device)
    source = open_batches(
        SourceOptions(
            config.source,
            captions=text,
            resolution=config.resolution,
            batch=config.embed_batch,
            image_column=config.image_column,
            caption_column=config.caption_column,
            limit=config.limit,
            frames=config.frames,
            fps=config.fps,
        )
    )
    encoder = make_encoder(config.encoder, device=device, seed=config.seed)
    if source.is_video:
        encoder = ClipEncoder(encoder, seed=config.seed)
    text_encoder = None
    if text:
        from .text_encoder import load_text_encoder

        text_encoder = load_text_encoder(config.text_encoder, max_length=config.text_max_length, device=device)
    vae = None
    if config.vae:
        from .vae import load_vae

        vae = load_vae(config.vae, device=device)

    out = Path(config.out)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    name = config.name or default_name(config.source)

    # 1. One pass over the source: items (latents) and caption embeddings spooled to disk, features kept.
    spool_path = out / ".partition-spool.safetensors"
    features, labelled = _spool(source, spool_path, encoder, text_encoder, vae, on_progress)
    try:
        n = features.shape[0]
        if n == 0:
            raise IslesError(f"{config.source} gave no items", hint=_skipped_hint(source))
        if k > n:
            raise IslesError(
                f"cannot make {k} clusters from {n} items", hint=f"use --experts {max(1, n // 10)} or fewer"
            )
        clusters = torch.from_numpy(kmeans(features, k, seed=config.seed))
        val_mask = cluster_split(clusters, k, config.val_fraction, config.seed)

        # 2. One shard per cluster, copied from the spool in row order, then published as one dataset revision.
        for stale in shard_dir.glob("shard-*.safetensors"):
            stale.unlink()
        meta = dict(source.meta)
        if text_encoder is not None:
            meta["text_encoder"] = text_encoder.spec.to_dict()
        if vae is not None:
            meta.update(latent=True, vae=vae.spec.to_dict())
        if source.attribute_names:
            meta["attribute_names"] = source.attribute_names
        meta.update(num_clusters=k, run_name=name, encoder=config.encoder)
        written = _write_shards(spool_path, clusters, val_mask, shard_dir, meta, on_progress)
    finally:
        spool_path.unlink(missing_ok=True)
    shard_paths, hashes, sizes, val_sizes, class_counts, examples, captions = written
    shape = _expert_shape(config, source, labelled, text_encoder, examples)  # refuses a misfit before publishing

    store_uri = config.store or str((out / "store").resolve())
    store = open_store(store_uri)
    repo = f"{name}-shards"
    revision = store.publish(repo, shard_dir, kind="dataset", message=f"isles partition: {k} shards of {name}")
    log.info("published %d shards to %s as %s@%s", k, store_uri, repo, revision[:12])

    # 3. The manifest: shards + one recipe per shard + the router recipe. run_id covers all of it.
    manifest = _manifest(
        config, name, objectives, source, labelled, shape, text_encoder, vae, store_uri, repo, revision, written, n
    )
    manifest_path = out / "manifest.json"
    atomic_write_json(manifest_path, manifest.dict())
    return PartitionResult(
        manifest,
        manifest_path,
        sizes,
        val_sizes,
        class_counts,
        shard_paths,
        examples,
        skipped=source.skipped,
        skipped_examples=source.skipped_examples,
        captions=captions if text else None,
        skipped_short=source.skipped_short,
    )


def _skipped_hint(source) -> str:
    if source.skipped:
        return f"{source.skipped} items could not be decoded (e.g. {', '.join(source.skipped_examples[:3])})"
    return "check the source path and its contents"


class _Spool:
    """Pass 1's writer: each batch's rows (items or their latents, labels, caption embeddings and captions) go to a
    spool shard on disk; only the clustering features stay in memory."""

    def __init__(self, path: Path, encoder, text_encoder, vae, on_progress, size_hint: int | None):
        from isles.experts.shard_file import ShardWriter

        self.writer = ShardWriter(path)
        self.encoder, self.text_encoder, self.vae = encoder, text_encoder, vae
        self.on_progress, self.size_hint = on_progress, size_hint
        self.features: list[np.ndarray] = []
        self.labelled = True  # every item so far has a label
        self.done = 0

    def add(self, batch) -> None:
        from isles.experts.data import encode_captions

        self.features.append(self.encoder.encode(batch.pixels))
        items = batch.pixels if self.vae is None else self.vae.encode(batch.pixels).cpu()
        text = mask = captions = None
        if self.text_encoder is not None:
            if batch.captions is None:
                raise IslesError("the source gave items without captions", hint="text runs need captioned data")
            text, mask = self.text_encoder(batch.captions)
            text, mask, captions = text.to(torch.float16), mask.to(torch.uint8), encode_captions(batch.captions)
        self.labelled = self.labelled and batch.labels is not None
        labels = batch.labels if self.labelled else None
        self.writer.append(
            items=items, labels=labels, text=text, text_mask=mask, captions=captions, attributes=batch.attributes
        )
        self.done += len(batch.pixels)
        if self.on_progress:
            self.on_progress("embedding", self.done, self.size_hint or self.done)

    def close(self) -> tuple[np.ndarray, bool]:
        """Write the spool file; the clustering features [N, d] and whether every item has a label."""
        from isles.experts.data import set_null_text

        if self.writer.rows == 0:
            self.writer.abort()
            return np.zeros((0, 1), dtype=np.float32), False
        if self.text_encoder is not None:
            set_null_text(self.writer, self.text_encoder.null())
        self.writer.close({})
        return np.concatenate(self.features, axis=0), self.labelled


def _spool(source, path: Path, encoder, text_encoder, vae, on_progress) -> tuple[np.ndarray, bool]:
    """Read every batch of the source once into a spool shard at `path` (see _Spool). An encoder that is fitted
    (PCA) sees the first `fit_items` items first: those batches are held until it is."""
    spool = _Spool(path, encoder, text_encoder, vae, on_progress, source.size_hint)
    fit_items = getattr(encoder, "fit_items", 0)
    held: list | None = [] if fit_items else None
    try:
        for batch in source:
            if held is None:
                spool.add(batch)
                continue
            held.append(batch)
            if sum(len(b.pixels) for b in held) >= fit_items:
                encoder.fit(torch.cat([b.pixels for b in held]))
                for b in held:
                    spool.add(b)
                held = None
        if held:
            encoder.fit(torch.cat([b.pixels for b in held]))
            for b in held:
                spool.add(b)
        return spool.close()
    except BaseException:
        spool.writer.abort()
        raise


def _write_shards(spool_path: Path, clusters: torch.Tensor, val_mask: torch.Tensor, shard_dir: Path, meta, progress):
    """Copy the spooled rows into one shard per cluster (rows in source order); returns paths, hashes, sizes,
    held-out sizes, class counts, example items and example captions per cluster."""
    from isles.experts.data import decode_captions, set_null_text, shard_header
    from isles.experts.shard_file import ShardFile, ShardWriter

    spool = ShardFile(spool_path)
    k = int(clusters.max()) + 1
    columns = {name: spool.column(name) for name in spool.entries if name not in ("null_text", "null_text_mask")}
    labels = spool.tensor("labels") if "labels" in spool else None
    writers = [ShardWriter(shard_dir / f"shard-{c}.safetensors") for c in range(k)]
    n = clusters.numel()
    row_bytes = sum(column.row_bytes for column in columns.values())
    chunk = max(1, min(4096, COPY_CHUNK_BYTES // max(1, row_bytes)))  # CLIP captions are 118 kB a row
    try:
        for start in range(0, n, chunk):
            rows = torch.arange(start, min(n, start + chunk))
            values = {name: column.read(rows) for name, column in columns.items()}
            for c in range(k):
                member = (clusters[rows] == c).nonzero(as_tuple=True)[0]
                if member.numel() == 0:
                    continue
                picked = {name: value[member] for name, value in values.items()}
                writers[c].append(
                    **picked,
                    clusters=torch.full((member.numel(),), c, dtype=torch.int64),
                    val_mask=val_mask[rows][member].to(torch.uint8),
                )
            if progress:
                progress("shards", min(n, start + chunk), n)
        null = (spool.tensor("null_text"), spool.tensor("null_text_mask")) if "null_text" in spool else None
        hashes = []
        for c, writer in enumerate(writers):
            set_null_text(writer, null)
            hashes.append(writer.close(shard_header({**meta, "cluster": c})))
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    paths = [w.path for w in writers]
    sizes = [int((clusters == c).sum()) for c in range(k)]
    val_sizes = [int(val_mask[clusters == c].sum()) for c in range(k)]
    class_counts: list[dict[int, int]] = []
    examples, captions = [], []
    for c in range(k):
        member = (clusters == c).nonzero(as_tuple=True)[0]
        if labels is not None:
            values, counts = torch.unique(labels[member], return_counts=True)
            class_counts.append({int(v): int(m) for v, m in zip(values, counts, strict=True)})
        else:
            class_counts.append({})
        examples.append(columns["items"].read(member[:8]))
        captions.append(decode_captions(columns["captions"].read(member[:8])) if "captions" in columns else [])
    return paths, hashes, sizes, val_sizes, class_counts, examples, captions


def _expert_shape(config, source, labelled, text_encoder, examples) -> dict:
    """The data-shape fields of every expert's recipe, checked before anything is published: the source has the labels
    class conditioning needs, and the preset takes the shape (e.g. a transformer's tokens hold a patch of these
    channels). Otherwise every volunteer would fail at its first step."""
    from isles.experts.presets import model_config

    channels, frames, height, _ = item_layout(examples[0].shape[1:])
    num_classes = source.meta.get("num_classes") if labelled else None
    conditioning = config.conditioning or ("class" if num_classes else "none")
    if conditioning == "class" and not num_classes:
        hint = "use --conditioning none (or text, for captioned data)"
        raise IslesError(f"{config.source} has no class labels", hint=hint)
    shape = {
        "channels": channels,
        "resolution": height,
        "frames": frames,
        "num_classes": num_classes if conditioning == "class" else None,
        "conditioning": conditioning,
        "text_width": text_encoder.spec.width if text_encoder is not None else None,
        "text_length": text_encoder.spec.max_length if text_encoder is not None else None,
    }
    model_config(config.preset, channels, height, shape["num_classes"], shape["text_width"], frames)
    return shape


def _manifest(
    config, name, objectives, source, labelled, shape, text_encoder, vae, store_uri, repo, revision, written, n
):
    from isles.protocol.records import ExpertRecipe, RouterRecipe, RunManifest, ShardRef, TextEncoderRef, VaeRef

    shard_paths, hashes, sizes, val_sizes, _, _, _ = written
    k = len(shard_paths)
    channels, frames, height = shape["channels"], shape["frames"], shape["resolution"]
    num_classes = source.meta.get("num_classes") if labelled else None
    conditioning = shape["conditioning"]
    steps = split_steps(config.steps, [int(x) for x in sizes], config.steps_split)
    experts = [
        ExpertRecipe(
            preset=config.preset,
            objective=objectives[c],
            **shape,
            cond_dropout=float(config.cond_dropout),
            hflip=config.hflip,
            steps=steps[c],
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
        # Class-aware router r(x_t, t, c) when the experts take a class: k-means clusters mix classes. A text run's
        # router sees x_t and t only, as in the papers, unless the run asks for a text-aware one.
        class_conditional=conditioning == "class",
        text_aware=bool(config.router_text),
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
    space = f"latents of {config.vae} " if vae is not None else ""
    description = config.description or (
        f"{config.source}: {n} {'clips' if frames else 'items'}, {space}{channels}x"
        + (f"{frames}x" if frames else "")
        + f"{height}x{height}"
        + (f", {num_classes} classes" if num_classes else ", unlabelled")
        + (f", captions embedded by {text_encoder.spec.id}" if text_encoder is not None else "")
        + f"; {k} clusters by k-means on {config.encoder} features"
    )
    from isles.protocol.identity import default_identity_dir, load_identity

    return RunManifest.create(
        signer=load_identity(config.identity or default_identity_dir()),
        aggregators=config.aggregators,
        progress_timeout=float(config.progress_timeout),
        name=name,
        dataset=config.source,
        description=description,
        store=store_uri,
        shards=shards,
        experts=experts,
        router=router,
        created_time=float(time.time()),
        text_encoder=TextEncoderRef(**text_encoder.spec.to_dict()) if text_encoder is not None else None,
        vae=VaeRef(**vae.spec.to_dict()) if vae is not None else None,
    )
