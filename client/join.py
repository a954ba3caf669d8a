"""The volunteer loop behind `isles join`: check the machine, find the run, claim a unit, train it, publish, repeat.

`Volunteer(JoinConfig(...), console).run()`. Every unit is trained by the experts/ trainer; checkpoints are pushed
to the store every `checkpoint_period` seconds with a pointer in the DHT, so a vanished peer's successor resumes.
SIGINT / SIGTERM: checkpoint, push, withdraw the lease, return (a clean hand-off).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from isles.protocol.errors import IslesError

from .display import TrainingDisplay

log = logging.getLogger("isles.join")
VERSION = "0.1.0"


@dataclass(frozen=True)
class SwarmOptions:
    """How a client joins the DHT (shared by `join` and `aggregate`)."""

    peers: tuple[str, ...]
    identity: Path | None = None
    client_mode: bool = True  # outbound only unless told this peer is reachable
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    announce_maddrs: tuple[str, ...] = ()
    startup_timeout: float = 30.0


@dataclass(frozen=True)
class JoinConfig:
    swarm: SwarmOptions
    run_id: str | None = None
    store: str | None = None  # default: the store the manifest names
    token: str | None = None
    device: str = "auto"
    max_units: int | None = None
    work_dir: Path = Path("isles-work")
    checkpoint_period: float = 180.0
    lease_ttl: float = 60.0
    heartbeat_period: float = 15.0
    settle_period: float = 3.0
    poll_period: float = 2.0  # how often to look again while every open unit is claimed by someone else
    run_timeout: float = 60.0  # how long to wait for the run's manifest to show up
    name: str = ""  # shown in model cards as who trained a unit (default: the peer id)
    plain: bool | None = None  # None: plain log lines unless stderr is a terminal
    micro_batch: int | None = None


@dataclass
class UnitOutcome:
    unit: str
    state: str  # "released" | "stopped" | "lost"
    step: int = 0
    resumed_from_step: int | None = None
    revision: str | None = None
    metrics: dict = field(default_factory=dict)


# --- joining the swarm and finding the run (also used by the aggregator) -------------------------------------------


def open_swarm(options: SwarmOptions):
    """A DHT peer with isles' validators and the typed `Swarm` over it."""
    from isles.protocol.dht import DHTConfig, open_dht, parse_multiaddr
    from isles.protocol.swarm import Swarm

    if not options.peers:
        raise IslesError("no peers given", hint="pass --peers with the address `isles bootstrap` printed")
    config = DHTConfig(
        initial_peers=tuple(parse_multiaddr(p) for p in options.peers),
        host_maddrs=options.host_maddrs,
        announce_maddrs=options.announce_maddrs,
        client_mode=options.client_mode,
        identity_dir=options.identity,
        startup_timeout=options.startup_timeout,
    )
    # The DHT forks a process that starts the p2p daemon: with SIGINT ignored meanwhile, both inherit that, so a
    # Ctrl-C on the terminal (sent to the whole process group) reaches only us and we can still withdraw our lease.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        node = open_dht(config)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    return node, Swarm(node)


def find_manifest(swarm, run_id: str | None, timeout: float, stop: threading.Event | None = None):
    """The run's manifest from the DHT; without `run_id`, the swarm's only run. Waits up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if run_id:
            manifest = swarm.get_manifest(run_id)
            if manifest is not None:
                return manifest
        else:
            runs = swarm.list_runs()
            if len(runs) == 1:
                manifest = swarm.get_manifest(runs[0].run_id)
                if manifest is not None:
                    return manifest
            elif len(runs) > 1:
                listing = "; ".join(f"{r.run_id} ({r.name}, {r.units} units)" for r in runs)
                raise IslesError(f"the swarm has {len(runs)} open runs: {listing}", hint="choose one with --run ID")
        if time.monotonic() > deadline or (stop is not None and stop.is_set()):
            what = f"run {run_id}" if run_id else "any run"
            raise IslesError(
                f"found no manifest for {what} in the swarm after {timeout:.0f}s",
                hint="check the run id with `isles status --peers ...`; the bootstrap node must be started with "
                "--manifest FILE to publish it",
            )
        time.sleep(1.0)


def released_units(swarm, manifest) -> dict[str, list]:
    """Units with at least one release the aggregator has not rejected (a rejected unit is open again)."""
    rejected = {(r.unit, r.token.attempt, r.token.owner, r.revision) for r in swarm.get_rejections(manifest.run_id)}
    released = {}
    for unit in manifest.units:
        good = [
            r
            for r in swarm.get_releases(manifest.run_id, unit)
            if (unit, r.token.attempt, r.token.owner, r.revision) not in rejected
        ]
        if good:
            released[unit] = good
    return released


class StopSignals:
    """SIGINT / SIGTERM set `event` (a clean hand-off follows); a second SIGINT interrupts at once."""

    def __init__(self, action: str = "checkpointing and handing the unit back"):
        self.action = action
        self.event = threading.Event()
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        log.info("%s received: %s (Ctrl-C again to quit at once)", self.received, self.action)
        self.event.set()


# --- the volunteer ------------------------------------------------------------------------------------------------


class Volunteer:
    def __init__(self, config: JoinConfig, console, stop: threading.Event | None = None):
        self.config = config
        self.console = console
        self.stop = stop or threading.Event()
        self.outcomes: list[UnitOutcome] = []
        self.peers_online: int | None = None
        self._state = "JOINING"
        self._unit: str | None = None

    def run(self) -> list[UnitOutcome]:
        from isles.protocol.artifacts import open_store
        from isles.protocol.leases import LeaseManager, LeaseSettings

        from .machine import check_machine, param_count, require_fit, resolve_device

        c = self.config
        self.display = TrainingDisplay(self.console, plain=c.plain)
        resolve_device(c.device)  # a bad --device fails before we touch the network
        node, self.swarm = open_swarm(c.swarm)
        try:
            self.peer_id = node.peer_id
            self.name = c.name or self.peer_id
            self.manifest = find_manifest(self.swarm, c.run_id, c.run_timeout, self.stop)
            m = self.manifest
            needs = {}
            for r in {(e.preset, e.channels, e.resolution, e.num_classes) for e in m.experts}:
                needs[f"{r[0]} {r[2]}x{r[2]}x{r[1]}"] = param_count(*r)
            self.machine = check_machine(c.device, c.work_dir, needs)
            for line in self.machine.summary_lines():
                self.display.event(line)
            require_fit(self.machine)
            # Shards come from the run's store (or --store, when it mirrors them); our work goes to --store.
            self.store = open_store(c.store or m.store, token=c.token)
            self.shard_stores = shard_stores(m.store, self.store, c.token)
            self.work = Path(c.work_dir) / m.run_id
            settings = LeaseSettings(c.lease_ttl, c.heartbeat_period, c.settle_period)
            self.leases = LeaseManager(self.swarm, m.run_id, settings, hardware=self.machine.hardware)
            self.display.event(f"joined run {m.run_id} ({m.name}: {len(m.units)} units) as {self.name}")
            presence = threading.Thread(target=self._presence_loop, name="presence", daemon=True)
            presence.start()
            with self.display:
                self._loop()
        finally:
            self._state = "OFFLINE"
            self._announce()
            node.shutdown()
        return self.outcomes

    def _loop(self) -> None:
        c, m = self.config, self.manifest
        waiting_logged = False
        while not self.stop.is_set():
            if c.max_units is not None and len([o for o in self.outcomes if o.state == "released"]) >= c.max_units:
                self.display.event(f"done: trained {c.max_units} unit(s) (--max-units)")
                return
            released = released_units(self.swarm, m)
            open_units = [u for u in m.units if u not in released]
            if not open_units:
                self.display.event(f"every unit of run {m.run_id} is released: nothing left to train")
                return
            self._state = "IDLE"
            # Units someone already pushed a checkpoint for come first: their work is not lost twice.
            started = [u for u in open_units if self.swarm.latest_checkpoint(m.run_id, u) is not None]
            lease = self.leases.acquire(started) if started else None
            lease = lease or self.leases.acquire([u for u in open_units if u not in started])
            if lease is None:
                if not waiting_logged:
                    self.display.event(
                        f"units {', '.join(open_units)} are claimed by others: waiting for a lease to lapse"
                    )
                    waiting_logged = True
                self.stop.wait(c.poll_period)
                continue
            waiting_logged = False
            outcome = self._train_unit(lease)
            self.outcomes.append(outcome)

    # -- one unit ----------------------------------------------------------------------------------------------------

    def _train_unit(self, lease) -> UnitOutcome:
        from isles.experts.trainer import TrainRecipe, train

        c, m, unit = self.config, self.manifest, lease.unit
        self._state, self._unit = "TRAINING", unit
        unit_dir = self.work / unit
        token = lease.fencing_token
        self.display.event(f"claimed {unit} (attempt {token.attempt})")
        try:
            task, recipe_fields = self._build_task(unit, unit_dir)
            recipe = TrainRecipe(
                steps=recipe_fields.steps,
                global_batch=recipe_fields.global_batch,
                lr=recipe_fields.lr,
                warmup_steps=recipe_fields.warmup_steps,
                ema_decay=recipe_fields.ema_decay,
                seed=recipe_fields.seed,
                checkpoint_every_steps=None,
                checkpoint_every_seconds=c.checkpoint_period,
            )
            resumed_from = self._restore_checkpoint(unit, unit_dir)
            if resumed_from:
                self.display.event(f"resuming {unit} from step {resumed_from}")
            self.display.update(
                force=True,
                unit=unit,
                step=resumed_from or 0,
                steps=recipe.steps,
                resumed_from=resumed_from,
                state="training",
                loss=None,
                samples_per_s=None,
                eta_s=None,
            )

            def progress(p) -> None:
                lease.update_progress(p.step, p.steps, p.samples_per_s)
                self.display.update(
                    step=p.step, loss=p.loss, samples_per_s=p.samples_per_s, eta_s=p.eta_s, peers=self.peers_online
                )

            pusher = Pusher()  # uploads run beside training; a newer checkpoint replaces one still waiting

            def on_checkpoint(path: Path, step: int) -> None:
                if step < recipe.steps and step > 0:
                    staging = self._stage_checkpoint(path, step)
                    pusher.submit(
                        lambda: self._push_checkpoint(lease, staging, step, recipe.steps),
                        lambda: shutil.rmtree(staging, ignore_errors=True),
                    )

            try:
                result = train(
                    task,
                    recipe,
                    unit_dir,
                    device=self.machine.device,
                    micro_batch=c.micro_batch,
                    progress=progress,
                    on_checkpoint=on_checkpoint,
                    should_stop=lambda: self.stop.is_set() or lease.lost.is_set(),
                )
            except KeyboardInterrupt:  # a second Ctrl-C: leave at once, without waiting for uploads
                pusher.abandon()
                raise
            finally:
                pusher.close()  # the last checkpoint (e.g. the one written on SIGTERM) is pushed before we go on
            if lease.lost.is_set():
                self.display.event(f"lost {unit} to an earlier claim; dropping it")
                return UnitOutcome(unit, "lost", result.step, resumed_from)
            if not result.completed:
                self.display.event(f"stopped {unit} at step {result.step}: checkpoint pushed, unit handed back")
                return UnitOutcome(unit, "stopped", result.step, resumed_from)
            outcome = self._release(lease, result, resumed_from)
            self.display.event(
                f"released {unit}: val loss {outcome.metrics.get('val_loss', float('nan')):.4f}, "
                f"{c.store or m.store} {outcome.revision[:12]}"
            )
            return outcome
        finally:
            lease.withdraw()
            self._unit = None

    def _build_task(self, unit: str, unit_dir: Path):
        """The trainer task of a unit and its recipe; pulls (and verifies) the shards it needs."""
        from isles.experts.data import load_shard

        m = self.manifest
        shards_dir = self.work / "shards"
        indices = range(len(m.shards)) if unit == "router" else [int(unit.rsplit("-", 1)[1])]
        shards = {}
        for i in indices:
            ref = m.shards[i]
            dest = shards_dir / f"{ref.sha256[:16]}-{Path(ref.path).name}"
            if not dest.is_file():
                pull_shard(self.shard_stores, ref, dest)
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
            conditional=recipe.num_classes is not None,
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

    def _restore_checkpoint(self, unit: str, unit_dir: Path) -> int | None:
        """Make the newest checkpoint anyone pushed the trainer's starting point; returns its step (None: step 0)."""
        from isles.experts import checkpoints

        ckpt_dir = unit_dir / "checkpoints"
        latest = checkpoints.latest_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None  # only whole checkpoints
        local_step = next((s for s, p in checkpoints.list_checkpoints(ckpt_dir) if p == latest), 0) if latest else 0
        pointer = self.swarm.latest_checkpoint(self.manifest.run_id, unit)
        if pointer is not None and pointer.step > local_step:
            staging = unit_dir / "pulled"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                self.store.pull(pointer.repo, pointer.revision, staging, pointer.files)
                ckpt_dir.mkdir(parents=True, exist_ok=True)
                for entry in staging.iterdir():  # the checkpoint's file(s), as the trainer wrote them
                    target = ckpt_dir / entry.name
                    if target.is_dir():
                        shutil.rmtree(target)
                    entry.replace(target)
                local_step = pointer.step
                self.display.event(f"pulled the checkpoint of {unit} at step {pointer.step} ({pointer.token.owner})")
            except IslesError as exc:
                log.warning("cannot use the pushed checkpoint of %s (%s); starting from local state", unit, exc)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return local_step or None

    def _stage_checkpoint(self, path: Path, step: int) -> Path:
        """Hard-link (or copy) the checkpoint's file(s) into a folder of their own: the trainer may prune the originals
        while the upload runs in the background."""
        staging = path.parent.parent / f"push-{step:09d}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        parts = [path] if path.is_dir() else list(path.parent.glob(f"{path.stem}.*"))  # companions of one name too
        for part in parts:
            if part.is_dir():
                shutil.copytree(part, staging / part.name)
                continue
            try:
                os.link(part, staging / part.name)
            except OSError:
                shutil.copy2(part, staging / part.name)
        return staging

    def _push_checkpoint(self, lease, staging: Path, step: int, steps: int) -> None:
        """Publish a staged checkpoint and point the swarm at it (runs on the pusher thread)."""
        from isles.protocol.artifacts import folder_files
        from isles.protocol.records import CheckpointPointer
        from isles.protocol.swarm import dht_time

        m = self.manifest
        try:
            repo = qualified(self.store, f"{m.run_id}-{lease.unit}-checkpoints")
            revision = self.store.publish(repo, staging, kind="model", message=f"{lease.unit} step {step}")
            pointer = CheckpointPointer(
                run_id=m.run_id,
                unit=lease.unit,
                token=lease.fencing_token,
                repo=repo,
                revision=revision,
                files=folder_files(staging),
                step=step,
                steps=steps,
                written_time=dht_time(),
            )
            self.swarm.put_checkpoint(pointer)
            self.display.event(f"pushed the checkpoint of {lease.unit} at step {step}")
        except Exception as exc:  # a failed push loses at most one period of work; training goes on
            log.warning("could not push the checkpoint of %s at step %d: %s", lease.unit, step, exc)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _release(self, lease, result, resumed_from: int | None) -> UnitOutcome:
        from isles.protocol.artifacts import folder_files
        from isles.protocol.records import Release
        from isles.protocol.swarm import dht_time

        m, unit, metrics = self.manifest, lease.unit, result.metrics
        repo = qualified(self.store, f"{m.run_id}-{unit}")
        revision = self.store.publish(repo, result.export_dir, kind="model", message=f"{unit} trained by {self.name}")
        objective = m.experts[int(unit.rsplit("-", 1)[1])].objective if unit != "router" else "router"
        release = Release(
            run_id=m.run_id,
            unit=unit,
            token=lease.fencing_token,
            repo=repo,
            revision=revision,
            files=folder_files(result.export_dir),
            objective=objective,
            steps=int(result.step),
            flops=float(metrics.get("train_flops", 0.0)),
            final_loss=_float(metrics.get("final_loss")),
            val_loss=_float(metrics.get("val_loss")),
            hardware=self.machine.hardware,
            wall_period=float(metrics.get("wall_time_s", 0.0)),
            released_time=dht_time(),
            resumed_from_step=resumed_from,
            volunteer=self.name,
        )
        if not self.swarm.put_release(release):
            raise IslesError(f"no peer accepted the release of {unit}", hint="check the connection to the swarm")
        return UnitOutcome(unit, "released", result.step, resumed_from, revision, metrics)

    # -- presence ------------------------------------------------------------------------------------------------

    def _announce(self) -> None:
        from isles.protocol.records import PeerPresence
        from isles.protocol.swarm import dht_time

        try:
            presence = PeerPresence(
                peer_id=self.peer_id,
                state=self._state,
                unit=self._unit,
                updated_time=dht_time(),
                hardware=self.machine.hardware if hasattr(self, "machine") else "",
                version=VERSION,
            )
            self.swarm.put_presence(self.manifest.run_id, presence, self.config.lease_ttl)
        except Exception as exc:  # presence is informational: never fail training over it
            log.debug("presence update failed: %s", exc)

    def _presence_loop(self) -> None:
        while self._state != "OFFLINE":
            self._announce()
            try:
                peers = self.swarm.get_presence(self.manifest.run_id)
                self.peers_online = len([p for p in peers if p.state != "OFFLINE"])
            except Exception:
                pass
            if self.stop.wait(self.config.heartbeat_period):
                return


class Pusher:
    """One background worker for checkpoint uploads: at most one upload running and one waiting (the newest)."""

    def __init__(self):
        self._cv = threading.Condition()
        self._waiting: tuple | None = None  # (push, discard)
        self._closed = False
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name="checkpoint-pusher", daemon=True)
        self._thread.start()

    def submit(self, push, discard) -> None:
        with self._cv:
            if self._waiting is not None:
                self._waiting[1]()  # superseded before it started: a newer checkpoint is on its way
            self._waiting = (push, discard)
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._waiting is None and not self._closed:
                    self._cv.wait()
                if self._waiting is None:
                    return
                job, self._waiting = self._waiting, None
            job[0]()

    def close(self) -> None:
        """Finish the running and the waiting upload, then stop the worker (at once after `abandon`)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            if self._abandoned:
                return
        self._thread.join()

    def abandon(self) -> None:
        """Drop the waiting upload and do not wait for the running one."""
        with self._cv:
            if self._waiting is not None:
                self._waiting[1]()
            self._waiting, self._closed, self._abandoned = None, True, True
            self._cv.notify_all()


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


def _float(value) -> float | None:
    return None if value is None else float(value)


def make_router_task(manifest, shards: dict):
    """The router's trainer task over every shard, as the manifest's router recipe says (router/router_task.py)."""
    from isles.router.router_task import RouterTask

    recipe = manifest.router
    return RouterTask(
        [shards[i] for i in sorted(shards)],
        preset=recipe.preset,
        conditional=recipe.class_conditional,
        max_items_per_shard=recipe.items_per_shard,
        recipe=recipe.dict(),
    )
