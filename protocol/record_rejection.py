"""Rejections: a release the aggregator refused, and why, so its volunteer and `isles status` can see it (one
subkey per release). One record type in one home: schema, key and accessors; readers count only rejections signed
by the run's aggregators.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic.v1 import StrictFloat, StrictStr

from .record_base import DURABLE_PERIOD, Record, RecordType, dht_time
from .record_claim import FencingToken

if TYPE_CHECKING:
    from .swarm import Swarm


class Rejection(Record):
    """A release the aggregator refused, and why (so its volunteer, and `isles status`, can see it)."""

    run_id: StrictStr
    unit: StrictStr
    token: FencingToken
    revision: StrictStr
    reason: StrictStr
    rejected_time: StrictFloat
    peer_id: StrictStr

    def signer_ids(self) -> list[str]:
        return [self.peer_id]


RECORD = RecordType("rejections", Rejection)


def rejections_key(run_id: str) -> str:
    return RECORD.key(run_id)


def put_rejection(swarm: Swarm, rejection: Rejection, expiration_period: float = DURABLE_PERIOD) -> bool:
    key = rejections_key(rejection.run_id)
    subkey = swarm.subkey(f"{rejection.unit}:{rejection.token.attempt}:{rejection.revision}")
    return swarm._store(key, rejection.to_value(), dht_time() + expiration_period, subkey)


def get_rejections(swarm: Swarm, run_id: str) -> list[Rejection]:
    """The releases the run's aggregators refused (anyone else's "rejection" is dropped)."""
    return [e.record for e in swarm.from_aggregators(run_id, rejections_key(run_id), Rejection)]
