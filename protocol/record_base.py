"""What every DHT record of isles shares: the strict, size-bounded `Record` base, how readers parse one, and the
`RecordType` each record module declares so a run's validator (protocol/dht.py) can be built from them.

pydantic.v1 models with strict types, so hivemind's SchemaValidator refuses any record that would need a conversion.
Every model keeps unknown fields (`Extra.allow`): an older peer stores and forwards a newer peer's records unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import pydantic.v1 as pydantic
from pydantic.v1 import conint

from . import keys
from .files import canonical_json

NonNegInt = conint(strict=True, ge=0)
PositiveInt = conint(strict=True, ge=1)
MAX_ATTEMPT = 1 << 30  # attempts are counted by whoever claims next: bounded, so a liar cannot overflow the count
Attempt = conint(strict=True, ge=1, le=MAX_ATTEMPT)
R = TypeVar("R", bound="Record")
MAX_RECORD_BYTES = 32 * 1024
DURABLE_PERIOD = 14 * 24 * 3600.0  # checkpoint pointers, releases, ensembles, rejections: results outlive peers


def dht_time() -> float:
    """The DHT's clock (hivemind's), in which every `*_time` of a record is stated."""
    from hivemind.utils.timed_storage import get_dht_time

    return get_dht_time()


def _plain(obj: Any) -> Any:
    if isinstance(obj, pydantic.BaseModel):
        return _plain(obj.dict())
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


class Record(pydantic.BaseModel):
    class Config:
        extra = pydantic.Extra.allow
        allow_mutation = False
        max_bytes = MAX_RECORD_BYTES  # every record is bounded: nobody fills a reader's memory with one write

    def to_value(self) -> dict:
        """The plain dict stored in the DHT (msgpack-serialisable, every field present so nothing is converted)."""
        return self.dict()

    def signer_ids(self) -> list[str]:
        """The peer ids this record speaks for: each must be its signer's own, or readers drop the record."""
        return []

    @pydantic.root_validator(skip_on_failure=True)
    def _bounded(cls, values: dict) -> dict:
        size = len(canonical_json(_plain(values)))
        if size > cls.__config__.max_bytes:
            raise ValueError(f"a {cls.__name__} record of {size} bytes (at most {cls.__config__.max_bytes})")
        return values


def parse_record(model: type[R], value: Any) -> R | None:
    """A record read back from the DHT, or None if it has the wrong shape (readers skip such records)."""
    if not isinstance(value, dict):
        return None
    try:
        return model.parse_obj(value)
    except pydantic.ValidationError:
        return None


def first_seen_identity(record: Record) -> tuple:
    """What makes a record new for first-seen purposes: a claim's attempt, a result's revision and step."""
    return tuple(getattr(record, name, None) for name in ("attempt", "claimed_time", "revision", "step"))


def looks_like_peer_id(text: str) -> bool:
    """A base58 libp2p peer id (RSA keys: `Qm...`, 46 characters; ed25519: `12D3KooW...`, 52)."""
    return (text.startswith("Qm") and len(text) == 46) or (text.startswith("12D3KooW") and len(text) == 52)


@dataclass(frozen=True)
class RecordType:
    """One kind of record a run's keys hold, as its run's schema validator sees it: a key named `field` (one per run,
    or with `per_unit` one per unit of the run: `claims_expert-0`) whose subkeys each hold one signer's `model`
    (the subkey carries the signer's `[owner:...]` key, so nobody else can write it)."""

    field: str
    model: type[Record]
    per_unit: bool = False

    def field_name(self, unit: str | None = None) -> str:
        """The run schema's field of this record's key: `peers`, or `claims_expert-0` for a per-unit key."""
        if not self.per_unit:
            return self.field
        if not unit:
            raise ValueError(f"{self.field} keys are per unit")
        return keys.run_field(self.field, unit)

    def key(self, run_id: str, unit: str | None = None) -> str:
        """The raw DHT key of this record in run `run_id` (and `unit`, for a per-unit record)."""
        return keys.run_key(run_id, self.field_name(unit))
