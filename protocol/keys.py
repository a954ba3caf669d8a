"""The DHT key names of isles: the only place that spells raw key strings (everything else calls these builders).

A run's keys all start with `isles_<run_id>_`, then a field name of the run's schema (protocol/dht.py): each record
type's field, declared with its schema in its module (protocol/record_types.py lists them; the manifest's is
protocol/record_manifest.py, which also holds the runs index key).
Subkeys that belong to one peer hold its `[owner:<public key>]`, so only it can write.
"""

from __future__ import annotations

from importlib import import_module

PREFIX = "isles"


def run_prefix(run_id: str) -> str:
    return f"{PREFIX}_{run_id}"


def run_field(field: str, unit: str | None = None) -> str:
    """The schema field name of a run's key: `manifest`, `peers`, ... or `claims_expert-0` for a per-unit key."""
    return f"{field}_{unit}" if unit else field


def run_key(run_id: str, field: str, unit: str | None = None) -> str:
    return f"{run_prefix(run_id)}_{run_field(field, unit)}"


def owner_subkey(public_key: bytes, suffix: str = "") -> bytes:
    """A subkey only the holder of `public_key` (already in `[owner:...]` form) can write; `suffix` tells apart
    several records of one owner under one key (e.g. one rejection per release)."""
    return public_key + suffix.encode()


# Each record type's key builder lives in its module; these older names still reach them (`keys.claims_key`).
_MOVED = {
    "MANIFEST": "record_manifest",
    "RUNS_INDEX": "record_manifest",
    "manifest_key": "record_manifest",
    "claims_key": "record_claim",
    "checkpoints_key": "record_checkpoint",
    "releases_key": "record_release",
    "presence_key": "record_presence",
    "ensemble_key": "record_ensemble",
    "rejections_key": "record_rejection",
}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__package__}.{_MOVED[name]}"), name)
