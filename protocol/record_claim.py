"""Claims: a peer's lease on one unit of a run (one subkey per claimant, renewed by heartbeats), and the fencing
token that the records of its work carry. One record type in one home: schema, key and accessors; the lease protocol
that reads claims (who owns a unit) is protocol/leases.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic.v1 import StrictFloat, StrictStr

from .record_base import Attempt, NonNegInt, Record, RecordType, first_seen_identity

if TYPE_CHECKING:
    from .swarm import Signed, Swarm


class FencingToken(Record):
    """Who trained a unit under which claim; later records carry it so stale or duplicate work can be told apart."""

    unit: StrictStr
    attempt: Attempt
    owner: StrictStr  # libp2p peer id (base58)
    claimed_time: StrictFloat


class Claim(Record):
    """A peer's claim on one unit (one subkey per claimant). Renewed by heartbeats; expires unless renewed."""

    run_id: StrictStr
    unit: StrictStr
    peer_id: StrictStr
    state: Literal["claimed", "withdrawn"] = "claimed"
    attempt: Attempt = 1
    claimed_time: StrictFloat
    heartbeat_time: StrictFloat
    step: NonNegInt = 0
    steps: NonNegInt = 0
    samples_per_s: StrictFloat = 0.0
    hardware: StrictStr = ""

    @property
    def token(self) -> FencingToken:
        return FencingToken(unit=self.unit, attempt=self.attempt, owner=self.peer_id, claimed_time=self.claimed_time)

    def signer_ids(self) -> list[str]:
        return [self.peer_id]


RECORD = RecordType("claims", Claim, per_unit=True)


def claims_key(run_id: str, unit: str) -> str:
    return RECORD.key(run_id, unit)


def put_claim(swarm: Swarm, claim: Claim, expiration_time: float) -> bool:
    key = claims_key(claim.run_id, claim.unit)
    swarm.first_seen(key, swarm.subkey(), first_seen_identity(claim))  # our own claim is seen when written
    swarm.first_seen(key, swarm.subkey())
    return swarm._store(key, claim.to_value(), expiration_time, swarm.subkey())


def get_claims(swarm: Swarm, run_id: str, unit: str) -> list[Signed]:
    return _of_unit(swarm._get_entries(claims_key(run_id, unit), Claim, max_period=_max_period()), run_id, unit)


def scan_claims(swarm: Swarm, run_id: str, units: list[str]) -> dict[str, list[Signed]]:
    """Every unit's claims, looked up together (`Swarm._scan_entries`): a hint of which units are free."""
    keys = {unit: claims_key(run_id, unit) for unit in units}
    found = swarm._scan_entries(list(keys.values()), Claim, max_period=_max_period())
    return {unit: _of_unit(found[key], run_id, unit) for unit, key in keys.items()}


def _of_unit(entries: list[Signed], run_id: str, unit: str) -> list[Signed]:
    return [e for e in entries if e.record.run_id == run_id and e.record.unit == unit]


def _max_period() -> float:
    from .leases import MAX_TTL_PERIOD

    return MAX_TTL_PERIOD + 60.0
