"""How a client reaches a run (shared by `join` and `aggregate`): the swarm, the run's manifest, its shards.

Also the router's trainer task as the manifest's recipe describes it, so that the volunteer who trains the router and
the aggregator who checks it build the same task.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from isles.protocol.dht import DHTConfig
from isles.protocol.errors import IslesError
from isles.protocol.record_manifest import check_protocol

log = logging.getLogger("isles.run")
MAX_RUNS_LISTED = 16  # runs index entries looked up when no --run is given


# --- joining the swarm and finding the run -------------------------------------------


def open_swarm(config: DHTConfig):
    """A DHT peer with isles' validators and the typed `Swarm` over it."""
    from isles.protocol.dht import open_dht
    from isles.protocol.swarm import Swarm

    if not config.initial_peers:
        raise IslesError("no peers given", hint="pass --peers with the address `isles bootstrap` printed")
    # open_dht forks the DHT process and daemon with SIGINT/SIGTERM ignored, so a Ctrl-C on the terminal (sent to the
    # whole process group) reaches only us and we can still withdraw our lease.
    node = open_dht(config)
    return node, Swarm(node)


def find_manifest(swarm, run_id: str | None, timeout: float, stop: threading.Event | None = None):
    """The run's manifest from the DHT; without `run_id`, the swarm's only run. Waits up to `timeout` seconds.
    A run that needs a newer isles (`requires_protocol`) is refused with an error naming the upgrade."""
    manifest = _find_manifest(swarm, run_id, timeout, stop)
    check_protocol(manifest)
    return manifest


def _find_manifest(swarm, run_id: str | None, timeout: float, stop: threading.Event | None):
    deadline = time.monotonic() + timeout
    stop = stop or threading.Event()
    while True:
        if run_id:
            manifest = swarm.get_manifest(run_id)
            if manifest is not None:
                return manifest
        else:
            # Index entries are unsigned: count only runs whose (owner-signed) manifest can be found.
            found = {r.run_id: (r, swarm.get_manifest(r.run_id)) for r in swarm.list_runs()[:MAX_RUNS_LISTED]}
            runs = [r for r, manifest in found.values() if manifest is not None]
            if len(runs) == 1:
                return found[runs[0].run_id][1]
            if len(runs) > 1:
                listing = "; ".join(f"{r.run_id} ({r.name}, {r.units} units)" for r in runs)
                raise IslesError(f"the swarm has {len(runs)} open runs: {listing}", hint="choose one with --run ID")
        what = f"run {run_id}" if run_id else "any run"
        if stop.is_set():
            raise IslesError(
                f"stopped while looking for the manifest of {what}", hint="nothing was claimed; run it again"
            )
        if time.monotonic() > deadline:
            raise IslesError(
                f"found no manifest for {what} in the swarm after {timeout:.0f}s",
                hint="check the run id with `isles status --peers ...`; the bootstrap node must be started with "
                "--manifest FILE to publish it",
            )
        stop.wait(1.0)  # a Ctrl-C ends the wait at once


def released_units(swarm, manifest) -> dict[str, list]:
    """Units with at least one release the run's aggregators have not rejected (a rejected unit is open again).

    A peer one of whose releases an aggregator rejected is trusted with none it has not accepted: its other releases
    do not close units, so a peer flooding fake releases cannot make volunteers stop with "nothing left to train"."""
    rejections = swarm.get_rejections(manifest.run_id)
    rejected = {(r.unit, r.token.attempt, r.token.owner, r.revision) for r in rejections}
    banned = {r.token.owner for r in rejections}
    ensemble = swarm.latest_ensemble(manifest.run_id)
    tokens = [*ensemble.experts, *([ensemble.router] if ensemble.router else [])] if ensemble else []
    accepted = {(t.unit, t.attempt, t.owner) for t in tokens}

    def counts(r) -> bool:
        if (r.unit, r.token.attempt, r.token.owner) in accepted:
            return True
        return (r.unit, r.token.attempt, r.token.owner, r.revision) not in rejected and r.token.owner not in banned

    released = {}
    for unit in manifest.units:
        good = [r for r in swarm.get_releases(manifest.run_id, unit) if counts(r)]
        if good:
            released[unit] = good
    return released


# --- shards and the router task ------------------------------------------------------------------------------------


def shard_stores(run_store_uri: str, own_store, token: str | None) -> list:
    """Where shards may be pulled from, in order: the run's store, then ours (a mirror, e.g. a shared folder)."""
    from isles.protocol.artifacts import open_store

    stores = []
    try:
        stores.append(open_store(run_store_uri, token=token))
    except IslesError as exc:
        log.warning("cannot open the run's store %s (%s); using %s", run_store_uri, exc.message, own_store.uri)
    if not stores or stores[0].uri != own_store.uri:
        stores.append(own_store)
    return stores


def pull_shard(stores: list, ref, dest: Path) -> Path:
    """Pull one shard, verified against the manifest's sha256, from the first store that has it."""
    from isles.protocol.artifacts import IntegrityError

    error: IslesError | None = None
    for store in stores:
        try:
            return store.pull_file(ref.repo, ref.revision, ref.path, dest, ref.sha256, kind="dataset")
        except IntegrityError:
            raise
        except IslesError as exc:
            error = exc
    raise IslesError(
        f"cannot pull shard {ref.path} ({ref.repo}@{ref.revision[:12]}): {error.message if error else 'no store'}",
        hint="pass --store with a store that holds the run's shards (the run owner's hf://<namespace> or folder)",
    )


def qualified(store, repo: str) -> str:
    """`namespace/repo` on the Hub, so readers using another namespace (the run's store) still find it."""
    namespace = getattr(store, "namespace", "")
    return f"{namespace}/{repo}" if namespace and "/" not in repo else repo


def unit_task(manifest, unit: str, stores: list, shards_dir: Path):
    """The trainer task of a unit and its recipe, exactly as every volunteer builds it (so checkpoints resume and
    replay anywhere); pulls (and verifies) the shards it needs into `shards_dir`."""
    from isles.experts.data import load_shard

    m = manifest
    indices = range(len(m.shards)) if unit == "router" else [int(unit.rsplit("-", 1)[1])]
    shards = {}
    for i in indices:
        ref = m.shards[i]
        dest = shards_dir / f"{ref.sha256[:16]}-{Path(ref.path).name}"
        if not dest.is_file():
            pull_shard(stores, ref, dest)
        shards[i] = load_shard(dest, sha256=ref.sha256)
    if unit == "router":
        return make_router_task(m, shards), m.router
    from isles.experts.expert import ExpertTask

    i = indices[0]
    recipe, ref = m.experts[i], m.shards[i]
    task = ExpertTask(
        shards[i],
        preset=recipe.preset,
        objective=recipe.objective,
        conditioning=recipe.conditioning,
        label_dropout=recipe.cond_dropout,
        hflip=recipe.hflip,
        shard_info={
            "repo": ref.repo,
            "revision": ref.revision,
            "path": ref.path,
            "sha256": ref.sha256,
            "cluster": ref.cluster,
            "run_id": m.run_id,
            "unit": unit,
        },
        recipe=recipe.dict(),
    )
    return task, recipe


def make_router_task(manifest, shards: dict):
    """The router's trainer task over every shard, as the manifest's router recipe says (router/router_task.py)."""
    from isles.router.router_task import RouterTask

    recipe = manifest.router
    return RouterTask(
        [shards[i] for i in sorted(shards)],
        preset=recipe.preset,
        conditional=recipe.class_conditional,
        text_aware=recipe.text_aware,
        max_items_per_shard=recipe.items_per_shard,
        recipe=recipe.dict(),
    )
