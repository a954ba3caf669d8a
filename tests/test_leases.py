"""Shard leases between real hivemind peers on 127.0.0.1: a 12-peer race for 4 shards, expiry after a peer vanishes,
and a restarted peer renewing its own claim. Short lease periods keep it fast. Run: pytest tests/test_leases.py -q
"""

from __future__ import annotations

import threading

import pytest
from conftest import wait_for
from test_records import LOOPBACK, make_manifest, start_peers

from isles.protocol.dht import DHTConfig, open_dht
from isles.protocol.leases import LeaseManager, LeaseSettings, owner_of, rendezvous_rank
from isles.protocol.records import CheckpointPointer, Claim
from isles.protocol.swarm import Signed, Swarm, dht_time
from isles.protocol.swarm_view import read_run

FAST = LeaseSettings(ttl_period=4.0, heartbeat_period=1.0, settle_period=1.0)


@pytest.fixture
def swarms(request):
    """`request.param` peers (default 3) as Swarm objects; all shut down at teardown."""
    nodes = start_peers(getattr(request, "param", 3))
    yield [Swarm(node) for node in nodes]
    for node in nodes:
        node.shutdown()


def race(managers: list[LeaseManager], units: list[str]) -> list:
    """Every manager tries to acquire one of `units` at the same moment; their leases (or None) in order."""
    results: list = [None] * len(managers)
    start = threading.Barrier(len(managers))

    def run(i: int) -> None:
        start.wait()
        results[i] = managers[i].acquire(units)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(managers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_rendezvous_ranking_differs_between_peers_and_is_stable():
    units = [f"expert-{i}" for i in range(8)]
    firsts = {rendezvous_rank(units, f"peer-{p}")[0] for p in range(32)}
    assert len(firsts) > 3  # racing peers start on different units
    assert rendezvous_rank(units, "peer-1") == rendezvous_rank(list(reversed(units)), "peer-1")
    with pytest.raises(ValueError):
        LeaseSettings(ttl_period=5, heartbeat_period=10)


def test_forged_claims_do_not_hold_a_unit():
    """Claims are self-reported: one dated in the future or written to live for years must not own the unit."""
    now = 1_000_000.0

    def entry(peer: str, claimed: float, heartbeat: float, expires: float) -> Signed:
        claim = Claim(run_id="r", unit="expert-0", peer_id=peer, claimed_time=claimed, heartbeat_time=heartbeat)
        return Signed(record=claim, subkey=peer.encode(), expiration_time=expires)

    honest = entry("honest", now - 5, now - 1, now + 59)
    forever = entry("forever", 0.0, 0.0, now + 10 * 365 * 86400)  # one write dated 1970, expiring in ten years
    future = entry("future", now - 100, now + 3600, now + 3660)  # heartbeat from the future
    assert owner_of([honest, forever, future], now) is honest
    assert owner_of([entry("early", now - 10, now - 2, now + 58), honest], now).record.peer_id == "early"


@pytest.mark.parametrize("swarms", [12], indirect=True)
def test_twelve_peers_race_for_four_shards(swarms):
    manifest = make_manifest(num_shards=4)
    swarms[0].publish_manifest(manifest)
    shards = manifest.units[:4]
    managers = [LeaseManager(swarm, manifest.run_id, FAST) for swarm in swarms]
    leases = race(managers, shards)
    try:
        won = [lease for lease in leases if lease is not None]
        assert sorted(lease.unit for lease in won) == shards  # every shard has an owner, and only one
        # After the settle period every peer sees the same single live claim per shard: the losers withdrew.
        for swarm in (swarms[0], swarms[-1]):
            for shard in shards:
                owner = LeaseManager(swarm, manifest.run_id, FAST).owner(shard)
                holder = next(lease for lease in won if lease.unit == shard)
                assert owner is not None and owner.peer_id == holder.claim.peer_id
                # Losers withdraw in the background, while they try their next unit.
                wait_for(
                    lambda s=swarm, u=shard: (
                        len([e for e in s.get_claims(manifest.run_id, u) if e.record.state == "claimed"]) == 1
                    ),
                    timeout=20,
                    message=f"the losers' withdrawals on {shard}",
                )
        # The losers moved on and found nothing left: a new claim on an owned shard fails at once.
        loser = managers[leases.index(None)]
        assert loser.acquire(shards) is None

        # Heartbeats carry progress to any reader.
        won[0].update_progress(step=5, steps=20, samples_per_s=16.0)

        def progress_visible():
            view = read_run(swarms[-1], manifest.run_id)
            unit = next(u for u in view.units if u.unit == won[0].unit)
            return unit.state == "claimed" and unit.step == 5 and unit.eta_s == pytest.approx(7.5)

        wait_for(progress_visible, timeout=20, message="the heartbeat's progress")
        assert all(lease.active for lease in won)
    finally:
        for manager in managers:
            manager.close()
    view = read_run(swarms[1], manifest.run_id)
    assert all(u.state == "open" for u in view.units)  # withdrawn leases free their units at once


def claim_of(swarm: Swarm, run_id: str, unit: str, attempt: int = 1, state: str = "claimed", age: float = 0.0):
    """Write a claim of `swarm`'s peer directly (a racer's, or an old attempt's), dated `age` seconds ago."""
    now = dht_time()
    claim = Claim(
        run_id=run_id,
        unit=unit,
        peer_id=swarm.peer_id,
        attempt=attempt,
        state=state,
        claimed_time=now - age,
        heartbeat_time=now,
    )
    assert swarm.put_claim(claim, now + 60)
    return claim


def test_a_peer_new_to_the_run_writes_first_and_still_gives_way_to_an_owner(swarms):
    """A newcomer writes its first claim before reading (one DHT round trip fewer); on an owned unit that claim is
    withdrawn again, and on a free unit it takes the attempt after the last one seen."""
    a, b, c = swarms
    manifest = make_manifest(num_shards=3)
    owner = LeaseManager(c, manifest.run_id, FAST).claim("expert-0")
    assert owner is not None
    newcomer = LeaseManager(a, manifest.run_id, FAST, new_to_run=True)
    try:
        assert newcomer.claim("expert-0") is None

        def newcomer_withdrew():
            mine = [e for e in b.get_claims(manifest.run_id, "expert-0") if e.peer_id == a.peer_id]
            return bool(mine) and all(e.record.state == "withdrawn" for e in mine)

        wait_for(newcomer_withdrew, timeout=20, message="the newcomer's withdrawal")
        assert LeaseManager(b, manifest.run_id, FAST).owner("expert-0").peer_id == c.peer_id

        claim_of(b, manifest.run_id, "expert-1", attempt=3, state="withdrawn", age=30)  # an old holder gave up
        again = LeaseManager(a, manifest.run_id, FAST, new_to_run=True)
        lease = again.claim("expert-1")
        assert lease is not None and lease.fencing_token.attempt == 4
        again.close()
    finally:
        owner.withdraw()
        newcomer.close()


def test_a_newcomer_never_takes_a_unit_held_since_before_it_looked(swarms):
    """An owner of long standing is first seen by a newcomer after the newcomer dated its own claim (it writes while
    it reads), so by first-seen times alone the newcomer would rank first: it must give way all the same."""
    a, b, c = swarms
    manifest = make_manifest(num_shards=3)
    claim_of(c, manifest.run_id, "expert-2", age=FAST.backdate_grace + 20)  # held for longer than the grace
    newcomer = LeaseManager(a, manifest.run_id, FAST, new_to_run=True)
    try:
        assert newcomer.claim("expert-2") is None
        # Its claim is withdrawn in the background; once that lands, a third peer sees the owner alone.
        wait_for(
            lambda: getattr(LeaseManager(b, manifest.run_id, FAST).owner("expert-2"), "peer_id", None) == c.peer_id,
            timeout=20,
            message="the newcomer's withdrawal",
        )
    finally:
        newcomer.close()


def test_a_newcomer_gives_way_to_a_long_standing_owner_even_beside_a_racer(swarms):
    """The newcomer's read finds the owner of long standing and a racer dated just after the newcomer: ranked by
    first-seen times the racer would come first, and the newcomer (earlier than the racer) would take the unit."""
    a, b, c = swarms
    manifest = make_manifest(num_shards=3)
    claim_of(c, manifest.run_id, "expert-1", age=FAST.backdate_grace + 20)  # the owner, held for long
    newcomer = LeaseManager(a, manifest.run_id, FAST, new_to_run=True)
    read, raced = newcomer._read_claims, []

    def race_then_read(unit):  # the racer's claim lands after the newcomer dated its own, before the read
        if not raced:
            raced.append(claim_of(b, manifest.run_id, unit))
        return read(unit)

    newcomer._read_claims = race_then_read
    try:
        assert newcomer.claim("expert-1") is None
        assert raced  # the racer's claim was there to be found
    finally:
        newcomer.close()


def test_a_scan_that_misses_an_owner_does_not_let_a_peer_take_its_unit(swarms):
    """The one-traversal scan of every unit is a hint: a peer dates a claim only after a full read of the unit."""
    a, b, c = swarms
    manifest = make_manifest(num_shards=3)
    claim_of(c, manifest.run_id, "expert-0", age=FAST.backdate_grace + 20)
    a.scan_claims = lambda run_id, units: {unit: [] for unit in units}  # a scan that missed the owner's record
    manager = LeaseManager(a, manifest.run_id, FAST)
    try:
        assert manager.acquire(["expert-0"]) is None
        assert LeaseManager(b, manifest.run_id, FAST).owner("expert-0").peer_id == c.peer_id
    finally:
        manager.close()


def test_peers_that_lost_a_race_together_are_matched_to_different_free_units(swarms):
    a, b, c = swarms
    manifest = make_manifest(num_shards=6)
    units = manifest.units[:6]
    claim_of(c, manifest.run_id, units[0], age=1.0)  # the winner
    for loser in (a, b):
        claim_of(loser, manifest.run_id, units[0])
    patient = LeaseSettings(ttl_period=60.0, heartbeat_period=15.0, settle_period=10.0)  # racers for 40 s
    managers = {s.peer_id: LeaseManager(s, manifest.run_id, patient) for s in (a, b)}

    def first_choices():
        views = {p: m.swarm.scan_claims(manifest.run_id, units) for p, m in managers.items()}
        return {p: managers[p]._claim_order(view)[0] for p, view in views.items()}

    choices = wait_for(
        lambda: (found := first_choices()) and len(set(found.values())) == 2 and found,
        timeout=20,
        message="both losers' claims to show up in each other's view",
    )
    assert units[0] not in choices.values()  # the owned unit is not tried again
    for loser in (a, b):  # losers withdraw at once: the matching still tells them apart
        claim_of(loser, manifest.run_id, units[0], state="withdrawn")
    assert len(set(first_choices().values())) == 2


def test_a_racer_slower_than_the_settle_period_is_caught_by_the_confirming_read(swarms):
    """A claim dated before ours that lands only after we settled takes the unit back a settle period later, long
    before the next heartbeat."""
    a, b, _ = swarms
    manifest = make_manifest()
    settings = LeaseSettings(ttl_period=120.0, heartbeat_period=60.0, settle_period=5.0)
    lease = LeaseManager(a, manifest.run_id, settings).claim("expert-0")
    assert lease is not None and not lease.lost.is_set()
    late = Claim(
        run_id=manifest.run_id,
        unit="expert-0",
        peer_id=b.peer_id,
        claimed_time=lease.claim.claimed_time - 0.5,
        heartbeat_time=dht_time(),
    )
    assert b.put_claim(late, dht_time() + 60)
    try:
        assert lease.confirmed.wait(timeout=30)
        assert lease.lost.is_set()
    finally:
        lease.withdraw()


def test_vanished_peer_loses_its_shard_after_the_ttl(swarms):
    a, b, c = swarms
    manifest = make_manifest()
    a.publish_manifest(manifest)
    lease_b = LeaseManager(b, manifest.run_id, FAST).claim("expert-0")
    assert lease_b is not None
    now = dht_time()
    b.put_checkpoint(
        CheckpointPointer(
            run_id=manifest.run_id,
            unit="expert-0",
            token=lease_b.fencing_token,
            repo="ckpt",
            revision="abc",
            files={"state.safetensors": "0" * 64},
            step=7,
            steps=20,
            written_time=now,
        )
    )
    b.node.shutdown()  # vanishes without withdrawing; its heartbeat thread stops on the dead DHT

    manager_c = LeaseManager(c, manifest.run_id, FAST)
    assert manager_c.claim("expert-0") is None  # still owned until the TTL runs out
    lease_c = wait_for(lambda: manager_c.claim("expert-0"), timeout=FAST.ttl_period + 30, message="the takeover")
    try:
        token = lease_c.fencing_token
        assert token.owner == c.peer_id and token.attempt == lease_b.fencing_token.attempt + 1
        assert c.latest_checkpoint(manifest.run_id, "expert-0").step == 7  # the next claimant resumes from here
        assert LeaseManager(a, manifest.run_id, FAST).owner("expert-0").peer_id == c.peer_id
    finally:
        manager_c.close()


def test_restarted_peer_keeps_its_peer_id_and_renews_its_claim(swarms, tmp_path):
    a, _, c = swarms
    manifest = make_manifest()
    slow = LeaseSettings(ttl_period=30.0, heartbeat_period=1.0, settle_period=1.0)  # outlive the restart
    config = DHTConfig(
        initial_peers=tuple(a.node.visible_maddrs()), host_maddrs=LOOPBACK, identity_dir=tmp_path / "id"
    )
    first = Swarm(open_dht(config))
    lease = LeaseManager(first, manifest.run_id, slow).claim("expert-1")
    assert lease is not None
    peer_id, claimed_time = first.peer_id, lease.claim.claimed_time
    first.node.shutdown()  # a crash: no withdrawal

    again = Swarm(open_dht(config))
    manager = LeaseManager(again, manifest.run_id, slow)
    try:
        assert again.peer_id == peer_id
        assert LeaseManager(c, manifest.run_id, slow).claim("expert-1") is None  # others still see it owned
        renewed = manager.claim("expert-1")
        assert renewed is not None
        assert renewed.claim.claimed_time == claimed_time  # the same claim, renewed: its place in line is kept
        renewed.update_progress(3, 20, 1.0)
        assert renewed.renew()
        owner = LeaseManager(c, manifest.run_id, slow).owner("expert-1")
        assert owner.peer_id == peer_id and owner.step == 3
        renewed.withdraw()
        assert LeaseManager(c, manifest.run_id, slow).owner("expert-1") is None
    finally:
        manager.close()
        again.node.shutdown()
