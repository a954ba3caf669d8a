"""The volunteer loop behind `isles join`: check the machine, find the run, claim a unit, train it, publish, repeat.

`Volunteer(JoinConfig(...), console).run()`. Every unit is trained by the experts/ trainer; checkpoints are pushed
to the store every `checkpoint_period` seconds with a pointer in the DHT, so a vanished peer's successor resumes.
SIGINT / SIGTERM: checkpoint, push, withdraw the lease, return (a clean hand-off).
"""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from isles.protocol.dht import DHTConfig
from isles.protocol.errors import IslesError
from isles.protocol.installation import default_work_dir, isles_version

from .contact import open_swarm_retrying
from .display import TrainingDisplay
from .handoff import Pusher
from .run_access import (
    find_manifest,
    qualified,
    released_units,
    shard_stores,
    unit_task,
)
from .training_chain import ResumePolicy, chain_path, load_kept
from .unit_checkpoints import restore_checkpoint, stage_checkpoint, stage_release
from .unit_choice import largest_first, units_too_slow

log = logging.getLogger("isles.join")


@dataclass(frozen=True)
class JoinConfig:
    swarm: DHTConfig
    run_id: str | None = None
    store: str | None = None  # default: the store the manifest names
    token: str | None = None
    device: str = "auto"
    max_units: int | None = None
    work_dir: Path = field(default_factory=lambda: default_work_dir("join"))  # never the current folder
    checkpoint_period: float = 180.0
    lease_ttl: float = 60.0
    heartbeat_period: float = 15.0
    settle_period: float = 3.0
    poll_period: float = 2.0  # how often to look again while every open unit is claimed by someone else
    run_timeout: float = 60.0  # how long to wait for the run's manifest to show up
    contact_timeout: float = 120.0  # how long to keep trying the initial peers before giving up
    name: str = ""  # shown in model cards as who trained a unit (default: the peer id)
    plain: bool | None = None  # None: plain log lines unless stderr is a terminal
    micro_batch: int | None = None
    max_unit_hours: float | None = None  # leave units a measured step says would take longer than this here


@dataclass
class UnitOutcome:
    unit: str
    state: str  # "released" | "stopped" | "lost"
    step: int = 0
    resumed_from_step: int | None = None
    revision: str | None = None
    metrics: dict = field(default_factory=dict)


# --- the volunteer ------------------------------------------------------------------------------------------------


class Volunteer:
    def __init__(self, config: JoinConfig, console, stop: threading.Event | None = None, trainer=None):
        self.config = config
        self.console = console
        self.stop = stop or threading.Event()
        self.trainer = trainer  # experts.trainer.train unless set (`--gpus N`: client/join_ranks.py's leader)
        self.outcomes: list[UnitOutcome] = []
        self.peers_online: int | None = None
        self._state = "JOINING"
        self._unit: str | None = None
        self.push_failures = 0  # checkpoint pushes that failed: shown as they happen
        self.refused: dict[str, str] = {}  # units this machine cannot train, and why (said once, then in `skipped`)
        self.skipped: set[str] = set()
        self.unit_sizes: dict[str, int] = {}  # unit -> parameters x steps: the largest this machine can finish first

    def run(self) -> list[UnitOutcome]:
        from isles.protocol.artifacts import open_store
        from isles.protocol.leases import LeaseManager, LeaseSettings
        from isles.protocol.records import expert_unit

        from .machine import check_machine, param_count, require_fit, resolve_device
        from .preflight import preflight

        c = self.config
        self.display = TrainingDisplay(self.console, plain=c.plain)
        resolve_device(c.device)  # a bad --device fails before we touch the network
        node, self.swarm = open_swarm_retrying(c.swarm, c.contact_timeout, self.stop, self.display.event)
        try:
            self.peer_id = node.peer_id
            self.name = c.name or self.peer_id
            self.manifest = find_manifest(self.swarm, c.run_id, c.run_timeout, self.stop)
            m = self.manifest
            needs = {}
            for e in m.experts:
                if _need_label(e) not in needs:
                    shape = (e.channels, e.resolution, e.num_classes, e.text_width, e.frames)
                    needs[_need_label(e)] = param_count(e.preset, *shape)
            self.machine = check_machine(c.device, c.work_dir, needs)
            for line in self.machine.summary_lines():
                self.display.event(line)
            require_fit(self.machine)
            self.refused = self._units_that_do_not_fit()
            units = [expert_unit(i) for i in range(len(m.experts))]
            self.unit_sizes = {u: needs[_need_label(e)] * e.steps for u, e in zip(units, m.experts, strict=True)}
            if c.max_unit_hours is not None:
                fitting = [(e, u) for e, u in zip(m.experts, units, strict=True) if u not in self.refused]
                slow = units_too_slow(
                    [e for e, _ in fitting], [u for _, u in fitting], resolve_device(c.device), c.max_unit_hours,
                    [_need_label(e) for e, _ in fitting],
                )  # fmt: skip
                self.refused.update(slow)
            # Shards come from the run's store (or --store, when it mirrors them); our work goes to --store.
            self.store = open_store(c.store or m.store, token=c.token)
            self.shard_stores = shard_stores(m.store, self.store, c.token)
            self.work = Path(c.work_dir) / m.run_id
            for line in preflight(self.store, self.work, m):  # can we publish what we train? before any claim
                self.display.event(line)
            if m.progress_timeout <= c.checkpoint_period:
                raise IslesError(
                    f"run {m.run_id} expects a verified checkpoint every {m.progress_timeout:g} s, "
                    f"and --checkpoint-period is {c.checkpoint_period:g} s",
                    hint=f"pass --checkpoint-period {m.progress_timeout / 5:g} (others would take the unit otherwise)",
                )
            settings = LeaseSettings(c.lease_ttl, c.heartbeat_period, c.settle_period, m.progress_timeout)
            # No work folder for this run: no claim of ours from an earlier start to renew (see LeaseManager).
            new_to_run = not self.work.exists()
            self.leases = LeaseManager(
                self.swarm, m.run_id, settings, hardware=self.machine.hardware, new_to_run=new_to_run
            )
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

    def _units_that_do_not_fit(self) -> dict[str, str]:
        """unit -> why this machine does not take it (its model needs more memory than there is)."""
        from isles.protocol.records import expert_unit

        refused = {}
        for i, e in enumerate(self.manifest.experts):
            label = _need_label(e)
            if not self.machine.fits.get(label, True):
                why = next((p for p in self.machine.problems if p.startswith(label)), f"{label} does not fit")
                refused[expert_unit(i)] = why
        return refused

    def _loop(self) -> None:
        c, m = self.config, self.manifest
        waiting_logged = False
        while not self.stop.is_set():
            if c.max_units is not None and len([o for o in self.outcomes if o.state == "released"]) >= c.max_units:
                self.display.event(f"done: trained {c.max_units} unit(s) (--max-units)")
                return
            released = released_units(self.swarm, m)
            # A unit we released that looks open was rejected (or our record is not visible yet): training it again
            # here would give the same model, so we never take it twice.
            mine = {o.unit for o in self.outcomes if o.state == "released"}
            rejected = [u for u in m.units if u not in released and u in mine]
            open_units = [u for u in m.units if u not in released and u not in mine]
            if any(u in self.refused for u in open_units):
                for unit in [u for u in open_units if u in self.refused]:
                    self.display.event(f"not taking {unit}: {self.refused.pop(unit)}")  # said once per unit
                    self.skipped.add(unit)
            open_units = [u for u in open_units if u not in self.skipped]
            if not open_units and any(u not in released for u in self.skipped):
                self.display.event(
                    "the units left need more memory (or time: --max-unit-hours) than this machine has: nothing to "
                    "train here"
                )
                return
            if not open_units:
                if rejected:
                    self.display.event(
                        f"{', '.join(rejected)}: our release is not (or not yet) accepted; not training it again "
                        "(see `isles status` for a rejection)"
                    )
                else:
                    self.display.event(f"every unit of run {m.run_id} is released: nothing left to train")
                return
            self._state = "IDLE"
            # Units someone already pushed a checkpoint for come first: their work is not lost twice.
            started = [u for u in open_units if self.swarm.latest_checkpoint(m.run_id, u) is not None]
            lease = self.leases.acquire(started) if started else None
            for group in largest_first([u for u in open_units if u not in started], self.unit_sizes):
                lease = lease or self.leases.acquire(group)
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
            kept = load_kept(m.run_id, unit, unit_dir, token.attempt)
            policy = ResumePolicy(self.swarm, m.run_id, unit, kept)
            resumed_from, resumed_sha = restore_checkpoint(
                self.swarm, self.store, m.run_id, unit, unit_dir, task, recipe, policy, self.display.event
            )
            chain = policy.chain(m.run_id, unit, chain_path(unit_dir, token.attempt), resumed_from, resumed_sha)
            if resumed_from:
                own = " (continuing its own checkpoint chain)" if chain.inherited_from is None else ""
                self.display.event(f"resuming {unit} from step {resumed_from}{own}")
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
                    staging = stage_checkpoint(path, step)
                    pusher.submit(
                        lambda: self._push_checkpoint(lease, staging, step, recipe.steps, chain),
                        lambda: shutil.rmtree(staging, ignore_errors=True),
                    )

            try:
                result = (self.trainer or train)(
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
            outcome = self._release(lease, result, chain.inherited_from, chain)
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
        return unit_task(self.manifest, unit, self.shard_stores, self.work / "shards")

    def _push_checkpoint(self, lease, staging: Path, step: int, steps: int, chain) -> None:
        """Publish a staged checkpoint, link it into the chain and point the swarm at it (runs on the pusher thread,
        one push after another, so the chain grows in step order)."""
        from isles.experts.checkpoints import checkpoint_name
        from isles.protocol.artifacts import folder_files
        from isles.protocol.records import CheckpointPointer
        from isles.protocol.swarm import dht_time

        m = self.manifest
        try:
            repo = qualified(self.store, f"{m.run_id}-{lease.unit}-checkpoints")
            revision = self.store.publish(repo, staging, kind="model", message=f"{lease.unit} step {step}")
            files = folder_files(staging)
            link = chain.add(step, files.get(checkpoint_name(step), ""))
            pointer = CheckpointPointer(
                run_id=m.run_id,
                unit=lease.unit,
                token=lease.fencing_token,
                repo=repo,
                revision=revision,
                files=files,
                step=step,
                steps=steps,
                written_time=dht_time(),
                chain_link=link.link,
                chain_prev=link.prev,
            )
            self.swarm.put_checkpoint(pointer)
            self.display.event(f"pushed the checkpoint of {lease.unit} at step {step}")
        except Exception as exc:  # a failed push loses at most one period of work; training goes on, and says so
            self.push_failures += 1
            self.display.event(
                f"could not push the checkpoint of {lease.unit} at step {step}: {exc} "
                f"({self.push_failures} failed so far; training goes on, the next push retries)"
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _release(self, lease, result, resumed_from: int | None, chain) -> UnitOutcome:
        from isles.protocol.artifacts import folder_files
        from isles.protocol.records import Release
        from isles.protocol.swarm import dht_time

        m, unit, metrics = self.manifest, lease.unit, result.metrics
        repo = qualified(self.store, f"{m.run_id}-{unit}")
        folder = self._stage_release(result, chain)
        try:
            revision = self.store.publish(repo, folder, kind="model", message=f"{unit} trained by {self.name}")
            files = folder_files(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        objective = m.experts[int(unit.rsplit("-", 1)[1])].objective if unit != "router" else "router"
        release = Release(
            run_id=m.run_id,
            unit=unit,
            token=lease.fencing_token,
            repo=repo,
            revision=revision,
            files=files,
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
            chain_head=chain.head,
        )
        if not self.swarm.put_release(release):
            raise IslesError(f"no peer accepted the release of {unit}", hint="check the connection to the swarm")
        return UnitOutcome(unit, "released", result.step, resumed_from, revision, metrics)

    def _stage_release(self, result, chain) -> Path:
        if result.checkpoint is None:
            raise IslesError(f"the trainer left no checkpoint of step {result.step} to release")
        return stage_release(result.export_dir, result.checkpoint, result.step, chain)

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
                version=isles_version(),
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


def _need_label(recipe) -> str:
    """How the machine check names an expert recipe's model: 'unet-tiny 32x32x3' (clips: 'x16' frames more)."""
    r = recipe
    return f"{r.preset} {r.resolution}x{r.resolution}x{r.channels}" + (f"x{r.frames}" if r.frames else "")


def _float(value) -> float | None:
    return None if value is None else float(value)
