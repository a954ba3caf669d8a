"""A volunteer's checkpoint chain across its own restarts (client/training_chain.py): killed and restarted within its
attempt, it continues the chain it kept on disk, so its release still carries the checkpoints the aggregator verified
before the crash and is accepted; a checkpoint neither verified nor on the attempt's chain is not resumed from.
Run: pytest tests/test_training_chain.py -q
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
from test_chain import MANIFEST, WEIGHTS, trained  # noqa: F401 (fixture)

from isles.client import training_chain
from isles.client.release_checks import check_chain
from isles.client.training_chain import KeptChain, ResumePolicy, chain_path, load_kept
from isles.client.unit_checkpoints import stage_release
from isles.protocol.artifacts import folder_files
from isles.protocol.files import sha256_file


def _policy(monkeypatch, kept, verified=(), verifies=True):
    records = [SimpleNamespace(step=s, sha256=h) for s, h in verified]
    monkeypatch.setattr("isles.protocol.witness.get_verified", lambda swarm, run_id, unit: records)
    monkeypatch.setattr("isles.protocol.witness.run_verifies", lambda swarm, run_id: verifies)
    return ResumePolicy(None, MANIFEST.run_id, "expert-0", kept)


def test_a_restart_within_an_attempt_continues_the_kept_chain_and_its_release_holds(trained, tmp_path, monkeypatch):  # noqa: F811
    folder, ckpts = trained
    sha = {step: sha256_file(path) for step, path in ckpts.items()}
    # Before the crash: steps 2 and 4 pushed (and kept), the aggregator verified both.
    path = chain_path(tmp_path / "unit", attempt=1)
    path.parent.mkdir()
    first_run = KeptChain(MANIFEST.run_id, "expert-0", path)
    verified = [(s, sha[s], first_run.add(s, sha[s]).link) for s in (2, 4)]
    # Killed; restarted with the same attempt, resuming from its local checkpoint at step 4.
    kept = load_kept(MANIFEST.run_id, "expert-0", tmp_path / "unit", attempt=1)
    assert [x.link for x in kept.links] == [x.link for x in first_run.links]
    assert load_kept(MANIFEST.run_id, "expert-0", tmp_path / "unit", attempt=2) is None  # another attempt: none
    policy = _policy(monkeypatch, kept, verified=[(s, h) for s, h, _ in verified])
    assert policy.allows(4, sha[4]) and policy.continues(4, sha[4])
    chain = policy.chain(MANIFEST.run_id, "expert-0", path, 4, sha[4])
    assert chain.inherited_from is None  # its own training since step 0: the release says it resumed nothing
    export = tmp_path / "model"
    shutil.copytree(folder / "model", export)
    staged = stage_release(export, ckpts[6], 6, chain)
    release = SimpleNamespace(
        unit="expert-0", files=folder_files(staged), chain_head=chain.head, resumed_from_step=None
    )
    points = {(s, h) for s, h, _ in verified}
    assert check_chain(MANIFEST, release, staged, WEIGHTS, verified, points) is None


def test_what_a_volunteer_may_resume_from_once_the_run_verifies(trained, tmp_path, monkeypatch):  # noqa: F811
    _, ckpts = trained
    sha = {step: sha256_file(path) for step, path in ckpts.items()}
    policy = _policy(monkeypatch, None, verified=[(2, sha[2])])
    assert policy.allows(2, sha[2])  # verified: inherited, the release names it
    assert not policy.allows(4, sha[4])  # an older attempt's unverified checkpoint: its release would be refused
    chain = policy.chain(MANIFEST.run_id, "expert-0", chain_path(tmp_path, 3), 2, sha[2])
    assert chain.inherited_from == 2 and [x.step for x in chain.links] == [2]
    assert _policy(monkeypatch, None, verifies=False).allows(4, sha[4])  # a run nobody verifies: anything goes
    fresh = _policy(monkeypatch, None).chain(MANIFEST.run_id, "expert-0", chain_path(tmp_path, 4), None, None)
    assert fresh.inherited_from is None and fresh.links == [] and chain_path(tmp_path, 4).is_file()


@pytest.mark.parametrize("content", ["{", '{"format": "isles-own-chain-1", "run_id": "other", "unit": "expert-0"}'])
def test_an_unreadable_kept_chain_is_ignored_not_fatal(tmp_path, content):
    chain_path(tmp_path, 1).write_text(content)
    assert training_chain.load_kept(MANIFEST.run_id, "expert-0", tmp_path, 1) is None
