"""The DHT key names of isles: the only place that spells raw key strings (everything else calls these builders).

A run's keys all start with `isles_<run_id>_`; the schema validator of a run (protocol/dht.py) maps each name below
to the record type it may hold. Subkeys that belong to one peer hold its `[owner:<public key>]`, so only it can write.
"""

from __future__ import annotations

PREFIX = "isles"
RUNS_INDEX = f"{PREFIX}_runs"  # one subkey per run id: RunIndexEntry

# Field names of a run's schema; the raw key is f"{run_prefix(run_id)}_{field}".
MANIFEST = "manifest"
PRESENCE = "peers"
ENSEMBLE = "ensemble"
REJECTIONS = "rejections"
CLAIMS = "claims"
CHECKPOINTS = "checkpoints"
RELEASES = "releases"
PER_UNIT = (CLAIMS, CHECKPOINTS, RELEASES)


def run_prefix(run_id: str) -> str:
    return f"{PREFIX}_{run_id}"


def run_field(kind: str, unit: str | None = None) -> str:
    """The schema field name of a run's key: `manifest`, `peers`, ... or `claims_expert-0` for a per-unit key."""
    if kind in PER_UNIT:
        if not unit:
            raise ValueError(f"{kind} keys are per unit")
        return f"{kind}_{unit}"
    return kind


def run_key(run_id: str, kind: str, unit: str | None = None) -> str:
    return f"{run_prefix(run_id)}_{run_field(kind, unit)}"


def manifest_key(run_id: str) -> str:
    return run_key(run_id, MANIFEST)


def presence_key(run_id: str) -> str:
    return run_key(run_id, PRESENCE)


def ensemble_key(run_id: str) -> str:
    return run_key(run_id, ENSEMBLE)


def rejections_key(run_id: str) -> str:
    return run_key(run_id, REJECTIONS)


def claims_key(run_id: str, unit: str) -> str:
    return run_key(run_id, CLAIMS, unit)


def checkpoints_key(run_id: str, unit: str) -> str:
    return run_key(run_id, CHECKPOINTS, unit)


def releases_key(run_id: str, unit: str) -> str:
    return run_key(run_id, RELEASES, unit)


def owner_subkey(public_key: bytes, suffix: str = "") -> bytes:
    """A subkey only the holder of `public_key` (already in `[owner:...]` form) can write; `suffix` tells apart
    several records of one owner under one key (e.g. one rejection per release)."""
    return public_key + suffix.encode()
