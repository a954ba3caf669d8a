"""Read and write a run's records in the DHT: manifests and the runs index, claims, checkpoint pointers, releases,
presence, ensembles and rejections. Writes are signed with our identity; readers keep only records of the right shape
whose signer may write them (the peer ids a record names are its signer's; ensembles and rejections come from the
run's aggregators), and order them by when this reader first saw them, never by the times they state.

    swarm = Swarm(open_dht(DHTConfig(initial_peers=(...,))))
    manifest = swarm.get_manifest(run_id); swarm.put_release(release)
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, TypeVar

from . import keys
from .dht import DHTNode
from .identity import peer_id_of, signer_of
from .records import (
    CheckpointPointer,
    Claim,
    Ensemble,
    PeerPresence,
    Record,
    Rejection,
    Release,
    RunIndexEntry,
    RunManifest,
    parse_record,
)

logger = logging.getLogger(__name__)
R = TypeVar("R", bound=Record)

MANIFEST_PERIOD = 3600.0  # manifests and index entries live this long unless re-announced (the bootstrap node does)
DURABLE_PERIOD = 14 * 24 * 3600.0  # checkpoint pointers, releases, ensembles, rejections: results outlive peers
MAX_CLOCK_SKEW = 3.0  # hivemind's MAX_DHT_TIME_DISCREPANCY_SECONDS
MAX_ENTRIES = 256  # subkeys read per key: a key flooded by many signers is cut here, honest records first in line
MAX_OBSERVED = 100_000  # first-seen times remembered (oldest forgotten first)


def dht_time() -> float:
    from hivemind.utils.timed_storage import get_dht_time

    return get_dht_time()


@dataclass(frozen=True)
class Signed:
    """A record read from a subkey, with the subkey (whose `[owner:...]` key signed it), when it expires, and when
    this reader first saw it (a DHT time measured here, which no writer can backdate)."""

    record: Any
    subkey: bytes
    expiration_time: float
    first_seen: float = 0.0
    holder_since: float = 0.0  # when this reader first saw any record of this signer under this key

    @property
    def signer(self) -> bytes | None:
        return signer_of(self.subkey)

    @property
    def peer_id(self) -> str:
        signer = self.signer
        return peer_id_of(signer) if signer else ""


class Swarm:
    """Typed access to isles records over one DHT peer."""

    def __init__(self, node: DHTNode):
        self.node = node
        self.dht = node.dht
        self.identity = node.identity
        self.peer_id = node.peer_id
        self._seen: dict[tuple, float] = {}
        self._seen_lock = threading.Lock()

    def subkey(self, suffix: str = "") -> bytes:
        return keys.owner_subkey(self.identity.public_key, suffix)

    # --- raw access ---------------------------------------------------------------------------------------------

    def _store(self, key: str, value: dict, expiration_time: float, subkey: Any = None) -> bool:
        ok = self.node.store(key, value, expiration_time, subkey=subkey)
        if not ok:
            logger.debug("store of %s refused or not accepted by any peer", key)
        return bool(ok)

    def first_seen(self, *identity: Any) -> float:
        """When this reader first saw the record `identity` names (now, the first time it is asked)."""
        now = dht_time()
        with self._seen_lock:
            if identity not in self._seen:
                if len(self._seen) >= MAX_OBSERVED:
                    del self._seen[next(iter(self._seen))]
                self._seen[identity] = now
            return self._seen[identity]

    def _get_entries(self, key: str, model: type[R], max_period: float = DURABLE_PERIOD) -> list[Signed]:
        """Every well-formed, unexpired entry of `key` whose signer is every peer it names, parsed as `model`.

        An expiration further ahead than `max_period` (plus clock skew) is a writer squatting: dropped."""
        found = self.node.get(key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        now = dht_time()
        entries = []
        for subkey, item in list(found.value.items())[: MAX_ENTRIES * 4]:
            if not now < item.expiration_time <= now + max_period + MAX_CLOCK_SKEW:
                continue
            record = parse_record(model, item.value)
            if record is None or (signer := signer_of(subkey)) is None:
                continue
            if any(name != peer_id_of(signer) for name in record.signer_ids()):
                logger.debug("dropping a %s that names a peer other than its signer", model.__name__)
                continue
            seen = self.first_seen(key, subkey, _identity(record))
            entries.append(Signed(record, subkey, item.expiration_time, seen, self.first_seen(key, subkey)))
        entries.sort(key=lambda e: (e.first_seen, e.subkey))
        return entries[:MAX_ENTRIES]

    def manifest(self, run_id: str) -> RunManifest | None:
        """The run's manifest (registered on this peer, else looked up)."""
        return self.node.manifests.get(run_id) or self.get_manifest(run_id)

    # --- manifests and the runs index ---------------------------------------------------------------------------

    def publish_manifest(self, manifest: RunManifest, expiration_period: float = MANIFEST_PERIOD) -> bool:
        """Store the manifest under its run's key and add it to the runs index; True if a peer accepted both."""
        self.node.register_run(manifest)
        expiration = dht_time() + expiration_period
        stored = self._store(keys.manifest_key(manifest.run_id), manifest.to_value(), expiration, manifest.run_id)
        entry = RunIndexEntry(
            run_id=manifest.run_id, name=manifest.name, units=len(manifest.units), published_time=dht_time()
        )
        indexed = self._store(keys.RUNS_INDEX, entry.to_value(), expiration, subkey=manifest.run_id)
        return stored and indexed

    def get_manifest(self, run_id: str) -> RunManifest | None:
        found = self.node.get(keys.manifest_key(run_id), latest=True)
        if found is None or not isinstance(found.value, dict) or run_id not in found.value:
            return None
        manifest = parse_record(RunManifest, found.value[run_id].value)
        if manifest is None or manifest.run_id != run_id:
            return None
        self.node.register_run(manifest)
        return manifest

    def list_runs(self) -> list[RunIndexEntry]:
        found = self.node.get(keys.RUNS_INDEX, latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        runs, now = [], dht_time()
        for run_id, item in list(found.value.items())[:MAX_ENTRIES]:
            if item.expiration_time > now + MANIFEST_PERIOD + MAX_CLOCK_SKEW:
                continue  # an index entry squatting for longer than any node announces
            entry = parse_record(RunIndexEntry, item.value)
            if entry is not None and entry.run_id == run_id:
                runs.append(entry)
        return sorted(runs, key=lambda e: (-e.published_time, e.run_id))

    # --- claims (the lease protocol lives in leases.py) -----------------------------------------------------------

    def put_claim(self, claim: Claim, expiration_time: float) -> bool:
        key = keys.claims_key(claim.run_id, claim.unit)
        self.first_seen(key, self.subkey(), _identity(claim))  # our own claim is seen when written
        self.first_seen(key, self.subkey())
        return self._store(key, claim.to_value(), expiration_time, self.subkey())

    def get_claims(self, run_id: str, unit: str) -> list[Signed]:
        from .leases import MAX_TTL_PERIOD

        entries = self._get_entries(keys.claims_key(run_id, unit), Claim, max_period=MAX_TTL_PERIOD + 60.0)
        return [e for e in entries if e.record.run_id == run_id and e.record.unit == unit]

    # --- results of training ------------------------------------------------------------------------------------

    def put_checkpoint(self, pointer: CheckpointPointer, expiration_period: float = DURABLE_PERIOD) -> bool:
        key = keys.checkpoints_key(pointer.run_id, pointer.unit)
        return self._store(key, pointer.to_value(), dht_time() + expiration_period, self.subkey())

    def get_checkpoints(self, run_id: str, unit: str) -> list[Signed]:
        entries = self._get_entries(keys.checkpoints_key(run_id, unit), CheckpointPointer)
        return [e for e in entries if e.record.run_id == run_id and e.record.unit == unit]

    def checkpoints_to_resume(self, run_id: str, unit: str) -> list[CheckpointPointer]:
        """Pointers a next claimant may resume from, furthest step first: signed by the peer whose token they carry,
        strictly inside the recipe's steps (a pointer at or past the last step would be a finished model that its
        resumer publishes as its own) and, once the run's aggregators verify checkpoints, verified by them (or ours).
        The resumer still checks that the checkpoint loads with the recipe."""
        from .witness import get_verified, run_verifies

        pointers = self.valid_checkpoints(run_id, unit)
        verified = {(v.holder, v.attempt, v.revision) for v in get_verified(self, run_id, unit)}
        if verified or run_verifies(self, run_id):  # the aggregators verify checkpoints: only those (and ours) count
            mine = self.subkey()
            pointers = [
                e
                for e in pointers
                if e.subkey == mine or (e.peer_id, e.record.token.attempt, e.record.revision) in verified
            ]
        pointers.sort(key=lambda e: (-e.record.step, e.first_seen))
        return [e.record for e in pointers]

    def valid_checkpoints(self, run_id: str, unit: str) -> list[Signed]:
        """Signed pointers strictly inside the recipe's steps (the rest count for nothing, progress included)."""
        manifest = self.manifest(run_id)
        if manifest is None or unit not in manifest.units:
            return []
        steps = recipe_steps(manifest, unit)
        return [e for e in self.get_checkpoints(run_id, unit) if 0 < e.record.step < steps]

    def latest_checkpoint(self, run_id: str, unit: str) -> CheckpointPointer | None:
        """The checkpoint to resume from: the furthest valid step, then the first seen."""
        return next(iter(self.checkpoints_to_resume(run_id, unit)), None)

    def put_release(self, release: Release, expiration_period: float = DURABLE_PERIOD) -> bool:
        key = keys.releases_key(release.run_id, release.unit)
        subkey = self.subkey(f"{release.token.attempt}:{release.revision}")
        return self._store(key, release.to_value(), dht_time() + expiration_period, subkey)

    def get_releases(self, run_id: str, unit: str) -> list[Release]:
        """A unit's releases in the order this reader first saw them (a stated `released_time` counts for nothing)."""
        entries = self._get_entries(keys.releases_key(run_id, unit), Release)
        return [e.record for e in entries if e.record.run_id == run_id and e.record.unit == unit]

    # --- presence, ensemble, rejections -------------------------------------------------------------------------

    def put_presence(self, run_id: str, presence: PeerPresence, expiration_period: float) -> bool:
        return self._store(
            keys.presence_key(run_id), presence.to_value(), dht_time() + expiration_period, self.subkey()
        )

    def get_presence(self, run_id: str) -> list[PeerPresence]:
        return sorted((e.record for e in self._get_entries(keys.presence_key(run_id), PeerPresence)), key=_by_peer)

    def put_ensemble(self, ensemble: Ensemble, expiration_period: float = DURABLE_PERIOD) -> bool:
        key = keys.ensemble_key(ensemble.run_id)
        return self._store(key, ensemble.to_value(), dht_time() + expiration_period, self.subkey())

    def from_aggregators(self, run_id: str, key: str, model: type[R]) -> list[Signed]:
        """Entries of `key` signed by a key the run's (owner-signed) manifest names as aggregator."""
        manifest = self.manifest(run_id)
        if manifest is None:
            return []
        entries = self._get_entries(key, model)
        return [e for e in entries if e.record.run_id == run_id and manifest.may_aggregate(e.signer)]

    def get_ensembles(self, run_id: str) -> list[Ensemble]:
        """The run's aggregators' ensembles, oldest first (as first seen here, then as stated)."""
        entries = self.from_aggregators(run_id, keys.ensemble_key(run_id), Ensemble)
        return [e.record for e in sorted(entries, key=lambda e: (e.first_seen, e.record.published_time))]

    def latest_ensemble(self, run_id: str) -> Ensemble | None:
        ensembles = self.get_ensembles(run_id)
        return ensembles[-1] if ensembles else None

    def put_rejection(self, rejection: Rejection, expiration_period: float = DURABLE_PERIOD) -> bool:
        key = keys.rejections_key(rejection.run_id)
        subkey = self.subkey(f"{rejection.unit}:{rejection.token.attempt}:{rejection.revision}")
        return self._store(key, rejection.to_value(), dht_time() + expiration_period, subkey)

    def get_rejections(self, run_id: str) -> list[Rejection]:
        """The releases the run's aggregators refused (anyone else's "rejection" is dropped)."""
        return [e.record for e in self.from_aggregators(run_id, keys.rejections_key(run_id), Rejection)]


def _by_peer(presence: PeerPresence) -> str:
    return presence.peer_id


def recipe_steps(manifest: RunManifest, unit: str) -> int:
    """A unit's training steps as the manifest's recipe says (never as a record says)."""
    if unit == manifest.units[-1]:
        return manifest.router.steps
    return manifest.experts[manifest.units.index(unit)].steps


def _identity(record: Record) -> tuple:
    """What makes a record new for first-seen purposes: a claim's attempt, a result's revision and step."""
    return tuple(getattr(record, name, None) for name in ("attempt", "claimed_time", "revision", "step"))
