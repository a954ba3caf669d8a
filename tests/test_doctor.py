"""`isles doctor`: a measured training step, the p2p daemon, a peer's latency and clock, reachability, disk and the
store, as JSON for scripts and as one screen for people; every failure comes with numbered fix steps and exit code 1.
Real processes and a DHT peer on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import ISLES, LOOPBACK

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """A DHT peer on loopback announcing a run of 2 unet-tiny experts: (its multiaddr, the run's manifest)."""
    from isles.protocol.dht import DHTConfig, open_dht
    from isles.protocol.swarm import Swarm
    from isles.router.partition import PartitionConfig, partition

    folder = tmp_path_factory.mktemp("run")
    node = open_dht(DHTConfig(host_maddrs=(LOOPBACK,)))
    manifest = partition(
        PartitionConfig(source="digits", experts=2, out=folder / "run", store=str(folder / "store"), name="doctor",
                        seed=61, steps=500, global_batch=16, router_preset="cnn-tiny")
    ).manifest  # fmt: skip
    assert Swarm(node).publish_manifest(manifest)
    yield node.visible_maddrs()[0], manifest
    node.shutdown()


def _doctor(tmp_path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = ["doctor", "--device", "cpu", "--preset", "unet-micro", "--batch", "2", "--host-maddrs", LOOPBACK]
    return subprocess.run(
        ISLES + base + ["--work-dir", str(tmp_path / "work"), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **(env or {})},
    )


def test_doctor_reports_what_this_machine_can_do_as_json(peer, tmp_path):
    peer, manifest = peer
    proc = _doctor(tmp_path, "--peers", peer, "--store", str(tmp_path / "store"), "--preset", "pixart-tiny", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout
    report = json.loads(proc.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is True
    assert checks["device"]["data"]["device"] == "cpu" and checks["device"]["data"]["precision"] == "fp32"
    step = checks["train unet-micro"]["data"]
    assert step["measured"] and step["seconds"] > 0 and step["micro_batch"] == 2 and step["samples_per_s"] > 0
    assert checks["train pixart-tiny"]["data"]["measured"]  # a text preset: measured with caption embeddings
    unit = checks[f"run {manifest.run_id[:8]} expert-0 (+1)"]  # the run the peer announces: both experts alike
    assert unit["data"]["measured"] and unit["data"]["unit_hours"] > 0 and "500 steps x 16" in unit["detail"]
    assert checks["disk"]["data"]["free_gb"] > 0
    assert checks["p2p daemon"]["ok"] and checks["p2p daemon"]["data"]["maddrs"]
    (pinged,) = [c for name, c in checks.items() if name.startswith("peer ")]
    assert pinged["ok"] and pinged["data"]["rtt_ms"] > 0 and abs(pinged["data"]["skew_s"]) < 1.0
    assert checks["reachability"]["data"]["reachable"] is False  # loopback only: nobody elsewhere can dial in
    assert checks["store"]["ok"] and "writable" in checks["store"]["detail"]


def test_doctor_failures_come_with_numbered_steps_and_exit_1(tmp_path):
    unreachable = "/ip4/127.0.0.1/tcp/9/p2p/QmPP3jvpykNGuiUj6LVqcFxtivqR5Z9HZK18DoU6R3EFM1"
    env = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf-home")}  # no Hugging Face token anywhere
    args = ("--peers", unreachable, "--startup-timeout", "3", "--store", "hf://nobody-isles-test", "--no-measure")
    proc = _doctor(tmp_path, *args, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("FAIL peers") and "could not reach" in line for line in lines), proc.stdout
    assert any(line.startswith("FAIL store") and "no Hugging Face token" in line for line in lines), proc.stdout
    assert any(line.strip().startswith("1. ") and "hf auth login" in line for line in lines), proc.stdout
    assert any(line.strip().startswith("3. ") for line in lines), proc.stdout  # the peers' numbered checklist
    assert lines[-1].startswith("2 to fix: ")
    assert "Traceback" not in proc.stderr
    report = json.loads(_doctor(tmp_path, *args, "--json", env=env).stdout)
    assert report["ok"] is False
    assert all(c["fix"] for c in report["checks"] if not c["ok"])


def test_reachability_is_judged_from_the_addresses_peers_could_dial():
    from isles.client.doctor import reachability

    private = ["/ip4/127.0.0.1/tcp/4001/p2p/Qm", "/ip4/192.168.1.2/tcp/4001/p2p/Qm", "/ip4/10.1.2.3/tcp/4001"]
    assert reachability(private).data["reachable"] is False
    assert "--announce-maddrs" in " ".join(reachability(private).fix)
    assert reachability([*private, "/ip4/81.2.69.160/tcp/4001/p2p/Qm"]).data["reachable"] is True
    assert reachability(private, ("/ip4/81.2.69.160/tcp/31337",)).data["reachable"] is True  # announced on purpose
    assert reachability(private, ("/dns4/boot.example.org/tcp/31337",)).data["reachable"] is True
