"""Releases: a finished unit's published weights and the numbers the aggregator checks (one subkey per signer,
attempt and revision). One record type in one home: schema, key and accessors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic.v1 import StrictFloat, StrictStr

from .record_base import DURABLE_PERIOD, NonNegInt, Record, RecordType, dht_time, looks_like_peer_id
from .record_claim import FencingToken

if TYPE_CHECKING:
    from .swarm import Swarm


class Release(Record):
    """A finished unit: its published weights and the numbers the aggregator checks."""

    run_id: StrictStr
    unit: StrictStr
    token: FencingToken
    repo: StrictStr
    revision: StrictStr
    files: dict[StrictStr, StrictStr]
    objective: StrictStr = "fm"
    steps: NonNegInt
    flops: StrictFloat = 0.0
    final_loss: StrictFloat | None = None
    val_loss: StrictFloat | None = None
    hardware: StrictStr = ""
    wall_period: StrictFloat = 0.0
    released_time: StrictFloat
    resumed_from_step: NonNegInt | None = None  # where training picked up another attempt's checkpoint, if it did
    volunteer: StrictStr = ""  # the volunteer's display name, for the model card
    chain_head: StrictStr = ""  # the head of its checkpoint chain (protocol/chain.py; the links are in its files)

    def signer_ids(self) -> list[str]:
        # The display name is self-chosen, but may not be another peer's id (a release "by" someone else).
        return [self.token.owner] + ([self.volunteer] if looks_like_peer_id(self.volunteer) else [])


RECORD = RecordType("releases", Release, per_unit=True)


def releases_key(run_id: str, unit: str) -> str:
    return RECORD.key(run_id, unit)


def put_release(swarm: Swarm, release: Release, expiration_period: float = DURABLE_PERIOD) -> bool:
    key = releases_key(release.run_id, release.unit)
    subkey = swarm.subkey(f"{release.token.attempt}:{release.revision}")
    return swarm._store(key, release.to_value(), dht_time() + expiration_period, subkey)


def get_releases(swarm: Swarm, run_id: str, unit: str) -> list[Release]:
    """A unit's releases in the order this reader first saw them (a stated `released_time` counts for nothing)."""
    entries = swarm._get_entries(releases_key(run_id, unit), Release)
    return [e.record for e in entries if e.record.run_id == run_id and e.record.unit == unit]
