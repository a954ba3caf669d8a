"""The trainer: runs a TrainRecipe to completion for any *task* (see `Task`), with checkpoints, exact resume, EMA and
export. `train(task, recipe, out_dir)`; run it again with the same out_dir and it resumes from the newest whole
checkpoint, bit for bit (same hardware and micro-batch). The global batch never depends on the hardware.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from isles.protocol.artifacts import install_folder
from isles.protocol.errors import IslesError

from . import checkpoints
from .device import autocast_dtype, describe_device, needs_grad_scaler, pick_device, synchronize
from .distributed import World

log = logging.getLogger("isles.trainer")

# Recipe fields that change the optimisation: a checkpoint made with other values cannot be resumed.
_TRAJECTORY_FIELDS = ("global_batch", "lr", "warmup_steps", "ema_decay", "seed", "weight_decay", "grad_clip", "betas")


@dataclass(frozen=True)
class TrainRecipe:
    steps: int  # optimizer steps to completion
    global_batch: int = 64  # items per optimizer step, the same on every volunteer's hardware
    lr: float = 2e-4  # AdamW peak learning rate, constant after warmup (DiT trains at 1e-4 constant)
    warmup_steps: int = 100  # linear warmup from 0, keeps the first Adam steps from blowing up attention
    ema_decay: float = 0.999  # EMA of the weights, which is what gets exported (ramped up early, see _ema_decay)
    seed: int = 0  # model init, data order, noise: everything random descends from it
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max global gradient norm; None disables clipping
    betas: tuple[float, float] = (0.9, 0.999)
    checkpoint_every_steps: int | None = 500  # whichever of these comes first; at most this much work is lost
    checkpoint_every_seconds: float | None = 600.0
    keep_checkpoints: int = 2  # older checkpoints are deleted once a newer one is written

    def __post_init__(self) -> None:
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be at least 1 (got {self.steps})")
        if self.global_batch < 1:
            problems.append(f"global batch must be at least 1 (got {self.global_batch})")
        if not self.lr > 0:
            problems.append(f"learning rate must be positive (got {self.lr})")
        if self.warmup_steps < 0 or not 0 <= self.ema_decay < 1:
            problems.append("warmup_steps must be >= 0 and ema_decay in [0, 1)")
        if self.keep_checkpoints < 1:
            problems.append("keep_checkpoints must be at least 1")
        if problems:
            raise IslesError("invalid training recipe: " + "; ".join(problems))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass
class Progress:
    step: int
    steps: int
    loss: float  # mean training loss since the previous report
    samples_per_s: float
    eta_s: float
    lr: float


@dataclass
class TrainResult:
    completed: bool  # False when stopped early (should_stop, stop_at_step, Ctrl-C): resume later
    step: int
    checkpoint: Path | None  # newest checkpoint written
    export_dir: Path | None  # the exported folder when completed
    metrics: dict[str, Any]


class Task(Protocol):
    """What the trainer trains (the expert task is experts/expert.py, the router's is in router/):

    describe() -> dict                       JSON-able identity; a checkpoint only resumes into the same one
    build_model() -> torch.nn.Module         fresh model (the trainer seeds torch's RNG with recipe.seed first)
    train_size() -> int                      number of training items; the trainer walks seeded permutations
    make_batch(indices, generator) -> dict   the global batch on the CPU: every tensor has a leading batch dim and
                                             ALL randomness (noise, t, label dropout) is drawn here from
                                             `generator`, so splitting into micro-batches changes nothing
    loss(model, batch) -> scalar tensor      mean loss over a (micro-)batch already moved to the device
    validate(model, device) -> dict          e.g. {"val_loss": ...}; deterministic; run on the EMA model
    export(model, folder, metrics) -> None   write the publishable folder from the EMA model
    flops_per_sample() -> int  (optional)    training FLOPs per item, for the metrics
    """

    def describe(self) -> dict: ...
    def build_model(self) -> torch.nn.Module: ...
    def train_size(self) -> int: ...
    def make_batch(self, indices: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]: ...
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def validate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]: ...
    def export(self, model: torch.nn.Module, folder: Path, metrics: dict[str, Any]) -> None: ...


def _ema_decay(decay: float, step: int) -> float:
    # Ramp (1 + n) / (10 + n): a short run still exports a useful average instead of its random init.
    return min(decay, (1 + step) / (10 + step))


def _lr_factor(warmup_steps: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class _Order:
    """The data order: an endless stream of seeded permutations of the training items; `cursor` is the position."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise IslesError("the training split is empty", hint="use a shard with more items")
        self.n, self.seed, self._epoch, self._perm = n, seed, -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator)
        return self._perm

    def take(self, cursor: int, count: int) -> torch.Tensor:
        out = []
        while count > 0:
            epoch, offset = divmod(cursor, self.n)
            chunk = self._permutation(epoch)[offset : offset + count]
            out.append(chunk)
            cursor += len(chunk)
            count -= len(chunk)
        return torch.cat(out)


def _to_device(batch: dict[str, torch.Tensor], start: int, stop: int, device: torch.device) -> dict:
    return {k: v[start:stop].to(device, non_blocking=True) for k, v in batch.items()}


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def train(
    task: Task,
    recipe: TrainRecipe,
    out_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    micro_batch: int | None = None,
    precision: str = "auto",
    progress: Callable[[Progress], None] | None = None,
    progress_every_steps: int = 10,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    stop_at_step: int | None = None,
    export: bool = True,
) -> TrainResult:
    """Train `task` under `recipe`, checkpointing into out_dir/checkpoints and exporting to out_dir/model.

    micro_batch: items per forward pass (None: the whole global batch, halved on out-of-memory on accelerators).
    on_checkpoint(path, step) runs after each checkpoint is written (e.g. to upload it); should_stop() is polled
    every step (e.g. a lost lease) and stops with a checkpoint; stop_at_step stops there (tests, time slices).
    """
    device = device if isinstance(device, torch.device) else pick_device(device)
    # Under torchrun, this rank trains its slice of every global batch (experts/distributed.py).
    world = World.current()
    span = world.span(recipe.global_batch)
    amp_dtype = autocast_dtype(device, precision)
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if micro_batch is not None and micro_batch < 1:
        raise IslesError(f"micro-batch must be at least 1 (got {micro_batch})")
    micro = min(micro_batch or recipe.global_batch, recipe.global_batch)
    auto_micro = micro_batch is None  # halved on out-of-memory; a micro-batch the user set is kept

    # 1. Build everything from the seed, then overwrite it from the newest checkpoint if there is one.
    torch.manual_seed(recipe.seed)
    model = task.build_model().to(device)
    model.train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(recipe.warmup_steps))
    # fp16 autocast: the loss is scaled up so small gradients survive fp16, steps with inf/nan gradients are skipped
    # and the scale backed off. Disabled (every call a pass-through) for bf16 and fp32.
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(amp_dtype))
    generator = torch.Generator().manual_seed(recipe.seed)
    order = _Order(task.train_size(), recipe.seed)
    step, cursor, elapsed, recent_loss = 0, 0, 0.0, None
    identity = task_identity(task)

    latest = checkpoints.latest_checkpoint(ckpt_dir)
    if latest is not None:
        state = checkpoints.read_checkpoint(latest)
        _check_compatible(state, recipe, identity, latest)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler.is_enabled() and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        step, cursor, elapsed = int(state["step"]), int(state["cursor"]), float(state["elapsed_s"])
        recent_loss = state.get("recent_loss")
        log.info("resuming from %s (step %d of %d)", latest.name, step, recipe.steps)

    ema_params = [p for p in ema.parameters()]
    model_params = [p for p in model.parameters()]
    flops_per_sample = getattr(task, "flops_per_sample", lambda: None)()
    last_ckpt: Path | None = latest

    def save() -> Path | None:
        nonlocal last_ckpt
        if not world.leader:  # one writer: the other ranks hold the very same state
            return None
        state = {
            "format": "isles-train-1",
            "step": step,
            "cursor": cursor,
            "elapsed_s": elapsed + (time.monotonic() - run_start),
            "recent_loss": recent_loss,
            "recipe": recipe.to_dict(),
            "task": identity,
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(),
            "rng": _rng_state(),
        }
        if scaler.is_enabled():
            state["scaler"] = scaler.state_dict()
        last_ckpt = checkpoints.write_checkpoint(ckpt_dir, step, state)
        checkpoints.prune_checkpoints(ckpt_dir, recipe.keep_checkpoints)
        if on_checkpoint is not None:
            on_checkpoint(last_ckpt, step)
        return last_ckpt

    # 2. The loop. Loss values stay on the device between reports: no host sync per step.
    run_start = time.monotonic()
    last_ckpt_time = run_start
    report_start, report_step = time.monotonic(), step
    loss_sum = torch.zeros((), device=device)
    target = recipe.steps if stop_at_step is None else min(stop_at_step, recipe.steps)
    stopped = False
    phase = "idle"  # "batch": data drawn, weights untouched; "update": weights changing (not checkpointable)
    try:
        while step < target:
            if world.any(should_stop is not None and should_stop(), device):
                stopped = True
                break
            generator_before = generator.get_state()
            phase = "batch"
            indices = order.take(cursor, recipe.global_batch)
            batch = task.make_batch(indices, generator)
            while True:
                try:
                    step_loss = _accumulate(
                        task, model, batch, recipe.global_batch, micro, device, amp_dtype, scaler, span
                    )
                    break
                except torch.OutOfMemoryError:
                    if not auto_micro or micro == 1:
                        raise IslesError(
                            f"out of memory on {device} with a micro-batch of {micro}",
                            hint="pass a smaller --micro-batch or pick a smaller preset",
                        ) from None
                    micro = max(1, micro // 2)
                    optimizer.zero_grad(set_to_none=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    log.warning("out of memory: micro-batch reduced to %d", micro)
                except RuntimeError as exc:
                    if "can't allocate memory" not in str(exc):  # the CPU allocator's out-of-memory
                        raise
                    raise IslesError(
                        f"out of memory on {device} with a micro-batch of {micro}",
                        hint="pass a smaller --micro-batch or pick a smaller preset",
                    ) from None
            phase = "update"
            world.sum_([p.grad for p in params if p.grad is not None] + [step_loss])  # data parallel: sum the slices
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            if recipe.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            scaler.step(optimizer)  # optimizer.step(), skipped when fp16 gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # after a skipped fp16 step torch warns; the schedule counts steps anyway
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                scheduler.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, model_params, 1.0 - _ema_decay(recipe.ema_decay, step))
            step += 1
            cursor += recipe.global_batch
            phase = "idle"
            loss_sum += step_loss

            if step % progress_every_steps == 0 or step == target:
                recent_loss = float(loss_sum) / max(1, step - report_step)
                now = time.monotonic()
                rate = (step - report_step) * recipe.global_batch / max(now - report_start, 1e-9)
                eta = (recipe.steps - step) * recipe.global_batch / max(rate, 1e-9)
                if progress is not None and world.leader:
                    progress(Progress(step, recipe.steps, recent_loss, rate, eta, scheduler.get_last_lr()[0]))
                report_start, report_step, loss_sum = now, step, torch.zeros((), device=device)
            due_steps = recipe.checkpoint_every_steps and step % recipe.checkpoint_every_steps == 0
            due_time = (
                recipe.checkpoint_every_seconds is not None
                and time.monotonic() - last_ckpt_time >= recipe.checkpoint_every_seconds
            )
            if (due_steps or due_time) and step < target:
                save()
                last_ckpt_time = time.monotonic()
    except KeyboardInterrupt:
        # Checkpoint only a consistent state: between steps, or mid-forward with the batch's draws undone.
        if phase == "batch":
            generator.set_state(generator_before)
            phase = "idle"
        if phase == "idle" and step > 0 and (last_ckpt is None or last_ckpt.name != checkpoints.checkpoint_name(step)):
            save()
            log.info("interrupted: checkpoint at step %d written; run again to resume", step)
        raise
    if step - report_step > 0:
        recent_loss = float(loss_sum) / (step - report_step)

    completed = step >= recipe.steps and not stopped
    if last_ckpt is None or checkpoints.checkpoint_name(step) != last_ckpt.name:
        save()
    synchronize(device)
    wall = elapsed + (time.monotonic() - run_start)
    metrics: dict[str, Any] = {
        "steps": step,
        "samples_seen": cursor,
        "wall_time_s": round(wall, 3),
        "final_loss": recent_loss,
        "hardware": describe_device(device),
        "micro_batch": micro,
    }
    if flops_per_sample:
        metrics["train_flops_per_sample"] = int(flops_per_sample)
        metrics["train_flops"] = int(flops_per_sample) * cursor
    export_dir = None
    if completed and export and world.leader:
        metrics.update(task.validate(ema, device))
        # Exported beside, then swapped in: a crash mid-export never leaves a half-written model/ to be published.
        export_dir, staging = out_dir / "model", out_dir / ".model.partial"
        shutil.rmtree(staging, ignore_errors=True)
        task.export(ema, staging, metrics)
        install_folder(staging, export_dir)
    return TrainResult(completed=completed, step=step, checkpoint=last_ckpt, export_dir=export_dir, metrics=metrics)


def _accumulate(task, model, batch, global_batch, micro, device, amp_dtype, scaler=None, span=None) -> torch.Tensor:
    """Forward/backward the global batch (or this rank's `span` of it) in micro-batches; gradients sum to those of
    the global mean loss (over the ranks, once they are summed)."""
    total = torch.zeros((), device=device)
    first, last = span or (0, global_batch)
    for start in range(first, last, micro):
        stop = min(start + micro, last)
        piece = _to_device(batch, start, stop, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = task.loss(model, piece)
        weight = (stop - start) / global_batch
        scaled = loss * weight
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.detach().float() * weight
    return total


def task_identity(task: Task) -> dict:
    """What a checkpoint records of its task, in the form it has after the checkpoint's JSON round trip."""
    return json.loads(json.dumps(task.describe()))


def check_resumable(path: Path, task: Task, recipe: TrainRecipe) -> None:
    """Raise IslesError unless the checkpoint at `path` resumes `task` under `recipe` (the check `train` makes), e.g.
    before installing a checkpoint another peer pushed."""
    _check_compatible(checkpoints.read_checkpoint(path), recipe, task_identity(task), path)


def _check_compatible(state: dict, recipe: TrainRecipe, identity: dict, path: Path) -> None:
    saved = state.get("recipe", {})
    mine = recipe.to_dict()
    changed = [f for f in _TRAJECTORY_FIELDS if saved.get(f) != mine.get(f)]
    if changed:
        raise IslesError(
            f"{path.parent.parent} holds a checkpoint of a different recipe ({', '.join(changed)} differ)",
            hint="use another --out folder, or the original recipe to resume",
        )
    if state.get("task") != identity:
        raise IslesError(
            f"{path.parent.parent} holds a checkpoint of a different model or data",
            hint="use another --out folder to start over",
        )
    if int(state["step"]) > recipe.steps:
        raise IslesError(f"the checkpoint in {path.parent.parent} is past the recipe's {recipe.steps} steps")
