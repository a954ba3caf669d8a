"""Shard data: fixed-shape items (uint8 images or float latents), labels, cluster ids and a validation split.

A shard is one safetensors file (tensors + JSON metadata in its header), written atomically and named by sha256.
`load_source("digits" | <image folder> | "hf:<name>")` reads a whole data set into one ShardData (cluster 0).
Images only: items are [N, C, H, W]; video clips ([N, C, F, H, W], Paris 2.0) are not supported yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from isles.protocol.errors import IslesError
from isles.protocol.files import atomic_write_bytes, sha256_file

FORMAT = "isles-shard-1"
VAL_FRACTION = 0.1
REQUIRED = {"items", "clusters", "val_mask"}  # tensors every shard file holds (labels are optional)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ShardData:
    """N items of one shape. items: uint8 [N, C, H, W] pixels (0..255) or float latents; labels: int64 [N] or
    None; clusters: int64 [N]; val_mask: bool [N] (True = held out for validation); meta: JSON-able dict with at
    least num_classes (None if unlabelled) and source."""

    items: torch.Tensor
    labels: torch.Tensor | None
    clusters: torch.Tensor
    val_mask: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.items.shape[0]
        if self.items.ndim != 4:
            raise IslesError(f"shard items must be [N, C, H, W], got shape {list(self.items.shape)}")
        for name in ("labels", "clusters", "val_mask"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (n,):
                raise IslesError(f"shard {name} has shape {list(value.shape)}, expected [{n}]")
        self.meta.setdefault("num_classes", None)

    def __len__(self) -> int:
        return self.items.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one item."""
        return tuple(self.items.shape[1:])  # type: ignore[return-value]

    @property
    def is_latent(self) -> bool:
        return self.items.dtype != torch.uint8

    @property
    def num_classes(self) -> int | None:
        return self.meta.get("num_classes")

    def subset(self, mask_or_index: torch.Tensor) -> ShardData:
        """The items selected by a bool mask or an index tensor (metadata kept)."""
        return ShardData(
            items=self.items[mask_or_index],
            labels=None if self.labels is None else self.labels[mask_or_index],
            clusters=self.clusters[mask_or_index],
            val_mask=self.val_mask[mask_or_index],
            meta=dict(self.meta),
        )

    def train_split(self) -> ShardData:
        return self.subset(~self.val_mask)

    def val_split(self) -> ShardData:
        return self.subset(self.val_mask)

    def with_meta(self, **meta: Any) -> ShardData:
        return replace(self, meta={**self.meta, **meta})


def to_model_space(items: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [-1, 1]; latents are returned as float32 unchanged (already unit scale)."""
    if items.dtype == torch.uint8:
        return items.float().div(127.5).sub(1.0)
    return items.float()


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 0..255."""
    return x.detach().float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def split_mask(n: int, fraction: float = VAL_FRACTION, seed: int = 0) -> torch.Tensor:
    """A fixed pseudo-random validation mask holding out round(fraction * n) items (at least 1 when n > 1)."""
    n_val = min(n - 1, max(1 if n > 1 else 0, round(fraction * n)))
    mask = torch.zeros(n, dtype=torch.bool)
    if n_val > 0:
        mask[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_val]] = True
    return mask


# --- the file format -----------------------------------------------------------------------------------------------


def shard_bytes(shard: ShardData) -> bytes:
    from safetensors.torch import save

    tensors = {"items": shard.items.contiguous(), "clusters": shard.clusters.to(torch.int64).contiguous()}
    tensors["val_mask"] = shard.val_mask.to(torch.uint8).contiguous()  # bool is not portable across readers
    if shard.labels is not None:
        tensors["labels"] = shard.labels.to(torch.int64).contiguous()
    # One metadata key: safetensors writes several in hash-map order, and equal shards must be equal bytes.
    header = json.dumps({"format": FORMAT, "meta": shard.meta}, sort_keys=True)
    return save(tensors, metadata={"isles": header})


def save_shard(shard: ShardData, path: str | Path) -> str:
    """Write the shard as one safetensors file (atomically) and return its sha256."""
    import hashlib

    data = shard_bytes(shard)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_shard(path: str | Path, sha256: str | None = None) -> ShardData:
    """Read a shard file; with `sha256`, refuse a file whose hash differs (a corrupt or wrong download)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise IslesError(f"shard file not found: {path}", hint="check the path, or use a built-in source: digits")
    if sha256 is not None and sha256_file(path) != sha256:
        raise IslesError(f"shard {path} is corrupt: its sha256 does not match", hint="delete it and download again")
    try:
        with safe_open(path, framework="pt") as f:  # tensor by tensor: a large shard is not held in memory twice
            metadata = json.loads((f.metadata() or {}).get("isles", "{}"))
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, ValueError, OSError, AttributeError) as exc:
        raise IslesError(
            f"{path} is not a readable shard file ({exc})", hint="rebuild it with `isles partition`"
        ) from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT or not REQUIRED <= tensors.keys():
        raise IslesError(f"{path} is a safetensors file but not an isles shard", hint="rebuild it with isles")
    return ShardData(
        items=tensors["items"],
        labels=tensors.get("labels"),
        clusters=tensors["clusters"],
        val_mask=tensors["val_mask"].bool(),
        meta=metadata.get("meta", {}),
    )


# --- sources -------------------------------------------------------------------------------------------------------


def load_source(source: str, resolution: int | None = None, val_fraction: float = VAL_FRACTION) -> ShardData:
    """A whole data set as one ShardData with cluster ids 0.

    "digits": scikit-learn's 1,797 8x8 grayscale digits, 10 classes (ships with scikit-learn, no download).
    An image folder: every image under it, resized/cropped to `resolution` (default 32); one subfolder per class
    gives labels, a flat folder gives none. "hf:<name>[:split]": a Hugging Face data set (needs `datasets`).
    "procedural[:N[:SEED]]": the benchmark data set (experts/procedural.py), 32x32 RGB, 18 classes.
    """
    if source == "digits":
        shard = _digits()
    elif source == "procedural" or source.startswith("procedural:"):
        from . import procedural

        shard = procedural.load(source, resolution)
    elif source.startswith("hf:"):
        shard = _hf_dataset(source[3:], resolution or 32)
    elif Path(source).is_dir():
        shard = _image_folder(Path(source), resolution or 32)
    elif Path(source).is_file():
        raise IslesError(f"{source} is a file, not a data source", hint="pass a shard file where a shard is expected")
    else:
        raise IslesError(
            f"unknown data source {source!r}",
            hint="use `digits`, `procedural[:N]`, a folder of images, or hf:<dataset name> (e.g. hf:cifar10)",
        )
    if resolution is not None and shard.items.shape[-1] != resolution and source == "digits":
        shard = replace(shard, items=_resize_uint8(shard.items, resolution))
    shard.val_mask = split_mask(len(shard), val_fraction)
    return shard


def _digits() -> ShardData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.from_numpy(digits.images).float().mul(255.0 / 16.0).round().to(torch.uint8)  # 0..16 -> 0..255
    n = pixels.shape[0]
    return ShardData(
        items=pixels.unsqueeze(1).contiguous(),
        labels=torch.from_numpy(digits.target).long(),
        clusters=torch.zeros(n, dtype=torch.long),
        val_mask=torch.zeros(n, dtype=torch.bool),
        meta={"source": "digits", "num_classes": 10, "class_names": [str(i) for i in range(10)]},
    )


def _resize_uint8(items: torch.Tensor, resolution: int) -> torch.Tensor:
    import torch.nn.functional as F

    out = F.interpolate(items.float(), size=(resolution, resolution), mode="bilinear", antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)


def _pil_to_tensor(image, resolution: int, mode: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    image = image.convert(mode)
    w, h = image.size
    side = min(w, h)  # center crop to a square, then resize
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _image_folder(root: Path, resolution: int) -> ShardData:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise IslesError(f"no images found under {root}", hint=f"supported: {', '.join(sorted(IMAGE_SUFFIXES))}")
    class_names = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    labelled = bool(class_names) and all(len(p.relative_to(root).parts) > 1 for p in files)
    modes = set()
    for p in files[:64]:
        with Image.open(p) as im:
            modes.add(im.mode)
    mode = "L" if modes <= {"L", "1", "I;16", "I"} else "RGB"
    items = []
    for p in files:
        try:
            with Image.open(p) as im:
                items.append(_pil_to_tensor(im, resolution, mode))
        except (UnidentifiedImageError, OSError) as exc:
            raise IslesError(f"cannot read image {p}: {exc}", hint="remove or fix the file") from None
    labels = None
    if labelled:
        index = {name: i for i, name in enumerate(class_names)}
        labels = torch.tensor([index[p.relative_to(root).parts[0]] for p in files], dtype=torch.long)
    n = len(files)
    return ShardData(
        items=torch.stack(items),
        labels=labels,
        clusters=torch.zeros(n, dtype=torch.long),
        val_mask=torch.zeros(n, dtype=torch.bool),
        meta={
            "source": str(root),
            "num_classes": len(class_names) if labelled else None,
            "class_names": class_names if labelled else None,
        },
    )


def _hf_dataset(spec: str, resolution: int) -> ShardData:
    try:
        import datasets
    except ImportError:
        raise IslesError(
            "Hugging Face data sets need the `datasets` package", hint="pip install 'isles[real]'"
        ) from None
    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # datasets raises many types (network, missing config, ...): one line for the user
        raise IslesError(
            f"cannot load Hugging Face data set {name!r}: {exc}", hint="check the name and split"
        ) from None
    image_column = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if image_column is None:
        raise IslesError(f"data set {name!r} has no image column", hint="isles trains on image data sets")
    label_column = next((c for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)), None)
    first = ds[0][image_column]
    mode = "L" if first.mode in {"L", "1"} else "RGB"
    items = torch.stack([_pil_to_tensor(row[image_column], resolution, mode) for row in ds])
    labels = None
    class_names = None
    if label_column is not None:
        labels = torch.tensor(ds[label_column], dtype=torch.long)
        class_names = list(ds.features[label_column].names)
    n = items.shape[0]
    return ShardData(
        items=items,
        labels=labels,
        clusters=torch.zeros(n, dtype=torch.long),
        val_mask=torch.zeros(n, dtype=torch.bool),
        meta={
            "source": f"hf:{spec}",
            "num_classes": len(class_names) if class_names else None,
            "class_names": class_names,
        },
    )


def load_data(spec: str, sha256: str | None = None) -> ShardData:
    """What `--data` accepts: a shard file, or a source name/folder (`load_source`)."""
    path = Path(spec)
    if path.is_file():
        return load_shard(path, sha256)
    if path.suffix == ".safetensors":
        raise IslesError(f"shard file not found: {path}", hint="check the path, or use a built-in source: digits")
    return load_source(spec)
