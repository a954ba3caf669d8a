"""Checkpoint pointers: where the newest pushed checkpoint of a unit lies, so the next claimant resumes instead of
starting over. One record type in one home: schema, key, accessors, and the rule for which pointers a resumer may
trust (inside the recipe's steps, and verified by the run's aggregators once they verify any: protocol/witness.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic.v1 import StrictFloat, StrictStr

from .record_base import DURABLE_PERIOD, NonNegInt, Record, RecordType, dht_time
from .record_claim import FencingToken

if TYPE_CHECKING:
    from .swarm import Signed, Swarm


class CheckpointPointer(Record):
    """Where the newest checkpoint of a unit lies, so the next claimant resumes instead of starting over."""

    run_id: StrictStr
    unit: StrictStr
    token: FencingToken
    repo: StrictStr
    revision: StrictStr
    files: dict[StrictStr, StrictStr]  # path -> sha256
    step: NonNegInt
    steps: NonNegInt
    written_time: StrictFloat
    # The holder's checkpoint chain (protocol/chain.py) after this checkpoint and before it; its release extends it.
    chain_link: StrictStr = ""
    chain_prev: StrictStr = ""

    def signer_ids(self) -> list[str]:
        return [self.token.owner]


RECORD = RecordType("checkpoints", CheckpointPointer, per_unit=True)


def checkpoints_key(run_id: str, unit: str) -> str:
    return RECORD.key(run_id, unit)


def put_checkpoint(swarm: Swarm, pointer: CheckpointPointer, expiration_period: float = DURABLE_PERIOD) -> bool:
    key = checkpoints_key(pointer.run_id, pointer.unit)
    return swarm._store(key, pointer.to_value(), dht_time() + expiration_period, swarm.subkey())


def get_checkpoints(swarm: Swarm, run_id: str, unit: str) -> list[Signed]:
    entries = swarm._get_entries(checkpoints_key(run_id, unit), CheckpointPointer)
    return [e for e in entries if e.record.run_id == run_id and e.record.unit == unit]


def checkpoints_to_resume(swarm: Swarm, run_id: str, unit: str) -> list[CheckpointPointer]:
    """Pointers a next claimant may resume from, furthest step first: signed by the peer whose token they carry,
    strictly inside the recipe's steps (a pointer at or past the last step would be a finished model that its
    resumer publishes as its own) and, once the run's aggregators verify checkpoints, verified by them (or ours).
    The resumer still checks that the checkpoint loads with the recipe."""
    from .witness import get_verified, run_verifies

    pointers = valid_checkpoints(swarm, run_id, unit)
    verified = {(v.holder, v.attempt, v.revision) for v in get_verified(swarm, run_id, unit)}
    if verified or run_verifies(swarm, run_id):  # the aggregators verify checkpoints: only those (and ours) count
        mine = swarm.subkey()
        pointers = [
            e
            for e in pointers
            if e.subkey == mine or (e.peer_id, e.record.token.attempt, e.record.revision) in verified
        ]
    pointers.sort(key=lambda e: (-e.record.step, e.first_seen))
    return [e.record for e in pointers]


def valid_checkpoints(swarm: Swarm, run_id: str, unit: str) -> list[Signed]:
    """Signed pointers strictly inside the recipe's steps (the rest count for nothing, progress included)."""
    from .records import recipe_steps

    manifest = swarm.manifest(run_id)
    if manifest is None or unit not in manifest.units:
        return []
    steps = recipe_steps(manifest, unit)
    return [e for e in get_checkpoints(swarm, run_id, unit) if 0 < e.record.step < steps]


def latest_checkpoint(swarm: Swarm, run_id: str, unit: str) -> CheckpointPointer | None:
    """The checkpoint to resume from: the furthest valid step, then the first seen."""
    return next(iter(checkpoints_to_resume(swarm, run_id, unit)), None)
