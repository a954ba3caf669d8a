"""Swarm records: content-addressed manifests, strict schemas enforced by real DHT peers on 127.0.0.1, owner-signed
subkeys, and persistent identities. Run: pytest tests/test_records.py -q
"""

from __future__ import annotations

import os
import stat

import pydantic.v1 as pydantic
import pytest

from isles.protocol import keys
from isles.protocol.dht import DHTConfig, open_dht
from isles.protocol.errors import IslesError
from isles.protocol.identity import ephemeral_identity, load_identity
from isles.protocol.records import (
    Claim,
    ExpertRecipe,
    RouterRecipe,
    RunManifest,
    ShardRef,
    load_manifest_json,
    parse_record,
)
from isles.protocol.swarm import Swarm, dht_time

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)
_OWNER = ephemeral_identity()
_OWNER.forget_key_file()


def make_manifest(
    num_shards: int = 2, name: str = "test-run", owner=None, aggregators=(), router_text: bool = False, **fields
) -> RunManifest:
    """A small valid manifest signed by `owner` (an Identity; a throwaway one by default); other tests import it."""
    return RunManifest.create(
        signer=owner or _OWNER,
        aggregators=aggregators,
        name=name,
        dataset="digits",
        store="/tmp/isles-test-store",
        shards=[
            ShardRef(
                repo="shards",
                revision="r1",
                path=f"shard-{i}.safetensors",
                sha256="0" * 64,
                items=100,
                val_items=10,
                cluster=i,
            )
            for i in range(num_shards)
        ],
        experts=fields.pop("experts", None)
        or [
            ExpertRecipe(preset="unet-tiny", channels=1, resolution=8, steps=20, global_batch=8, lr=1e-3)
            for _ in range(num_shards)
        ],
        router=RouterRecipe(preset="router-tiny", steps=20, global_batch=8, lr=1e-3, text_aware=router_text),
        **fields,
    )


def start_peers(count: int, first=None, **config) -> list:
    """`count` DHT peers on loopback, each joining through `first` (or the first one started here)."""
    nodes = []
    for _ in range(count):
        anchor = first or (nodes[0] if nodes else None)
        peers = tuple(anchor.visible_maddrs()) if anchor else ()
        nodes.append(open_dht(DHTConfig(initial_peers=peers, host_maddrs=LOOPBACK, **config)))
    return nodes


@pytest.fixture
def peers():
    """Three connected peers; shut down at teardown."""
    nodes = start_peers(3)
    yield nodes
    for node in nodes:
        node.shutdown()


# --- records without a network ------------------------------------------------------------------------------------


def test_run_id_covers_the_whole_manifest():
    manifest = make_manifest()
    assert len(manifest.run_id) == 16
    assert manifest.units == ["expert-0", "expert-1", "router"]
    again = RunManifest.parse_raw(manifest.json())
    assert again == manifest and again.run_id == manifest.run_id
    assert make_manifest(name="other").run_id != manifest.run_id

    tampered = manifest.dict()
    tampered["experts"][0]["steps"] = 10_000
    with pytest.raises(pydantic.ValidationError, match="does not match"):
        RunManifest.parse_obj(tampered)
    with pytest.raises(IslesError, match="not a valid run manifest") as info:
        load_manifest_json(RunManifest.construct(**tampered).json(), source="m.json")
    assert info.value.hint


def test_records_are_strict_and_keep_unknown_fields():
    now = dht_time()
    claim = Claim(run_id="r", unit="expert-0", peer_id="p", claimed_time=now, heartbeat_time=now)
    value = claim.to_value()
    assert parse_record(Claim, value) == claim
    assert parse_record(Claim, {**value, "step": 1.0}) is None  # a float where an int belongs: no conversion
    assert parse_record(Claim, {**value, "state": "mine"}) is None
    assert parse_record(Claim, "not a dict") is None
    newer = parse_record(Claim, {**value, "gpu_temperature": 71})  # a field from a newer version is kept
    assert newer is not None and newer.dict()["gpu_temperature"] == 71
    assert claim.token.owner == "p" and claim.token.attempt == 1


def test_identity_persists_with_private_files(tmp_path):
    folder = tmp_path / "identity"
    first = load_identity(folder)
    second = load_identity(folder)
    assert first.peer_id == second.peer_id and first.peer_id
    assert first.public_key == second.public_key and first.public_key.startswith(b"[owner:ssh-rsa ")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    (folder / "signing.key").write_bytes(b"garbage")
    os.chmod(folder / "signing.key", 0o600)
    with pytest.raises(IslesError, match="damaged"):
        load_identity(folder)


def test_manifests_from_before_text_aware_routers_keep_their_run_id():
    """A text-blind router recipe serialises without text_aware, as every manifest did before text-aware routers
    existed: those manifests (their run_id hashes that form) still load; a text-aware router needs captions."""
    manifest = make_manifest()
    value = manifest.to_value()
    assert "text_aware" not in value["router"] and "requires_protocol" not in value
    reloaded = RunManifest.parse_obj(value)
    assert reloaded.run_id == manifest.run_id and reloaded.router.text_aware is False
    with pytest.raises(pydantic.ValidationError, match="text-aware router needs text-conditioned experts"):
        make_manifest(router_text=True)


def test_a_manifest_is_signed_by_the_owner_it_names_who_names_the_aggregators():
    owner, aggregator, stranger = (ephemeral_identity() for _ in range(3))
    manifest = make_manifest(owner=owner)
    assert manifest.owner == owner.owner_key and manifest.aggregators == [owner.owner_key]
    assert manifest.may_aggregate(owner.public_key) and not manifest.may_aggregate(stranger.public_key)
    named = make_manifest(owner=owner, aggregators=[aggregator.owner_key])
    assert named.may_aggregate(aggregator.public_key) and not named.may_aggregate(owner.public_key)
    assert named.run_id != manifest.run_id  # the authority is part of the run: nobody can swap it under the same id

    # A stranger re-signing the owner's run as its own, or the owner's signature on other content, is refused.
    value = manifest.dict()
    for forged in (
        {**value, "owner": stranger.owner_key},
        {**value, "aggregators": [stranger.owner_key], "signature": value["signature"]},
        {**value, "signature": stranger.sign(b"anything")},
        {k: v for k, v in value.items() if k != "signature"},
    ):
        with pytest.raises(pydantic.ValidationError):
            RunManifest.parse_obj(forged)
    for identity in (owner, aggregator, stranger):
        identity.forget_key_file()


# --- records in a real swarm ----------------------------------------------------------------------------------------


def test_manifest_round_trip_and_runs_index(peers):
    a, b, c = (Swarm(node) for node in peers)
    manifest = make_manifest()
    assert a.publish_manifest(manifest)
    assert c.get_manifest(manifest.run_id) == manifest
    assert [e.run_id for e in b.list_runs()] == [manifest.run_id]
    assert b.get_manifest("0" * 16) is None


def test_a_run_that_needs_a_newer_isles_is_refused_with_the_upgrade_hint(peers):
    """Records allow fields they do not know, so without the version an older client would train a newer run's
    recipes as something else (e.g. a text-aware router as a text-blind one); instead it refuses the run."""
    from isles.client.run_access import find_manifest
    from isles.protocol.record_manifest import PROTOCOL_VERSION

    a, b, _ = (Swarm(node) for node in peers)
    newer, current = make_manifest(requires_protocol=PROTOCOL_VERSION + 1), make_manifest(name="current")
    assert a.publish_manifest(newer) and a.publish_manifest(current)
    with pytest.raises(IslesError, match=f"needs isles protocol {PROTOCOL_VERSION + 1}") as err:
        find_manifest(b, newer.run_id, timeout=30)
    assert "pip install -U isles" in err.value.hint
    assert find_manifest(b, current.run_id, timeout=30) == current
    # What a run uses sets the version its manifest records: a ddpm-v expert needs version 2.
    experts = [ExpertRecipe(preset="unet-tiny", channels=1, resolution=8, steps=20, global_batch=8, lr=1e-3,
                            objective=objective) for objective in ("fm", "ddpm-v")]  # fmt: skip
    assert make_manifest(experts=experts).requires_protocol == 2


def test_manifest_that_does_not_match_its_run_id_is_refused(peers):
    a, b, c = (Swarm(node) for node in peers)
    manifest, other = make_manifest(), make_manifest(name="other")
    for swarm in (a, b, c):
        swarm.node.register_run(manifest)
    key, expiration = keys.manifest_key(manifest.run_id), dht_time() + 60
    tampered = {**manifest.to_value(), "name": "hijacked"}
    assert not b.node.store(key, tampered, expiration, subkey=manifest.run_id)
    # a valid manifest of another run under this run's key is refused too
    assert not b.node.store(key, other.to_value(), expiration, subkey=manifest.run_id)
    assert c.get_manifest(manifest.run_id) is None
    assert a.publish_manifest(manifest)
    assert c.get_manifest(manifest.run_id) == manifest


def test_claim_under_another_peers_subkey_is_refused(peers):
    a, b, c = (Swarm(node) for node in peers)
    manifest = make_manifest()
    now = dht_time()
    claim = Claim(run_id=manifest.run_id, unit="expert-0", peer_id=a.peer_id, claimed_time=now, heartbeat_time=now)
    assert a.put_claim(claim, now + 30)
    forged = claim.copy(update=dict(peer_id=b.peer_id, claimed_time=now - 100)).to_value()
    key = keys.claims_key(manifest.run_id, "expert-0")
    assert not b.node.store(key, forged, now + 40, subkey=a.subkey())
    claims = c.get_claims(manifest.run_id, "expert-0")
    assert [(e.record.peer_id, e.subkey) for e in claims] == [(a.peer_id, a.subkey())]


def test_record_of_the_wrong_shape_is_refused_at_store_and_ignored_at_read(peers):
    a, b, c = (Swarm(node) for node in peers)
    manifest = make_manifest()
    for swarm in (a, b, c):
        swarm.node.register_run(manifest)
    key, now = keys.claims_key(manifest.run_id, "expert-1"), dht_time()
    bad = {"run_id": manifest.run_id, "unit": "expert-1", "peer_id": b.peer_id, "claimed_time": "yesterday"}
    assert not b.node.store(key, bad, now + 30, subkey=b.subkey())  # refused by every peer that knows the run

    # A peer that never registered the run keeps the bad record for itself; readers that know the run drop it.
    (stranger_node,) = start_peers(1, first=peers[0])
    try:
        stranger = Swarm(stranger_node)
        stranger.node.store(key, {**bad, "peer_id": stranger.peer_id}, now + 30, subkey=stranger.subkey())
        raw = stranger.node.get(key)
        assert raw is not None and stranger.subkey() in raw.value  # it is really out there
        assert c.get_claims(manifest.run_id, "expert-1") == []
        assert stranger.get_claims(manifest.run_id, "expert-1") == []  # typed readers skip it even unregistered
    finally:
        stranger_node.shutdown()


def test_unreachable_initial_peer_is_an_actionable_error():
    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooW9vCHSQ8kAKMD3g6wswQ92qKpK3huzeghnXErzQuXwyFi"
    with pytest.raises(IslesError, match="could not reach") as info:
        open_dht(DHTConfig(initial_peers=(dead,), host_maddrs=LOOPBACK, startup_timeout=10))
    assert "1." in info.value.hint and "--announce-maddrs" in info.value.hint
