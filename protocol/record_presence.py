"""Presence: a peer's health in a run (one subkey per peer), re-announced by its heartbeat and set to OFFLINE on a
clean exit. One record type in one home: schema, key and accessors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic.v1 import StrictFloat, StrictStr

from .record_base import Record, RecordType, dht_time

if TYPE_CHECKING:
    from .swarm import Swarm

PresenceState = Literal["JOINING", "TRAINING", "IDLE", "OFFLINE"]


class PeerPresence(Record):
    """A peer's health in a run, re-announced by a heartbeat and set to OFFLINE on a clean exit."""

    peer_id: StrictStr
    state: PresenceState
    unit: StrictStr | None = None
    updated_time: StrictFloat
    hardware: StrictStr = ""
    version: StrictStr = ""

    def signer_ids(self) -> list[str]:
        return [self.peer_id]


RECORD = RecordType("peers", PeerPresence)


def presence_key(run_id: str) -> str:
    return RECORD.key(run_id)


def put_presence(swarm: Swarm, run_id: str, presence: PeerPresence, expiration_period: float) -> bool:
    return swarm._store(presence_key(run_id), presence.to_value(), dht_time() + expiration_period, swarm.subkey())


def get_presence(swarm: Swarm, run_id: str) -> list[PeerPresence]:
    return sorted((e.record for e in swarm._get_entries(presence_key(run_id), PeerPresence)), key=_by_peer)


def _by_peer(presence: PeerPresence) -> str:
    return presence.peer_id
