"""Data parallel over several GPUs (or CPU processes) of one volunteer: every rank draws the same global batch, trains
on its slice, and the gradients are summed with torch.distributed (NCCL on GPUs, gloo on CPU) before the same step.
Run under torchrun: `torchrun --nproc-per-node 2 -m isles.client.cli.app train-expert ...` (or `--gpus 2`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def leader(self) -> bool:
        """Rank 0 alone writes checkpoints and exports and reports progress."""
        return self.rank == 0

    @staticmethod
    def current() -> World:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return World(dist.get_rank(), dist.get_world_size())
        return World()

    def span(self, global_batch: int) -> tuple[int, int]:
        """This rank's rows of the global batch: contiguous, as even as possible (ranks may differ by one row)."""
        base, extra = divmod(global_batch, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum `tensors` over the ranks in place, in one flat all-reduce (each rank's share is already weighted)."""
        if self.size == 1 or not tensors:
            return
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if it is true on one (a stop request seen by rank 0 stops them all at the same step)."""
        if self.size == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([1.0 if flag else 0.0], device=device)  # NCCL reduces GPU tensors only
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def init_from_env(device_type: str, timeout_period: float | None = None) -> World:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...); a plain run is World(0, 1).
    `timeout_period`: how long a rank may wait in one collective (a volunteer's followers wait for the next unit)."""
    import datetime

    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = None if timeout_period is None else datetime.timedelta(seconds=timeout_period)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    return World.current()


def leave(world: World) -> None:
    """Leave the process group after the last collective, on every rank that finished well. Without this, gloo's
    worker threads outlive the interpreter's finalization and a rank can abort at exit ("terminate called without an
    active exception", SIGABRT), which torchrun reports as a failed run. Not on an error: a rank that raised may have
    left the others inside a collective, and they would wait here for it."""
    if world.size == 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # no rank tears down its connections while another still reads from them
        dist.destroy_process_group()


def broadcast(obj, world: World):
    """Rank 0's `obj` on every rank (pickled: only for small, trusted objects made by rank 0 of this machine)."""
    if world.size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def exec_torchrun(gpus: int, argv: list[str]) -> None:
    """Replace this process by torchrun running `isles` with `argv` (less any --gpus) once per GPU."""
    import sys

    args, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--gpus="):
            skip = False
            continue
        if arg == "--gpus":
            skip = True
            continue
        args.append(arg)
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
    # "--": torchrun's parser would otherwise take isles' options (--run) as abbreviations of its own (--run-path).
    os.execv(sys.executable, [sys.executable, *torchrun, "-m", "--", "isles.client.cli.app", *args])


def local_device(device: str) -> str:
    """Each rank's own GPU under torchrun (cuda:LOCAL_RANK); other devices unchanged."""
    if device in ("auto", "cuda") and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device
