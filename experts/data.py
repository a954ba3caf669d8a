"""Shard data: fixed-shape items (uint8 images or float latents), labels, text embeddings, cluster ids, a validation
split. A shard is one safetensors file (experts/shard_file.py), written atomically, named by sha256, read lazily.

`load_source("digits" | <image folder> | "hf:<name>")` reads a whole data set into one ShardData (cluster 0).
Items are images [N, C, H, W] or video clips [N, C, F, H, W] (channels, frames, height, width; Paris 2.0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from isles.protocol.errors import IslesError
from isles.protocol.files import sha256_file

from .shard_file import LazyColumn, ShardFile, ShardWriter, take_rows

FORMAT = "isles-shard-1"
VAL_FRACTION = 0.1
REQUIRED = {"items", "clusters", "val_mask"}  # tensors every shard file holds (labels and text are optional)
CAPTION_BYTES = 256  # a caption is kept beside its embedding as UTF-8, zero-padded (cut at this many bytes)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

Column = torch.Tensor | LazyColumn  # a tensor in memory, or rows of a shard file read on demand


@dataclass
class ShardData:
    """N items of one shape. items: uint8 [N, C, H, W] pixels (0..255), clips [N, C, F, H, W], or float latents;
    labels: int64 [N] or None; clusters: int64 [N]; val_mask: bool [N] (True = held out for validation);
    text: float16 [N, L, D] token embeddings of each item's caption and text_mask: uint8 [N, L] (or both None);
    null_text: the empty caption's ([L, D], [L]), the condition of classifier-free guidance; attributes: int64 [N, A]
    (procedural data, for evaluation) or None; meta: JSON-able dict with at least num_classes (None if unlabelled)
    and source. items, text and text_mask may be LazyColumns: rows are read from the shard file when indexed."""

    items: Column
    labels: torch.Tensor | None
    clusters: torch.Tensor
    val_mask: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    text: Column | None = None
    text_mask: Column | None = None
    null_text: tuple[torch.Tensor, torch.Tensor] | None = None
    attributes: torch.Tensor | None = None
    captions: Column | None = None  # uint8 [N, CAPTION_BYTES]: the caption text (`decode_captions`)

    def __post_init__(self) -> None:
        n = self.items.shape[0]
        if self.items.ndim not in (4, 5):
            raise IslesError(
                f"shard items must be images [N, C, H, W] or clips [N, C, F, H, W], got shape {list(self.items.shape)}"
            )
        for name in ("labels", "clusters", "val_mask", "text", "text_mask", "attributes", "captions"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise IslesError(f"shard {name} has {value.shape[0]} rows, expected {n}")
        if (self.text is None) != (self.text_mask is None) or (self.text is not None and self.null_text is None):
            raise IslesError("a shard with text needs its embeddings, masks and the null (empty caption) embedding")
        self.meta.setdefault("num_classes", None)

    def __len__(self) -> int:
        return self.items.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """(channels, height, width) of one image, (channels, frames, height, width) of one clip."""
        return tuple(self.items.shape[1:])

    @property
    def frames(self) -> int | None:
        """Frames per clip; None for images."""
        return self.items.shape[2] if self.items.ndim == 5 else None

    @property
    def is_latent(self) -> bool:
        return self.items.dtype != torch.uint8

    @property
    def has_text(self) -> bool:
        return self.text is not None

    @property
    def num_classes(self) -> int | None:
        return self.meta.get("num_classes")

    def subset(self, mask_or_index: torch.Tensor) -> ShardData:
        """The items selected by a bool mask or an index tensor (metadata kept; lazy columns stay lazy)."""
        return ShardData(
            items=take_rows(self.items, mask_or_index),
            labels=take_rows(self.labels, mask_or_index),
            clusters=self.clusters[mask_or_index],
            val_mask=self.val_mask[mask_or_index],
            meta=dict(self.meta),
            text=take_rows(self.text, mask_or_index),
            text_mask=take_rows(self.text_mask, mask_or_index),
            null_text=self.null_text,
            attributes=take_rows(self.attributes, mask_or_index),
            captions=take_rows(self.captions, mask_or_index),
        )

    def train_split(self) -> ShardData:
        return self.subset(~self.val_mask)

    def val_split(self) -> ShardData:
        return self.subset(self.val_mask)

    def with_meta(self, **meta: Any) -> ShardData:
        return replace(self, meta={**self.meta, **meta})


def item_layout(shape) -> tuple[int, int | None, int, int]:
    """(channels, frames or None, height, width) of an item shape [C, H, W] or [C, F, H, W]."""
    shape = tuple(int(v) for v in shape)
    if len(shape) == 3:
        return shape[0], None, shape[1], shape[2]
    if len(shape) == 4:
        return shape
    raise IslesError(f"an item is [C, H, W] or [C, F, H, W], not {list(shape)}")


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


def shard_header(meta: dict) -> dict[str, str]:
    # One metadata key: safetensors writes several in hash-map order, and equal shards must be equal bytes.
    return {"isles": json.dumps({"format": FORMAT, "meta": meta}, sort_keys=True)}


def shard_columns(shard: ShardData, rows: torch.Tensor | slice = slice(None)) -> dict[str, torch.Tensor | None]:
    """The row tensors of `shard` (at `rows`) as a ShardWriter appends them."""
    return {
        "items": shard.items[rows],
        "clusters": shard.clusters[rows].to(torch.int64),
        "val_mask": shard.val_mask[rows].to(torch.uint8),
        "labels": None if shard.labels is None else shard.labels[rows].to(torch.int64),
        "text": None if shard.text is None else shard.text[rows].to(torch.float16),
        "text_mask": None if shard.text_mask is None else shard.text_mask[rows].to(torch.uint8),
        "attributes": None if shard.attributes is None else shard.attributes[rows].to(torch.int64),
        "captions": None if shard.captions is None else shard.captions[rows],
    }


def encode_captions(captions: list[str]) -> torch.Tensor:
    """Captions as a uint8 [N, CAPTION_BYTES] tensor of zero-padded UTF-8 (cut at a character boundary)."""
    out = torch.zeros(len(captions), CAPTION_BYTES, dtype=torch.uint8)
    for i, caption in enumerate(captions):
        data = caption.encode()[:CAPTION_BYTES].decode(errors="ignore").encode()
        out[i, : len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else out[i, :0]
    return out


def decode_captions(rows: torch.Tensor) -> list[str]:
    return [bytes(row.tolist()).rstrip(b"\0").decode(errors="replace") for row in rows]


def set_null_text(writer: ShardWriter, null_text: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    if null_text is not None:
        writer.set_extra("null_text", null_text[0].to(torch.float16))
        writer.set_extra("null_text_mask", null_text[1].to(torch.uint8))


def save_shard(shard: ShardData, path: str | Path, batch: int = 4096) -> str:
    """Write the shard as one safetensors file (atomically, a batch of rows at a time) and return its sha256."""
    writer = ShardWriter(path)
    try:
        for start in range(0, max(len(shard), 1), batch):
            writer.append(**shard_columns(shard, slice(start, start + batch)))
        set_null_text(writer, shard.null_text)
    except BaseException:
        writer.abort()
        raise
    return writer.close(shard_header(shard.meta))


def load_shard(path: str | Path, sha256: str | None = None) -> ShardData:
    """Open a shard file: small columns are read now, items and text embeddings lazily (memory does not grow with
    the shard). With `sha256`, refuse a file whose hash differs (a corrupt or wrong download)."""
    path = Path(path)
    if not path.is_file():
        raise IslesError(f"shard file not found: {path}", hint="check the path, or use a built-in source: digits")
    if sha256 is not None and sha256_file(path) != sha256:
        raise IslesError(f"shard {path} is corrupt: its sha256 does not match", hint="delete it and download again")
    f = ShardFile(path)
    try:
        metadata = json.loads(f.metadata.get("isles", "{}"))
    except ValueError:
        metadata = None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT or not REQUIRED <= f.entries.keys():
        raise IslesError(f"{path} is a safetensors file but not an isles shard", hint="rebuild it with isles")
    has_text = {"text", "text_mask", "null_text", "null_text_mask"} <= f.entries.keys()
    return ShardData(
        items=f.column("items"),
        labels=f.tensor("labels") if "labels" in f else None,
        clusters=f.tensor("clusters"),
        val_mask=f.tensor("val_mask").bool(),
        meta=metadata.get("meta", {}),
        text=f.column("text") if has_text else None,
        text_mask=f.column("text_mask") if has_text else None,
        null_text=(f.tensor("null_text"), f.tensor("null_text_mask")) if has_text else None,
        attributes=f.tensor("attributes") if "attributes" in f else None,
        captions=f.column("captions") if "captions" in f else None,
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


def import_datasets():
    """The `datasets` package, or an IslesError saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise IslesError(
            "Hugging Face data sets need the `datasets` package", hint="pip install 'isles[real]'"
        ) from None
    return datasets


def _hf_dataset(spec: str, resolution: int) -> ShardData:
    datasets = import_datasets()
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
