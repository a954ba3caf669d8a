"""`isles join` checks that it can publish before it claims anything (store writable, Hub token allowed to create repos
in the namespace, disk for a unit): one `Error:` + `Hint:` and no claim in the swarm; a failed checkpoint push is
shown, and training goes on. Real `isles join` processes, a DHT peer and the Hub test server on 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import ISLES, LOOPBACK, read_log
from hub_server import hub_server  # noqa: F401  (the Hub test server fixture)

from isles.client.preflight import hub_write_problem

pytestmark = pytest.mark.timeout(300)


def _whoami(role="write", name="alice", orgs=(), scoped=None) -> dict:
    token = {"role": role}
    if scoped is not None:
        token["fineGrained"] = {"global": [], "scoped": scoped}
    return {"type": "user", "name": name, "orgs": list(orgs), "auth": {"accessToken": token}}


@pytest.mark.parametrize(
    "info, namespace, refused",
    [
        (_whoami(), "alice", None),
        (_whoami(role="read"), "alice", "read-only"),
        (_whoami(), "bob", "neither"),
        (_whoami(orgs=[{"name": "lab", "roleInOrg": "write"}]), "lab", None),
        (_whoami(orgs=[{"name": "lab", "roleInOrg": "read"}]), "lab", "role in lab"),
        (_whoami("fineGrained", scoped=[{"entity": {"name": "alice"}, "permissions": ["repo.write"]}]), "alice", None),
        (_whoami("fineGrained", scoped=[{"entity": {"name": "alice"}, "permissions": ["repo.content.read"]}]),
         "alice", "repo.write"),
    ],
)  # fmt: skip
def test_hub_token_may_create_repos_only_where_the_hub_allows_it(info, namespace, refused):
    problem = hub_write_problem(info, namespace)
    assert (problem is None) if refused is None else (refused in problem), problem


@pytest.fixture(scope="module")
def swarm_run(tmp_path_factory):
    from isles.protocol.dht import DHTConfig, open_dht
    from isles.protocol.swarm import Swarm
    from isles.router.partition import PartitionConfig, partition

    folder = tmp_path_factory.mktemp("run")
    node = open_dht(DHTConfig(host_maddrs=(LOOPBACK,)))
    swarm = Swarm(node)
    result = partition(
        PartitionConfig(
            source="digits", experts=2, out=folder / "run", store=str(folder / "store"), name="preflight-test",
            seed=31, steps=60, global_batch=16, lr=2e-3, warmup_steps=5, router_preset="cnn-tiny", router_steps=60,
        )
    )  # fmt: skip
    assert swarm.publish_manifest(result.manifest)
    yield node.visible_maddrs()[0], swarm, result.manifest
    node.shutdown()


def _join_args(peer, manifest, folder, *extra):
    return ISLES + [
        "join", "--peers", peer, "--host-maddrs", LOOPBACK, "--run", manifest.run_id, "--work-dir", str(folder / "w"),
        "--identity", str(folder / "id"), "--device", "cpu", "--plain", "--max-units", "1", "--settle-period", "0.5",
        "--checkpoint-period", "1", "--lease-ttl", "8", "--heartbeat-period", "2", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("case", ["store-folder-is-a-file", "read-only-hub-token", "hub-namespace-of-another"])
def test_join_that_cannot_publish_fails_before_any_claim(case, swarm_run, tmp_path, hub_server):  # noqa: F811
    peer, swarm, manifest = swarm_run
    env = {**os.environ, "HF_ENDPOINT": hub_server.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_alice_test"}
    if case == "store-folder-is-a-file":
        (tmp_path / "taken").write_text("a file where the store folder should be")
        store, expect = str(tmp_path / "taken"), "cannot write to the local store"
    elif case == "read-only-hub-token":
        hub_server.accounts["hf_alice_test"] = {"name": "alice", "auth": {"accessToken": {"role": "read"}}}
        store, expect = "hf://alice", "read-only token"
    else:
        store, expect = "hf://bob", "cannot create repos in bob"
    proc = subprocess.run(
        _join_args(peer, manifest, tmp_path, "--store", store), capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and expect in errors[0], proc.stderr[-3000:]
    assert any(line.startswith("Hint: ") for line in proc.stderr.splitlines())
    assert "Traceback" not in proc.stderr
    assert all(swarm.get_claims(manifest.run_id, unit) == [] for unit in manifest.units)  # nothing was claimed
    assert not any("/commit/" in r for r in hub_server.requests)  # and nothing published


def test_a_failed_checkpoint_push_is_shown_and_training_goes_on(swarm_run, spawn, tmp_path, hub_server):  # noqa: F811
    peer, swarm, manifest = swarm_run
    env = {"HF_ENDPOINT": hub_server.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_alice_test"}
    hub_server.fail(match="checkpoints/commit", times=1, status=400)  # the first checkpoint upload is refused
    proc = spawn(_join_args(peer, manifest, tmp_path, "--store", "hf://alice"), name="vol", env=env)
    assert proc.wait(240) == 0, read_log(proc)
    log = read_log(proc)
    assert "could not push the checkpoint of" in log and "1 failed so far" in log, log
    assert "released " in log  # the unit still completes and is published


def test_a_volunteer_does_not_claim_a_unit_its_memory_cannot_train(monkeypatch):
    """A run whose experts differ in size: a small machine takes the unit that fits, says why it leaves the other,
    and stops when only units too large for it are left (instead of claiming them and failing hours later)."""
    import threading
    from types import SimpleNamespace

    from isles.client import join
    from isles.client.join import JoinConfig, Volunteer
    from isles.client.machine import MachineReport
    from isles.protocol.dht import DHTConfig

    monkeypatch.setattr(join, "released_units", lambda swarm, manifest: {})
    expert = dict(channels=3, resolution=32, frames=None)
    volunteer = Volunteer(JoinConfig(swarm=DHTConfig()), console=None)
    volunteer.manifest = SimpleNamespace(
        run_id="r",
        units=["expert-0", "expert-1"],
        experts=[SimpleNamespace(preset="unet-tiny", **expert), SimpleNamespace(preset="dit-xl-2", **expert)],
    )
    volunteer.machine = MachineReport(
        "cpu", "test", 4.0, 4.0, 100.0, 2,
        fits={"unet-tiny 32x32x3": True, "dit-xl-2 32x32x3": False},
        problems=("dit-xl-2 32x32x3 needs ~13.1 GB, 4.0 GB free",),
    )  # fmt: skip
    volunteer.refused = volunteer._units_that_do_not_fit()
    assert volunteer.refused == {"expert-1": "dit-xl-2 32x32x3 needs ~13.1 GB, 4.0 GB free"}
    events, claims = [], []
    volunteer.display = SimpleNamespace(event=events.append)
    volunteer.swarm = SimpleNamespace(latest_checkpoint=lambda run_id, unit: None)

    def acquire(units):
        claims.append(list(units))
        return SimpleNamespace(unit=units[0]) if units else None

    volunteer.leases = SimpleNamespace(acquire=acquire)
    monkeypatch.setattr(volunteer, "_train_unit", lambda lease: join.UnitOutcome(lease.unit, "released", 1))
    loop = threading.Thread(target=volunteer._loop, daemon=True)
    loop.start()
    loop.join(10)
    assert not loop.is_alive()
    assert claims == [["expert-0"]]  # never offered the unit that does not fit
    assert "not taking expert-1: dit-xl-2 32x32x3 needs ~13.1 GB, 4.0 GB free" in events
    assert events[-1].startswith("the units left need more memory (or time: --max-unit-hours) than this machine")


def test_units_too_slow_for_this_machine_are_refused_by_a_measured_step_and_the_largest_go_first():
    """--max-unit-hours: a real training step of each recipe is measured here; a unit whose steps x batch would take
    longer is left, with the estimate in the reason; among the others the largest (parameters x steps) is offered
    first, equal ones as one group for the lease manager's rendezvous order."""
    from types import SimpleNamespace

    from isles.client.unit_choice import largest_first, unit_hours, units_too_slow

    assert unit_hours(1000, 64, 0.25) == pytest.approx(1000 * 64 * 0.25 / 3600)
    recipe = dict(channels=1, resolution=8, num_classes=10, text_width=None, text_length=None, frames=None)
    short = SimpleNamespace(preset="unet-micro", steps=10, global_batch=8, **recipe)
    long = SimpleNamespace(preset="unet-micro", steps=10_000_000, global_batch=64, **recipe)
    labels = ["unet-micro 8x8x1", "unet-micro 8x8x1"]
    refused = units_too_slow([short, long], ["expert-0", "expert-1"], "cpu", 1.0, labels)
    assert list(refused) == ["expert-1"]  # one measured step (the same recipe shape is measured once) decides
    assert "h on this machine" in refused["expert-1"] and "over --max-unit-hours 1" in refused["expert-1"]
    assert units_too_slow([short], ["expert-0"], "cpu", 1e-9, labels[:1])  # any limit below the measured time

    sizes = {"expert-0": 10, "expert-1": 500, "expert-2": 500}
    assert largest_first(["expert-0", "expert-1", "expert-2", "router"], sizes) == [
        ["expert-1", "expert-2"], ["expert-0"], ["router"]
    ]  # fmt: skip


def test_join_with_max_unit_hours_leaves_units_it_cannot_finish_and_claims_none(swarm_run, tmp_path):
    """`isles join --max-unit-hours` far below what a measured step gives: every expert unit is left with its estimate,
    none is claimed; the router (tiny, not measured) is all it may take."""
    from isles.client.run_access import released_units

    peer, swarm, manifest = swarm_run
    open_experts = [u for u in ("expert-0", "expert-1") if u not in released_units(swarm, manifest)]
    assert open_experts  # (the module's other tests may have released one)
    args = _join_args(peer, manifest, tmp_path, "--store", str(tmp_path / "store"), "--max-unit-hours", "0.000001")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    for unit in open_experts:
        assert f"not taking {unit}: unet-tiny 8x8x1: ~" in log and "over --max-unit-hours 1e-06" in log, log[-3000:]
        assert swarm.get_claims(manifest.run_id, unit) == []
