"""Among strangers: a hostile peer (tests/adversary.py) attacks a real run on 127.0.0.1 (a bootstrap node, two honest
`isles join` volunteers, `isles aggregate`) with every attack of issue 14, and the run still completes with honest,
verified units only. Plus the readers' rules one by one, against records a hostile key really signed and stored.
Run: pytest tests/test_adversary.py -q
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import ISLES, LOOPBACK, read_log, wait_for
from test_records import make_manifest, start_peers

from isles.protocol.identity import ephemeral_identity
from isles.protocol.leases import LeaseManager, LeaseSettings
from isles.protocol.records import CheckpointPointer, Claim, Ensemble, FencingToken, Rejection, Release
from isles.protocol.swarm import Swarm, dht_time

pytestmark = pytest.mark.timeout(420)
FAST = LeaseSettings(ttl_period=6.0, heartbeat_period=1.0, settle_period=0.5, progress_timeout=5.0)


@pytest.fixture
def swarms():
    nodes = start_peers(3)
    yield [Swarm(node) for node in nodes]
    for node in nodes:
        node.shutdown()


def _token(swarm: Swarm, unit: str, owner: str | None = None) -> FencingToken:
    return FencingToken(unit=unit, attempt=1, owner=owner or swarm.peer_id, claimed_time=0.0)


def test_records_count_only_from_their_signer_and_the_run_authority(swarms):
    """Identities in a record are its signer's or it is dropped; ensembles and rejections count only from the keys
    the owner-signed manifest names; a record that outlives the bounds is dropped; releases go by first sight."""
    honest, hostile, reader = swarms
    aggregator = honest  # the run names `honest`'s key as its aggregator
    manifest = make_manifest(aggregators=[honest.identity.owner_key])
    honest.publish_manifest(manifest)
    run, unit, now = manifest.run_id, "expert-0", dht_time()

    def release(swarm, owner=None, time=now, volunteer=""):
        return Release(
            run_id=run,
            unit=unit,
            token=_token(swarm, unit, owner),
            repo="r",
            revision=f"{swarm.peer_id}{owner}",
            files={"a": "0" * 64},
            steps=20,
            released_time=time,
            volunteer=volunteer,
        )

    honest.put_release(release(honest, time=now))
    hostile.put_release(release(hostile, owner=honest.peer_id))  # in the honest peer's name
    hostile.put_release(release(hostile, volunteer=honest.peer_id))  # "by" the honest peer
    hostile.put_release(release(hostile, time=0.0))  # backdated: first by stated time
    releases = wait_for(lambda: len(reader.get_releases(run, unit)) == 2 and reader.get_releases(run, unit), 30)
    assert {r.token.owner for r in releases} == {honest.peer_id, hostile.peer_id}
    assert all(r.token.owner == honest.peer_id or r.volunteer == "" for r in releases)

    # Ensembles and rejections: only the aggregator's count, whatever times they state.
    for swarm, published in ((aggregator, now), (hostile, now + 3600)):
        swarm.put_ensemble(
            Ensemble(
                run_id=run,
                repo="e",
                revision=swarm.peer_id,
                files={},
                experts=[],
                complete=swarm is hostile,
                published_time=published,
                peer_id=swarm.peer_id,
            )
        )
        swarm.put_rejection(
            Rejection(
                run_id=run,
                unit=unit,
                token=_token(honest, unit),
                revision="x",
                reason=swarm.peer_id,
                rejected_time=now,
                peer_id=swarm.peer_id,
            )
        )
    wait_for(lambda: reader.latest_ensemble(run) is not None, 30)
    assert reader.latest_ensemble(run).revision == aggregator.peer_id and not reader.latest_ensemble(run).complete
    assert [r.reason for r in reader.get_rejections(run)] == [aggregator.peer_id]

    # A record written to live ten years is a squatter: dropped (the DHT keeps it, readers do not count it).
    from isles.protocol import keys

    squat = release(hostile, time=1.0).copy(update=dict(revision="squat"))
    hostile._store(keys.releases_key(run, unit), squat.to_value(), now + 10 * 365 * 86400, hostile.subkey("far"))
    assert all(r.revision != "squat" for r in reader.get_releases(run, unit))


def test_leases_a_liar_cannot_hold_and_checkpoints_only_inside_the_recipe(swarms):
    """A claim dated 1970 and renewed with a fresh attempt every second holds a unit only until the progress
    timeout; pointers at or past the last step, or naming another peer, are never resumed from."""
    owner, hostile, honest = swarms
    manifest = make_manifest()
    owner.publish_manifest(manifest)
    run, unit = manifest.run_id, "expert-0"
    manager = LeaseManager(honest, run, FAST)

    def backdate(attempt: int) -> None:
        now = dht_time()
        claim = Claim(
            run_id=run, unit=unit, peer_id=hostile.peer_id, attempt=attempt, claimed_time=0.0, heartbeat_time=now
        )
        hostile.put_claim(claim, now + 30)

    steps = manifest.experts[0].steps
    for i, step in enumerate((steps, 10**12, steps - 1)):
        owner_id = honest.peer_id if step == steps - 1 else hostile.peer_id  # the last one names the honest peer
        hostile._store(
            keys_checkpoints(run, unit),
            CheckpointPointer(
                run_id=run,
                unit=unit,
                token=_token(hostile, unit, owner_id),
                repo="c",
                revision=str(i),
                files={"a": "0" * 64},
                step=step,
                steps=steps,
                written_time=dht_time(),
            ).to_value(),
            dht_time() + 600,
            hostile.subkey(str(i)),
        )
    backdate(1)
    wait_for(lambda: manager.owner(unit) is not None, 30, message="the backdated claim")
    assert manager.claim(unit) is None  # held by the liar for now: it may yet show progress
    attempt = [1]

    def liar_renews_and_we_try():
        attempt[0] += 1
        backdate(attempt[0])  # a fresh attempt every time does not reset the stall clock
        return manager.claim(unit)

    lease = wait_for(liar_renews_and_we_try, FAST.progress_timeout + 30, interval=1.0, message="the takeover")
    try:
        backdate(attempt[0] + 1)
        assert lease.renew() and lease.active  # the liar's earlier claim does not take it back
        from isles.protocol.swarm_view import read_run

        view = read_run(honest, run, settings=FAST)  # what `isles status` shows: who stalls
        assert hostile.peer_id in next(u for u in view.units if u.unit == unit).stalled
    finally:
        manager.close()
    assert honest.checkpoints_to_resume(run, unit) == []  # at/after the last step, 10^12, or forged: none counts


def test_once_an_aggregator_verifies_checkpoints_only_verified_ones_are_resumed_from(swarms):
    """A pointer from a peer that never held the lease (or whose file never verified) is not resumed from once the
    run's aggregator verifies checkpoints; a "verification" signed by anyone else counts for nothing."""
    from isles.protocol.witness import VerifiedCheckpoint, get_verified, put_verified

    aggregator, hostile, honest = swarms
    manifest = make_manifest(aggregators=[aggregator.identity.owner_key])
    aggregator.publish_manifest(manifest)
    run, unit = manifest.run_id, "expert-0"
    for swarm, step in ((honest, 5), (hostile, 9)):
        swarm.put_checkpoint(
            CheckpointPointer(
                run_id=run,
                unit=unit,
                token=_token(swarm, unit),
                repo="c",
                revision=swarm.peer_id,
                files={"a": "0" * 64},
                step=step,
                steps=20,
                written_time=dht_time(),
            )
        )
    wait_for(lambda: len(aggregator.checkpoints_to_resume(run, unit)) == 2, 30, message="both pointers")
    assert aggregator.checkpoints_to_resume(run, unit)[0].step == 9  # before any verification: the furthest

    def verify(by: Swarm, of: Swarm, step: int) -> None:
        put_verified(
            by,
            VerifiedCheckpoint(
                run_id=run,
                unit=unit,
                holder=of.peer_id,
                attempt=1,
                repo="c",
                revision=of.peer_id,
                step=step,
                verified_time=dht_time(),
                peer_id=by.peer_id,
            ),
        )

    verify(hostile, hostile, 9)  # the hostile vouches for itself: ignored
    verify(aggregator, honest, 5)
    wait_for(lambda: get_verified(hostile, run, unit), 30, message="the verification")
    assert [v.holder for v in get_verified(hostile, run, unit)] == [honest.peer_id]
    # The honest reader resumes from the verified step 5, not the hostile's unverified 9; a writer trusts its own.
    assert [p.step for p in honest.checkpoints_to_resume(run, unit)] == [5]
    assert [p.step for p in hostile.checkpoints_to_resume(run, unit)] == [9, 5]
    # Once the aggregator verifies any unit's checkpoints, an unverified pointer counts in no unit: not to resume
    # from, not as a holder's progress.
    from isles.protocol.leases import progress_of

    hostile.put_checkpoint(
        CheckpointPointer(
            run_id=run,
            unit="expert-1",
            token=_token(hostile, "expert-1"),
            repo="c",
            revision="h1",
            files={"a": "0" * 64},
            step=3,
            steps=20,
            written_time=dht_time(),
        )
    )
    wait_for(lambda: aggregator.get_checkpoints(run, "expert-1"), 30, message="the pointer on expert-1")
    assert honest.checkpoints_to_resume(run, "expert-1") == [] and progress_of(honest, run, "expert-1") == {}


def keys_checkpoints(run: str, unit: str) -> str:
    from isles.protocol import keys

    return keys.checkpoints_key(run, unit)


def test_bootstrap_announces_only_runs_given_or_signed_by_its_owner(swarms, tmp_path):
    from isles.protocol.bootstrap import BootstrapNode, BootstrapSettings
    from isles.protocol.dht import DHTConfig

    a, _, _ = swarms
    node = BootstrapNode(
        DHTConfig(initial_peers=tuple(a.node.visible_maddrs()), host_maddrs=(LOOPBACK,), identity_dir=tmp_path / "id"),
        [],
        BootstrapSettings(max_runs=2),
    )
    node.start()
    try:
        from isles.protocol.identity import load_identity

        own = make_manifest(name="own", owner=load_identity(tmp_path / "id"))
        stranger = make_manifest(name="stranger", owner=ephemeral_identity())
        a.publish_manifest(own)
        a.publish_manifest(stranger)
        wait_for(lambda: len(node.swarm.list_runs()) >= 2, 30, message="both runs in the index")
        node.adopt()
        assert [m.run_id for m in node.manifests] == [own.run_id]
    finally:
        node.shutdown()


# --- the whole system against a hostile peer -----------------------------------------------------------------------


def _join(spawn, peer, run_id, tmp_path, name):
    args = [*ISLES, "join", "--peers", peer, "--host-maddrs", LOOPBACK, "--run", run_id, "--device", "cpu", "--plain"]
    args += ["--work-dir", str(tmp_path / name), "--identity", str(tmp_path / "identities" / name), "--name", name]
    args += ["--settle-period", "0.5", "--checkpoint-period", "1", "--lease-ttl", "6", "--heartbeat-period", "1"]
    return spawn(args, name=name)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_a_run_completes_with_honest_units_only_among_hostile_peers(spawn, tmp_path):
    from isles.protocol.dht import DHTConfig, open_dht
    from isles.router.partition import PartitionConfig, partition

    owner_id = tmp_path / "identities" / "owner"
    result = partition(
        PartitionConfig(
            identity=owner_id,
            source="digits",
            experts=2,
            out=tmp_path / "run",
            store=str(tmp_path / "store"),
            name="among-strangers",
            progress_timeout=10.0,  # the run's: a holder without verified progress for 10 s loses its unit
            steps=40,
            global_batch=16,
            lr=2e-3,
            warmup_steps=5,
            router_preset="cnn-tiny",
            router_steps=40,
        )
    )
    m = result.manifest
    boot = open_dht(DHTConfig(host_maddrs=(LOOPBACK,)))
    try:
        swarm = Swarm(boot)
        assert swarm.publish_manifest(m)
        peer = boot.visible_maddrs()[0]
        here = Path(__file__).parent
        hostile = spawn(
            [
                sys.executable,
                str(here / "adversary.py"),
                "--peer",
                peer,
                "--run",
                m.run_id,
                "--store",
                str(tmp_path / "store"),
                "--work",
                str(tmp_path / "hostile"),
            ],
            name="hostile",
        )
        summary_path = tmp_path / "summary.json"
        aggregator = spawn(
            [
                *ISLES,
                "aggregate",
                "--peers",
                peer,
                "--host-maddrs",
                LOOPBACK,
                "--run",
                m.run_id,
                "--until-complete",
                "--poll-period",
                "1",
                "--sample-steps",
                "3",
                "--work-dir",
                str(tmp_path / "aggregator"),
                "--identity",
                str(owner_id),
                "--summary",
                str(summary_path),
                "--replay-fraction",
                "1",  # every pushed checkpoint: training replayed from the holder's previous one
            ],
            name="aggregator",
        )
        # The hostile peer is in the swarm first: its fakes are judged before the volunteers arrive.
        wait_for(lambda: "round 2 done" in read_log(hostile), 120, message=f"the attacks\n{read_log(hostile)}")
        wait_for(lambda: swarm.get_rejections(m.run_id), 120, message=f"a rejected fake\n{read_log(aggregator)}")
        volunteers = [_join(spawn, peer, m.run_id, tmp_path, name) for name in ("alice", "bob")]
        logs = lambda: "\n".join(read_log(p)[-3000:] for p in (*volunteers, aggregator, hostile))  # noqa: E731
        assert aggregator.wait(360) == 0, logs()
        for volunteer in volunteers:
            assert volunteer.wait(60) == 0, logs()
        summary = json.loads(summary_path.read_text())

        # Complete, with every unit trained by an honest volunteer from scratch (nobody resumed a hostile pointer).
        from isles.protocol.identity import load_identity

        honest_ids = {load_identity(tmp_path / "identities" / name).peer_id for name in ("alice", "bob")}
        assert summary["complete"], logs()
        for unit in summary["units"]:
            assert unit["state"] == "accepted" and unit["peer_id"] in honest_ids, unit
            assert unit["resumed_from_step"] is None, unit
        # Every fake that reached the aggregator was refused for what it is; nothing rejected stays on its disk.
        reasons = " ".join(r["reason"] for r in summary["rejections"])
        assert "is not part of the recipe" in reasons or "time_embedding_dim" in reasons, reasons
        assert "too large" in reasons, reasons
        assert all(r["owner"] == hostile_id(hostile) for r in summary["rejections"]), summary["rejections"]
        assert _folder_bytes(tmp_path / "aggregator") < 30 << 20
        # The ensemble readers see is the aggregator's, not the hostile "complete" one; no fake rejection counted.
        ensemble = swarm.latest_ensemble(m.run_id)
        assert ensemble.revision == summary["revision"] and ensemble.complete
        assert all(r.peer_id != hostile_id(hostile) for r in swarm.get_rejections(m.run_id))
        assert hostile.poll() is None, read_log(hostile)  # it attacked all along
        # The aggregator verified the honest checkpoints (what resumers and lease readers go by), and crashed on none.
        assert "verified the checkpoint of" in read_log(aggregator) and "Traceback" not in read_log(aggregator)
        assert "replayed (exact)" in read_log(aggregator), read_log(aggregator)[-3000:]  # honest CPU training
        assert "final steps" in read_log(aggregator), read_log(aggregator)[-3000:]  # up to the released weights
    finally:
        boot.shutdown()


def hostile_id(proc) -> str:
    line = next(x for x in read_log(proc).splitlines() if x.startswith("hostile peer "))
    return line.split()[2]


def test_partition_names_the_run_authority(tmp_path):
    """`isles partition --identity DIR --aggregator KEY`: the manifest is the owner's, signed, naming the aggregators;
    a key that is not one is a one-line error."""
    import subprocess

    from isles.protocol.identity import load_identity
    from isles.protocol.records import load_manifest_json

    owner, aggregator = load_identity(tmp_path / "owner"), load_identity(tmp_path / "aggregator")
    key = aggregator.owner_key[len("[owner:") : -1]  # as `isles aggregate` logs it: ssh-rsa AAAA...
    args = ["partition", "digits", "--experts", "2", "--out", str(tmp_path / "run"), "--steps", "5"]
    args += ["--identity", str(tmp_path / "owner"), "--aggregator", key, "--aggregator", str(tmp_path / "owner")]
    done = subprocess.run(ISLES + args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = load_manifest_json((tmp_path / "run" / "manifest.json").read_text())
    assert manifest.owner == owner.owner_key
    assert manifest.aggregators == [aggregator.owner_key, owner.owner_key]

    bad = subprocess.run(ISLES + [*args[:-4], "--aggregator", "ssh-rsa nonsense"], capture_output=True, text=True)
    errors = [line for line in bad.stderr.splitlines() if line.startswith("Error:")]
    assert bad.returncode == 1 and len(errors) == 1 and "not an RSA public key" in errors[0], bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr
