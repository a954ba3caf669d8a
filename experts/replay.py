"""Verified training by replay: start from one pushed checkpoint of a unit, train the recipe's task on the unit's
shard up to the step of the next pushed checkpoint, and compare weights. The trainer resumes bit-identically on a CPU
(tests/test_trainer.py), so an honest segment lands exactly on the next checkpoint, trained weights and EMA alike;
one trained on noise or on another shard does not. Across hardware (or micro-batches) pass a tolerance: how far the
replayed weights may land from the claimed ones, as a fraction of how far the segment moved them (L2 norms over every
weight). A holder's first checkpoint is replayed from the recipe's seeded initial weights (start=None): training from
scratch is as exact.

    result = replay_segment(task, recipe, start_ckpt, end_ckpt, work_dir)   # result.ok, result.relative_error
    result = replay_segment(task, recipe, None, first_ckpt, work_dir)       # steps 0..first_ckpt's step
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from isles.protocol.errors import IslesError

from . import checkpoints


@dataclass(frozen=True)
class ReplayResult:
    start_step: int
    end_step: int
    error: float  # ||replayed - claimed||: where the replay landed, from where the checkpoint says training landed
    moved: float  # ||claimed - start||: how far the segment moved the weights
    tolerance: float

    @property
    def relative_error(self) -> float:
        return self.error / self.moved if self.moved > 0 else (0.0 if self.error == 0 else float("inf"))

    @property
    def ok(self) -> bool:
        return self.relative_error <= self.tolerance

    @property
    def exact(self) -> bool:
        return self.error == 0.0

    @property
    def verdict(self) -> str:
        """'exact', or the relative error: how logs and `isles verify` describe a replay."""
        return "exact" if self.exact else f"relative error {self.relative_error:.2e}"


def replay_segment(
    task,
    recipe,
    start: str | Path | None,
    end: str | Path,
    work: str | Path,
    tolerance: float = 0.0,
    device: str = "cpu",
) -> ReplayResult:
    """Replay training from checkpoint `start` (None: from the recipe's initial weights, step 0) to the step of
    checkpoint `end` in `work` (emptied first); compare the model weights. Both checkpoints must be of `recipe` and
    `task` (the trainer refuses anything else)."""
    from .trainer import train

    end_state = checkpoints.read_checkpoint(end)
    if start is None:
        torch.manual_seed(recipe.seed)  # as the trainer builds its model: these are the weights of step 0
        initial = task.build_model().state_dict()
        start_state = {"step": 0, "model": initial, "ema": initial}  # the EMA starts as a copy of the model
    else:
        start_state = checkpoints.read_checkpoint(start)
    first, last = int(start_state["step"]), int(end_state["step"])
    if not 0 <= first < last <= recipe.steps or (start is not None and first == 0):
        raise IslesError(f"cannot replay from step {first} to step {last} of a {recipe.steps}-step recipe")
    claimed = end_state.get("model")
    if not isinstance(claimed, dict):
        raise IslesError(f"checkpoint {end} holds no model weights")
    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "checkpoints").mkdir(parents=True)
    if start is not None:
        shutil.copyfile(start, work / "checkpoints" / checkpoints.checkpoint_name(first))
    result = train(task, recipe, work, device=device, stop_at_step=last, export=False)
    if result.step != last:
        raise IslesError(f"the replay stopped at step {result.step}, not {last}")
    replayed_state = checkpoints.read_checkpoint(checkpoints.latest_checkpoint(work / "checkpoints"))
    error, moved = 0.0, 0.0
    # The trained weights and their EMA (what a release exports): both must land where the checkpoint says.
    for part in ("model", "ema"):
        replayed, claimed, begin = replayed_state[part], end_state.get(part), start_state.get(part)
        if not isinstance(claimed, dict) or not isinstance(begin, dict) or replayed.keys() != claimed.keys():
            raise IslesError(f"checkpoint {end} is not of the recipe's model ({part})")
        for name, tensor in replayed.items():
            other = claimed[name]
            if tensor.shape != other.shape or begin.get(name) is None or begin[name].shape != other.shape:
                raise IslesError(f"checkpoint {end}: {part} {name} is not of the shape of the recipe's model")
            if tensor.is_floating_point():
                error += float((tensor.double() - other.double()).pow(2).sum())
                moved += float((other.double() - begin[name].double()).pow(2).sum())
            elif not torch.equal(tensor, other):
                error = float("inf")
    shutil.rmtree(work, ignore_errors=True)
    return ReplayResult(first, last, error**0.5, moved**0.5, tolerance)
