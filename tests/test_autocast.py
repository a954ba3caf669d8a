"""GPUs of every generation: which precision the trainer picks (bf16, fp16 + gradient scaler, fp32), the fp16 scaler
path run for real on CPU (torch supports fp16 autocast there), and the out-of-memory micro-batch halving, driven by an
injected out-of-memory error.
"""

from __future__ import annotations

import pytest
import torch

from isles.experts import checkpoints
from isles.experts.data import load_source
from isles.experts.device import autocast_dtype, needs_grad_scaler
from isles.experts.expert import ExpertTask
from isles.experts.trainer import TrainRecipe, train
from isles.protocol.errors import IslesError


@pytest.fixture(scope="module")
def shard():
    return load_source("digits").subset(torch.arange(48))


def _recipe(steps: int, **kw) -> TrainRecipe:
    return TrainRecipe(
        steps=steps, global_batch=8, lr=1e-3, warmup_steps=2, checkpoint_every_steps=None,
        checkpoint_every_seconds=None, **kw,
    )  # fmt: skip


@pytest.mark.parametrize(
    "capability, expected",
    [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
    ids=["V100", "T4", "A100", "H100"],
)
def test_auto_precision_is_bf16_on_new_gpus_and_fp16_with_a_scaler_on_old_ones(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    dtype = autocast_dtype(torch.device("cuda"), "auto")
    assert dtype == expected
    assert needs_grad_scaler(dtype) == (expected == torch.float16)
    if expected == torch.float16:
        with pytest.raises(IslesError, match="bf16 is not supported"):
            autocast_dtype(torch.device("cuda"), "bf16")


def test_cpu_trains_in_fp32_unless_told_otherwise():
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu) is None and autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "fp16") == torch.float16 and autocast_dtype(cpu, "bf16") == torch.bfloat16
    with pytest.raises(IslesError, match="unknown precision"):
        autocast_dtype(cpu, "fp8")


class Overflowing(ExpertTask):
    """An expert task whose first loss is inf, as an fp16 overflow makes it."""

    calls = 0

    def loss(self, model, batch):
        loss = super().loss(model, batch)
        Overflowing.calls += 1
        return loss * float("inf") if Overflowing.calls == 1 else loss


def test_fp16_scaler_skips_an_overflowing_step_and_resumes_exactly(shard, tmp_path):
    Overflowing.calls = 0
    task = Overflowing(shard, preset="unet-tiny", objective="fm")
    torch.manual_seed(_recipe(1).seed)
    initial = task.build_model().state_dict()
    train(task, _recipe(1), tmp_path / "one", precision="fp16", export=False)
    state = checkpoints.read_checkpoint(checkpoints.latest_checkpoint(tmp_path / "one" / "checkpoints"))
    for name, value in initial.items():  # the inf step changed nothing ...
        assert torch.equal(state["model"][name], value), name
    scale = state["scaler"]["scale"]
    assert float(scale) == 2.0**16 * 0.5  # ... and the scale was backed off from its start, 2**16
    # The scaler's state is part of the checkpoint: a stopped and resumed fp16 run is the straight one.
    task = ExpertTask(shard, preset="unet-tiny", objective="fm")
    straight = train(task, _recipe(4), tmp_path / "a", precision="fp16", export=False)
    train(task, _recipe(4), tmp_path / "b", precision="fp16", stop_at_step=2, export=False)
    resumed = train(task, _recipe(4), tmp_path / "b", precision="fp16", export=False)
    assert straight.completed and resumed.completed and torch.isfinite(torch.tensor(straight.metrics["final_loss"]))
    a, b = (checkpoints.read_checkpoint(checkpoints.latest_checkpoint(tmp_path / x / "checkpoints")) for x in "ab")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


class RunsOutOfMemory(ExpertTask):
    """Raises the out-of-memory error a GPU raises whenever a forward pass gets more than `limit` items."""

    limit = 2

    def loss(self, model, batch):
        items = next(iter(batch.values())).shape[0]
        if items > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate for {items} items")
        return super().loss(model, batch)


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_global_batch(shard, tmp_path):
    task = RunsOutOfMemory(shard, preset="unet-tiny", objective="fm")
    halved = train(task, _recipe(3), tmp_path / "auto", progress_every_steps=1, export=False)
    assert halved.completed and halved.metrics["micro_batch"] == 2  # 8 -> 4 -> 2
    plain = ExpertTask(shard, preset="unet-tiny", objective="fm")
    fixed = train(plain, _recipe(3), tmp_path / "fixed", micro_batch=2, progress_every_steps=1, export=False)
    assert halved.metrics["final_loss"] == pytest.approx(fixed.metrics["final_loss"], rel=1e-5)
    # A micro-batch the user chose is kept: one clear error instead.
    with pytest.raises(IslesError, match="out of memory .* micro-batch of 4") as info:
        train(task, _recipe(3), tmp_path / "set", micro_batch=4, export=False)
    assert "--micro-batch" in info.value.hint
