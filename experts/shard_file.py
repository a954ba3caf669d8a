"""Shard files larger than memory: `ShardWriter` streams rows into one safetensors file, `ShardFile` reads them lazily.

A shard is a plain safetensors file (any safetensors reader opens it). Row tensors (items, labels, text embeddings)
share their first dimension; `LazyColumn` reads only the rows asked for with positioned reads (no mmap, so reading a
batch never grows the resident memory with the file's size), and `take()` gives a lazy view of a subset of rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from isles.protocol.errors import IslesError
from isles.protocol.files import CHUNK, atomic_writer

MAX_HEADER_BYTES = 16 << 20  # a shard header lists a few tensors; anything larger is not a shard
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_NAMES = {v: k for k, v in _DTYPES.items()}


class LazyColumn:
    """Rows of one tensor in a shard file, read on demand. Indexing returns a tensor; `take` returns a lazy view."""

    def __init__(self, path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...], rows=None):
        self.path, self.offset, self.dtype, self._full_shape = path, offset, dtype, tuple(shape)
        self._rows = rows  # None: every row in order; else an int64 tensor of row numbers in the file
        self._row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()

    @property
    def row_bytes(self) -> int:
        return self._row_bytes

    @property
    def shape(self) -> torch.Size:
        n = self._full_shape[0] if self._rows is None else int(self._rows.numel())
        return torch.Size((n, *self._full_shape[1:]))

    @property
    def ndim(self) -> int:
        return len(self._full_shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _index(self, key) -> torch.Tensor:
        n = len(self)
        if isinstance(key, slice):
            return torch.arange(n)[key]
        key = torch.as_tensor(key)
        if key.dtype == torch.bool:
            if key.shape != (n,):
                raise IndexError(f"mask of shape {list(key.shape)} for {n} rows")
            return key.nonzero(as_tuple=True)[0]
        key = key.long().reshape(-1)
        if key.numel() and (int(key.min()) < -n or int(key.max()) >= n):
            raise IndexError(f"row index out of range for {n} rows")
        return torch.where(key < 0, key + n, key)

    def _file_rows(self, index: torch.Tensor) -> torch.Tensor:
        return index if self._rows is None else self._rows[index]

    def take(self, key) -> LazyColumn:
        """A lazy view of the selected rows (a slice, bool mask or index tensor); nothing is read."""
        return LazyColumn(self.path, self.offset, self.dtype, self._full_shape, self._file_rows(self._index(key)))

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, int):
            return self.read(torch.tensor([key]))[0]
        return self.read(self._index(key))

    def read(self, index: torch.Tensor) -> torch.Tensor:
        """The rows at `index` (positions in this view), in that order, as one tensor."""
        rows = self._file_rows(index.long()).numpy()
        out = np.empty((len(rows), self._row_bytes), dtype=np.uint8)
        if len(rows):
            order = np.argsort(rows, kind="stable")
            sorted_rows = rows[order]
            # Consecutive rows are read with one call: a whole shard read in order is a few large reads.
            breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
            fd = os.open(self.path, os.O_RDONLY)
            try:
                start = 0
                for stop in [*breaks.tolist(), len(sorted_rows)]:
                    first, where = int(sorted_rows[start]), order[start:stop]
                    if where[-1] - where[0] == len(where) - 1 and (np.diff(where) == 1).all():
                        self._read_into(fd, out[where[0] : where[-1] + 1], first)  # in place: rows asked in order
                    else:
                        run = np.empty((len(where), self._row_bytes), dtype=np.uint8)
                        self._read_into(fd, run, first)
                        out[where] = run
                    start = stop
            finally:
                os.close(fd)
        if not len(rows) or not self._row_bytes:
            return torch.empty((len(rows), *self._full_shape[1:]), dtype=self.dtype)
        return torch.from_numpy(out).view(self.dtype).reshape(len(rows), *self._full_shape[1:])

    def _read_into(self, fd: int, buffer: np.ndarray, first_row: int) -> None:
        """Fill `buffer` (contiguous rows) from the file, starting at row `first_row`. A read may return less than
        asked (Linux: at most ~2 GiB a call), so it loops; the file ending early is a truncated shard."""
        view, done = memoryview(buffer).cast("B"), 0
        position = self.offset + first_row * self._row_bytes
        while done < len(view):
            got = os.preadv(fd, [view[done:]], position + done)
            if got == 0:
                raise IslesError(f"shard file {self.path} is truncated", hint="delete it and pull it again")
            done += got


def take_rows(column, key):
    """`column[key]` as a lazy view for a LazyColumn, as a tensor for a tensor (None stays None)."""
    if column is None:
        return None
    return column.take(key) if isinstance(column, LazyColumn) else column[key]


class ShardFile:
    """The header of a safetensors shard file; `column(name)` gives lazy rows, `tensor(name)` reads a whole tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                header_size = int.from_bytes(f.read(8), "little")
                if not 2 <= header_size <= min(MAX_HEADER_BYTES, size - 8):
                    raise ValueError("no safetensors header")
                header = json.loads(f.read(header_size))
        except OSError as exc:
            raise IslesError(f"cannot read shard {self.path}: {exc.strerror}") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise IslesError(f"{self.path} is not a readable shard file ({exc})", hint="rebuild it") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        base = 8 + header_size
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                start, end = (int(v) for v in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise IslesError(f"{self.path} is not a readable shard file (bad entry {name!r})") from None
            nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            if min(shape, default=0) < 0 or end - start != nbytes or start < 0 or base + end > size:
                raise IslesError(
                    f"{self.path} is not a readable shard file (tensor {name!r} does not fit it: truncated?)",
                    hint="delete it and pull or rebuild it",
                )
            self.entries[name] = (dtype, shape, base + start, nbytes)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def column(self, name: str) -> LazyColumn:
        dtype, shape, offset, _ = self.entries[name]
        if not shape:
            raise IslesError(f"{self.path}: {name} is a scalar, not a column")
        return LazyColumn(self.path, offset, dtype, shape)

    def tensor(self, name: str) -> torch.Tensor:
        dtype, shape, offset, nbytes = self.entries[name]
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = bytearray(f.read(nbytes))
        if len(data) != nbytes:
            raise IslesError(f"shard file {self.path} is truncated", hint="delete it and pull it again")
        flat = torch.frombuffer(data, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
        return flat.reshape(shape)


class ShardWriter:
    """Append rows column by column, then `close(metadata)` writes one safetensors file atomically.

    Each column is spooled to a temporary file next to the target, so memory stays at one batch whatever the
    shard's size. `extra` tensors (no row dimension, e.g. the null text embedding) are written whole. Equal
    content gives equal bytes (columns in name order), so a shard's sha256 names its content.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._spool_dir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        self._columns: dict[str, tuple[torch.dtype, tuple[int, ...], Any]] = {}
        self._extra: dict[str, torch.Tensor] = {}
        self.rows = 0

    def append(self, **columns: torch.Tensor | None) -> None:
        """Append one batch: every column (the same ones each time) with the same number of rows."""
        columns = {k: v for k, v in columns.items() if v is not None}
        counts = {int(v.shape[0]) for v in columns.values()}
        if len(counts) != 1:
            raise IslesError(f"shard columns of different lengths: { {k: v.shape[0] for k, v in columns.items()} }")
        if self._columns and set(columns) != set(self._columns):
            raise IslesError(f"shard columns changed from {sorted(self._columns)} to {sorted(columns)}")
        for name, value in columns.items():
            value = value.detach().cpu().contiguous()
            if value.dtype == torch.bool:
                value = value.to(torch.uint8)  # bool is not portable across readers
            if name not in self._columns:
                if value.dtype not in _NAMES:
                    raise IslesError(f"shard column {name}: dtype {value.dtype} cannot be stored")
                spool = open(self._spool_dir / name, "wb")  # noqa: SIM115 (closed in close/abort)
                self._columns[name] = (value.dtype, tuple(value.shape[1:]), spool)
            dtype, row_shape, spool = self._columns[name]
            if value.dtype != dtype or tuple(value.shape[1:]) != row_shape:
                raise IslesError(f"shard column {name}: rows of {value.dtype} {list(value.shape[1:])} after {dtype}")
            spool.write((value.view(torch.int16) if value.dtype == torch.bfloat16 else value).numpy().tobytes())
        self.rows += counts.pop()

    def set_extra(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().cpu().contiguous()
        self._extra[name] = value.to(torch.uint8) if value.dtype == torch.bool else value

    def close(self, metadata: dict[str, str]) -> str:
        """Write the file (atomically) and return its sha256; the spool is removed either way."""
        try:
            for _, _, spool in self._columns.values():
                spool.close()
            entries, offset = {}, 0
            parts: list[tuple[str, Any]] = []
            for name in sorted(set(self._columns) | set(self._extra)):
                if name in self._columns:
                    dtype, row_shape, _ = self._columns[name]
                    shape = [self.rows, *row_shape]
                    nbytes = os.path.getsize(self._spool_dir / name)
                    parts.append(("file", self._spool_dir / name))
                else:
                    value = self._extra[name]
                    dtype, shape = value.dtype, list(value.shape)
                    raw = value.view(torch.int16) if dtype == torch.bfloat16 else value
                    data = raw.numpy().tobytes()
                    nbytes = len(data)
                    parts.append(("bytes", data))
                entries[name] = {"dtype": _NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
            header += b" " * (-len(header) % 8)  # safetensors pads its header to 8 bytes
            hasher = hashlib.sha256()
            with atomic_writer(self.path) as out:

                def put(chunk: bytes) -> None:
                    hasher.update(chunk)
                    out.write(chunk)

                put(len(header).to_bytes(8, "little") + header)
                for kind, part in parts:
                    if kind == "bytes":
                        put(part)
                        continue
                    with open(part, "rb") as f:
                        while chunk := f.read(CHUNK):
                            put(chunk)
            return hasher.hexdigest()
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the spool (e.g. after an error): nothing half-written is left behind."""
        import shutil

        for _, _, spool in self._columns.values():
            spool.close()
        shutil.rmtree(self._spool_dir, ignore_errors=True)
