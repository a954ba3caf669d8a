"""Captioned image data sets, streamed item by item (never held whole): an image folder with metadata.jsonl or .txt
captions, WebDataset tar shards (img2dataset's output), or `hf:<dataset>[:split]` read in streaming mode.

With `frames`, the same sources hold videos (.mp4, .webm, .mkv, .avi, .mov; a tar's mp4 members; an hf Video column),
decoded by PyAV into fixed-shape clips (experts/video_decode.py): undecodable files and clips too short to pad are
skipped and counted.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from isles.protocol.errors import IslesError

from .data import IMAGE_SUFFIXES, _pil_to_tensor, import_datasets
from .video_decode import ClipTooShort, decode_clip

log = logging.getLogger("isles.data")

CAPTION_COLUMNS = ("text", "caption", "prompt")  # the default caption column: the first of these present
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v"}
TAR_VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")
MAX_MEMBER_BYTES = 64 * 2**20  # a tar member larger than this is skipped unread (a runaway or hostile shard)
MAX_EXAMPLES = 5  # skipped keys kept in the report (and warned about one by one)


@dataclass
class CaptionedItem:
    key: str  # file path relative to the root, tar member key, or hf row index as str
    pixels: torch.Tensor  # uint8 [C, R, R] (or a clip [C, F, R, R]): center-cropped square, resized (bicubic)
    caption: str
    label: int | None = None  # class index where the source has one (hf ClassLabel, metadata "label", tar .cls)


@dataclass
class StreamReport:
    """Filled in while a stream is iterated; reset when it is iterated again."""

    items: int = 0
    skipped_undecodable: int = 0
    skipped_examples: list[str] = field(default_factory=list)  # the first MAX_EXAMPLES keys that failed to decode
    skipped_oversized: int = 0  # tar samples skipped because a member was over MAX_MEMBER_BYTES
    skipped_short: int = 0  # videos with fewer than half the frames asked for (shorter ones are padded)
    noun: str = "image"  # what the items are: "image" or "video"

    def reset(self) -> None:
        self.items = self.skipped_undecodable = self.skipped_oversized = self.skipped_short = 0
        self.skipped_examples.clear()

    def summary(self) -> str:
        """E.g. "1,000 items, 3 undecodable images skipped (a.png, b.png, c.png)"."""
        parts = [f"{self.items:,} items"]
        if self.skipped_undecodable:
            more = ", ..." if self.skipped_undecodable > len(self.skipped_examples) else ""
            examples = ", ".join(self.skipped_examples) + more
            parts.append(f"{self.skipped_undecodable:,} undecodable {self.noun}s skipped ({examples})")
        if self.skipped_short:
            parts.append(f"{self.skipped_short:,} videos too short to pad skipped")
        if self.skipped_oversized:
            parts.append(f"{self.skipped_oversized:,} samples over {MAX_MEMBER_BYTES // 2**20} MiB skipped")
        return ", ".join(parts)


# A raw sample before decoding: (key, image as a path / bytes / PIL image, caption, label).
Raw = tuple[str, Any, str, "int | None"]
_OVERSIZED = object()  # stands in for the image of a tar sample that had a member over the size bound


class CaptionedStream:
    """Iterating yields CaptionedItems in a fixed order; each new iteration starts over and resets `report`."""

    def __init__(
        self,
        rows: Callable[[], Iterator[Raw]],
        description: str,
        resolution: int,
        mode: str,
        limit,
        frames: int | None = None,
        fps: float | None = None,
    ):
        self._rows = rows
        self.description = description
        self.resolution = resolution
        self.mode = mode
        self.limit = limit
        self.frames, self.fps = frames, fps  # videos: frames per clip, sampled at fps (None: the file's own rate)
        self.report = StreamReport(noun="video" if frames is not None else "image")

    def __iter__(self) -> Iterator[CaptionedItem]:
        from PIL import Image, UnidentifiedImageError

        self.report.reset()
        if self.limit is not None and self.limit <= 0:
            return
        for key, image, caption, label in self._rows():
            if image is _OVERSIZED:
                self.report.skipped_oversized += 1
                log.warning("skipping %s: a member is over %d MiB", key, MAX_MEMBER_BYTES // 2**20)
                continue
            try:
                pixels = self._decode(image)
            except ClipTooShort as exc:
                self.report.skipped_short += 1
                log.warning("skipping %s: too short to pad (%s)", key, exc)
                continue
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                self._skip(key, exc)
                continue
            self.report.items += 1
            yield CaptionedItem(key=key, pixels=pixels, caption=caption, label=label)
            if self.limit is not None and self.report.items >= self.limit:
                return

    def _decode(self, image: Any) -> torch.Tensor:
        from PIL import Image

        if image is None:
            raise ValueError("no image data")
        if self.frames is not None:
            return decode_clip(image, self.frames, self.resolution, self.fps)
        if isinstance(image, Image.Image):  # already decoded by `datasets`
            return _pil_to_tensor(image, self.resolution, self.mode)
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
            return _pil_to_tensor(im, self.resolution, self.mode)

    def _skip(self, key: str, exc: Exception) -> None:
        report = self.report
        report.skipped_undecodable += 1
        if len(report.skipped_examples) < MAX_EXAMPLES:
            report.skipped_examples.append(key)
            log.warning("skipping undecodable file %s: %s", key, exc)
        else:  # a data set with many bad files: the report counts them, the log does not repeat itself
            log.debug("skipping undecodable file %s: %s", key, exc)


def open_captioned(
    source: str,
    *,
    resolution: int = 32,
    mode: str = "RGB",
    image_column: str | None = None,
    caption_column: str | None = None,
    limit: int | None = None,
    frames: int | None = None,
    fps: float | None = None,
) -> CaptionedStream:
    """A stream over `source`: an image folder, a .tar shard, a folder of shards, a brace pattern such as
    /data/{00000..00003}.tar, or hf:<dataset>[:split] (a Hub name, or a local folder in imagefolder layout).
    `image_column` / `caption_column` pick an hf column, a tar member extension or json field, or a metadata field.
    With `frames`, the source holds videos: each becomes a clip of `frames` frames sampled at `fps`."""
    if mode not in ("RGB", "L"):
        raise IslesError(f"unsupported image mode {mode!r}", hint="use RGB or L (grayscale)")
    if resolution < 1:
        raise IslesError(f"resolution must be positive, got {resolution}")
    if frames is not None and frames < 1:
        raise IslesError(f"frames must be positive, got {frames}")
    if fps is not None and fps <= 0:
        raise IslesError(f"fps must be positive, got {fps}")
    kind = Media.video() if frames is not None else Media.image()
    rows, description = _resolve(source, image_column, caption_column, kind)
    return CaptionedStream(rows, description, resolution, mode, limit, frames, fps)


@dataclass(frozen=True)
class Media:
    """What a source's items are: file suffixes in folders, member extensions in tars, the word in messages."""

    suffixes: frozenset
    tar_extensions: tuple[str, ...]
    noun: str

    @staticmethod
    def image() -> Media:
        return Media(frozenset(IMAGE_SUFFIXES), TAR_IMAGE_EXTENSIONS, "image")

    @staticmethod
    def video() -> Media:
        return Media(frozenset(VIDEO_SUFFIXES), TAR_VIDEO_EXTENSIONS, "video")


def _resolve(source: str, image_column: str | None, caption_column: str | None, media: Media):
    if source.startswith("hf:"):
        return _hf_source(source[3:], image_column, caption_column, media)
    path = Path(source)
    if "{" in source:
        shards = [Path(s) for s in expand_braces(source)]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise IslesError(f"{len(missing)} of {len(shards)} shards not found: {', '.join(missing[:3])}")
    elif path.is_file() and source.endswith(TAR_SUFFIXES):
        shards = [path]
    elif path.is_dir() and _is_shard_folder(path, media):
        shards = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(TAR_SUFFIXES))
    elif path.is_dir():
        captions = "metadata.jsonl" if next(path.rglob("metadata.jsonl"), None) else ".txt captions"
        return (lambda: _folder_rows(path, caption_column, media)), f"folder {path} ({captions})"
    else:
        raise IslesError(
            f"unknown captioned data source {source!r}",
            hint="use a folder of images with metadata.jsonl or .txt captions, a .tar shard, a folder of shards, "
            "/data/{00000..00009}.tar, or hf:<dataset>[:split]",
        )
    description = f"{len(shards)} tar shard{'s' if len(shards) != 1 else ''} ({shards[0]} ...)"
    return (lambda: _tar_rows(shards, image_column, caption_column, media)), description


# --- image folders -------------------------------------------------------------------------------------------------


def _walk_sorted(directory: Path) -> Iterator[Path]:
    """Files under `directory` in the order of sorted(rglob("*")), one directory listing at a time."""
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_dir():
            yield from _walk_sorted(Path(entry.path))
        elif entry.is_file():
            yield Path(entry.path)


def _read_metadata(path: Path) -> dict[str, dict]:
    """metadata.jsonl -> {normalized file_name: its line}."""
    lines: dict[str, dict] = {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                lines[str(PurePosixPath(os.path.normpath(row["file_name"])))] = row
            except (ValueError, KeyError, TypeError):
                raise IslesError(
                    f"{path} line {number} is not a JSON object with a file_name", hint="fix or remove that line"
                ) from None
    return lines


def _folder_rows(root: Path, caption_column: str | None, media: Media) -> Iterator[Raw]:
    metadata: dict[Path, dict[str, dict]] = {}  # directory -> its metadata.jsonl, read when first needed
    found = False
    for path in _walk_sorted(root):
        if path.suffix.lower() not in media.suffixes:
            continue
        found = True
        key = path.relative_to(root).as_posix()
        row, source = None, None
        for directory in [path.parent, *path.parent.parents]:  # the nearest metadata.jsonl naming this file wins
            if directory not in metadata:
                file = directory / "metadata.jsonl"
                metadata[directory] = _read_metadata(file) if file.is_file() else {}
            row = metadata[directory].get(path.relative_to(directory).as_posix())
            if row is not None or directory == root:
                source = directory / "metadata.jsonl"
                break
        if row is not None:
            column = caption_column or next((c for c in CAPTION_COLUMNS if c in row), None)
            if column is None or not isinstance(row.get(column), str):
                raise IslesError(
                    f"{source} has no caption {column or '/'.join(CAPTION_COLUMNS)!r} for {key} "
                    f"(its fields: {', '.join(row)})",
                    hint="pass --caption-column with the field that holds the caption",
                )
            label = row.get("label")
            yield key, path, row[column], label if isinstance(label, int) else None
        elif path.with_suffix(".txt").is_file():
            yield key, path, path.with_suffix(".txt").read_text(encoding="utf-8", errors="replace").strip(), None
        else:
            raise IslesError(
                f"{media.noun} {path} has no caption: no metadata.jsonl line names it and there is no {path.stem}.txt",
                hint="add a caption for it (a metadata.jsonl line or a .txt file beside it), or remove it",
            )
    if not found:
        supported = ", ".join(sorted(media.suffixes))
        raise IslesError(f"no {media.noun}s found under {root}", hint=f"supported: {supported}")


# --- WebDataset tar shards -----------------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """Shell-style braces: "a{00..02}b{x,y}" -> a00bx a00by a01bx ... (numeric ranges keep their zero padding)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(i).zfill(width) for i in range(int(first), int(last) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        raise IslesError(f"cannot expand {{{body}}} in {pattern}", hint="use {00000..00009} or {a,b,c}")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def _is_shard_folder(path: Path, media: Media) -> bool:
    """A folder with tar shards and no images (videos) directly in it."""
    entries = [p for p in path.iterdir() if p.is_file()]
    has_shards = any(p.name.endswith(TAR_SUFFIXES) for p in entries)
    return has_shards and not any(p.suffix.lower() in media.suffixes for p in entries)


def _split_member_name(name: str) -> tuple[str, str] | None:
    """Split "dir/000123.jpg" into ("dir/000123", "jpg"): the key ends at the basename's first dot (as webdataset)."""
    match = re.fullmatch(r"((?:.*/)?[^./][^.]*)\.([^/]*)", name)
    return (match.group(1), match.group(2).lower()) if match else None


def _tar_samples(shard: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, {extension: bytes}) for each run of adjacent members sharing a key; oversized members map to None."""
    key, members = None, {}
    try:
        with tarfile.open(shard, "r|*") as tar:  # streaming: members are read in order, nothing is extracted
            for member in tar:
                split = _split_member_name(member.name) if member.isfile() else None
                if split is None:
                    continue
                if split[0] != key:
                    if members:
                        yield key, members
                    key, members = split[0], {}
                if member.size > MAX_MEMBER_BYTES:
                    members[split[1]] = None  # its data is skipped, not read, when the stream moves on
                else:
                    members[split[1]] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise IslesError(f"cannot read tar shard {shard}: {exc}", hint="re-download or rebuild that shard") from None
    if members:
        yield key, members


def _tar_caption(members: dict[str, Any], caption_column: str | None, where: str) -> str | None:
    if caption_column is None and members.get("txt") is not None:
        return members["txt"].decode("utf-8", errors="replace").strip()
    if caption_column is not None and members.get(caption_column) is not None:
        return members[caption_column].decode("utf-8", errors="replace").strip()
    if members.get("json") is not None:
        try:
            meta = json.loads(members["json"])
        except ValueError:
            raise IslesError(f"{where}.json is not valid JSON", hint="rebuild that shard") from None
        for column in [caption_column] if caption_column else ("caption", "text", "prompt"):
            if isinstance(meta, dict) and isinstance(meta.get(column), str):
                return meta[column]
    return None


def _tar_rows(shards: list[Path], image_column: str | None, caption_column: str | None, media: Media) -> Iterator[Raw]:
    for shard in shards:
        for key, members in _tar_samples(shard):
            where = f"{shard}: {key}"
            if any(data is None for data in members.values()):
                yield key, _OVERSIZED, "", None
                continue
            extensions = [image_column] if image_column else media.tar_extensions
            image = next((members[e] for e in extensions if e in members), None)
            if image is None:
                raise IslesError(
                    f"{where} has no {media.noun} (members: {', '.join(sorted(members))})",
                    hint=f"pass --image-column with the extension of the {media.noun} member",
                )
            caption = _tar_caption(members, caption_column, where)
            if caption is None:
                raise IslesError(
                    f"{where} has no caption (members: {', '.join(sorted(members))})",
                    hint="captions come from .txt or a .json caption/text field; or pass --caption-column",
                )
            cls = members.get("cls", b"").strip()
            yield key, image, caption, int(cls) if cls.isdigit() else None


# --- Hugging Face data sets ----------------------------------------------------------------------------------------


def _hf_source(spec: str, image_column: str | None, caption_column: str | None, media: Media):
    datasets = import_datasets()
    name, _, split = spec.partition(":")
    local = Path(name).is_dir()  # a local folder in imagefolder layout (metadata.jsonl): no network needed
    try:
        ds = datasets.load_dataset(
            str(Path(name).resolve()) if local else name, split=split or "train", streaming=True
        )
    except Exception as exc:  # datasets raises many types (network, missing config, bad split): one line for the user
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise IslesError(
            f"cannot load Hugging Face data set {name!r}: {message}", hint="check the name and split"
        ) from None
    features = ds.features
    if features is None:  # some streaming builders do not know their features before the first row
        first = next(iter(ds), None) or {}
        columns, is_image = list(first), {c: _looks_like_media(v, media) for c, v in first.items()}
    else:
        columns = list(features)
        is_image = {
            c: _is_media_feature(datasets, f, media) or _looks_like_media(f, media) for c, f in features.items()
        }
    image_column = image_column or next((c for c in columns if is_image[c]), None)
    caption_column = caption_column or next((c for c in CAPTION_COLUMNS if c in columns), None)
    for role, column in ((media.noun, image_column), ("caption", caption_column)):
        if column is None or column not in columns:
            raise IslesError(
                f"data set {name!r} has {f'no column {column!r}' if column else f'no {role} column'}; "
                f"its columns: {', '.join(columns)}",
                hint="pass --image-column / --caption-column",
            )
    if not is_image[image_column]:
        raise IslesError(
            f"column {image_column!r} of {name!r} does not hold {media.noun}s", hint="pass --image-column"
        )
    label_column = None
    if features is not None:
        if _is_media_feature(datasets, features[image_column], media):  # decode here: a bad file is skipped, not fatal
            kind = datasets.Video if media.noun == "video" else datasets.Image
            ds = ds.cast_column(image_column, kind(decode=False))
        label_column = next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)

    def rows() -> Iterator[Raw]:
        iterator = iter(ds)
        for index in itertools.count():
            try:
                row = next(iterator)
            except StopIteration:
                return
            except Exception as exc:  # a network or file error mid-stream
                raise IslesError(f"reading hf:{spec} failed at row {index}: {exc}", hint="try again") from None
            caption = row[caption_column]
            if isinstance(caption, list | tuple):  # several captions per image (e.g. COCO): the first
                caption = caption[0] if caption else None
            if caption is None:
                raise IslesError(f"hf:{spec} row {index} has no caption in {caption_column!r}")
            label = row[label_column] if label_column else None
            label = None if label is None or label < 0 else label  # ClassLabel -1: unlabelled
            yield str(index), _hf_image(row[image_column]), str(caption), label

    return rows, f"hf:{spec} ({'local folder, ' if local else ''}streaming)"


def _is_media_feature(datasets, feature: Any, media: Media) -> bool:
    kind = getattr(datasets, "Video", None) if media.noun == "video" else datasets.Image
    return kind is not None and isinstance(feature, kind)


def _looks_like_media(value: Any, media: Media) -> bool:
    """A decoded image (images only), or a file struct: a {"bytes", "path"} value (or feature dict); for videos, a
    path's suffix must be a video's where one is given."""
    from PIL import Image

    if media.noun == "image" and isinstance(value, Image.Image):
        return True
    if not (isinstance(value, dict) and {"bytes", "path"} <= value.keys()):
        return False
    path = value.get("path")
    return media.noun == "image" or not isinstance(path, str) or Path(path).suffix.lower() in media.suffixes


def _hf_image(value: Any) -> Any:
    """An undecoded datasets.Image value ({"bytes", "path"}) -> bytes or a path; a PIL image passes through."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    return value
