"""Verified checkpoints: the run's aggregators download each lease holder's newest pushed checkpoint, check that it
loads into the recipe's model and advances, and sign what they verified. One record type in one home: its schema,
DHT key, reader rule and accessors are all here (protocol/record_types.py lists it for the run's validator).

Readers use them twice: a resumer installs only checkpoints an aggregator verified (or its own), and a lease holder
shows progress only by verified checkpoints, once the run's aggregators verify any; so a pointer from a peer that
never held the lease, or a holder pushing pointers at garbage, neither seeds a resumer nor keeps its lease.
"""

from __future__ import annotations

import time

from pydantic.v1 import StrictFloat, StrictStr

from .record_base import DURABLE_PERIOD, Attempt, NonNegInt, Record, RecordType, dht_time

FIELD = "verified"  # the run's schema field (one key per unit): f"{FIELD}_{unit}"
RECHECK_PERIOD = 30.0  # how long a reader trusts "nobody verifies this run's checkpoints" before looking again


class VerifiedCheckpoint(Record):
    """An aggregator's word that the holder's pointer at `revision` loads into the recipe's model at `step`."""

    run_id: StrictStr
    unit: StrictStr
    holder: StrictStr  # the pointer's signer (peer id)
    attempt: Attempt
    repo: StrictStr
    revision: StrictStr
    step: NonNegInt
    verified_time: StrictFloat
    peer_id: StrictStr  # the aggregator
    sha256: StrictStr = ""  # of the checkpoint file: the holder's release must carry it on its chain ...
    chain_link: StrictStr = ""  # ... with this link (the history the holder committed to when it pushed it)

    def signer_ids(self) -> list[str]:
        return [self.peer_id]


RECORD = RecordType(FIELD, VerifiedCheckpoint, per_unit=True)


def verified_key(run_id: str, unit: str) -> str:
    return RECORD.key(run_id, unit)


def put_verified(swarm, record: VerifiedCheckpoint, expiration_period: float | None = None) -> bool:
    subkey = swarm.subkey(f"{record.holder}:{record.attempt}")  # one record per holder and attempt: the newest
    expiration = dht_time() + (expiration_period or DURABLE_PERIOD)
    return swarm._store(verified_key(record.run_id, record.unit), record.to_value(), expiration, subkey)


def get_verified(swarm, run_id: str, unit: str) -> list[VerifiedCheckpoint]:
    """What the run's aggregators verified of `unit` (anyone else's word is dropped), oldest first seen first."""
    return [e.record for e in verified_entries(swarm, run_id, unit)]


def run_verifies(swarm, run_id: str) -> bool:
    """Whether the run's aggregators verify checkpoints (some unit has a verified one). Once they do, only verified
    checkpoints count, in every unit: a unit whose pointers never verified has none to resume from and no progress."""
    cache = swarm.__dict__.setdefault("_run_verifies", {})
    state = cache.get(run_id)
    if state is True:
        return True
    if state is not None and time.monotonic() - state < RECHECK_PERIOD:
        return False
    manifest = swarm.manifest(run_id)
    found = manifest is not None and any(verified_entries(swarm, run_id, unit) for unit in manifest.units)
    cache[run_id] = True if found else time.monotonic()
    return found


def verified_entries(swarm, run_id: str, unit: str) -> list:
    """The same, as `Signed` entries (with when this reader first saw each)."""
    entries = swarm.from_aggregators(run_id, verified_key(run_id, unit), VerifiedCheckpoint)
    return [e for e in entries if e.record.unit == unit]
