"""What `isles partition` reads: any data source as a stream of fixed-shape batches (pixels, labels, captions,
procedural attributes), so a data set larger than memory is embedded, clustered and sharded without being held whole.

Captioned sources (text conditioning): a folder with `metadata.jsonl` or `.txt` captions, WebDataset tars, `hf:` data
sets read streaming (experts/captioned.py), and the procedural set with captions made from its parameters. The other
sources (digits, class folders, `hf:` class data sets) are read as before and cut into batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from isles.protocol.errors import IslesError


@dataclass
class Batch:
    pixels: torch.Tensor  # uint8 [B, C, H, W], or clips [B, C, F, H, W]
    labels: torch.Tensor | None = None  # int64 [B]
    captions: list[str] | None = None
    attributes: torch.Tensor | None = None  # int64 [B, A] (procedural data: what the captions say)


@dataclass
class SourceBatches:
    """A source as batches. `meta` (source, num_classes, class_names) is known before iterating; `skipped` counts
    items that could not be decoded, `skipped_examples` names a few of them."""

    batches: Any  # a callable returning an iterator of Batch (each call starts over)
    meta: dict[str, Any]
    description: str
    report: Any = None  # experts.captioned.StreamReport for streamed sources
    size_hint: int | None = None  # the item count when known in advance (progress bars)
    attribute_names: dict[str, list[str]] | None = None
    is_video: bool = False  # batches hold clips [B, C, F, H, W]

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches())

    @property
    def skipped(self) -> int:
        return 0 if self.report is None else self.report.skipped_undecodable

    @property
    def skipped_short(self) -> int:
        """Videos with under half the frames asked for (skipped; other short ones are padded with their last frame)."""
        return 0 if self.report is None else self.report.skipped_short

    @property
    def skipped_examples(self) -> list[str]:
        return [] if self.report is None else list(self.report.skipped_examples)


@dataclass
class SourceOptions:
    source: str
    captions: bool  # text conditioning: read captions (a source without them is an error)
    resolution: int | None = None
    batch: int = 1024
    image_column: str | None = None
    caption_column: str | None = None
    limit: int | None = None
    frames: int | None = None  # video sources: frames per clip (procedural-video's default: 16)
    fps: float | None = None  # video files: frames sampled per second (default: the file's own rate)


def open_batches(options: SourceOptions) -> SourceBatches:
    """The source named by `options.source` as batches of `options.batch` items."""
    from isles.experts import procedural, procedural_video

    video = options.frames is not None or procedural_video.is_procedural_video(options.source)
    if video and not options.captions:
        raise IslesError("video sources are captioned: isles trains text-to-video", hint="add --conditioning text")
    if procedural_video.is_procedural_video(options.source):
        shard, attributes, captions = procedural_video.load_clips(options.source, options.resolution, options.frames)
        return _in_memory(shard.items, shard.labels, captions, attributes, shard.meta, options, procedural_video)
    if options.captions and procedural.is_procedural(options.source):
        shard, attributes, captions = procedural.load_captioned(options.source, options.resolution)
        return _in_memory(shard.items, shard.labels, captions, attributes, shard.meta, options, procedural)
    if options.captions:
        return _streamed(options)
    from isles.experts.data import load_source

    shard = load_source(options.source, resolution=options.resolution)
    return _in_memory(shard.items, shard.labels, None, None, shard.meta, options, None)


def _in_memory(items, labels, captions, attributes, meta, options: SourceOptions, procedural_module) -> SourceBatches:
    n = items.shape[0] if options.limit is None else min(options.limit, items.shape[0])

    def batches() -> Iterator[Batch]:
        for start in range(0, n, options.batch):
            stop = min(n, start + options.batch)
            yield Batch(
                pixels=items[start:stop],
                labels=None if labels is None else labels[start:stop],
                captions=None if captions is None else list(captions[start:stop]),
                attributes=None if attributes is None else attributes[start:stop],
            )

    names = procedural_module.attribute_names() if procedural_module is not None and captions is not None else None
    video = items.ndim == 5
    return SourceBatches(batches, dict(meta), options.source, size_hint=n, attribute_names=names, is_video=video)


def _streamed(options: SourceOptions) -> SourceBatches:
    from isles.experts.captioned import open_captioned

    stream = open_captioned(
        options.source,
        resolution=options.resolution or 32,
        image_column=options.image_column,
        caption_column=options.caption_column,
        limit=options.limit,
        frames=options.frames,
        fps=options.fps,
    )

    def batches() -> Iterator[Batch]:
        # Labels are not kept: a text run is conditioned on captions, and a label only some items have is no column.
        pixels, captions = [], []
        for item in stream:
            pixels.append(item.pixels)
            captions.append(item.caption)
            if len(pixels) == options.batch:
                yield Batch(torch.stack(pixels), captions=captions)
                pixels, captions = [], []
        if pixels:
            yield Batch(torch.stack(pixels), captions=captions)

    meta = {"source": options.source, "num_classes": None, "class_names": None}
    if options.frames is not None:
        meta.update(frames=options.frames, fps=options.fps)
    video = options.frames is not None
    return SourceBatches(batches, meta, stream.description, report=stream.report, is_video=video)
