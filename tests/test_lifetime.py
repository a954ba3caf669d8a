"""A killed volunteer leaves nothing behind: `kill -9` on `isles join` (what the OOM killer does) takes its DHT process
and p2p daemon with it within seconds, and the same command, restarted, resumes its unit from its checkpoint at once
(same identity, same work folder) and completes it; a killed bootstrap node too leaves nothing holding its identity.
Real `isles` processes and a DHT peer on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import ISLES, LOOPBACK, read_log, wait_for

from isles.client.lifetime import alive, daemon_sockets, descendants

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def bootstrap():
    from isles.protocol.dht import DHTConfig, open_dht
    from isles.protocol.swarm import Swarm

    node = open_dht(DHTConfig(host_maddrs=(LOOPBACK,)))
    yield node.visible_maddrs()[0], Swarm(node)
    node.shutdown()


def _manifest(tmp_path, swarm):
    from isles.router.partition import PartitionConfig, partition

    result = partition(
        PartitionConfig(
            source="digits",
            experts=2,
            out=tmp_path / "run",
            store=str(tmp_path / "store"),
            name="lifetime-test",
            seed=21,
            steps=150,
            global_batch=16,
            lr=2e-3,
            warmup_steps=5,
            router_preset="cnn-tiny",
            router_steps=150,
        )
    )
    assert swarm.publish_manifest(result.manifest)
    return result.manifest


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc to list a process's children")
def test_kill_9_leaves_no_process_behind_and_the_same_command_resumes(bootstrap, spawn, tmp_path):
    peer, swarm = bootstrap
    manifest = _manifest(tmp_path, swarm)
    # A lease TTL far longer than the test: the restart must take its own claim back, not wait for it to lapse.
    command = ISLES + [
        "join", "--peers", peer, "--host-maddrs", LOOPBACK, "--run", manifest.run_id,
        "--work-dir", str(tmp_path / "work"), "--identity", str(tmp_path / "identity"), "--device", "cpu",
        "--plain", "--name", "vol", "--max-units", "1", "--settle-period", "0.5", "--checkpoint-period", "1",
        "--lease-ttl", "600", "--heartbeat-period", "5",
    ]  # fmt: skip
    first = spawn(command, name="first")

    def pushed():
        pointers = [swarm.latest_checkpoint(manifest.run_id, u) for u in manifest.units]
        return next((p for p in pointers if p is not None and p.step >= 10), None)

    pointer = wait_for(pushed, 150, message=f"a pushed checkpoint\n{read_log(first)}")
    children = descendants(first.pid)
    assert any(_comm(pid) == "p2pd" for pid in children), (children, [_comm(p) for p in children])
    assert len(children) >= 2  # the DHT process and its p2p daemon at least
    sockets = [path for pid in children for path in daemon_sockets(pid)]
    assert sockets and os.path.exists(sockets[0])  # the daemon's control socket

    os.kill(first.pid, signal.SIGKILL)  # the volunteer alone, as the OOM killer does: not its process group
    first.wait(10)
    killed = time.monotonic()
    wait_for(lambda: not any(alive(pid) for pid in children), 10, message="the children of a killed join to exit")
    assert time.monotonic() - killed < 5
    assert not any(os.path.exists(path) for path in sockets)  # and no socket files left in /tmp

    second = spawn(command, name="second")
    assert second.wait(240) == 0, read_log(second)
    log = read_log(second)
    assert "already used" not in log and "Traceback" not in log
    assert f"resuming {pointer.unit} from step" in log, log
    releases = wait_for(lambda: swarm.get_releases(manifest.run_id, pointer.unit), 30, message=f"a release\n{log}")
    assert len(releases) == 1
    release = releases[0]
    assert release.volunteer == "vol" and release.steps == 150
    # The same attempt (the claim was taken back). Resuming a checkpoint it had pushed continues the chain it kept on
    # disk: the release resumed nothing of another attempt. A newer one the kill left unpushed is an inherited start,
    # which the release names (client/training_chain.py).
    resumed = int(log.split(f"resuming {pointer.unit} from step ", 1)[1].split()[0])
    assert resumed >= pointer.step
    own = f"resuming {pointer.unit} from step {resumed} (continuing its own checkpoint chain)" in log
    assert release.resumed_from_step == (None if own else resumed), release
    assert release.token.attempt == pointer.token.attempt  # its own claim, taken back


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc to list a process's children")
def test_kill_9_on_a_bootstrap_node_takes_its_dht_process_and_daemon_along(spawn, tmp_path):
    boot = spawn(
        ISLES + ["bootstrap", "--host-maddrs", LOOPBACK, "--identity", str(tmp_path / "id")], name="bootstrap"
    )
    wait_for(lambda: "To join:" in read_log(boot), 60, message="the bootstrap node to start")
    children = descendants(boot.pid)
    assert any(_comm(pid) == "p2pd" for pid in children), (children, [_comm(p) for p in children])
    os.kill(boot.pid, signal.SIGKILL)
    boot.wait(10)
    wait_for(lambda: not any(alive(pid) for pid in children), 5, message="the children of a killed bootstrap to exit")
    # The same node starts again at once on the same identity (nothing else holds it).
    again = spawn(ISLES + ["bootstrap", "--host-maddrs", LOOPBACK, "--identity", str(tmp_path / "id")], name="again")
    wait_for(lambda: "To join:" in read_log(again), 60, message=f"the restart\n{read_log(again)}")


def test_a_killed_demo_takes_every_role_it_started_with_it(tmp_path):
    """`kill -9` on `isles demo`: its bootstrap node, volunteers, aggregator and their DHT processes and p2p daemons
    all exit within seconds (they watch their parent), leaving nothing holding the demo's identities."""
    import subprocess

    proc = subprocess.Popen(
        ISLES + ["demo", "--quick", "--experts", "2", "--work-dir", str(tmp_path / "demo"), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started: list[int] = []
    try:
        # The roles are up once each of the 4 (bootstrap, 2 volunteers, aggregator) has started its p2p daemon.
        wait_for(lambda: sum(_comm(p) == "p2pd" for p in descendants(proc.pid)) >= 4, timeout=180, message="the roles")
        started = descendants(proc.pid)
        proc.kill()
        proc.wait(10)
        wait_for(lambda: not any(alive(p) for p in started), timeout=15, message="the demo's processes to exit")
    finally:  # on failure, what is left has been reparented: kill what was started, not what is below proc now
        for pid in [*descendants(proc.pid), *started]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
