"""Volunteers behind NAT, on a real network: Linux network namespaces, veth pairs and iptables MASQUERADE. A bootstrap
node and an aggregator sit on a "public" namespace; two volunteers each sit in a private namespace (the same
192.168.1.0/24 for both, as at home) behind their own NAT gateway, and complete a run. The second volunteer's first
contact fails (its gateway drops everything) and it retries until the network comes up; `isles doctor` behind the NAT
says it is outbound-only. Root and `ip netns` only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ISLES, read_log, wait_for

pytestmark = pytest.mark.timeout(420)

PUBLIC_IP = "11.0.0.1"  # the bootstrap node's (global) address; each gateway's outside is 10.77.<n>.2
PRIVATE_IP = "192.168.1.2"  # every volunteer's address behind its gateway


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check)


def _why_not() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux to build network namespaces"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (.ci/run installs iproute2 and iptables with apt)"
    probe = f"islprobe{os.getpid()}"
    if _sh("ip", "netns", "add", probe, check=False).returncode != 0:
        return "this machine does not allow network namespaces"
    _sh("ip", "netns", "del", probe, check=False)
    return None


class Network:
    """The namespaces: `pub`; for each volunteer n in (1, 2), gateway `gw<n>` and host `v<n>`."""

    def __init__(self):
        tag = f"isl{os.getpid() % 100000}"
        self.pub = f"{tag}pub"
        self.gw = {n: f"{tag}gw{n}" for n in (1, 2)}
        self.vol = {n: f"{tag}v{n}" for n in (1, 2)}
        self.names = [self.pub, *self.gw.values(), *self.vol.values()]

    def ns(self, name: str, *cmd: str) -> subprocess.CompletedProcess:
        return _sh("ip", "netns", "exec", name, *cmd)

    def build(self) -> None:
        for name in self.names:
            _sh("ip", "netns", "add", name)
            self.ns(name, "ip", "link", "set", "lo", "up")
        self.ns(self.pub, "ip", "addr", "add", f"{PUBLIC_IP}/32", "dev", "lo")
        for n in (1, 2):
            gw, vol = self.gw[n], self.vol[n]
            # pub <-> gateway: 10.77.n.0/24; the public namespace does not forward, so volunteers reach only it.
            _sh("ip", "link", "add", f"p{n}", "netns", self.pub, "type", "veth", "peer", "name", "wan", "netns", gw)
            self.ns(self.pub, "ip", "addr", "add", f"10.77.{n}.1/24", "dev", f"p{n}")
            self.ns(self.pub, "ip", "link", "set", f"p{n}", "up")
            self.ns(gw, "ip", "addr", "add", f"10.77.{n}.2/24", "dev", "wan")
            self.ns(gw, "ip", "link", "set", "wan", "up")
            self.ns(gw, "ip", "route", "add", "default", "via", f"10.77.{n}.1")
            # gateway <-> volunteer: the private 192.168.1.0/24, masqueraded on the way out.
            _sh("ip", "link", "add", "lan", "netns", gw, "type", "veth", "peer", "name", "eth0", "netns", vol)
            self.ns(gw, "ip", "addr", "add", "192.168.1.1/24", "dev", "lan")
            self.ns(gw, "ip", "link", "set", "lan", "up")
            self.ns(vol, "ip", "addr", "add", f"{PRIVATE_IP}/24", "dev", "eth0")
            self.ns(vol, "ip", "link", "set", "eth0", "up")
            self.ns(vol, "ip", "route", "add", "default", "via", "192.168.1.1")
            self.ns(gw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            self.ns(gw, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE")

    def cut(self, n: int, on: bool) -> None:
        """Drop (or stop dropping) everything gateway n forwards: a volunteer whose network is down."""
        self.ns(self.gw[n], "iptables", "-I" if on else "-D", "FORWARD", "-j", "DROP")

    def destroy(self) -> None:
        for name in self.names:
            _sh("ip", "netns", "del", name, check=False)


@pytest.fixture
def network():
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    net = Network()
    try:
        net.build()
        yield net
    finally:
        net.destroy()


def _can_connect(net: Network, ns: str, host: str, port: int) -> bool:
    code = f"import socket\ntry:\n socket.create_connection(({host!r}, {port}), timeout=2)\nexcept OSError:\n exit(1)"
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code]).returncode == 0


def test_two_volunteers_behind_nat_complete_a_run_and_a_late_one_retries(network, spawn, tmp_path):
    from isles.router.partition import PartitionConfig, partition

    net = network
    manifest = partition(
        PartitionConfig(
            source="digits", experts=2, out=tmp_path / "run", store=str(tmp_path / "store"), name="nat-test",
            seed=41, steps=40, global_batch=16, lr=2e-3, warmup_steps=5, router_preset="cnn-tiny", router_steps=40,
        )
    ).manifest  # fmt: skip
    boot = spawn(
        ["ip", "netns", "exec", net.pub, *ISLES, "bootstrap", "--manifest", str(tmp_path / "run" / "manifest.json"),
         "--identity", str(tmp_path / "boot-id"), "--announce-maddrs", f"/ip4/{PUBLIC_IP}/tcp/31337"],
        name="bootstrap",
    )  # fmt: skip
    line = wait_for(lambda: re.search(r"To join: isles join --peers (\S+)", read_log(boot)), 60, message="bootstrap")
    peer = line[1]
    assert f"/ip4/{PUBLIC_IP}/tcp/31337/p2p/" in peer  # the announced address is the one volunteers are told
    # The NAT is real: the public side cannot open a connection to a volunteer; a volunteer reaches the public side.
    assert not _can_connect(net, net.pub, PRIVATE_IP, 22)
    assert _can_connect(net, net.vol[1], PUBLIC_IP, 31337)

    def join(n: int, *extra: str):
        return spawn(
            ["ip", "netns", "exec", net.vol[n], *ISLES, "join", "--peers", peer, "--run", manifest.run_id,
             "--work-dir", str(tmp_path / f"v{n}"), "--identity", str(tmp_path / f"id{n}"), "--device", "cpu",
             "--plain", "--name", f"v{n}", "--max-units", "2", "--settle-period", "0.5", "--checkpoint-period", "5",
             "--lease-ttl", "10", "--heartbeat-period", "2", *extra],
            name=f"v{n}",
        )  # fmt: skip

    net.cut(2, on=True)  # volunteer 2's network is down when it starts
    v2 = join(2, "--startup-timeout", "5", "--contact-timeout", "180")
    v1 = join(1)
    wait_for(lambda: "attempt 1: could not reach" in read_log(v2), 60, message=f"a failed contact\n{read_log(v2)}")
    net.cut(2, on=False)
    agg = spawn(
        ["ip", "netns", "exec", net.pub, *ISLES, "aggregate", "--peers", peer, "--run", manifest.run_id,
         "--until-complete", "--poll-period", "2", "--json", "--work-dir", str(tmp_path / "agg"),
         "--identity", str(tmp_path / "agg-id"), "--summary", str(tmp_path / "summary.json")],
        name="aggregate",
    )  # fmt: skip
    for proc in (v1, v2):
        assert proc.wait(240) == 0, read_log(proc)
    assert agg.wait(90) == 0, read_log(agg)  # every unit verified and in the ensemble
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(u["unit"] for u in summary["units"] if u["state"] == "accepted") == sorted(manifest.units)
    for proc in (v1, v2):  # both trained: each may take at most 2 of the 3 units
        assert "released " in read_log(proc), read_log(proc)
    assert "joined run" in read_log(v2)
    # `isles doctor`: behind the NAT this machine is outbound-only; on the public side it is reachable.
    for ns, reachable in ((net.vol[1], False), (net.pub, True)):
        doctor = subprocess.run(
            ["ip", "netns", "exec", ns, *ISLES, "doctor", "--no-measure", "--peers", peer, "--json",
             "--work-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert doctor.returncode == 0, doctor.stderr[-3000:] + doctor.stdout
        checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
        assert checks["reachability"]["data"]["reachable"] is reachable, checks["reachability"]
