"""Training checkpoints: one file per checkpoint, written atomically, with a footer that proves it is whole.

Layout of `ckpt-<step>.isles`: a `torch.save` payload (tensors and plain values only, read back with
`weights_only=True`), then a 48-byte footer: sha256 of the payload (32), payload length (8, little endian), MAGIC.
`latest_checkpoint` skips any file whose footer does not verify, so a truncated or partial file is never resumed.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Any

import torch

from isles.protocol.errors import IslesError
from isles.protocol.files import atomic_writer

MAGIC = b"ISLESCK1"
FOOTER_SIZE = 32 + 8 + len(MAGIC)
SUFFIX = ".isles"
_NAME = re.compile(r"^ckpt-(\d+)\.isles$")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:09d}{SUFFIX}"


def write_checkpoint(folder: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Serialize `state` to `folder/ckpt-<step>.isles` atomically; returns the path."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    footer = hashlib.sha256(payload).digest() + len(payload).to_bytes(8, "little") + MAGIC
    path = Path(folder) / checkpoint_name(step)
    with atomic_writer(path) as f:
        f.write(payload)
        f.write(footer)
    return path


def _payload(path: Path) -> bytes | None:
    """The verified payload of a checkpoint file, or None if the file is truncated, altered or not a checkpoint."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < FOOTER_SIZE or data[-len(MAGIC) :] != MAGIC:
        return None
    digest = data[-FOOTER_SIZE : -FOOTER_SIZE + 32]
    length = int.from_bytes(data[-FOOTER_SIZE + 32 : -len(MAGIC)], "little")
    payload = data[:-FOOTER_SIZE]
    if len(payload) != length or hashlib.sha256(payload).digest() != digest:
        return None
    return payload


def verify_checkpoint(path: str | Path) -> bool:
    return _payload(Path(path)) is not None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's state onto the CPU; a damaged file is an IslesError."""
    payload = _payload(Path(path))
    if payload is None:
        raise IslesError(
            f"checkpoint {path} is damaged or incomplete", hint="delete it; training resumes from an older one"
        )
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every file named like a checkpoint in `folder`, oldest first (not verified)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return sorted(found)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest checkpoint in `folder` whose footer verifies; damaged files are skipped."""
    for _step, path in reversed(list_checkpoints(folder)):
        if verify_checkpoint(path):
            return path
    return None


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the `keep` newest verified checkpoints (and any damaged file older than those)."""
    kept = 0
    for _step, path in reversed(list_checkpoints(folder)):
        if kept < keep and verify_checkpoint(path):
            kept += 1
            continue
        if kept >= keep:
            path.unlink(missing_ok=True)
