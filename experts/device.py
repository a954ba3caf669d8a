"""Which device trains, in which precision, and how to describe the hardware in an expert's metrics."""

from __future__ import annotations

import platform

import torch

from isles.protocol.errors import IslesError


def pick_device(requested: str | None = "auto") -> torch.device:
    """The device asked for; "auto" (or None) picks the best present: CUDA, then Apple MPS, then CPU. A device that
    is absent or unknown is a user error. The one place isles resolves `--device` (client/machine.resolve_device
    gives the same as a string)."""
    if requested in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    unknown = IslesError(f"unknown device {requested!r}", hint="use one of: auto, cpu, cuda, cuda:N, mps")
    if requested not in ("cpu", "mps") and not requested.startswith("cuda"):
        raise unknown
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise unknown from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise IslesError(f"--device {requested} was asked for but CUDA is not available", hint="use --device auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise IslesError("--device mps was asked for but Apple MPS is not available", hint="use --device auto")
    return device


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype the trainer uses; None means plain float32.

    "auto": bf16 on CUDA GPUs with native bf16 (compute capability 8.0+: A100, H100, RTX 30xx/40xx); fp16 on older
    CUDA GPUs (T4, V100, GTX 16xx, RTX 20xx), where the trainer adds a gradient scaler (`needs_grad_scaler`); fp32 on
    CPU and MPS, where autocast is slower or unsupported for many ops. "bf16" / "fp16" / "fp32" force one.
    """
    if precision not in PRECISIONS:
        raise IslesError(f"unknown precision {precision!r}", hint=f"use one of: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    native_bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if native_bf16 else torch.float16
    if precision == "bf16" and (device.type == "mps" or (device.type == "cuda" and not native_bf16)):
        raise IslesError(f"bf16 is not supported natively on {device}", hint="use --precision fp16 (or auto)")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def needs_grad_scaler(dtype: torch.dtype | None) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none."""
    return dtype == torch.float16


def describe_device(device: torch.device) -> dict:
    """A JSON-able description of the hardware (for expert.json and the swarm's claims)."""
    info = {"device": device.type, "torch": torch.__version__, "platform": platform.platform(terse=True)}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1))
    elif device.type == "cpu":
        info.update(name=_cpu_name(), threads=torch.get_num_threads())
    else:
        info.update(name="Apple MPS")
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
