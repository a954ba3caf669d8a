"""Read and write a run's records in the DHT, every record type through its own module (the manifest and runs index,
claims, checkpoint pointers, releases, presence, ensembles, rejections, verified checkpoints). Writes are
signed with our identity; readers keep only records of the right shape whose signer may write them (the peer ids a
record names are its signer's; ensembles and rejections come from the run's aggregators), and order them by when this
reader first saw them, never by the times they state.

    swarm = Swarm(open_dht(DHTConfig(initial_peers=(...,))))
    manifest = swarm.get_manifest(run_id); swarm.put_release(release)
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, TypeVar

from . import (
    keys,
    record_checkpoint,
    record_claim,
    record_ensemble,
    record_manifest,
    record_presence,
    record_rejection,
    record_release,
)
from .dht import DHTNode
from .identity import peer_id_of, signer_of
from .record_base import DURABLE_PERIOD, Record, dht_time, first_seen_identity, parse_record
from .record_checkpoint import CheckpointPointer
from .record_claim import Claim
from .record_ensemble import Ensemble
from .record_manifest import MANIFEST_PERIOD as MANIFEST_PERIOD
from .record_manifest import RunIndexEntry, RunManifest
from .record_manifest import recipe_steps as recipe_steps
from .record_presence import PeerPresence
from .record_rejection import Rejection
from .record_release import Release

logger = logging.getLogger(__name__)
R = TypeVar("R", bound=Record)

MAX_CLOCK_SKEW = 3.0  # hivemind's MAX_DHT_TIME_DISCREPANCY_SECONDS
MAX_ENTRIES = 256  # subkeys read per key: a key flooded by many signers is cut here, honest records first in line
MAX_KEYS_PER_SCAN = 64  # keys looked up in one DHT traversal (a run's units, when a peer looks for one to claim)
MAX_OBSERVED = 100_000  # first-seen times remembered (oldest forgotten first)


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
        return self._entries(key, self.node.get(key, latest=True), model, max_period)

    def _scan_entries(
        self, keys_: list[str], model: type[R], max_period: float = DURABLE_PERIOD
    ) -> dict[str, list[Signed]]:
        """`_get_entries` of several keys, from a scan (`DHTNode.scan`, `MAX_KEYS_PER_SCAN` keys at a time): cheaper
        than a read per key and possibly missing the newest records, so a hint for choices a full read confirms."""
        found: dict[str, Any] = {}
        for start in range(0, len(keys_), MAX_KEYS_PER_SCAN):
            found.update(self.node.scan(keys_[start : start + MAX_KEYS_PER_SCAN]))
        return {key: self._entries(key, found.get(key), model, max_period) for key in keys_}

    def _entries(self, key: str, found: Any, model: type[R], max_period: float) -> list[Signed]:
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
            seen = self.first_seen(key, subkey, first_seen_identity(record))
            entries.append(Signed(record, subkey, item.expiration_time, seen, self.first_seen(key, subkey)))
        entries.sort(key=lambda e: (e.first_seen, e.subkey))
        return entries[:MAX_ENTRIES]

    def from_aggregators(self, run_id: str, key: str, model: type[R]) -> list[Signed]:
        """Entries of `key` signed by a key the run's (owner-signed) manifest names as aggregator."""
        manifest = self.manifest(run_id)
        if manifest is None:
            return []
        entries = self._get_entries(key, model)
        return [e for e in entries if e.record.run_id == run_id and manifest.may_aggregate(e.signer)]

    def manifest(self, run_id: str) -> RunManifest | None:
        """The run's manifest (registered on this peer, else looked up)."""
        return self.node.manifests.get(run_id) or self.get_manifest(run_id)

    # --- manifests and the runs index (protocol/record_manifest.py) -----------------------------------------------

    def publish_manifest(self, manifest: RunManifest, expiration_period: float = MANIFEST_PERIOD) -> bool:
        return record_manifest.publish_manifest(self, manifest, expiration_period)

    def get_manifest(self, run_id: str) -> RunManifest | None:
        return record_manifest.get_manifest(self, run_id)

    def list_runs(self) -> list[RunIndexEntry]:
        return record_manifest.list_runs(self)

    # --- each record type's accessors, kept as methods for their callers (its module holds the code) -------------
    # A new record type needs none here: its module's functions take the Swarm (protocol/witness.py).

    def put_claim(self, claim: Claim, expiration_time: float) -> bool:
        return record_claim.put_claim(self, claim, expiration_time)

    def get_claims(self, run_id: str, unit: str) -> list[Signed]:
        return record_claim.get_claims(self, run_id, unit)

    def scan_claims(self, run_id: str, units: list[str]) -> dict[str, list[Signed]]:
        return record_claim.scan_claims(self, run_id, units)

    def put_checkpoint(self, pointer: CheckpointPointer, expiration_period: float = DURABLE_PERIOD) -> bool:
        return record_checkpoint.put_checkpoint(self, pointer, expiration_period)

    def get_checkpoints(self, run_id: str, unit: str) -> list[Signed]:
        return record_checkpoint.get_checkpoints(self, run_id, unit)

    def checkpoints_to_resume(self, run_id: str, unit: str) -> list[CheckpointPointer]:
        return record_checkpoint.checkpoints_to_resume(self, run_id, unit)

    def valid_checkpoints(self, run_id: str, unit: str) -> list[Signed]:
        return record_checkpoint.valid_checkpoints(self, run_id, unit)

    def latest_checkpoint(self, run_id: str, unit: str) -> CheckpointPointer | None:
        return record_checkpoint.latest_checkpoint(self, run_id, unit)

    def put_release(self, release: Release, expiration_period: float = DURABLE_PERIOD) -> bool:
        return record_release.put_release(self, release, expiration_period)

    def get_releases(self, run_id: str, unit: str) -> list[Release]:
        return record_release.get_releases(self, run_id, unit)

    def put_presence(self, run_id: str, presence: PeerPresence, expiration_period: float) -> bool:
        return record_presence.put_presence(self, run_id, presence, expiration_period)

    def get_presence(self, run_id: str) -> list[PeerPresence]:
        return record_presence.get_presence(self, run_id)

    def put_ensemble(self, ensemble: Ensemble, expiration_period: float = DURABLE_PERIOD) -> bool:
        return record_ensemble.put_ensemble(self, ensemble, expiration_period)

    def get_ensembles(self, run_id: str) -> list[Ensemble]:
        return record_ensemble.get_ensembles(self, run_id)

    def latest_ensemble(self, run_id: str) -> Ensemble | None:
        return record_ensemble.latest_ensemble(self, run_id)

    def put_rejection(self, rejection: Rejection, expiration_period: float = DURABLE_PERIOD) -> bool:
        return record_rejection.put_rejection(self, rejection, expiration_period)

    def get_rejections(self, run_id: str) -> list[Rejection]:
        return record_rejection.get_rejections(self, run_id)
