"""The machine check a volunteer's client runs before it claims work: device, memory, disk, and which presets fit.

`check_machine(device="auto", work_dir=...)` returns a `MachineReport`; `require_fit(report, needs)` raises an
`IslesError` that says what to change when the run's models cannot be trained here.
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from isles.protocol.errors import IslesError

# Bytes per parameter while training with AdamW + EMA in float32: weights, grads, two moments, EMA copy.
TRAIN_BYTES_PER_PARAM = 4 * 5
# Activations, the allocator and the data: a generous fixed margin plus a share of the weights.
MARGIN_BYTES = 512 * 2**20
# Disk for one unit: the shard, two checkpoints (weights + optimizer + EMA) and the export.
DISK_PARAMS_FACTOR = 4 * 10


@dataclass(frozen=True)
class MachineReport:
    device: str  # "cuda", "cuda:1", "mps" or "cpu": what the trainer will use
    device_name: str  # "NVIDIA H100 80GB HBM3", "Apple M2", "x86_64 (2 cores)"
    memory_gb: float  # the memory training lives in: the accelerator's, or RAM on CPU
    ram_gb: float
    disk_free_gb: float
    cpu_count: int
    fits: dict[str, bool] = field(default_factory=dict)  # model need (e.g. "unet-tiny 32x32x1") -> fits
    problems: tuple[str, ...] = ()

    @property
    def hardware(self) -> str:
        """One short line for claims and releases: 'cpu x86_64 (2 cores), 23.4 GB'."""
        return f"{self.device} {self.device_name}, {self.memory_gb:.1f} GB"

    def summary_lines(self) -> list[str]:
        lines = [
            f"device: {self.device} ({self.device_name}), {self.memory_gb:.1f} GB for training",
            f"ram: {self.ram_gb:.1f} GB, disk free: {self.disk_free_gb:.1f} GB, cpus: {self.cpu_count}",
        ]
        for need, ok in self.fits.items():
            lines.append(f"{need}: {'fits' if ok else 'does NOT fit'}")
        lines.extend(f"problem: {p}" for p in self.problems)
        return lines


def resolve_device(device: str = "auto") -> str:
    """`--device` as a string ("cuda", "cuda:1", "mps", "cpu"): experts/device.pick_device decides."""
    from isles.experts.device import pick_device

    return str(pick_device(device))


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _ram_bytes()


def _device_memory(device: str) -> tuple[str, int]:
    import torch

    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        free, _total = torch.cuda.mem_get_info(index)
        return torch.cuda.get_device_name(index), free
    cpus = os.cpu_count() or 1
    name = f"{platform.machine() or 'cpu'} ({cpus} cores)"
    if device == "mps":
        name = f"Apple {platform.machine()} (MPS)"
    return name, _available_ram_bytes()


def param_count(
    preset: str,
    channels: int,
    resolution: int,
    num_classes: int | None,
    text_width: int | None = None,
    frames: int | None = None,
) -> int:
    """Parameters of a preset at a data shape (clips: `frames` per clip), counted on the meta device."""
    import torch

    from isles.experts.presets import build_model

    with torch.device("meta"):
        model = build_model(preset, channels, resolution, num_classes, text_width, frames)
    return sum(p.numel() for p in model.parameters())


def training_bytes(params: int) -> int:
    return params * TRAIN_BYTES_PER_PARAM + MARGIN_BYTES


def check_machine(
    device: str = "auto",
    work_dir: str | os.PathLike | None = None,
    needs: dict[str, int] | None = None,
) -> MachineReport:
    """Look at this machine. `needs` maps a label (e.g. 'unet-tiny 8x8x1') to its parameter count."""
    dev = resolve_device(device)
    name, mem = _device_memory(dev)
    disk_root = Path(work_dir) if work_dir is not None else Path.cwd()
    probe = disk_root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    disk_free = shutil.disk_usage(probe).free
    fits: dict[str, bool] = {}
    problems: list[str] = []
    for label, params in (needs or {}).items():
        ok = training_bytes(params) <= mem
        fits[label] = ok
        if not ok:
            problems.append(f"{label} needs ~{training_bytes(params) / 2**30:.1f} GB, {mem / 2**30:.1f} GB free")
        if params * DISK_PARAMS_FACTOR > disk_free:
            problems.append(f"{label} needs ~{params * DISK_PARAMS_FACTOR / 2**30:.1f} GB of disk in {disk_root}")
    return MachineReport(
        device=dev,
        device_name=name,
        memory_gb=mem / 2**30,
        ram_gb=_ram_bytes() / 2**30,
        disk_free_gb=disk_free / 2**30,
        cpu_count=os.cpu_count() or 1,
        fits=fits,
        problems=tuple(problems),
    )


def require_fit(report: MachineReport) -> None:
    """Raise when nothing the run needs can be trained here (a volunteer should not claim what it cannot finish)."""
    if report.fits and not any(report.fits.values()):
        raise IslesError(
            "this machine cannot train this run's models: " + "; ".join(report.problems),
            hint="free memory or disk, or join with --device cuda on a machine with a larger GPU",
        )
    disk = [p for p in report.problems if "of disk" in p]
    if disk:
        raise IslesError(disk[0], hint="free disk space or choose another folder with --work-dir DIR")
