"""A volunteer with several GPUs trains one expert on all of them: `isles train-expert --gpus 2` and `isles join
--gpus 2` run 2 data-parallel ranks under torchrun (gloo on CPU here), each on its half of every global batch, and give
the weights that one process gives at the same global batch. Real torchrun processes and a DHT peer on 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from conftest import ISLES

from isles.experts import checkpoints
from isles.experts.distributed import World

pytestmark = pytest.mark.timeout(300)


def test_ranks_split_the_global_batch_into_contiguous_slices():
    assert [World(r, 2).span(8) for r in range(2)] == [(0, 4), (4, 8)]
    assert [World(r, 3).span(8) for r in range(3)] == [(0, 3), (3, 6), (6, 8)]
    assert World().span(8) == (0, 8)


def _train(out, *extra: str) -> subprocess.CompletedProcess:
    args = ["train-expert", "--data", "digits", "--preset", "unet-tiny", "--steps", "3", "--batch", "8",
            "--micro-batch", "4", "--warmup", "1", "--device", "cpu", "--threads", "1", "--out", str(out),
            "--json", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(ISLES + args, capture_output=True, text=True, timeout=240, env=env)


def test_two_cpu_ranks_match_one_process_at_the_same_global_batch(tmp_path):
    single = _train(tmp_path / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    double = _train(tmp_path / "two", "--gpus", "2")
    assert double.returncode == 0, double.stderr[-3000:]
    assert "terminate called" not in double.stderr  # every rank left its process group before exiting
    assert double.stdout.count('"completed"') == 1  # rank 0 alone reports (and exports)
    a, b = (
        checkpoints.read_checkpoint(checkpoints.latest_checkpoint(tmp_path / name / "checkpoints"))
        for name in ("one", "two")
    )
    assert a["step"] == b["step"] == 3 and a["cursor"] == b["cursor"] == 24
    # Each rank's slice is one micro-batch of the single run, and a sum of two floats does not depend on their order:
    # the weights are not merely close but bit-identical.
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key} {name}"
    assert (tmp_path / "two" / "model" / "config.json").is_file()


def test_join_with_two_gpus_trains_a_unit_as_one_process_would(tmp_path):
    """`isles join --gpus 2` (2 gloo ranks on CPU): rank 0 is the volunteer, both ranks train the unit it claims, and
    the published weights are those of one process training that unit at the same global batch."""
    import json

    from conftest import LOOPBACK
    from safetensors.torch import load_file

    from isles.client.run_access import unit_task
    from isles.experts.trainer import TrainRecipe, train
    from isles.protocol.artifacts import open_store
    from isles.protocol.dht import DHTConfig, open_dht
    from isles.protocol.swarm import Swarm
    from isles.router.partition import PartitionConfig, partition

    node = open_dht(DHTConfig(host_maddrs=(LOOPBACK,)))
    try:
        swarm = Swarm(node)
        manifest = partition(
            PartitionConfig(
                source="digits", experts=2, out=tmp_path / "run", store=str(tmp_path / "store"), name="gpus-test",
                seed=51, steps=6, global_batch=16, lr=2e-3, warmup_steps=2, router_preset="cnn-tiny", router_steps=6,
            )
        ).manifest  # fmt: skip
        assert swarm.publish_manifest(manifest)
        work = tmp_path / "work"
        proc = subprocess.run(
            ISLES + ["join", "--gpus", "2", "--peers", node.visible_maddrs()[0], "--host-maddrs", LOOPBACK,
                     "--run", manifest.run_id, "--work-dir", str(work), "--identity", str(tmp_path / "id"),
                     "--device", "cpu", "--plain", "--max-units", "1", "--settle-period", "0.5", "--json"],
            capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "terminate called" not in proc.stderr  # a rank that exits inside gloo aborts, and torchrun fails
        (outcome,) = json.loads(proc.stdout)  # rank 0 alone reports
        assert outcome["state"] == "released", outcome
        assert f"rank 1: training {outcome['unit']} with rank 0" in proc.stderr  # the second rank took part
        (release,) = swarm.get_releases(manifest.run_id, outcome["unit"])
    finally:
        node.shutdown()
    # The same unit, one process, its micro-batch one rank's half of the global batch.
    task, r = unit_task(manifest, release.unit, [], work / manifest.run_id / "shards")  # as every volunteer does
    recipe = TrainRecipe(
        steps=r.steps, global_batch=r.global_batch, lr=r.lr, warmup_steps=r.warmup_steps, ema_decay=r.ema_decay,
        seed=r.seed, checkpoint_every_steps=None, checkpoint_every_seconds=None,
    )  # fmt: skip
    reference = train(task, recipe, tmp_path / "reference", device="cpu", micro_batch=r.global_batch // 2)
    published = tmp_path / "published"
    open_store(manifest.store).pull(release.repo, release.revision, published, release.files)
    weights = sorted(reference.export_dir.rglob("*.safetensors"))
    assert weights
    for path in weights:
        mine, theirs = load_file(path), load_file(published / path.relative_to(reference.export_dir))
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), f"{path.name} {name}"
