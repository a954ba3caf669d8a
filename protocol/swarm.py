"""Read and write a run's records in the DHT: manifests and the runs index, claims, checkpoint pointers, releases,
presence, ensembles and rejections. Writes are signed with our identity; reads skip records of the wrong shape.

    swarm = Swarm(open_dht(DHTConfig(initial_peers=(...,))))
    manifest = swarm.get_manifest(run_id); swarm.put_release(release)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, TypeVar

from . import keys
from .dht import DHTNode
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


def dht_time() -> float:
    from hivemind.utils.timed_storage import get_dht_time

    return get_dht_time()


@dataclass(frozen=True)
class Signed:
    """A record read from a subkey, with the subkey (who wrote it) and when it expires."""

    record: Any
    subkey: bytes
    expiration_time: float


class Swarm:
    """Typed access to isles records over one DHT peer."""

    def __init__(self, node: DHTNode):
        self.node = node
        self.dht = node.dht
        self.identity = node.identity
        self.peer_id = node.peer_id

    def subkey(self, suffix: str = "") -> bytes:
        return keys.owner_subkey(self.identity.public_key, suffix)

    # --- raw access ---------------------------------------------------------------------------------------------

    def _store(self, key: str, value: dict, expiration_time: float, subkey: Any = None) -> bool:
        ok = self.node.store(key, value, expiration_time, subkey=subkey)
        if not ok:
            logger.debug("store of %s refused or not accepted by any peer", key)
        return bool(ok)

    def _get_entries(self, key: str, model: type[R]) -> list[Signed]:
        """Every well-formed, unexpired subkey entry of `key`, parsed as `model`."""
        found = self.node.get(key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        now = dht_time()
        entries = []
        for subkey, item in found.value.items():
            if item.expiration_time <= now:
                continue
            record = parse_record(model, item.value)
            if record is not None:
                entries.append(Signed(record, subkey, item.expiration_time))
        return entries

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
        runs = []
        for run_id, item in found.value.items():
            entry = parse_record(RunIndexEntry, item.value)
            if entry is not None and entry.run_id == run_id:
                runs.append(entry)
        return sorted(runs, key=lambda e: (-e.published_time, e.run_id))

    # --- claims (the lease protocol lives in leases.py) -----------------------------------------------------------

    def put_claim(self, claim: Claim, expiration_time: float) -> bool:
        return self._store(keys.claims_key(claim.run_id, claim.unit), claim.to_value(), expiration_time, self.subkey())

    def get_claims(self, run_id: str, unit: str) -> list[Signed]:
        entries = self._get_entries(keys.claims_key(run_id, unit), Claim)
        return [e for e in entries if e.record.run_id == run_id and e.record.unit == unit]

    # --- results of training ------------------------------------------------------------------------------------

    def put_checkpoint(self, pointer: CheckpointPointer, expiration_period: float = DURABLE_PERIOD) -> bool:
        key = keys.checkpoints_key(pointer.run_id, pointer.unit)
        return self._store(key, pointer.to_value(), dht_time() + expiration_period, self.subkey())

    def get_checkpoints(self, run_id: str, unit: str) -> list[CheckpointPointer]:
        entries = self._get_entries(keys.checkpoints_key(run_id, unit), CheckpointPointer)
        return [e.record for e in entries if e.record.run_id == run_id and e.record.unit == unit]

    def latest_checkpoint(self, run_id: str, unit: str) -> CheckpointPointer | None:
        """The checkpoint to resume from: the furthest step, then the newest."""
        pointers = self.get_checkpoints(run_id, unit)
        return max(pointers, key=lambda p: (p.step, p.written_time), default=None)

    def put_release(self, release: Release, expiration_period: float = DURABLE_PERIOD) -> bool:
        key = keys.releases_key(release.run_id, release.unit)
        subkey = self.subkey(f"{release.token.attempt}:{release.revision}")
        return self._store(key, release.to_value(), dht_time() + expiration_period, subkey)

    def get_releases(self, run_id: str, unit: str) -> list[Release]:
        entries = self._get_entries(keys.releases_key(run_id, unit), Release)
        releases = [e.record for e in entries if e.record.run_id == run_id and e.record.unit == unit]
        return sorted(releases, key=lambda r: (r.released_time, r.token.owner))

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

    def get_ensembles(self, run_id: str) -> list[Ensemble]:
        entries = self._get_entries(keys.ensemble_key(run_id), Ensemble)
        return sorted((e.record for e in entries if e.record.run_id == run_id), key=lambda e: e.published_time)

    def latest_ensemble(self, run_id: str) -> Ensemble | None:
        ensembles = self.get_ensembles(run_id)
        return ensembles[-1] if ensembles else None

    def put_rejection(self, rejection: Rejection, expiration_period: float = DURABLE_PERIOD) -> bool:
        key = keys.rejections_key(rejection.run_id)
        subkey = self.subkey(f"{rejection.unit}:{rejection.token.attempt}:{rejection.revision}")
        return self._store(key, rejection.to_value(), dht_time() + expiration_period, subkey)

    def get_rejections(self, run_id: str) -> list[Rejection]:
        entries = self._get_entries(keys.rejections_key(run_id), Rejection)
        return sorted((e.record for e in entries if e.record.run_id == run_id), key=lambda r: r.rejected_time)


def _by_peer(presence: PeerPresence) -> str:
    return presence.peer_id
