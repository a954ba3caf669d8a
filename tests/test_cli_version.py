"""What an installed isles says about itself and where it writes: `isles --version` and the presence records carry
the package metadata's version, and `join` / `aggregate` without --work-dir keep their files in the user data dir,
never in the current folder. Run: pytest tests/test_cli_version.py -q
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import platformdirs
import pytest
import typer
from conftest import ISLES, LOOPBACK, read_log, wait_for

from isles.protocol.installation import default_work_dir, isles_version


def test_version_prints_the_package_metadata_version(tmp_path):
    result = subprocess.run([*ISLES, "--version"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"isles {importlib.metadata.version('isles')}\n"
    assert isles_version() == importlib.metadata.version("isles")
    assert list(tmp_path.iterdir()) == []


def test_work_dir_defaults_resolve_into_the_user_data_dir(monkeypatch, tmp_path):
    from isles.client.aggregate import AggregateConfig
    from isles.client.cli import aggregate, join
    from isles.client.join import JoinConfig
    from isles.protocol.dht import DHTConfig

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))  # honoured on Linux; elsewhere the real data dir
    data = Path(platformdirs.user_data_dir("isles"))
    assert default_work_dir("join") == data / "join" and (data / "join").is_absolute()
    assert JoinConfig(swarm=DHTConfig()).work_dir == data / "join"
    assert AggregateConfig(swarm=DHTConfig()).work_dir == data / "aggregate"
    # The CLI options resolve to the same folders when --work-dir is not given.
    app = typer.Typer()
    join.register(app)
    aggregate.register(app)
    group = typer.main.get_command(app)
    for name in ("join", "aggregate"):
        ctx = group.commands[name].make_context(name, [], resilient_parsing=True)
        assert ctx.params["work_dir"] == data / name
        ctx = group.commands[name].make_context(name, ["--work-dir", "elsewhere"], resilient_parsing=True)
        assert ctx.params["work_dir"] == Path("elsewhere")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="XDG_* redirect platformdirs on Linux only")
def test_join_without_work_dir_writes_into_the_data_dir_and_records_the_version(spawn, tmp_path):
    """A real `isles join --max-units 1` with neither --work-dir nor --identity, from an empty current folder."""
    from isles.protocol.dht import DHTConfig, open_dht
    from isles.protocol.swarm import Swarm
    from isles.router.partition import PartitionConfig, partition

    run = partition(
        PartitionConfig(
            source="digits",
            experts=2,
            out=tmp_path / "run",
            store=str(tmp_path / "store"),
            name="work-dir-test",
            seed=21,
            steps=20,
            global_batch=16,
            lr=2e-3,
            warmup_steps=5,
            router_preset="cnn-tiny",
            router_steps=20,
        )
    ).manifest
    node = open_dht(DHTConfig(host_maddrs=(LOOPBACK,)))
    try:
        swarm = Swarm(node)
        assert swarm.publish_manifest(run)
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        xdg = {f"XDG_{kind}_HOME": str(tmp_path / kind.lower()) for kind in ("DATA", "CONFIG", "CACHE")}
        proc = spawn(
            ISLES
            + ["join", "--peers", str(node.visible_maddrs()[0]), "--host-maddrs", LOOPBACK, "--run", run.run_id]
            + ["--device", "cpu", "--plain", "--max-units", "1", "--settle-period", "0.5"],
            name="volunteer",
            env=xdg,
            cwd=cwd,
        )
        assert proc.wait(240) == 0, read_log(proc)
        assert list(cwd.iterdir()) == [], read_log(proc)
        work = tmp_path / "data" / "isles" / "join" / run.run_id
        assert work.is_dir() and any(work.iterdir()), read_log(proc)
        assert (tmp_path / "config" / "isles" / "identity").is_dir()  # the default identity, under XDG_CONFIG_HOME
        presence = wait_for(lambda: swarm.get_presence(run.run_id), 30, message="the volunteer's presence record")
        assert {p.version for p in presence} == {importlib.metadata.version("isles")}
    finally:
        node.shutdown()
