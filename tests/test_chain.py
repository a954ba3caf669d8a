"""The checkpoint chain a release carries (protocol/chain.py, client/release_checks.py): an honest chain holds; one
that omits or alters a verified checkpoint, claims another peer's, stops short of the last step, or whose exported
weights are not its final checkpoint's EMA is refused with the reason. Tiny CPU training, no swarm.
Run: pytest tests/test_chain.py -q
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from isles.client.release_checks import check_chain
from isles.client.unit_checkpoints import stage_release
from isles.experts import checkpoints
from isles.experts.data import load_source
from isles.experts.expert import ExpertTask
from isles.experts.trainer import TrainRecipe, train
from isles.protocol.artifacts import folder_files
from isles.protocol.chain import CHAIN_FILE, Chain, next_link
from isles.protocol.errors import IslesError
from isles.protocol.files import sha256_file

RECIPE = TrainRecipe(
    steps=6, global_batch=8, lr=1e-3, warmup_steps=2, checkpoint_every_steps=2, checkpoint_every_seconds=None,
    keep_checkpoints=10,
)  # fmt: skip
MANIFEST = SimpleNamespace(run_id="run", units=["expert-0", "router"], experts=[SimpleNamespace(steps=RECIPE.steps)])
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An honest training: checkpoints at steps 2, 4, 6 and the exported model."""
    folder = tmp_path_factory.mktemp("train")
    shard = load_source("digits").subset(torch.arange(48))
    assert train(ExpertTask(shard, preset="unet-tiny", objective="fm"), RECIPE, folder).completed
    return folder, dict(checkpoints.list_checkpoints(folder / "checkpoints"))


def _release(trained, tmp_path, pushed=(2, 4), final: int = 6, resumed=None):
    """Stage a release as a volunteer does: its pushed checkpoints linked, then the final one; and its record."""
    folder, ckpts = trained
    export = tmp_path / "model"
    shutil.rmtree(export, ignore_errors=True)
    shutil.copytree(folder / "model", export)
    chain = Chain(MANIFEST.run_id, "expert-0")
    links = [chain.add(step, sha256_file(ckpts[step])) for step in pushed]
    staged = stage_release(export, ckpts[final], final, chain)
    release = SimpleNamespace(
        unit="expert-0", files=folder_files(staged), chain_head=chain.head, resumed_from_step=resumed
    )
    return staged, release, [(x.step, x.sha256, x.link) for x in links]


def _check(staged, release, verified, points=None):
    points = points if points is not None else {(s, h) for s, h, _ in verified} or None
    return check_chain(MANIFEST, release, staged, WEIGHTS, verified, points)


def test_an_honest_chain_holds(trained, tmp_path):
    staged, release, verified = _release(trained, tmp_path)
    assert _check(staged, release, verified) is None
    assert _check(staged, release, []) is None  # nothing verified yet: the chain and the final weights still hold


def test_a_chain_that_omits_or_alters_a_verified_checkpoint_is_refused(trained, tmp_path):
    _, verified_links = trained[1], _release(trained, tmp_path / "honest")[2]
    staged, release, _ = _release(trained, tmp_path / "omit", pushed=(2,))
    assert "omits the checkpoint verified at step 4" in _check(staged, release, verified_links)
    # Step 4 on the chain, but another file than the one the aggregator verified (trained otherwise, say).
    staged, release, _ = _release(trained, tmp_path / "alter", pushed=(2, 4))
    altered = [(4, "f" * 64, next_link("0" * 64, "f" * 64, 4))]
    assert "alters the checkpoint verified at step 4" in _check(staged, release, altered)
    # The same steps and files, but a history other than the one the holder committed to when it pushed them.
    forged = [(s, h, "e" * 64) for s, h, _ in verified_links]
    assert "alters the checkpoint verified at step 2" in _check(staged, release, forged)


def test_another_peers_verified_checkpoint_is_not_ones_own_training(trained, tmp_path):
    staged, release, verified = _release(trained, tmp_path)
    theirs = {(s, h) for s, h, _ in verified}  # verified as another holder's: this releaser's own verified are none
    assert "as another peer's" in _check(staged, release, [], points=theirs)
    # Resumed from it, and saying so: that is allowed (and it must be a verified one).
    staged, release, _ = _release(trained, tmp_path / "resumed", pushed=(2, 4), resumed=2)
    assert _check(staged, release, [], points={verified[0][:2]}) is None
    assert "that no aggregator verified" in _check(staged, release, [], points={(4, "f" * 64)})


def test_weights_that_do_not_follow_from_the_last_checkpoint_are_refused(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    staged, release, verified = _release(trained, tmp_path)
    weights = load_file(str(staged / WEIGHTS))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3  # fine-tuned (or swapped) after training: not the final checkpoint's EMA
    save_file(weights, str(staged / WEIGHTS))
    assert "differ from the final checkpoint's EMA weights" in _check(staged, release, verified)


def test_a_chain_must_end_at_the_recipes_last_step_under_the_signed_head(trained, tmp_path):
    staged, release, verified = _release(trained, tmp_path, pushed=(2,), final=4)
    assert "ends at step 4, not at the recipe's last step 6" in _check(staged, release, verified[:1])
    staged, release, verified = _release(trained, tmp_path / "head")
    release.chain_head = "0" * 64
    assert "head is not the one in the release record" in _check(staged, release, verified)
    release.files = {k: v for k, v in release.files.items() if k != CHAIN_FILE}
    assert "carries no checkpoint chain" in _check(staged, release, verified)


def test_chain_files_are_checked_link_by_link(tmp_path):
    chain = Chain("run", "expert-0")
    chain.add(2, "a" * 64)
    with pytest.raises(IslesError):
        chain.add(2, "b" * 64)  # steps only grow
    chain.write(tmp_path / CHAIN_FILE)
    assert Chain.read(tmp_path / CHAIN_FILE, "run", "expert-0").head == chain.head
    with pytest.raises(IslesError, match="of 'expert-0'"):
        Chain.read(tmp_path / CHAIN_FILE, "run", "expert-1")  # another unit's chain
    (tmp_path / CHAIN_FILE).write_text(
        '{"format": "isles-chain-1", "run_id": "run", "unit": "expert-0", "links": [[1, "x"]]}'
    )
    with pytest.raises(IslesError):
        Chain.read(tmp_path / CHAIN_FILE, "run", "expert-0")
