"""The volunteer client: a SIGKILLed volunteer's unit is resumed by another from its last pushed checkpoint (the
release records `resumed_from_step`); SIGTERM hands the unit back at once (checkpoint pushed, lease withdrawn, exit 0).
Volunteers are real `isles join` processes; the bootstrap peer lives in the test process; all on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal

import pytest
from conftest import ISLES, read_log, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def bootstrap():
    from isles.protocol.dht import DHTConfig, open_dht
    from isles.protocol.swarm import Swarm

    node = open_dht(DHTConfig(host_maddrs=("/ip4/127.0.0.1/tcp/0",)))
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


def _join(spawn, peer, manifest, tmp_path, name: str, *extra: str):
    return spawn(
        ISLES
        + [
            "join",
            "--peers",
            peer,
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
    releases = swarm.get_releases(manifest.run_id, unit)
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
    assert LeaseManager(swarm, manifest.run_id).owner(unit) is None  # withdrawn, well before the 120 s TTL
    last = swarm.latest_checkpoint(manifest.run_id, unit)
    assert last is not None and last.step >= pointer.step
    assert f"stopped {unit} at step {last.step}" in log  # the checkpoint of the very step it stopped at was pushed
    assert swarm.get_releases(manifest.run_id, unit) == []
