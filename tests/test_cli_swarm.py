"""`isles bootstrap` and `isles status` as a user runs them: real subprocesses on 127.0.0.1, the join line, the
swarm table and JSON, and one-line errors with hints for bad arguments. Run: pytest tests/test_cli_swarm.py -q
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess

import pytest
from conftest import ISLES, read_log, wait_for
from test_records import LOOPBACK, make_manifest

from isles.protocol.dht import DHTConfig, open_dht
from isles.protocol.swarm import Swarm

JOIN_LINE = re.compile(r"To join: isles join --peers (\S+)")


def isles(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*ISLES, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), result.stderr
    assert "Hint:" in result.stderr


@pytest.fixture
def bootstrap(spawn, tmp_path):
    """A bootstrap node in a subprocess announcing one manifest; yields (process, join maddr, manifest)."""
    manifest = make_manifest(num_shards=3, name="cli-run")
    path = tmp_path / "manifest.json"
    path.write_text(manifest.json())
    proc = spawn(
        [
            *ISLES,
            "bootstrap",
            "--manifest",
            str(path),
            "--host-maddrs",
            LOOPBACK[0],
            "--identity",
            str(tmp_path / "bootstrap-id"),
            "--log-period",
            "1",
        ],
        name="bootstrap",
    )
    found = wait_for(
        lambda: JOIN_LINE.search(read_log(proc)) or proc.poll() is not None, timeout=90, message="the join line"
    )
    assert proc.poll() is None, read_log(proc)
    return proc, found.group(1), manifest


def test_bootstrap_join_line_status_and_clean_exit(bootstrap):
    proc, maddr, manifest = bootstrap
    assert maddr.startswith("/ip4/127.0.0.1/tcp/") and "/p2p/" in maddr

    # Another peer joins through the printed address and finds the manifest.
    with open_dht(DHTConfig(initial_peers=(maddr,), host_maddrs=LOOPBACK)) as node:
        assert Swarm(node).get_manifest(manifest.run_id) == manifest

    listed = isles("status", "--peers", maddr, "--json")
    assert listed.returncode == 0, listed.stderr
    runs = json.loads(listed.stdout)["runs"]
    assert [r["run_id"] for r in runs] == [manifest.run_id]
    assert [u["unit"] for u in runs[0]["units"]] == manifest.units
    assert {u["state"] for u in runs[0]["units"]} == {"open"} and runs[0]["counts"]["open"] == 4

    table = isles("status", "--peers", maddr, "--run", manifest.run_id)
    assert table.returncode == 0, table.stderr
    assert f"Run {manifest.run_id}" in table.stdout and "cli-run" in table.stdout
    for unit in manifest.units:
        assert re.search(rf"{unit}\s.*open", table.stdout), table.stdout

    unknown = isles("status", "--peers", maddr, "--run", "0123456789abcdef")
    assert_one_line_error(unknown, r"run 0123456789abcdef not found")

    wait_for(lambda: "runs announced" in read_log(proc), timeout=30, message="a periodic status log line")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, read_log(proc)
    assert "Stopped (SIGTERM)" in read_log(proc)


def test_second_bootstrap_node_backs_up_the_first(bootstrap, spawn, tmp_path):
    first, maddr, manifest = bootstrap
    # The same identity twice (a cloned container) is refused with a way out.
    clone = isles(
        "bootstrap", "--peers", maddr, "--identity", str(tmp_path / "bootstrap-id"), "--host-maddrs", LOOPBACK[0]
    )
    assert_one_line_error(clone, r"already used by another running peer")

    # A backup node is given the manifest too: bootstrap nodes announce only runs given to them or their owner signed.
    second = spawn(
        [*ISLES, "bootstrap", "--peers", maddr, "--host-maddrs", LOOPBACK[0], "--identity", str(tmp_path / "second")]
        + ["--manifest", str(tmp_path / "manifest.json")],
        name="second",
    )
    found = wait_for(
        lambda: JOIN_LINE.search(read_log(second)) or second.poll() is not None,
        timeout=90,
        message="the second join line",
    )
    assert second.poll() is None and "adopting" not in read_log(second), read_log(second)
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole group: DHT process, daemon too
    assert first.wait(timeout=30) == 0, read_log(first)

    listed = isles("status", "--peers", found.group(1), "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["run_id"] for r in json.loads(listed.stdout)["runs"]] == [manifest.run_id]


def test_unparseable_multiaddr_is_one_error_line():
    assert_one_line_error(isles("status", "--peers", "localhost:31337"), r"cannot parse the multiaddr")
    assert_one_line_error(isles("status", "--peers", "/ip4/127.0.0.1/tcp/31337"), r"no /p2p/")


def test_unreachable_peer_is_one_error_line_with_steps():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = f"/ip4/127.0.0.1/tcp/{port}/p2p/12D3KooW9vCHSQ8kAKMD3g6wswQ92qKpK3huzeghnXErzQuXwyFi"
    result = isles("status", "--peers", dead, "--startup-timeout", "15")
    assert_one_line_error(result, r"could not reach any of the peers")
    assert "1. the bootstrap node is running" in result.stderr


def test_manifest_with_a_wrong_run_id_is_refused(tmp_path):
    manifest = make_manifest()
    tampered = {**json.loads(manifest.json()), "name": "renamed by hand"}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(tampered))
    result = isles("bootstrap", "--manifest", str(path), "--host-maddrs", LOOPBACK[0])
    assert_one_line_error(result, r"not a valid run manifest.*does not match")
    missing = isles("bootstrap", "--manifest", str(tmp_path / "nope.json"))
    assert_one_line_error(missing, r"not found")


def test_status_shows_markup_from_other_peers_records_verbatim(capsys):
    """A manifest name, peer id or rejection reason is another peer's text: `[/x]` in it must not crash the table."""
    from isles.client.cli.swarm import _print_run
    from isles.protocol.swarm_view import RunView, UnitView

    hostile = "[/bold][red]"
    view = RunView(
        run_id="0123456789abcdef",
        name=f"run {hostile}",
        dataset="digits",
        units=[UnitView(unit="expert-0", state="claimed", owner=f"12D3Koo{hostile}", step=1, steps=4)],
        peers_online=[f"peer{hostile}"],
        rejections=[{"unit": "expert-0", "revision": "abc", "owner": "p", "reason": f"val loss {hostile}"}],
    )
    _print_run(view)
    out = capsys.readouterr().out
    assert f"run {hostile}" in out and f"val loss {hostile}" in out and "[red]" in out
