"""Ensembles: an aggregator's published ensemble, its revision and which releases went into it. One record type in
one home: schema, key and accessors; readers count only ensembles signed by the run's aggregators.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic.v1 import StrictBool, StrictFloat, StrictStr

from .record_base import DURABLE_PERIOD, Record, RecordType, dht_time
from .record_claim import FencingToken

if TYPE_CHECKING:
    from .swarm import Swarm


class Ensemble(Record):
    """The aggregator's published ensemble: the revision and which releases went into it."""

    run_id: StrictStr
    repo: StrictStr
    revision: StrictStr
    files: dict[StrictStr, StrictStr]
    experts: list[FencingToken]
    router: FencingToken | None = None
    complete: StrictBool = False
    published_time: StrictFloat
    peer_id: StrictStr

    def signer_ids(self) -> list[str]:
        return [self.peer_id]


RECORD = RecordType("ensemble", Ensemble)


def ensemble_key(run_id: str) -> str:
    return RECORD.key(run_id)


def put_ensemble(swarm: Swarm, ensemble: Ensemble, expiration_period: float = DURABLE_PERIOD) -> bool:
    key = ensemble_key(ensemble.run_id)
    return swarm._store(key, ensemble.to_value(), dht_time() + expiration_period, swarm.subkey())


def get_ensembles(swarm: Swarm, run_id: str) -> list[Ensemble]:
    """The run's aggregators' ensembles, oldest first (as first seen here, then as stated)."""
    entries = swarm.from_aggregators(run_id, ensemble_key(run_id), Ensemble)
    return [e.record for e in sorted(entries, key=lambda e: (e.first_seen, e.record.published_time))]


def latest_ensemble(swarm: Swarm, run_id: str) -> Ensemble | None:
    ensembles = get_ensembles(swarm, run_id)
    return ensembles[-1] if ensembles else None
