"""Verified training by replay (experts/replay.py): a segment between two pushed checkpoints of an honest run lands
exactly on the next checkpoint on CPU; checkpoints trained on noise, or on another shard, under the same declared
recipe and task, do not. Run: pytest tests/test_verify.py -q
"""

from __future__ import annotations

import pytest
import torch

from isles.experts import checkpoints
from isles.experts.data import load_source
from isles.experts.expert import ExpertTask
from isles.experts.replay import replay_segment
from isles.experts.trainer import TrainRecipe, train
from isles.protocol.errors import IslesError

RECIPE = TrainRecipe(
    steps=6, global_batch=8, lr=1e-3, warmup_steps=2, checkpoint_every_steps=2, checkpoint_every_seconds=None,
    keep_checkpoints=10,
)  # fmt: skip


@pytest.fixture(scope="module")
def shards():
    digits = load_source("digits")
    return digits.subset(torch.arange(48)), digits.subset(torch.arange(48, 96))


def _train(shard, folder, noise: bool = False):
    """Train the recipe, pushing a checkpoint every 2 steps; `noise` swaps the items for noise (a cheater that keeps
    the shard's identity, so its checkpoints declare the right task)."""
    if noise:
        shard.items = torch.randint(0, 256, shard.items.shape, dtype=shard.items.dtype, generator=torch.Generator())
    result = train(ExpertTask(shard, preset="unet-tiny", objective="fm"), RECIPE, folder, export=False)
    assert result.completed
    return dict(checkpoints.list_checkpoints(folder / "checkpoints"))


def test_an_honest_segment_replays_exactly_and_a_noise_trained_one_does_not(shards, tmp_path):
    shard, other = shards
    task = ExpertTask(shard, preset="unet-tiny", objective="fm")
    honest = _train(shard, tmp_path / "honest")
    assert sorted(honest) == [2, 4, 6]
    result = replay_segment(task, RECIPE, honest[2], honest[4], tmp_path / "replay")
    assert result.ok and result.exact and (result.start_step, result.end_step) == (2, 4)

    cheat = _train(shard.subset(torch.arange(len(shard))), tmp_path / "noise", noise=True)
    result = replay_segment(task, RECIPE, cheat[2], cheat[4], tmp_path / "replay")
    assert not result.ok and result.relative_error > 0.1, result
    # A tolerance for other hardware (1% of the segment's update) still tells them apart.
    assert not replay_segment(task, RECIPE, cheat[4], cheat[6], tmp_path / "replay", tolerance=0.01).ok


def test_a_first_checkpoint_replays_from_the_recipes_initial_weights(shards, tmp_path):
    """A holder's first checkpoint has no earlier one to start from: the replay trains from the seeded step 0."""
    shard, _ = shards
    task = ExpertTask(shard, preset="unet-tiny", objective="fm")
    honest = _train(shard, tmp_path / "honest")
    result = replay_segment(task, RECIPE, None, honest[2], tmp_path / "replay")
    assert result.ok and result.exact and (result.start_step, result.end_step) == (0, 2)
    cheat = _train(shard.subset(torch.arange(len(shard))), tmp_path / "noise", noise=True)
    result = replay_segment(task, RECIPE, None, cheat[2], tmp_path / "replay")
    assert not result.ok and result.relative_error > 0.1, result
    # Another seed's start is not the recipe's: its first checkpoint does not replay either.
    from dataclasses import replace

    reseeded = train(task, replace(RECIPE, seed=1), tmp_path / "seed1", export=False, stop_at_step=2)
    assert reseeded.step == 2
    state = checkpoints.read_checkpoint(checkpoints.latest_checkpoint(tmp_path / "seed1" / "checkpoints"))
    state["recipe"] = RECIPE.to_dict()  # as a cheater would declare it
    forged = checkpoints.write_checkpoint(tmp_path / "forged", 2, state)
    assert not replay_segment(task, RECIPE, None, forged, tmp_path / "replay", tolerance=0.01).ok


def test_an_ema_changed_after_training_does_not_replay(shards, tmp_path):
    """What a release exports is the EMA: a final checkpoint whose EMA was swapped (say, fine-tuned elsewhere) while
    its trained weights are honest does not replay."""
    shard, _ = shards
    task = ExpertTask(shard, preset="unet-tiny", objective="fm")
    honest = _train(shard, tmp_path / "honest")
    assert replay_segment(task, RECIPE, honest[4], honest[6], tmp_path / "replay").exact
    state = checkpoints.read_checkpoint(honest[6])
    state["ema"] = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state["ema"].items()}
    forged = checkpoints.write_checkpoint(tmp_path / "forged", 6, state)
    result = replay_segment(task, RECIPE, honest[4], forged, tmp_path / "replay", tolerance=0.01)
    assert not result.ok, result


def test_checkpoints_trained_on_another_shard_do_not_replay(shards, tmp_path):
    shard, other = shards
    # Another shard of the same shape and size: the task it declares differs only by the shard's hash, which a cheater
    # can copy; replay tells them apart by the data.
    elsewhere = _train(other, tmp_path / "other")
    task = ExpertTask(shard, preset="unet-tiny", objective="fm")
    with pytest.raises(IslesError):  # as declared: another task, refused before any step
        replay_segment(task, RECIPE, elsewhere[2], elsewhere[4], tmp_path / "replay")
    for step in (2, 4):  # as a cheater would write them: the right task declared
        state = checkpoints.read_checkpoint(elsewhere[step])
        state["task"] = json_identity(task)
        checkpoints.write_checkpoint(tmp_path / "forged", step, state)
    forged = dict(checkpoints.list_checkpoints(tmp_path / "forged"))
    result = replay_segment(task, RECIPE, forged[2], forged[4], tmp_path / "replay", tolerance=0.01)
    assert not result.ok and result.relative_error > 0.1, result
    with pytest.raises(IslesError, match="cannot replay"):
        replay_segment(task, RECIPE, forged[4], forged[2], tmp_path / "replay")


def json_identity(task) -> dict:
    from isles.experts.trainer import task_identity

    return task_identity(task)


def test_isles_verify_accepts_an_honest_segment_and_refuses_a_noise_trained_one(tmp_path):
    """The command anyone runs: the run's manifest, a unit, two checkpoints; exit 0 or one `Error:` line and exit 1."""
    import dataclasses
    import subprocess

    from conftest import ISLES

    from isles.client.run_access import unit_task
    from isles.protocol.artifacts import open_store
    from isles.router.partition import PartitionConfig, partition

    result = partition(
        PartitionConfig(
            identity=tmp_path / "owner", source="digits", experts=2, out=tmp_path / "run",
            store=str(tmp_path / "store"), steps=6, global_batch=8, lr=1e-3, warmup_steps=2, router_steps=6,
            router_preset="cnn-tiny",
        )
    )  # fmt: skip
    m = result.manifest
    store = open_store(tmp_path / "store")
    runs = {}
    for name, noise in (("honest", False), ("noise", True)):
        task, r = unit_task(m, "expert-0", [store], tmp_path / name / "shards")
        if noise:  # a cheater's task: the same shard identity, noise for items
            shard = task.shard
            shard.items = torch.randint(0, 256, shard.items.shape, dtype=torch.uint8, generator=torch.Generator())
            task = dataclasses.replace(task, shard=shard)
        recipe = TrainRecipe(
            steps=r.steps, global_batch=r.global_batch, lr=r.lr, warmup_steps=r.warmup_steps, ema_decay=r.ema_decay,
            seed=r.seed, checkpoint_every_steps=2, checkpoint_every_seconds=None, keep_checkpoints=10,
        )  # fmt: skip
        train(task, recipe, tmp_path / name, export=False)
        runs[name] = dict(checkpoints.list_checkpoints(tmp_path / name / "checkpoints"))

    def verify(name: str, steps=(2, 4)):
        args = ["verify", "--manifest", str(tmp_path / "run" / "manifest.json"), "--unit", "expert-0"]
        args += ["--work-dir", str(tmp_path / "verify"), *(str(runs[name][s]) for s in steps)]
        return subprocess.run(ISLES + args, capture_output=True, text=True, timeout=300)

    honest = verify("honest")
    assert honest.returncode == 0 and "exact" in honest.stdout, honest.stderr[-2000:]
    first = verify("honest", steps=(2,))  # one checkpoint: replayed from step 0
    assert first.returncode == 0 and "steps 0 -> 2: exact" in first.stdout, first.stderr[-2000:]
    noise = verify("noise")
    errors = [line for line in noise.stderr.splitlines() if line.startswith("Error:")]
    assert noise.returncode == 1 and len(errors) == 1 and "is not what training" in errors[0], noise.stderr[-2000:]
