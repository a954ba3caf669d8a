"""The volunteer client: a SIGKILLed volunteer's unit is resumed by another from its last pushed checkpoint (the
release records `resumed_from_step`); SIGTERM hands the unit back at once (checkpoint pushed, lease withdrawn, exit 0).
Volunteers are real `isles join` processes; the bootstrap peer lives in the test process; all on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal

import pytest
from conftest import ISLES, LOOPBACK, aggregate_once, read_log, wait_for
from hub_server import hub_server  # noqa: F401  (the Hub test server fixture)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def bootstrap():
    from isles.protocol.dht import DHTConfig, open_dht
    from isles.protocol.swarm import Swarm

    node = open_dht(DHTConfig(host_maddrs=(LOOPBACK,)))
    yield node.visible_maddrs()[0], Swarm(node)
    node.shutdown()


def _run(tmp_path, swarm, seed: int, steps: int):
    """Partition digits into 2 shards (unique run per test via the seed) and announce the manifest."""
    from isles.router.partition import PartitionConfig, partition

    result = partition(
        PartitionConfig(
            source="digits",
            experts=2,
            out=tmp_path / "run",
            store=str(tmp_path / "store"),
            name=f"join-test-{seed}",
            seed=seed,
            steps=steps,
            global_batch=16,
            lr=2e-3,
            warmup_steps=5,
            router_preset="cnn-tiny",
            router_steps=steps,
        )
    )
    assert swarm.publish_manifest(result.manifest)
    return result.manifest


def _join(spawn, peer, manifest, tmp_path, name: str, *extra: str, env: dict | None = None):
    return spawn(
        ISLES
        + [
            "join",
            "--peers",
            peer,
            "--host-maddrs",
            LOOPBACK,
            "--run",
            manifest.run_id,
            "--work-dir",
            str(tmp_path / name),
            "--identity",
            str(tmp_path / "identities" / name),
            "--device",
            "cpu",
            "--plain",
            "--name",
            name,
            "--max-units",
            "1",
            "--settle-period",
            "0.5",
            "--checkpoint-period",
            "1",
            *extra,
        ],
        name=name,
        env=env,
    )


def _pointer(swarm, manifest, min_step: int):
    for unit in manifest.units:
        pointer = swarm.latest_checkpoint(manifest.run_id, unit)
        if pointer is not None and pointer.step >= min_step:
            return pointer
    return None


def test_sigkilled_volunteer_is_resumed_from_its_last_pushed_checkpoint(bootstrap, spawn, tmp_path):
    from isles.protocol.leases import LeaseManager

    peer, swarm = bootstrap
    manifest = _run(tmp_path, swarm, seed=11, steps=150)
    lease = ["--lease-ttl", "4", "--heartbeat-period", "1"]
    first = _join(spawn, peer, manifest, tmp_path, "first", *lease)
    pointer = wait_for(lambda: _pointer(swarm, manifest, 10), 150, message=f"a pushed checkpoint\n{read_log(first)}")
    os.killpg(first.pid, signal.SIGKILL)  # the volunteer, its DHT process and p2p daemon vanish at once
    first.wait(10)
    unit = pointer.unit
    # Nobody withdraws: the claim must lapse by itself after the lease TTL.
    wait_for(lambda: LeaseManager(swarm, manifest.run_id).owner(unit) is None, 60, message="the lease to lapse")
    second = _join(spawn, peer, manifest, tmp_path, "second", *lease)
    assert second.wait(240) == 0, read_log(second)
    releases = wait_for(
        lambda: swarm.get_releases(manifest.run_id, unit), 30, message=f"a release\n{read_log(second)}"
    )
    assert len(releases) == 1, read_log(second)
    release = releases[0]
    assert release.volunteer == "second"
    assert release.steps == 150
    assert release.resumed_from_step is not None and release.resumed_from_step >= pointer.step > 0
    assert release.token.attempt >= 2  # a new fencing token, not the vanished peer's
    assert f"resuming {unit} from step" in read_log(second)


def test_sigterm_hands_the_unit_back_at_once(bootstrap, spawn, tmp_path):
    from isles.protocol.leases import LeaseManager

    peer, swarm = bootstrap
    manifest = _run(tmp_path, swarm, seed=12, steps=400)
    # A long TTL: if the unit is free right after exit, it was withdrawn, not left to expire.
    proc = _join(spawn, peer, manifest, tmp_path, "leaver", "--lease-ttl", "120", "--heartbeat-period", "10")
    pointer = wait_for(lambda: _pointer(swarm, manifest, 3), 150, message=f"training to start\n{read_log(proc)}")
    unit = pointer.unit
    assert LeaseManager(swarm, manifest.run_id).owner(unit) is not None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, read_log(proc)
    log = read_log(proc)
    assert "handed back" in log and "Traceback" not in log
    # Withdrawn: free within seconds, well before the 120 s TTL.
    wait_for(lambda: LeaseManager(swarm, manifest.run_id).owner(unit) is None, 10, message="the withdrawal")
    last = swarm.latest_checkpoint(manifest.run_id, unit)
    assert last is not None and last.step >= pointer.step
    assert f"stopped {unit} at step {last.step}" in log  # the checkpoint of the very step it stopped at was pushed
    assert swarm.get_releases(manifest.run_id, unit) == []


def test_plain_progress_lines_when_not_a_terminal():
    import io

    from rich.console import Console

    from isles.client.display import TrainingDisplay

    buffer = io.StringIO()
    with TrainingDisplay(Console(file=buffer, width=200), log_period=0.0) as display:
        assert display.plain
        display.event("claimed expert-1 (attempt 1)")
        display.update(unit="expert-1", step=120, steps=500, loss=0.1423, samples_per_s=35.2, eta_s=71, peers=3)
    lines = buffer.getvalue().splitlines()
    assert lines == [
        "claimed expert-1 (attempt 1)",
        "expert-1 step 120/500 loss 0.1423 35.2 samples/s eta 1:11 peers 3",
    ]


def test_live_panel_shows_other_peers_text_verbatim():
    """Events quote peer ids and records other peers wrote: rich markup in them must be shown, not parsed."""
    import io

    from rich.console import Console

    from isles.client.display import TrainingDisplay

    buffer = io.StringIO()
    with TrainingDisplay(Console(file=buffer, width=200, force_terminal=True), plain=False) as display:
        display.event("resumed from [/x] peer [bold]Qm[/bold] at step 40")
        display.update(unit="expert-0", step=41, steps=100)
    assert "[/x] peer [bold]Qm[/bold]" in buffer.getvalue()


def test_machine_check_says_what_fits(tmp_path):
    from isles.client.machine import check_machine, param_count, require_fit
    from isles.protocol.errors import IslesError

    tiny = param_count("unet-tiny", 1, 8, 10)
    report = check_machine("cpu", tmp_path / "not-yet", {"unet-tiny 8x8x1": tiny})
    assert report.device == "cpu" and report.fits == {"unet-tiny 8x8x1": True} and report.disk_free_gb > 0
    require_fit(report)
    huge = check_machine("cpu", tmp_path, {"giant": 10**13})
    assert huge.fits == {"giant": False}
    with pytest.raises(IslesError, match="cannot train this run's models"):
        require_fit(huge)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--peers", "not-a-multiaddr"], "cannot parse the multiaddr"),
        ([], "no peers given"),
        (
            ["--peers", "/ip4/127.0.0.1/tcp/1/p2p/QmPP3jvpykNGuiUj6LVqcFxtivqR5Z9HZK18DoU6R3EFM1", "--device", "tpu"],
            "unknown device",
        ),
    ],
)
def test_join_bad_arguments_give_one_error_line(args, message, tmp_path):
    import subprocess

    proc = subprocess.run(
        ISLES + ["join", "--work-dir", str(tmp_path), "--identity", str(tmp_path / "id"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    first = proc.stderr.strip().splitlines()
    assert any(line.startswith("Error: ") and message in line for line in first), proc.stderr
    assert "Traceback" not in proc.stderr


def test_volunteer_with_a_hub_account_publishes_under_its_namespace(bootstrap, spawn, tmp_path, hub_server):  # noqa: F811
    """Shards come from the run's (local) store; the volunteer's checkpoints and release go to hf://alice on the Hub
    test server, and an aggregator reading the Hub under another namespace still verifies and accepts the release."""
    peer, swarm = bootstrap
    manifest = _run(tmp_path, swarm, seed=13, steps=60)
    env = {"HF_ENDPOINT": hub_server.url, "HF_TOKEN": "hf_alice_test", "HF_HUB_DISABLE_XET": "1"}
    lease = ("--lease-ttl", "8", "--heartbeat-period", "2")
    proc = _join(spawn, peer, manifest, tmp_path, "alice", "--store", "hf://alice", *lease, env=env)
    assert proc.wait(240) == 0, read_log(proc)
    released = wait_for(
        lambda: [r for unit in manifest.units for r in swarm.get_releases(manifest.run_id, unit)],
        30,
        message="release",
    )
    assert len(released) == 1 and released[0].repo.startswith("alice/"), read_log(proc)
    summary = aggregate_once(peer, manifest.run_id, tmp_path / "agg", "--store", "hf://runowner", env=env)
    states = {u["unit"]: u for u in summary["units"]}
    assert states[released[0].unit]["state"] == "accepted"
    assert states[released[0].unit]["repo"] == released[0].repo


def test_checkpoint_pusher_keeps_only_the_newest_waiting_upload():
    import threading

    from isles.client.handoff import Pusher

    gate, ran, discarded = threading.Event(), [], []
    pusher = Pusher()
    pusher.submit(lambda: (gate.wait(10), ran.append(1)), lambda: discarded.append(1))
    wait_for(lambda: not pusher._waiting, 10, message="the first upload to start")
    pusher.submit(lambda: ran.append(2), lambda: discarded.append(2))
    pusher.submit(lambda: ran.append(3), lambda: discarded.append(3))  # supersedes 2 before it started
    gate.set()
    pusher.close()  # waits for the running and the waiting upload
    assert ran == [1, 3] and discarded == [2]


def test_a_pushed_checkpoint_of_another_recipe_is_not_installed(tmp_path):
    """A peer's checkpoint pointer that names a checkpoint of another recipe must not become our starting point:
    the trainer would refuse it, and every later volunteer of the unit would fail the same way."""
    from types import SimpleNamespace

    import torch

    from isles.client.unit_checkpoints import restore_checkpoint
    from isles.experts import checkpoints
    from isles.experts.trainer import TrainRecipe
    from isles.protocol.artifacts import folder_files, open_store

    task = SimpleNamespace(describe=lambda: {"kind": "expert", "preset": "unet-tiny"}, build_model=lambda: model)
    model = torch.nn.Linear(2, 2)
    mine = TrainRecipe(steps=100, global_batch=16, seed=0)
    store = open_store(tmp_path / "store")
    pointers = {}

    def push(recipe: TrainRecipe, step: int, weights=None):
        folder = tmp_path / f"push-{recipe.seed}-{step}-{len(pointers)}"
        folder.mkdir()
        weights = model.state_dict() if weights is None else weights
        state = {"step": step, "recipe": recipe.to_dict(), "task": task.describe(), "model": weights}
        checkpoints.write_checkpoint(folder, step, state)
        revision = store.publish("ckpts", folder)
        pointers[len(pointers)] = SimpleNamespace(
            repo="ckpts", revision=revision, files=folder_files(folder), step=step, token=SimpleNamespace(owner="x")
        )

    # Furthest first, as the swarm orders them (the last pushed is the furthest here).
    swarm = SimpleNamespace(checkpoints_to_resume=lambda run_id, unit: list(reversed(pointers.values())))
    unit_dir = tmp_path / "unit"

    def restore(recipe, policy):
        return restore_checkpoint(swarm, store, "r", "expert-0", unit_dir, task, recipe, policy, lambda text: None)

    anything = SimpleNamespace(allows=lambda step, sha256: True)  # a run nobody verifies (client/training_chain.py)
    push(TrainRecipe(steps=100, global_batch=16, seed=7), 50)  # another seed: another trajectory
    assert restore(mine, anything) == (None, None)
    assert checkpoints.list_checkpoints(unit_dir / "checkpoints") == []

    push(mine, 40)
    # Checkpoints that do not fit the recipe's model, or sit at its last step, are skipped for the furthest that does.
    push(mine, 60, weights=torch.nn.Linear(2, 3).state_dict())
    push(mine, 100)
    step, sha256 = restore(mine, anything)
    assert step == 40 and sha256 == pointers[1].files[checkpoints.checkpoint_name(40)]
    assert [s for s, _ in checkpoints.list_checkpoints(unit_dir / "checkpoints")] == [40]
    # Once the run verifies checkpoints, an unverified one is neither installed nor kept: a release built on it would
    # be refused. Here only step 40 is verified, and a newer local checkpoint (never pushed) is dropped for it.
    only_40 = SimpleNamespace(allows=lambda step, sha256: step == 40)
    checkpoints.write_checkpoint(unit_dir / "checkpoints", 45, {"step": 45, "model": model.state_dict()})
    assert restore(mine, only_40) == (40, sha256)
    assert [s for s, _ in checkpoints.list_checkpoints(unit_dir / "checkpoints")] == [40]


def test_a_unit_whose_release_was_refused_is_not_trained_again(monkeypatch):
    """Released, then refused by the aggregator (so open again): retraining the same recipe here gives the same model,
    so the volunteer leaves instead of looping on claim, train, release, refusal."""
    import threading
    from types import SimpleNamespace

    from isles.client import join
    from isles.client.join import JoinConfig, UnitOutcome, Volunteer
    from isles.protocol.dht import DHTConfig

    monkeypatch.setattr(join, "released_units", lambda swarm, manifest: {})  # the only unit is open again
    events, claims = [], []
    volunteer = Volunteer(JoinConfig(swarm=DHTConfig()), console=None)
    volunteer.manifest = SimpleNamespace(run_id="r", units=["expert-0"])
    volunteer.display = SimpleNamespace(event=events.append)
    volunteer.swarm = SimpleNamespace(latest_checkpoint=lambda run_id, unit: None)
    volunteer.leases = SimpleNamespace(acquire=lambda units: claims.append(units))
    volunteer.outcomes = [UnitOutcome("expert-0", "released", 100)]
    loop = threading.Thread(target=volunteer._loop, daemon=True)
    loop.start()
    loop.join(10)
    assert not loop.is_alive() and claims == []
    assert events[-1].startswith("expert-0: our release is not (or not yet) accepted")


@pytest.mark.slow
def test_a_volunteer_killed_and_restarted_keeps_its_chain_and_its_release_is_accepted(bootstrap, spawn, tmp_path):
    """kill -9 after the aggregator verified some of its checkpoints, then the same volunteer again: it renews its
    claim (same attempt), resumes its own newest checkpoint, continues the chain it kept on disk, and the release
    carries every checkpoint verified before the crash, so the aggregator accepts it."""
    from isles.protocol.identity import load_identity
    from isles.router.partition import PartitionConfig, partition

    peer, swarm = bootstrap
    owner = tmp_path / "identities" / "owner"
    config = PartitionConfig(
        identity=owner, source="digits", experts=1, out=tmp_path / "run", store=str(tmp_path / "store"),
        name="restart-chain", seed=13, steps=200, global_batch=16, lr=2e-3, warmup_steps=5, router_preset="cnn-tiny",
        router_steps=20,
    )  # fmt: skip
    manifest = partition(config).manifest
    assert swarm.publish_manifest(manifest)
    aggregator = spawn(
        [*ISLES, "aggregate", "--peers", peer, "--host-maddrs", LOOPBACK, "--run", manifest.run_id, "--poll-period",
         "1", "--sample-steps", "2", "--work-dir", str(tmp_path / "aggregator"), "--identity", str(owner),
         "--replay-fraction", "0"],
        name="aggregator",
    )  # fmt: skip
    lease = ["--lease-ttl", "30", "--heartbeat-period", "1"]  # largest unit first: expert-0, not the tiny router
    first = _join(spawn, peer, manifest, tmp_path, "vol", *lease)
    me = load_identity(tmp_path / "identities" / "vol").peer_id
    wait_for(
        lambda: "verified the checkpoint of " + me in read_log(aggregator), 200,
        message=f"a verified checkpoint\n{read_log(first)}\n{read_log(aggregator)}",
    )  # fmt: skip
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    second = _join(spawn, peer, manifest, tmp_path, "vol", *lease)  # the same work dir and identity
    assert second.wait(300) == 0, read_log(second)
    log = read_log(second)
    assert "claimed expert-0 (attempt 1)" in log and "resuming expert-0 from step" in log, log
    accepted = "expert-0: accepted"
    wait_for(lambda: accepted in read_log(aggregator) or "REJECTED" in read_log(aggregator), 120,
             message=read_log(aggregator))  # fmt: skip
    assert accepted in read_log(aggregator) and "REJECTED" not in read_log(aggregator), read_log(aggregator)
