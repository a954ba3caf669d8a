"""Clips people can watch: an animated GIF of a grid of clips, an MP4 (H.264 through PyAV's bundled ffmpeg), and a
PNG sheet with one row per clip and one column per frame (to look at motion frame by frame).

Clips are model-space floats in [-1, 1], [N, C, F, H, W]; every file is written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from isles.protocol.errors import IslesError
from isles.protocol.files import atomic_write_bytes

from .data import to_pixels

DEFAULT_FPS = 8


def _check(clips: torch.Tensor) -> torch.Tensor:
    if clips.ndim != 5:
        raise IslesError(f"expected clips [N, C, F, H, W], got shape {list(clips.shape)}")
    return to_pixels(clips)  # uint8 [N, C, F, H, W]


def clip_grid_frames(clips: torch.Tensor, nrow: int = 4, scale: int = 4) -> list:
    """One PIL image per frame, each a grid of the clips at that frame (1-pixel dark borders, nearest upscaling)."""
    from PIL import Image

    pixels = _check(clips)
    n, c, f, h, w = pixels.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    out = []
    for frame in range(f):
        grid = torch.zeros(3, rows * (h + 1) + 1, ncol * (w + 1) + 1, dtype=torch.uint8)
        for i in range(n):
            r, col = divmod(i, ncol)
            tile = pixels[i, :, frame].expand(3, -1, -1) if c == 1 else pixels[i, :3, frame]
            grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = tile
        image = Image.fromarray(grid.permute(1, 2, 0).numpy())
        out.append(image.resize((image.width * scale, image.height * scale), Image.NEAREST))
    return out


def save_clip_grid_gif(
    clips: torch.Tensor, path: str | Path, nrow: int = 4, scale: int = 4, fps: int = DEFAULT_FPS
) -> None:
    """An animated GIF (looping) of the clips side by side."""
    frames = clip_grid_frames(clips, nrow, scale)
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    atomic_write_bytes(path, buffer.getvalue())


def save_clip_grid_mp4(
    clips: torch.Tensor, path: str | Path, nrow: int = 4, scale: int = 4, fps: int = DEFAULT_FPS
) -> None:
    """An H.264 MP4 of the clips side by side (yuv420p, so every player opens it; sides rounded up to even)."""
    import av

    frames = clip_grid_frames(clips, nrow, scale)
    width, height = frames[0].width + frames[0].width % 2, frames[0].height + frames[0].height % 2
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18"}
        for image in frames:
            if image.size != (width, height):
                from PIL import Image

                padded = Image.new("RGB", (width, height))
                padded.paste(image)
                image = padded
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    atomic_write_bytes(path, buffer.getvalue())


def save_frame_sheet(
    clips: torch.Tensor, path: str | Path, scale: int = 4, labels: list[str] | None = None, max_clips: int = 16
) -> None:
    """A PNG with one row per clip (at most max_clips) and one column per frame; `labels` (one per clip) are drawn at
    the left of each row."""
    from PIL import Image, ImageDraw

    pixels = _check(clips[:max_clips])
    n, c, f, h, w = pixels.shape
    sheet = torch.zeros(3, n * (h + 1) + 1, f * (w + 1) + 1, dtype=torch.uint8)
    for i in range(n):
        for frame in range(f):
            tile = pixels[i, :, frame].expand(3, -1, -1) if c == 1 else pixels[i, :3, frame]
            sheet[:, 1 + i * (h + 1) : 1 + i * (h + 1) + h, 1 + frame * (w + 1) : 1 + frame * (w + 1) + w] = tile
    image = Image.fromarray(sheet.permute(1, 2, 0).numpy())
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    if labels:
        margin = 8 * max(len(text) for text in labels[:n]) // 1 + 8
        framed = Image.new("RGB", (image.width + margin, image.height), "white")
        framed.paste(image, (margin, 0))
        draw = ImageDraw.Draw(framed)
        for i, text in enumerate(labels[:n]):
            draw.text((4, i * (h + 1) * scale + (h * scale) // 2 - 5), text, fill="black")
        image = framed
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
