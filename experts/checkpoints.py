"""Training checkpoints: `ckpt-<step>.isles`, written atomically: a safetensors payload (tensors, with the state's
structure as JSON in its header: checkpoints travel between peers, so nothing is unpickled), then a footer (sha256,
length, MAGIC) that proves the file whole: `latest_checkpoint` never picks a truncated or partial file.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from isles.protocol.errors import IslesError
from isles.protocol.files import atomic_writer

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
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        # load() views immutable bytes; the optimizer updates its state tensors in place, so each gets its own memory
        tensors = {name: tensor.clone() for name, tensor in load(payload).items()}
        header = json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "little")])
        return _decode(json.loads(header["__metadata__"][_STATE_KEY]), tensors)
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:  # whole, but not written by this version
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
