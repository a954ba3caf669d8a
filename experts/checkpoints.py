"""Training checkpoints: `ckpt-<step>.isles`, written atomically: a safetensors payload (tensors, with the state's
structure as JSON in its header: checkpoints travel between peers, so nothing is unpickled), then a footer (sha256,
length, MAGIC) that proves the file whole: `latest_checkpoint` never picks a truncated or partial file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, BinaryIO

import torch

from isles.protocol.errors import IslesError
from isles.protocol.files import CHUNK, atomic_writer

MAGIC = b"ISLESCK2"  # 2: safetensors payload (1 was a torch.save pickle)
FOOTER_SIZE = 32 + 8 + len(MAGIC)
SUFFIX = ".isles"
_NAME = re.compile(r"^ckpt-(\d+)\.isles$")
_STATE_KEY = "isles_state"  # the safetensors metadata entry holding the state's structure


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:09d}{SUFFIX}"


def _encode(obj: Any, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    """The JSON form of `obj` with every tensor moved into `tensors` (and replaced by a reference to its name).

    Dicts with non-string keys (optimizer state is keyed by parameter index) and tuples (Adam's betas) are tagged, so
    `_decode` gives back exactly the structure `load_state_dict` expects."""
    if isinstance(obj, torch.Tensor):
        name = str(len(tensors))
        tensor = obj.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen and tensor.numel():  # safetensors refuses tensors that share memory
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
        return {"t": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"d": {k: _encode(v, tensors, seen) for k, v in obj.items()}}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {"i": [[k, _encode(v, tensors, seen)] for k, v in obj.items()]}
        raise TypeError(f"checkpoint dicts need str or int keys, got {sorted({type(k).__name__ for k in obj})}")
    if isinstance(obj, tuple):
        return {"u": [_encode(v, tensors, seen) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, seen) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (tensors and plain values only)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    ((tag, value),) = obj.items()
    if tag == "t":
        return tensors[value]
    if tag == "d":
        return {k: _decode(v, tensors) for k, v in value.items()}
    if tag == "i":
        return {int(k): _decode(v, tensors) for k, v in value}
    if tag == "u":
        return tuple(_decode(v, tensors) for v in value)
    raise ValueError(f"unknown tag {tag!r}")


def write_checkpoint(folder: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Serialize `state` (nested dicts, lists and tuples of tensors and plain values) to `folder/ckpt-<step>.isles`
    atomically; returns the path."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(_encode(state, tensors, set()), separators=(",", ":"))
    payload = save(tensors, metadata={_STATE_KEY: structure})
    footer = hashlib.sha256(payload).digest() + len(payload).to_bytes(8, "little") + MAGIC
    path = Path(folder) / checkpoint_name(step)
    with atomic_writer(path) as f:
        f.write(payload)
        f.write(footer)
    return path


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class _Unreadable(Exception):
    """The payload is whole but not a checkpoint this version can read."""


def _open_payload(f: BinaryIO) -> tuple[bytes, int] | None:
    """(sha256, length) from the footer of an open checkpoint file, or None if it has no valid footer."""
    size = os.fstat(f.fileno()).st_size
    if size < FOOTER_SIZE:
        return None
    f.seek(size - FOOTER_SIZE)
    footer = f.read(FOOTER_SIZE)
    length = int.from_bytes(footer[32:40], "little")
    if footer[-len(MAGIC) :] != MAGIC or length != size - FOOTER_SIZE:
        return None
    f.seek(0)
    return footer[:32], length


def verify_checkpoint(path: str | Path) -> bool:
    """Whether the file is whole (its footer's sha256 matches the payload), read in chunks rather than into memory.

    Checkpoints are listed, pruned and resumed from often, and a large one takes seconds to hash: a file is hashed
    again only when it changed (another inode, size or mtime; writes are atomic renames, so a rewrite is a new inode).
    """
    try:
        st = os.stat(path)
    except OSError:
        return False
    return _verified(os.fspath(path), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _verified(path: str, _inode: int, _size: int, _mtime_ns: int) -> bool:
    try:
        with open(path, "rb") as f:
            found = _open_payload(f)
            if found is None:
                return False
            digest, remaining = found
            hasher = hashlib.sha256()
            while remaining and (chunk := f.read(min(CHUNK, remaining))):
                hasher.update(chunk)
                remaining -= len(chunk)
            return remaining == 0 and hasher.digest() == digest
    except OSError:
        return False


def _read_tensors(f: BinaryIO, length: int, hasher) -> tuple[dict[str, torch.Tensor], dict]:
    """Parse the safetensors payload in one pass, each tensor into its own writable buffer (peak memory: the state
    itself, not several copies of the file), hashing every byte read."""

    def take(n: int) -> bytearray:
        buffer = bytearray(n)
        if f.readinto(buffer) != n:
            raise _Unreadable("the file ended early")
        hasher.update(buffer)
        return buffer

    header_size = int.from_bytes(take(8), "little")
    if header_size > length - 8:
        raise _Unreadable("not a safetensors payload")
    header = json.loads(take(header_size))
    metadata = header.pop("__metadata__", {})
    entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    position = 0
    for _name, info in entries:  # check every size before allocating anything
        start, end = info["data_offsets"]
        if start != position or end < start or info["dtype"] not in _DTYPES:
            raise _Unreadable("the tensor layout is not one this version writes")
        position = end
    if 8 + header_size + position != length:
        raise _Unreadable("the tensor data does not fill the payload")
    tensors = {}
    for name, info in entries:
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        buffer = take(end - start)
        flat = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"])
    return tensors, metadata


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's state onto the CPU; a damaged or foreign file is an IslesError (nothing is unpickled)."""
    damaged = IslesError(
        f"checkpoint {path} is damaged or incomplete", hint="delete it; training resumes from an older one"
    )
    try:
        with open(path, "rb") as f:
            found = _open_payload(f)
            if found is None:
                raise damaged
            digest, length = found
            hasher = hashlib.sha256()
            tensors, metadata = _read_tensors(f, length, hasher)
        if hasher.digest() != digest:
            raise damaged
        return _decode(json.loads(metadata[_STATE_KEY]), tensors)
    except OSError as exc:
        raise IslesError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    except (_Unreadable, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:  # foreign content
        if not verify_checkpoint(path):  # a flipped byte in the header: say damaged, not foreign
            raise damaged from None
        raise IslesError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})",
            hint="delete it; training resumes from an older one",
        ) from None


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


def size_bound(model: torch.nn.Module) -> int:
    """The most bytes a checkpoint of `model` may take: weights, EMA and two Adam moments in fp32, plus 16 MiB for
    the scheduler, RNG states and header. A pushed checkpoint larger than this is refused before it is downloaded."""
    weights = sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])
    return 5 * weights + (16 << 20)


def check_foreign(path: str | Path, model: torch.nn.Module, steps: int) -> int:
    """Check a checkpoint another peer pushed before installing it: it must load into `model` (the recipe's model:
    same keys, same shapes) and stop short of the recipe's last step (a finished state would be published as the
    resumer's own work). Returns its step; anything else is an IslesError."""
    state = read_checkpoint(path)
    weights, step = state.get("model"), state.get("step")
    if not isinstance(step, int) or not 0 < step < steps:
        raise IslesError(f"checkpoint {path} is at step {step!r}, outside 1..{steps - 1} of the recipe")
    if not isinstance(weights, dict):
        raise IslesError(f"checkpoint {path} holds no model weights")
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)}
    if found != wanted:
        differ = sorted(set(found) ^ set(wanted)) or sorted(k for k in wanted if found[k] != wanted[k])
        raise IslesError(f"checkpoint {path} does not fit the recipe's model ({', '.join(differ[:3])} differ)")
    return step
