"""Decoding one video file into a fixed-shape clip with PyAV (ffmpeg): `frames` frames sampled at `fps` from the start,
each center-cropped to a square and resized to `resolution`, as uint8 [3, F, R, R].

Clips shorter than `frames` (at that rate) are padded by repeating their last frame when they hold at least half of
the frames asked for; shorter ones are refused (`ClipTooShort`), and the caller skips and counts them. A file ffmpeg
cannot read raises `UndecodableVideo`. Decoding stops after the frames it needs, so long videos cost little.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

MIN_FRACTION = 0.5  # a clip needs at least this share of the frames asked for, else it is skipped
MAX_DECODED_FRAMES = 10_000  # a stream that never reaches its next sample time (broken timestamps) stops here


class UndecodableVideo(ValueError):
    """ffmpeg could not open or decode the file."""


class ClipTooShort(ValueError):
    """The video holds fewer than MIN_FRACTION of the frames asked for."""


def decode_clip(source: bytes | str | Path, frames: int, resolution: int, fps: float | None = None) -> torch.Tensor:
    """uint8 [3, frames, resolution, resolution] from a video file's path or bytes. `fps`: the rate frames are sampled
    at (None: every frame of the file, at its own rate)."""
    import av
    import numpy as np
    from PIL import Image

    picked: list[Image.Image] = []
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
            if not container.streams.video:
                raise UndecodableVideo("no video stream")
            stream = container.streams.video[0]
            next_time, decoded = 0.0, 0
            for frame in container.decode(stream):
                decoded += 1
                if decoded > MAX_DECODED_FRAMES:
                    break
                if fps is not None and frame.time is not None:
                    if frame.time + 1e-6 < next_time:
                        continue  # between two sample times: not one of ours
                    next_time += 1.0 / fps
                picked.append(frame.to_image())
                if len(picked) == frames:
                    break
    except UndecodableVideo:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as exc:  # FFmpegError covers bad data, codecs
        raise UndecodableVideo(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from None
    if not picked:
        raise UndecodableVideo("no frame could be decoded")
    if len(picked) < max(1, round(MIN_FRACTION * frames)):
        raise ClipTooShort(f"{len(picked)} of {frames} frames")
    picked += [picked[-1]] * (frames - len(picked))  # pad by holding the last frame
    out = np.stack([_square(image.convert("RGB"), resolution) for image in picked])  # [F, R, R, 3]
    return torch.from_numpy(out).permute(3, 0, 1, 2).contiguous()


def _square(image, resolution: int):
    import numpy as np
    from PIL import Image

    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def write_test_video(path: str | Path, clip: torch.Tensor, fps: int = 8) -> None:
    """Write uint8 [3, F, H, W] as an H.264 MP4 (even sides): how tests and examples make real video files."""
    import av

    c, f, h, w = clip.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(f):
            array = clip[:, i].permute(1, 2, 0).contiguous().numpy()
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
