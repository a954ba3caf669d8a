"""The trainer: exact resume, truncated checkpoints never resumed, micro-batch accumulation, export, and a
non-diffusion task (as the router uses) running through the same code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from isles.experts import checkpoints
from isles.experts.data import load_source
from isles.experts.expert import ExpertTask, read_expert_info
from isles.experts.trainer import TrainRecipe, train
from isles.protocol.errors import IslesError


@pytest.fixture(scope="module")
def small_shard():
    shard = load_source("digits")
    return shard.subset(torch.arange(48))


def _task(shard, preset="unet-tiny", objective="fm"):
    return ExpertTask(shard, preset=preset, objective=objective)


def _recipe(steps, **kw):
    return TrainRecipe(
        steps=steps, global_batch=8, lr=1e-3, warmup_steps=2, checkpoint_every_steps=None,
        checkpoint_every_seconds=None, **kw,
    )  # fmt: skip


def _weights(out: Path, key: str) -> dict[str, torch.Tensor]:
    return checkpoints.read_checkpoint(checkpoints.latest_checkpoint(out / "checkpoints"))[key]


def _assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("preset,objective", [("unet-tiny", "fm"), ("dit-tiny", "ddpm")])
def test_stop_and_resume_gives_bit_identical_weights(small_shard, tmp_path, preset, objective):
    straight = train(_task(small_shard, preset, objective), _recipe(6), tmp_path / "a", export=False)
    assert straight.completed and straight.step == 6
    # 6 items of 43 training items per epoch: the resumed run also crosses an epoch boundary.
    first = train(_task(small_shard, preset, objective), _recipe(6), tmp_path / "b", stop_at_step=3, export=False)
    assert not first.completed and first.step == 3
    second = train(_task(small_shard, preset, objective), _recipe(6), tmp_path / "b", export=False)
    assert second.completed and second.step == 6
    for key in ("model", "ema", "optimizer"):
        if key == "optimizer":
            a, b = _weights(tmp_path / "a", key)["state"], _weights(tmp_path / "b", key)["state"]
            for index in a:
                _assert_bit_identical(a[index], b[index])
        else:
            _assert_bit_identical(_weights(tmp_path / "a", key), _weights(tmp_path / "b", key))


def test_truncated_checkpoint_is_never_resumed(small_shard, tmp_path):
    recipe = TrainRecipe(steps=4, global_batch=8, warmup_steps=2, checkpoint_every_steps=2, keep_checkpoints=5)
    train(_task(small_shard), recipe, tmp_path / "a", export=False)
    reference = _weights(tmp_path / "a", "model")
    ckpt_dir = tmp_path / "a" / "checkpoints"
    newest = ckpt_dir / checkpoints.checkpoint_name(4)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) - 100])  # a write cut short (or a partial download)
    assert checkpoints.latest_checkpoint(ckpt_dir).name == checkpoints.checkpoint_name(2)
    with pytest.raises(IslesError, match="damaged"):
        checkpoints.read_checkpoint(newest)
    # a flipped byte in the payload is caught as well
    step2 = ckpt_dir / checkpoints.checkpoint_name(2)
    flipped = bytearray(step2.read_bytes())
    flipped[1000] ^= 0xFF
    (ckpt_dir / checkpoints.checkpoint_name(3)).write_bytes(bytes(flipped))
    assert checkpoints.latest_checkpoint(ckpt_dir).name == checkpoints.checkpoint_name(2)
    # resuming from step 2 recomputes steps 3 and 4 exactly
    result = train(_task(small_shard), recipe, tmp_path / "a", export=False)
    assert result.completed
    _assert_bit_identical(_weights(tmp_path / "a", "model"), reference)


def test_a_pickle_with_a_valid_footer_is_never_unpickled(tmp_path):
    """Checkpoints come from other peers: a whole file that is not safetensors is refused, its code never run."""
    import hashlib
    import io
    import pickle

    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    payload = io.BytesIO()
    pickle.dump({"step": 1, "boom": Boom()}, payload)
    data = payload.getvalue()
    footer = hashlib.sha256(data).digest() + len(data).to_bytes(8, "little") + checkpoints.MAGIC
    path = tmp_path / checkpoints.checkpoint_name(1)
    path.write_bytes(data + footer)
    with pytest.raises(IslesError, match="cannot be read"):
        checkpoints.read_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_micro_batches_accumulate_to_the_global_batch(small_shard, tmp_path):
    from isles.experts.trainer import _accumulate

    task = _task(small_shard)
    batch = task.make_batch(torch.arange(8), torch.Generator().manual_seed(0))
    grads = []
    for micro in (8, 3):
        torch.manual_seed(0)
        model = task.build_model()
        loss = _accumulate(task, model, batch, 8, micro, torch.device("cpu"), None)
        grads.append((loss, [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for g8, g3 in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(g8, g3, rtol=1e-4, atol=1e-6)
    # Through the trainer: the same losses. (Weights are not compared: Adam's first steps move a parameter with a
    # near-zero gradient by up to lr either way, so rounding noise in such gradients is amplified to ~lr.)
    whole = train(task, _recipe(2), tmp_path / "a", micro_batch=8, progress_every_steps=1, export=False)
    pieces = train(task, _recipe(2), tmp_path / "b", micro_batch=3, progress_every_steps=1, export=False)
    assert whole.metrics["micro_batch"] == 8 and pieces.metrics["micro_batch"] == 3
    assert whole.metrics["final_loss"] == pytest.approx(pieces.metrics["final_loss"], rel=1e-4)


def test_checkpoints_are_pruned_and_reported(small_shard, tmp_path):
    seen = []
    recipe = TrainRecipe(steps=5, global_batch=4, checkpoint_every_steps=1, keep_checkpoints=2)
    train(_task(small_shard), recipe, tmp_path, on_checkpoint=lambda p, s: seen.append(s), export=False)
    assert seen == [1, 2, 3, 4, 5]
    assert [s for s, _ in checkpoints.list_checkpoints(tmp_path / "checkpoints")] == [4, 5]


def test_should_stop_writes_a_checkpoint_and_progress_is_reported(small_shard, tmp_path):
    reports = []
    result = train(
        _task(small_shard), _recipe(10), tmp_path, progress=reports.append, progress_every_steps=2,
        should_stop=lambda: len(reports) >= 2, export=False,
    )  # fmt: skip
    assert not result.completed and result.step == 4
    assert [r.step for r in reports] == [2, 4] and all(r.loss > 0 and r.samples_per_s > 0 for r in reports)
    assert checkpoints.latest_checkpoint(tmp_path / "checkpoints").name == checkpoints.checkpoint_name(4)


def test_resume_with_another_recipe_or_model_is_refused(small_shard, tmp_path):
    train(_task(small_shard), _recipe(2), tmp_path, export=False)
    with pytest.raises(IslesError, match="different recipe"):
        train(_task(small_shard), _recipe(4, seed=1), tmp_path)
    with pytest.raises(IslesError, match="different model"):
        train(_task(small_shard, "dit-tiny"), _recipe(4), tmp_path)
    with pytest.raises(IslesError, match="invalid training recipe"):
        TrainRecipe(steps=0)


def test_export_is_a_diffusers_folder_of_the_ema_weights(small_shard, tmp_path):
    from diffusers import UNet2DModel

    task = ExpertTask(small_shard, "unet-tiny", "ddpm", shard_info={"repo": "r", "sha256": "abc"})
    result = train(task, _recipe(3), tmp_path)
    assert result.completed and result.export_dir == tmp_path / "model"
    files = {p.name for p in result.export_dir.iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "expert.json", "README.md"} <= files
    model = UNet2DModel.from_pretrained(result.export_dir)
    ema = _weights(tmp_path, "ema")
    _assert_bit_identical({k: v for k, v in model.state_dict().items()}, ema)
    info = read_expert_info(result.export_dir)
    assert info["objective"] == "ddpm" and info["preset"] == "unet-tiny" and info["shard"]["sha256"] == "abc"
    assert info["num_classes"] == 10 and info["null_class"] == 10
    metrics = info["metrics"]
    assert metrics["steps"] == 3 and metrics["train_flops"] == 3 * 8 * metrics["train_flops_per_sample"]
    assert metrics["val_loss"] > 0 and metrics["final_loss"] > 0 and metrics["hardware"]["device"] == "cpu"
    card = (result.export_dir / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n") and "decentralized-diffusion" in card
    # running again in the finished folder does no more training and exports the same weights
    again = train(task, _recipe(3), tmp_path)
    assert again.completed and again.step == 3
    assert json.loads((again.export_dir / "expert.json").read_text())["metrics"]["steps"] == 3


class ParityTask:
    """A non-diffusion task (classify whether a vector's sum is positive): the router trains this way."""

    def __init__(self):
        self.x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
        self.y = (self.x.sum(1) > 0).long()

    def describe(self):
        return {"kind": "parity"}

    def build_model(self):
        return torch.nn.Linear(4, 2)

    def train_size(self):
        return 64

    def make_batch(self, indices, generator):
        return {"x": self.x[indices], "y": self.y[indices]}

    def loss(self, model, batch):
        return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])

    def validate(self, model, device):
        return {"val_accuracy": float((model(self.x).argmax(1) == self.y).float().mean())}

    def export(self, model, folder, metrics):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(metrics, default=str))


def test_the_trainer_is_generic_over_tasks(tmp_path):
    recipe = TrainRecipe(steps=60, global_batch=16, lr=0.05, warmup_steps=0, ema_decay=0.0)
    result = train(ParityTask(), recipe, tmp_path)
    assert result.completed and result.metrics["val_accuracy"] > 0.9
    assert (tmp_path / "model" / "metrics.json").is_file()


def test_checkpoints_by_wall_clock(small_shard, tmp_path):
    seen = []
    recipe = TrainRecipe(steps=3, global_batch=4, checkpoint_every_steps=None, checkpoint_every_seconds=0.0)
    train(_task(small_shard), recipe, tmp_path, on_checkpoint=lambda p, s: seen.append(s), export=False)
    assert seen == [1, 2, 3]


def test_a_failed_export_leaves_no_half_written_model_folder(tmp_path):
    class FailingExport(ParityTask):
        def export(self, model, folder, metrics):
            super().export(model, folder, metrics)
            raise OSError("disk full")

    recipe = TrainRecipe(steps=2, global_batch=16, warmup_steps=0)
    with pytest.raises(OSError, match="disk full"):
        train(FailingExport(), recipe, tmp_path)
    assert not (tmp_path / "model").exists()  # nothing a volunteer could publish by mistake
    result = train(ParityTask(), recipe, tmp_path)  # run again: resumes at the end and exports
    assert result.export_dir == tmp_path / "model" and (tmp_path / "model" / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "model"]
