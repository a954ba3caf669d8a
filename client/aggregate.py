"""The aggregator behind `isles aggregate`: verify every release of a run, keep one per unit, publish the ensemble.

A release is accepted when its files (no larger than the recipe's model allows) match their sha256, its config is the
manifest's recipe exactly (every key), its weights are finite, its checkpoint chain holds (client/release_checks.py:
every checkpoint of its holder that verified is on it, and it ends in the checkpoint whose EMA weights it exports), and
its loss on the shard's held-out split is below
the manifest's `eval.max_val_loss_fraction` of an untrained model's (the router: `max_router_loss_fraction` of an
untrained router's cross-entropy); a reported val loss that disagrees with ours by more than
`eval.val_loss_tolerance` (a fraction) is refused too. Everything is deterministic (fixed noise, CPU), and judgments
persist in the work folder (client/judgments.py), so a restarted aggregator rebuilds the same state from the DHT and
the store, the same revision, without judging a rejected release again.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from isles.protocol.chain import FINAL_CHECKPOINT
from isles.protocol.dht import DHTConfig
from isles.protocol.errors import IslesError
from isles.protocol.installation import default_work_dir

from .checkpoint_witness import CheckpointWitness
from .judgments import ACCEPTED, Judgments
from .model_card import SAMPLES_FILE, model_card
from .release_checks import RecipeChecks, check_chain, non_finite
from .run_access import pull_shard, shard_stores

log = logging.getLogger("isles.aggregate")

REQUIRED = {
    "expert": ("config.json", "diffusion_pytorch_model.safetensors"),
    "router": ("config.json", "model.safetensors"),
}
PROVENANCE_FILE = "releases.json"
# A peer with this many rejected releases is judged no more in this run: a flood of fake releases costs the
# aggregator this many downloads per key, not one per record.
MAX_REJECTED_PER_PEER = 8


@dataclass(frozen=True)
class AggregateConfig:
    swarm: DHTConfig
    run_id: str | None = None
    store: str | None = None  # where releases are pulled from (default: the manifest's store)
    to: str | None = None  # ensemble repo (default: <run_id>-ensemble)
    to_store: str | None = None  # where the ensemble is published (default: the same store)
    token: str | None = None
    work_dir: Path = field(default_factory=lambda: default_work_dir("aggregate"))  # never the current folder
    once: bool = False  # one pass, then exit
    until_complete: bool = False  # exit once every unit is in a published ensemble
    poll_period: float = 10.0
    run_timeout: float = 60.0
    sample_steps: int = 30
    summary: Path | None = None  # write the summary JSON here after every publish
    # Pushed checkpoints are verified by replaying the segment since the holder's previous one: exact on a CPU, so
    # this allows for volunteers on other hardware (a fraction of the segment's update; noise-trained: ~1).
    replay_tolerance: float = 0.01
    replay_fraction: float = 0.1  # share of checkpoints replayed (each costs a checkpoint period of training)


@dataclass
class Verdict:
    ok: bool
    reason: str = ""
    val_loss: float | None = None
    threshold: float | None = None
    folder: Path | None = None
    retry: bool = False  # the store could not be reached: judge the release again on the next poll


@dataclass
class Accepted:
    release: object  # protocol.records.Release
    verdict: Verdict


@dataclass
class Published:
    repo: str
    revision: str
    folder: Path
    units: list[str] = field(default_factory=list)


def unit_kind(unit: str) -> str:
    return "router" if unit == "router" else "expert"


def release_key(release) -> tuple:
    return (release.unit, release.token.attempt, release.token.owner, release.revision)


class Aggregator:
    """Verifies releases and assembles ensembles; `poll()` does one pass (safe to call repeatedly)."""

    def __init__(self, config: AggregateConfig, swarm, manifest, store, out_store, peer_id: str):
        self.config, self.swarm, self.manifest, self.store, self.out_store = config, swarm, manifest, store, out_store
        self.peer_id = peer_id
        self.work = Path(config.work_dir) / manifest.run_id
        self.repo = config.to or f"{manifest.run_id}-ensemble"
        self.accepted: dict[str, Accepted] = {}
        self.judged: dict[tuple, str] = {}  # release key -> "accepted" / "duplicate" / rejection reason
        self.published: Published | None = None
        self._shards: dict[int, object] = {}
        self._tasks: dict[str, tuple] = {}
        self._profiles: dict[tuple[str, str], list[float]] = {}  # (unit, release revision) -> velocity error by t
        self.shard_stores = shard_stores(manifest.store, store, config.token)
        self.judgments = Judgments(self.work)
        self.checks = RecipeChecks(manifest)
        self._rejected_of: Counter[str] = Counter()  # signer's peer id -> releases of it rejected
        self._rejected_content: dict[tuple[str, str], str] = {}  # (repo, revision) -> why it was rejected
        self.witness: CheckpointWitness | None = None  # what it verified, releases' chains must carry (and the DHT's)

    # -- the loop ----------------------------------------------------------------------------------------------------

    def poll(self) -> bool:
        """Judge every new release; publish a new ensemble revision if the verified set grew. True if it did."""
        grew = False
        for unit in self.manifest.units:
            releases = self.judgments.in_observed_order(self.swarm.get_releases(self.manifest.run_id, unit))
            for release in releases:  # in the order this aggregator first saw them
                key = release_key(release)
                if key in self.judged:
                    continue
                if (reason := self.judgments.rejected(release)) is not None:  # judged before a restart
                    self.judged[key] = reason
                    self._rejected_of[release.token.owner] += 1
                    continue
                if self._rejected_of[release.token.owner] >= MAX_REJECTED_PER_PEER:  # a flood: judged no more
                    self.judged[key] = f"ignored: {MAX_REJECTED_PER_PEER} releases of this peer were rejected"
                    continue
                if (reason := self._rejected_content.get((release.repo, release.revision))) is not None:
                    self.judged[key] = reason  # the same files under another record: the same verdict, no download
                    self._rejected_of[release.token.owner] += 1
                    self._reject(release, reason)
                    continue
                if unit in self.accepted:
                    self.judged[key] = "duplicate"
                    log.info("%s: ignoring a duplicate release from %s", unit, release.token.owner)
                    continue
                verdict = self.verify(unit, release)
                if verdict.retry:  # not the release's fault: a restarted aggregator would accept it
                    # Later releases of the unit wait too: the first valid one in order wins, whatever the store did.
                    log.warning("%s: %s; trying again on the next poll", unit, verdict.reason)
                    break
                if verdict.ok:
                    self.accepted[unit] = Accepted(release, verdict)
                    self.judged[key] = ACCEPTED
                    self.judgments.record(release, ACCEPTED)
                    grew = True
                    log.info(
                        "%s: accepted %s@%s (val loss %.4f < %.4f)",
                        unit,
                        release.repo,
                        release.revision[:12],
                        verdict.val_loss,
                        verdict.threshold,
                    )
                else:
                    self.judged[key] = verdict.reason
                    self._rejected_of[release.token.owner] += 1
                    self._rejected_content[(release.repo, release.revision)] = verdict.reason
                    self.judgments.record(release, verdict.reason)
                    shutil.rmtree(self._release_folder(release), ignore_errors=True)  # keep nothing rejected
                    self._reject(release, verdict.reason)
        if grew and "router" in self.accepted and len(self.accepted) > 1:  # a router alone makes no ensemble
            self.publish()
            return True
        return False

    @property
    def complete(self) -> bool:
        return self.published is not None and set(self.published.units) == set(self.manifest.units)

    def _reject(self, release, reason: str) -> None:
        from isles.protocol.records import Rejection
        from isles.protocol.swarm import dht_time

        log.warning(
            "%s: REJECTED release %s@%s from %s: %s",
            release.unit,
            release.repo,
            release.revision[:12],
            release.token.owner,
            reason,
        )
        rejection = Rejection(
            run_id=self.manifest.run_id,
            unit=release.unit,
            token=release.token,
            revision=release.revision,
            reason=reason,
            rejected_time=dht_time(),
            peer_id=self.peer_id,
        )
        try:
            self.swarm.put_rejection(rejection)
        except Exception as exc:  # the rejection is informational; the release stays rejected here anyway
            log.warning("could not record the rejection: %s", exc)

    # -- verification --------------------------------------------------------------------------------------------

    def verify(self, unit: str, release) -> Verdict:
        from isles.protocol.artifacts import IntegrityError, StoreUnavailable, TooLarge

        m, kind = self.manifest, unit_kind(unit)
        if release.run_id != m.run_id or release.unit != unit or release.token.unit != unit:
            return Verdict(False, f"fencing token names unit {release.token.unit!r} of run {release.run_id}")
        missing = [p for p in REQUIRED[kind] if p not in release.files]
        if missing:
            return Verdict(False, f"release lacks {', '.join(missing)}")
        folder = self._release_folder(release)
        wanted = (".json", ".safetensors", FINAL_CHECKPOINT)  # a release's files, its chain and final checkpoint
        expected = {p: h for p, h in release.files.items() if p.endswith(wanted)}
        try:
            self.store.pull(release.repo, release.revision, folder, expected, max_bytes=self.checks.max_bytes(unit))
        except TooLarge as exc:
            return Verdict(False, f"release too large: {exc.message}")
        except IntegrityError as exc:
            return Verdict(False, f"files do not match their hashes: {exc.message}")
        except StoreUnavailable as exc:
            return Verdict(False, f"the store is unreachable: {exc.message}", retry=True)
        except IslesError as exc:
            return Verdict(False, f"cannot pull the release: {exc.message}")
        try:  # our data: a failure here is ours, not the release's
            task, untrained = self._task_and_untrained(unit)
        except StoreUnavailable as exc:
            return Verdict(False, f"the store is unreachable: {exc.message}", retry=True)
        try:
            problem = (
                self._check_config(unit, folder)
                or non_finite(folder, REQUIRED[kind][1])
                or self._check_chain(unit, release, folder)
            )
            if problem:
                return Verdict(False, problem, folder=folder)
            import torch

            val_loss = float(task.validate(self._load(unit, folder), torch.device("cpu"))["val_loss"])
        except IslesError as exc:
            return Verdict(False, f"cannot load the model: {exc.message}", folder=folder)
        except Exception as exc:  # a malformed model must not take the aggregator down
            return Verdict(False, f"cannot load the model: {type(exc).__name__}: {exc}", folder=folder)
        fraction = self._fraction(kind)
        threshold = fraction * untrained
        if not math.isfinite(val_loss) or val_loss >= threshold:
            return Verdict(
                False,
                f"validation loss {val_loss:.4f} is not below {threshold:.4f} "
                f"({fraction:g} x untrained {untrained:.4f})",
                val_loss,
                threshold,
                folder,
            )
        tolerance = m.eval.val_loss_tolerance
        if release.val_loss is not None and abs(release.val_loss - val_loss) > tolerance * max(val_loss, 1e-8):
            return Verdict(
                False,
                f"reported validation loss {release.val_loss:.4f} differs from the measured {val_loss:.4f} "
                f"by more than {tolerance:.0%}",
                val_loss,
                threshold,
                folder,
            )
        return Verdict(True, "", val_loss, threshold, folder)

    def _check_chain(self, unit: str, release, folder: Path) -> str | None:
        """The release's checkpoint chain against what this aggregator (and the run's others) verified."""
        from .checkpoint_witness import verified_checkpoints, verified_links

        run_id, local = self.manifest.run_id, self.witness.links if self.witness is not None else {}
        try:
            links = verified_links(self.swarm, run_id, unit, release.token.owner, release.token.attempt, local)
            points = verified_checkpoints(self.swarm, run_id, unit, local) or None
            problem = check_chain(self.manifest, release, folder, REQUIRED[unit_kind(unit)][1], links, points)
            if problem is None and self.witness is not None:  # the segment from its last verified checkpoint
                problem = self.witness.replay_final(
                    unit, release.token.owner, release.token.attempt, folder / FINAL_CHECKPOINT
                )
            return problem
        finally:  # the final checkpoint is read once: what is kept of an accepted release is its model
            (folder / FINAL_CHECKPOINT).unlink(missing_ok=True)

    def _release_folder(self, release) -> Path:
        return self.work / "releases" / release.unit / release.revision

    def _fraction(self, kind: str) -> float:
        ev = self.manifest.eval
        return ev.max_router_loss_fraction if kind == "router" else ev.max_val_loss_fraction

    def _recipe_model(self, unit: str):
        return self.checks.recipe_model(unit)

    def _check_config(self, unit: str, folder: Path) -> str | None:
        return self.checks.check_config(unit, folder)

    def _shard(self, index: int):
        from isles.experts.data import load_shard

        if index not in self._shards:
            ref = self.manifest.shards[index]
            dest = self.work / "shards" / f"{ref.sha256[:16]}-{Path(ref.path).name}"
            if not dest.is_file():
                pull_shard(self.shard_stores, ref, dest)
            self._shards[index] = load_shard(dest, sha256=ref.sha256)
        return self._shards[index]

    def _task(self, unit: str):
        m = self.manifest
        if unit == "router":
            from .run_access import make_router_task

            return make_router_task(m, {i: self._shard(i) for i in range(len(m.shards))})
        from isles.experts.expert import ExpertTask

        i = _index(unit)
        r = m.experts[i]
        return ExpertTask(
            self._shard(i),
            preset=r.preset,
            objective=r.objective,
            conditioning=r.conditioning,
            label_dropout=r.cond_dropout,
            hflip=r.hflip,
        )

    def replay(self, unit: str, start: Path, end: Path):
        """Replay a holder's training segment between two of its checkpoints (experts/replay.py), with the unit's task
        built exactly as volunteers build it."""
        from isles.experts.replay import replay_segment
        from isles.experts.trainer import TrainRecipe

        from .run_access import unit_task

        task, r = unit_task(self.manifest, unit, self.shard_stores, self.work / "shards")
        recipe = TrainRecipe(
            steps=r.steps, global_batch=r.global_batch, lr=r.lr, warmup_steps=r.warmup_steps, ema_decay=r.ema_decay,
            seed=r.seed, checkpoint_every_steps=None, checkpoint_every_seconds=None,
        )  # fmt: skip
        return replay_segment(task, recipe, start, end, self.work / "replay", tolerance=self.config.replay_tolerance)

    def _task_and_untrained(self, unit: str):
        """The unit's task (its held-out data) and the val loss of an untrained model from the recipe's seed."""
        import torch

        if unit not in self._tasks:
            task = self._task(unit)
            seed = self.manifest.router.seed if unit == "router" else self.manifest.experts[_index(unit)].seed
            torch.manual_seed(seed)
            untrained = float(task.validate(task.build_model().eval(), torch.device("cpu"))["val_loss"])
            self._tasks[unit] = (task, untrained)
        return self._tasks[unit]

    @staticmethod
    def _load(unit: str, folder: Path):
        if unit == "router":
            from isles.router.model import RouterModel

            return RouterModel.from_pretrained(folder).eval()
        from isles.experts.presets import load_model

        return load_model(folder).eval()

    # -- assembly ------------------------------------------------------------------------------------------------

    def _grid_condition(self, pipe) -> dict:
        """The sample grid's condition: 6 per class (10 classes at most), 4 held-out captions per shard, or none."""
        import torch

        from isles.experts.data import decode_captions

        if pipe.conditioning == "text":
            prompts = []
            for i in range(len(self.manifest.shards)):
                val = self._shard(i).val_split()
                rows = torch.arange(min(4, len(val)))
                prompts += decode_captions(val.captions[rows]) if val.captions is not None else []
            return {"prompt": prompts or [""]}
        classes = pipe.num_classes
        if classes:
            return {"n": min(classes, 10) * 6, "class_labels": torch.arange(min(classes, 10)).repeat_interleave(6)}
        return {"n": 24}

    def _velocity_errors(self, unit: str, acc, model) -> list[float]:
        """The expert's measured velocity error per noise-level bin, once per accepted release (deterministic: fixed
        held-out noise, so a restarted aggregator publishes the same numbers)."""
        import torch

        key = (unit, acc.release.revision)
        if key not in self._profiles:
            task, _ = self._task_and_untrained(unit)
            self._profiles[key] = [round(v, 6) for v in task.velocity_errors(model, torch.device("cpu"))]
        return self._profiles[key]

    def publish(self) -> Published:
        """Assemble the accepted units into the published layout and publish it as a revision of the ensemble repo."""
        import torch

        from isles.experts.expert import save_grid
        from isles.protocol.artifacts import folder_files
        from isles.protocol.records import Ensemble
        from isles.protocol.swarm import dht_time
        from isles.router.calibration import PROFILE_KEY
        from isles.router.ensemble import EnsemblePipeline, Expert

        m = self.manifest
        experts = {}
        for unit, acc in sorted(self.accepted.items()):
            if unit == "router":
                continue
            i = _index(unit)
            meta = {
                "unit": unit,
                "release": _provenance(acc),
                "preset": m.experts[i].preset,
                "conditioning": m.experts[i].conditioning,
                "text_encoder": m.text_encoder.dict() if m.text_encoder else None,
                # What `isles eval` measures against, and what decodes the expert's latents.
                "data": {"source": m.dataset, "latent": m.vae is not None, "vae": m.vae.dict() if m.vae else None},
            }
            model = self._load(unit, acc.verdict.folder)
            # Its velocity error per noise level on the held-out split, for calibrated routing (router/calibration.py).
            meta[PROFILE_KEY] = self._velocity_errors(unit, acc, model)
            # diffusers saves the folder it loaded from; name the release instead, so restarts publish the same bytes.
            model.register_to_config(_name_or_path=f"{acc.release.repo}@{acc.release.revision}")
            experts[i] = Expert(i, model, m.experts[i].objective, meta)
        router = self._load("router", self.accepted["router"].verdict.folder)
        kind = "latents" if any(s.is_latent for s in self._shards.values()) else "pixels"
        config = {"run_id": m.run_id, "name": m.name, "data_kind": kind, "conditioning": m.experts[0].conditioning}
        if m.text_encoder is not None:
            config["text_encoder"] = m.text_encoder.dict()
        if m.vae is not None:
            config["vae"] = m.vae.dict()
        pipe = EnsemblePipeline(experts, router, config)
        staging = self.work / "assembling"
        shutil.rmtree(staging, ignore_errors=True)
        pipe.save_pretrained(staging)
        # A fixed sample grid, same seed every time: one row per class (or held-out captions, or 4 unconditional rows).
        torch.manual_seed(0)
        images = pipe(routing="top1", steps=self.config.sample_steps, seed=0, **self._grid_condition(pipe)).images
        has_samples = kind == "pixels" or m.vae is not None
        if has_samples and pipe.is_video:  # one row of frames per clip, and the clips themselves as a GIF
            from isles.experts.video_files import save_clip_grid_gif, save_frame_sheet

            save_frame_sheet(images, staging / SAMPLES_FILE, scale=2, max_clips=len(images))
            save_clip_grid_gif(images, staging / SAMPLES_FILE.replace(".png", ".gif"), nrow=4)
        elif has_samples:
            save_grid(images, staging / SAMPLES_FILE, nrow=6)
        units = sorted(self.accepted, key=m.units.index)
        provenance = {u: _provenance(self.accepted[u]) for u in units}
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        (staging / "README.md").write_text(model_card(m, provenance, self.repo, has_samples))
        revision = self.out_store.publish(self.repo, staging, kind="model", message=f"ensemble of {len(units)} units")
        files = folder_files(staging)
        final = self.work / "ensemble"
        shutil.rmtree(final, ignore_errors=True)
        staging.replace(final)
        tokens = [self.accepted[u].release.token for u in units if u != "router"]
        ensemble = Ensemble(
            run_id=m.run_id,
            repo=self.repo,
            revision=revision,
            files=files,
            experts=tokens,
            router=self.accepted["router"].release.token,
            complete=set(units) == set(m.units),
            published_time=dht_time(),
            peer_id=self.peer_id,
        )
        if not self.swarm.put_ensemble(ensemble):
            log.warning("no peer accepted the ensemble record (the ensemble is published in the store anyway)")
        self.published = Published(self.repo, revision, final, units)
        log.info("published ensemble %s@%s with %s", self.repo, revision[:12], ", ".join(units))
        if self.config.summary is not None:
            from isles.protocol.files import atomic_write_json

            atomic_write_json(self.config.summary, self.summary())
        return self.published

    def summary(self) -> dict:
        m = self.manifest
        units = []
        for unit in m.units:
            acc = self.accepted.get(unit)
            if acc is None:
                units.append({"unit": unit, "state": "missing"})
                continue
            units.append({"unit": unit, "state": "accepted", **_provenance(acc)})
        rejections = [
            {"unit": k[0], "owner": k[2], "revision": k[3], "reason": r}
            for k, r in self.judged.items()
            if r not in ("accepted", "duplicate")
        ]
        p = self.published
        return {
            "run_id": m.run_id,
            "units": units,
            "rejections": rejections,
            "complete": self.complete,
            "store_uri": self.out_store.uri,
            "repo": p.repo if p else None,
            "revision": p.revision if p else None,
            "ensemble": str(p.folder) if p else None,
            "samples": str(p.folder / SAMPLES_FILE) if p and (p.folder / SAMPLES_FILE).exists() else None,
        }


def _index(unit: str) -> int:
    return int(unit.rsplit("-", 1)[1])


def _provenance(acc: Accepted) -> dict:
    r = acc.release
    return {
        "unit": r.unit,
        # The display name is the volunteer's own word; the peer id is the attribution that holds (readers drop
        # releases whose token names anyone but their signer), and the model card shows both.
        "trained_by": r.volunteer or r.token.owner,
        "peer_id": r.token.owner,
        "attempt": r.token.attempt,
        "repo": r.repo,
        "revision": r.revision,
        "steps": r.steps,
        "resumed_from_step": r.resumed_from_step,
        "wall_s": r.wall_period,
        "hardware": r.hardware,
        "flops": r.flops,
        "val_loss": acc.verdict.val_loss,
        "threshold": acc.verdict.threshold,
        "reported_val_loss": r.val_loss,
    }


def run_aggregator(config: AggregateConfig, stop: threading.Event | None = None) -> dict:
    """Join the swarm, then poll until stopped (or once / until complete); returns the summary."""
    from isles.protocol.artifacts import open_store

    from .run_access import find_manifest, open_swarm

    stop = stop or threading.Event()
    node, swarm = open_swarm(config.swarm)
    try:
        manifest = find_manifest(swarm, config.run_id, config.run_timeout, stop)
        store = open_store(config.store or manifest.store, token=config.token)
        out_store = open_store(config.to_store, token=config.token) if config.to_store else store
        agg = Aggregator(config, swarm, manifest, store, out_store, node.peer_id)
        log.info(
            "aggregating run %s (%d units) into %s %s", manifest.run_id, len(manifest.units), out_store.uri, agg.repo
        )
        log.info("aggregator key (for `isles partition --aggregator`): %s", swarm.identity.owner_key[7:-1])
        if not manifest.may_aggregate(swarm.identity.public_key):
            log.warning(
                "this peer's key is not one of the run's aggregators: its ensembles and rejections count for nobody "
                "(the run owner names aggregators with `isles partition --aggregator KEY`)"
            )
        witness = CheckpointWitness(
            swarm,
            manifest,
            store,
            agg.work,
            lambda unit: agg._recipe_model(unit)[0],
            agg.replay,
            config.replay_fraction,
        )
        agg.witness = witness
        while not stop.is_set():
            agg.poll()
            witness.forget(agg.accepted)
            witness.poll()  # resumers install only checkpoints verified here; holders without any lose their lease
            if config.once or (config.until_complete and agg.complete):
                break
            stop.wait(config.poll_period)
        return agg.summary()
    finally:
        node.shutdown()
