"""File helpers every package shares: sha256 of files and folders, and atomic writes (temporary file, then rename)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_folder(folder: str | os.PathLike) -> dict[str, str]:
    """{relative posix path: sha256} of every regular file under `folder`, sorted by path."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@contextmanager
def atomic_writer(path: str | os.PathLike, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path`; on success it is fsynced and renamed over `path`, on failure removed.

    Readers see either the old file or the whole new one, never a partial write. `mode` is set before the rename
    (mkstemp makes 0600 files; secrets pass mode=0o600 so they are never readable by others, not even briefly).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    with atomic_writer(path, mode) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def canonical_json(obj: Any) -> bytes:
    """The one byte form used for hashing records: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
