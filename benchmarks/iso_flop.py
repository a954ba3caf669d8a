"""The iso-FLOP benchmark: does an ensemble of experts trained in isolation beat one model trained on all the data
with the same training FLOPs (counted by the trainer, the router's on the ensemble side)?

Run: `python benchmarks/iso_flop.py --quick` (a few minutes, what the tests run); `python benchmarks/iso_flop.py` (the
reported CPU run, 30-45 min a seed on a 2-core machine; run seeds as parallel processes with `--seeds N` and combine
them with `--merge`); `--preset unet-micro --mono-steps 9600 --curve-points 4` (where the ensemble wins on a CPU);
larger runs on a GPU with e.g. `--resolution 32 --preset unet-small --mono-steps 40000 --n 2000 --sample-steps 30`.
Writes <out>/iso_flop.{json,md,png} (iso_flop_quick.* with --quick) and prints the table. `--hetero-only yes` trains
just the all-FM ensemble and the hetero ones with DDPM experts (eps and v prediction) on the detail clusters.

`--video`: the same comparison for text-to-video (Paris 2.0): procedural captioned clips (experts/procedural_video.py),
Wan transformers prompted with the clips' captions (embedded once by --text-encoder), FVD-style distance on a small
video classifier's features. `python benchmarks/iso_flop.py --video --quick` (what the tests run); writes
iso_flop_video.* (iso_flop_video_quick.*).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from isles.experts import procedural
from isles.experts.checkpoints import read_checkpoint
from isles.experts.data import item_layout, split_mask
from isles.experts.device import pick_device
from isles.experts.expert import ExpertTask
from isles.experts.presets import preset_stats
from isles.experts.trainer import TrainRecipe, train
from isles.protocol.files import atomic_write_bytes, atomic_write_json
from isles.router import metrics
from isles.router.calibration import PROFILE_KEY
from isles.router.encoders import ClipEncoder, embed_items, make_encoder
from isles.router.ensemble import EnsemblePipeline, Expert
from isles.router.evaluate import EnsembleSampler, EvalConfig, ModelSampler, build_reference, evaluate
from isles.router.partition import kmeans, split_steps
from isles.router.router_task import RouterTask

log = logging.getLogger("iso_flop")
BASE_CONFIGS = ("monolith", "top1", "top2", "full", "hetero", "all_fm", "random_shards")
# Issue 16's questions (image runs): calibrated mixing of the all-FM and the hetero ensembles, DDPM experts (eps or v
# prediction) on the clusters with the most fine detail, and steps split in proportion to cluster size.
QUESTION_CONFIGS = ("calibrated_top1", "calibrated_top2", "calibrated", "hetero_calibrated", "hetero_chosen",
                    "hetero_chosen_calibrated", "hetero_v_chosen", "hetero_v_chosen_calibrated", "proportional",
                    "proportional_calibrated")  # fmt: skip
# Video runs: the same experts routed by a text-aware router (it reads the prompt; the papers' router does not).
TEXT_ROUTER_CONFIGS = ("text_top1", "text_top2", "text_full")
CONFIGS = BASE_CONFIGS + QUESTION_CONFIGS + TEXT_ROUTER_CONFIGS
SOLVERS = ("euler", "heun", "dpm++2m", "unipc")
SWEEP_LABELS = {"ensemble": "all-FM ensemble", "monolith": "monolith", "proportional": "proportional steps"}


@dataclass(frozen=True)
class BenchConfig:
    items: int = 20_000  # procedural items (seed 0): both sides train on exactly these (minus the validation split)
    resolution: int = 16
    experts: int = 4
    preset: str = "unet-tiny"  # the monolith and every expert: same architecture, as in the DDM paper
    mono_steps: int = 1200  # the monolith's steps; its training FLOPs are the budget both sides get
    batch: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    ema_decay: float = 0.999
    router_preset: str = "cnn-small"
    router_fraction: float = 0.05  # share of the ensemble's budget spent on the router (the papers: ~4%)
    router_batch: int = 64
    hetero_ddpm: int = 2  # the heterogeneous ensemble: this many DDPM experts, the rest flow matching
    routing: str = "top1"  # the routing of the all_fm / hetero / random_shards rows and of the FLOP curve
    encoder: str = "pixels"  # embedding for k-means (PCA of pixels; DINOv2 needs the `real` extra)
    seeds: tuple[int, ...] = (0, 1, 2)
    n: int = 500  # samples per FID and held-out reference items (always the same count)
    sample_steps: int = 20
    curve_points: int = 3  # budget fractions 1/P, 2/P, ..., 1 evaluated for the FID-vs-FLOPs plot
    val_fraction: float = 0.05
    feature_overrides: dict = field(default_factory=dict)  # e.g. a tiny feature network for --quick
    video: bool = False  # text-to-video clips instead of class-conditional images
    frames: int = 16  # video: frames per clip
    text_encoder: str = "minilm"  # video: embeds the captions (the offline MiniLM; a folder or hf:<id> works too)
    guidance: float = 1.0  # video: classifier-free guidance when sampling (1 = off, plain conditional sampling)
    questions: bool = True  # images: also the QUESTION_CONFIGS rows and the sampler sweep
    random_shards: bool = True  # the random-shards row (0: skip it, an ensemble's worth of training less)
    sampler_steps: tuple[int, ...] = (10, 20, 50)  # the sampler sweep: FID per solver and steps (monolith, ensembles)
    # Images: the hetero question alone, at a third of the cost: the all-FM ensemble and the ensembles with DDPM
    # experts (eps and v prediction) on the detail clusters; no monolith, largest-cluster hetero, proportional
    # steps, random shards or sampler sweep. Its all-FM and hetero_chosen rows repeat a full run's of the same seed.
    hetero_only: bool = False

    def routings(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(("top1", "top2", "full", self.routing)))


QUICK = BenchConfig(
    items=1500, resolution=8, experts=3, mono_steps=40, batch=16, lr=2e-3, warmup_steps=5, router_batch=32,
    seeds=(0, 1), n=64, sample_steps=4, curve_points=2, sampler_steps=(2, 4),
    feature_overrides={"train_items": 1024, "epochs": 1, "batch_size": 64},
)  # fmt: skip


VIDEO = BenchConfig(
    items=4000, resolution=32, experts=3, preset="wan-tiny", mono_steps=1500, batch=16, lr=1e-3, warmup_steps=50,
    router_batch=32, n=300, sample_steps=20, curve_points=2, video=True, frames=16, questions=False,
)  # fmt: skip
VIDEO_QUICK = dataclasses.replace(
    VIDEO, items=240, resolution=16, frames=8, experts=2, mono_steps=16, batch=8, router_batch=16, seeds=(0,), n=32,
    sample_steps=3, curve_points=1, feature_overrides={"train_items": 512, "epochs": 1, "batch_size": 32},
)  # fmt: skip


def _recipe(config: BenchConfig, steps: int, seed: int, batch: int | None = None) -> TrainRecipe:
    return TrainRecipe(
        steps=max(1, steps), global_batch=batch or config.batch, lr=config.lr, warmup_steps=config.warmup_steps,
        ema_decay=config.ema_decay, seed=seed, checkpoint_every_steps=None, checkpoint_every_seconds=None,
    )  # fmt: skip


class Trained:
    """One model trained in stages (stop_at_step), so it can be evaluated at fractions of its budget."""

    def __init__(self, task, recipe: TrainRecipe, folder: Path, device: torch.device):
        self.task, self.recipe, self.folder, self.device = task, recipe, folder, device
        self.flops = 0
        self.model: torch.nn.Module | None = None
        self._profile: list[float] | None = None  # measured once per trained state (advance resets it)

    def advance(self, fraction: float) -> None:
        stop = max(1, round(self.recipe.steps * fraction))
        result = train(self.task, self.recipe, self.folder, device=self.device, stop_at_step=stop, export=False)
        self.flops = int(result.metrics.get("train_flops", 0))
        model = self.task.build_model()
        model.load_state_dict(read_checkpoint(result.checkpoint)["ema"])
        self.model = model.to(self.device).eval()
        self._profile = None

    def profile(self) -> list[float] | None:
        """Velocity error by noise level on the held-out split (experts only; None for the router)."""
        if self._profile is None and hasattr(self.task, "velocity_errors"):
            self._profile = self.task.velocity_errors(self.model, self.device)
        return self._profile


def _shards(data, clusters: torch.Tensor, k: int) -> list:
    shards = []
    for c in range(k):
        shard = data.subset(clusters == c)
        shard.clusters = torch.full((len(shard),), c, dtype=torch.long)
        shards.append(shard.with_meta(cluster=c, num_clusters=k))
    return shards


def _ensemble(experts: list[Trained], objectives: list[str], router: Trained, pipe_config=None) -> EnsembleSampler:
    """The ensemble, each expert with its held-out velocity error by noise level (what the aggregator publishes)."""
    members = {i: Expert(i, e.model, objectives[i], {PROFILE_KEY: e.profile()}) for i, e in enumerate(experts)}
    return EnsembleSampler(EnsemblePipeline(members, router.model, pipe_config).to(router.device))


def detail_energy(shard) -> float:
    """Mean squared Laplacian of a shard's items in [-1, 1]: how much fine detail its images carry (where eps
    prediction's weight on low noise levels should pay)."""
    x = shard.items[:2048].float() / 127.5 - 1
    lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return float(lap.pow(2).mean())


def _video_data(config: BenchConfig):
    """The clips with their captions embedded (text, masks, the empty caption), and the encoder's recorded spec."""
    from isles.experts import procedural_video
    from isles.router.text_encoder import load_text_encoder

    data, _, captions = procedural_video.load_clips(
        f"procedural-video:{config.items}", resolution=config.resolution, frames=config.frames
    )
    encoder = load_text_encoder(config.text_encoder, max_length=16)
    parts = [encoder(captions[i : i + 512]) for i in range(0, len(captions), 512)]
    data.text = torch.cat([p[0] for p in parts]).to(torch.float16)
    data.text_mask = torch.cat([p[1] for p in parts]).to(torch.uint8)
    data.null_text = tuple(t.to(dtype) for t, dtype in zip(encoder.null(), (torch.float16, torch.uint8), strict=True))
    return data, encoder.spec.to_dict()


def save_video_samples(
    sampler: EnsembleSampler, folder: Path, steps: int, guidance: float, stem: str = "video_samples"
) -> None:
    """Clips of the seed's k-means ensemble (top-1) for fixed prompts: GIF, MP4, frame sheet, routing strip."""
    from isles.client.cli.sample import routing_strip, save_png
    from isles.experts.procedural_video import caption
    from isles.experts.video_files import save_clip_grid_gif, save_clip_grid_mp4, save_frame_sheet

    # class, colour, motion: every motion once, digits and shapes, two clips each
    rows = [[3, 0, 0], [7, 5, 1], [10, 3, 2], [11, 2, 3], [5, 6, 4], [13, 4, 5], [12, 1, 6], [8, 7, 7]]
    prompts = [caption(r) for r in rows for _ in range(2)]
    result = sampler.pipe(prompt=prompts, routing="top1", steps=steps, seed=0, guidance_scale=guidance,
                          return_routing=True)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    save_clip_grid_gif(result.images, folder / f"{stem}.gif", nrow=4)
    try:
        save_clip_grid_mp4(result.images, folder / f"{stem}.mp4", nrow=4)
    except ImportError:  # PyAV missing (a bare GPU machine): the GIF and the frame sheet are enough
        log.warning("no PyAV: %s.mp4 not written", stem)
    save_frame_sheet(result.images, folder / f"{stem}_frames.png", scale=3, labels=prompts, max_clips=16)
    save_png(routing_strip(result.choices, sampler.pipe.num_experts), folder / f"{stem}_routing.png")


def run_seed(
    config: BenchConfig, seed: int, data, reference, work: Path, device, on_row, samples_dir: Path | None = None
) -> dict:
    """Train every configuration for one seed and evaluate it; returns {config: row} and the FLOP curve points."""
    torch.manual_seed(seed)
    k = config.experts
    questions = config.questions and not config.video
    hetero_only = config.hetero_only and questions
    c, frames, res, _ = item_layout(data.shape)
    if config.video:
        text_width, text_length = data.text.shape[2], data.text.shape[1]
        fps = preset_stats(config.preset, c, res, None, text_width, text_length, frames)["train_flops_per_sample"]
        text_spec = data.meta["text_encoder"]
        pipe_config = {"conditioning": "text", "text_encoder": text_spec}
        mono_info = {"text_encoder": text_spec, "shape": list(data.shape)}
    else:
        fps = preset_stats(config.preset, c, res, procedural.NUM_CLASSES)["train_flops_per_sample"]
        pipe_config, mono_info = None, None
    budget = fps * config.batch * config.mono_steps
    # 1. Clusters: k-means on an embedding (what `isles partition` does), and a random split of the same sizes.
    encoder = make_encoder(config.encoder, seed=seed)
    feats = embed_items(data.items, ClipEncoder(encoder, seed=seed) if config.video else encoder)
    km = torch.from_numpy(kmeans(feats, k, seed=seed))
    rand = km[torch.randperm(len(km), generator=torch.Generator().manual_seed(seed))]
    km_shards, rand_shards = _shards(data, km, k), _shards(data, rand, k)
    # 2. Iso-FLOP recipes: the experts share (1 - router_fraction) of the budget equally, in whole steps; the router
    #    gets what is left, so the two sides differ by less than one router step.
    router_task = RouterTask(km_shards, preset=config.router_preset, conditional=not config.video)
    router_step_flops = router_task.flops_per_sample() * config.router_batch
    expert_steps = max(1, math.floor(budget * (1 - config.router_fraction) / (k * fps * config.batch)))
    router_steps = max(1, math.floor((budget - k * expert_steps * fps * config.batch) / router_step_flops))
    router_flops = router_step_flops * router_steps
    log.info(
        "seed %d: budget %.3g FLOPs; monolith %d steps; %d experts x %d steps; router %d steps (cluster sizes %s)",
        seed,
        budget,
        config.mono_steps,
        k,
        expert_steps,
        router_steps,
        torch.bincount(km).tolist(),
    )
    d = work / f"seed{seed}"
    mono = Trained(ExpertTask(data, config.preset, "fm"), _recipe(config, config.mono_steps, seed), d / "mono", device)
    fm = [
        Trained(
            ExpertTask(s, config.preset, "fm"), _recipe(config, expert_steps, seed + 1000 * i), d / f"fm{i}", device
        )
        for i, s in enumerate(km_shards)
    ]
    router = Trained(router_task, _recipe(config, router_steps, seed, config.router_batch), d / "router", device)
    text_router = None
    if config.video:  # the same share of the budget, spent on a router that also reads the prompt
        text_task = RouterTask(km_shards, preset=config.router_preset, conditional=False, text_aware=True)
        text_router_steps = max(1, math.floor(
            (budget - k * expert_steps * fps * config.batch) / (text_task.flops_per_sample() * config.router_batch)
        ))  # fmt: skip
        text_router = Trained(
            text_task, _recipe(config, text_router_steps, seed, config.router_batch), d / "text_router", device
        )
    ev = EvalConfig(
        n=config.n, steps=config.sample_steps, seed=seed, device=str(device), guidance_scale=config.guidance,
        batch_size=100 if config.video else 250,
    )  # fmt: skip
    rows: dict[str, dict] = {}
    curve: dict[str, list] = {**({} if hetero_only else {"monolith": []}), f"ensemble_{config.routing}": []}
    # 3. Train both sides in stages and evaluate them at each fraction of the budget (the last one is the budget).
    for j in range(1, config.curve_points + 1):
        fraction = j / config.curve_points
        for model in [*([] if hetero_only else [mono]), *fm, router, *([text_router] if text_router else [])]:
            model.advance(fraction)
        last = j == config.curve_points
        mono_row = None if hetero_only else evaluate(ModelSampler(mono.model, "fm", "monolith", mono_info), reference,
                                                     ev)[0]  # fmt: skip
        ens_flops = sum(e.flops for e in fm) + router.flops
        routings = config.routings() if last else (config.routing,)
        if last and questions:
            routings += ("calibrated:top1", "calibrated:top2", "calibrated")
        ens_rows = evaluate(
            _ensemble(fm, ["fm"] * k, router, pipe_config), reference, dataclasses.replace(ev, routings=routings)
        )
        if mono_row is not None:
            curve["monolith"].append([mono.flops, mono_row["fid"]])
        by_routing = {r["routing"]: r for r in ens_rows}
        curve[f"ensemble_{config.routing}"].append([ens_flops, by_routing[config.routing]["fid"]])
        if last and mono_row is not None:
            rows["monolith"] = {**mono_row, "train_flops": mono.flops}
        if last:
            for name in ("top1", "top2", "full"):
                rows[name] = {**by_routing[name], "train_flops": ens_flops}
            rows["all_fm"] = {**by_routing[config.routing], "train_flops": ens_flops}
            if questions:
                for name in ("calibrated_top1", "calibrated_top2", "calibrated"):
                    routing = "calibrated" if name == "calibrated" else name.replace("_", ":")
                    rows[name] = {**by_routing[routing], "train_flops": ens_flops}
            if text_router is not None:
                text_rows = evaluate(_ensemble(fm, ["fm"] * k, text_router, pipe_config), reference,
                                     dataclasses.replace(ev, routings=("top1", "top2", "full")))  # fmt: skip
                text_flops = sum(e.flops for e in fm) + text_router.flops
                for r in text_rows:
                    rows[f"text_{r['routing']}"] = {**r, "train_flops": text_flops}
                on_row(f"seed {seed}: text-aware router: " + ", ".join(
                    f"{r['routing']} {r['fid']:.3f}" for r in text_rows))  # fmt: skip
        on_row(
            f"seed {seed}, {fraction:.2f} of budget: monolith FID "
            f"{'-' if mono_row is None else format(mono_row['fid'], '.3f')}, ensemble "
            f"{config.routing} FID {by_routing[config.routing]['fid']:.3f}"
        )
    # 4. Heterogeneous objectives: the all-FM experts with some clusters' retrained as DDPM; same router. Each
    #    (cluster, objective) expert is trained once a seed and shared by the ensembles that use it.
    ev_one = dataclasses.replace(ev, routings=(config.routing,))
    ev_calibrated = dataclasses.replace(ev, routings=(config.routing, f"calibrated:{config.routing}"))
    swapped_experts: dict[tuple[int, str], Trained] = {}

    def hetero_rows(clusters: list[int], objective: str, ev_rows) -> list[dict]:
        """Rows (one per routing of ev_rows) of the ensemble whose experts on `clusters` train with `objective`."""
        models = list(fm)
        for i in clusters:
            if (i, objective) not in swapped_experts:
                task = ExpertTask(km_shards[i], config.preset, objective)
                folder = d / f"{objective.replace('-', '')}{i}"
                swapped_experts[i, objective] = Trained(task, _recipe(config, expert_steps, seed + 1000 * i), folder,
                                                        device)  # fmt: skip
                swapped_experts[i, objective].advance(1.0)
            models[i] = swapped_experts[i, objective]
        objectives = [objective if i in clusters else "fm" for i in range(k)]
        flops = sum(e.flops for e in models) + router.flops
        found = evaluate(_ensemble(models, objectives, router, pipe_config), reference, ev_rows)
        return [{**r, "train_flops": flops} for r in found]

    # With --hetero-ddpm 0 there is no heterogeneous ensemble: these rows would be the all-FM ensemble again.
    if not hetero_only and config.hetero_ddpm:  # DDPM on the first (largest) clusters, as `mixed:N` puts them
        found = hetero_rows(list(range(config.hetero_ddpm)), "ddpm", ev_calibrated if questions else ev_one)
        rows["hetero"] = found[0]
        if questions:
            rows["hetero_calibrated"] = found[1]
    if questions and config.hetero_ddpm:
        # DDPM on the clusters with the most fine detail (the paper's "two chosen clusters"), FM on the rest; then
        # the same clusters with v-prediction DDPM experts: the same process and schedule, an exact conversion.
        energy = [detail_energy(sh) for sh in km_shards]
        chosen = sorted(sorted(range(k), key=lambda i: -energy[i])[: config.hetero_ddpm])
        on_row(f"seed {seed}: detail energy per cluster {[round(e, 4) for e in energy]}: DDPM on clusters {chosen}")
        for name, objective in (("hetero_chosen", "ddpm"), ("hetero_v_chosen", "ddpm-v")):
            plain, calibrated = hetero_rows(chosen, objective, ev_calibrated)
            rows[name] = {**plain, "ddpm_clusters": chosen}
            rows[f"{name}_calibrated"] = {**calibrated, "ddpm_clusters": chosen}
    if questions and not hetero_only:
        # The same total expert steps, split in proportion to the shards' sizes (DDM splits them equally).
        sizes = [int((~s.val_mask).sum()) if s.val_mask is not None else len(s) for s in km_shards]
        steps = split_steps(expert_steps, sizes, "proportional")
        on_row(f"seed {seed}: proportional steps {steps} for shards of {sizes} (equal: {expert_steps} each)")
        proportional = [
            Trained(
                ExpertTask(sh, config.preset, "fm"), _recipe(config, steps[i], seed + 1000 * i), d / f"prop{i}", device
            )  # fmt: skip
            for i, sh in enumerate(km_shards)
        ]
        for model in proportional:
            model.advance(1.0)
        prop_rows = evaluate(_ensemble(proportional, ["fm"] * k, router, pipe_config), reference, ev_calibrated)
        flops = sum(e.flops for e in proportional) + router.flops
        rows["proportional"] = {**prop_rows[0], "train_flops": flops, "steps": steps}
        rows["proportional_calibrated"] = {**prop_rows[1], "train_flops": flops, "steps": steps}
    # 5. Random sharding: the same recipe on random shards of the same sizes, with its own router.
    if config.random_shards and not hetero_only:
        rand_router = Trained(
            RouterTask(rand_shards, preset=config.router_preset, conditional=not config.video),
            _recipe(config, router_steps, seed, config.router_batch), d / "rand_router", device,
        )  # fmt: skip
        rand_fm = [
            Trained(
                ExpertTask(s, config.preset, "fm"),
                _recipe(config, expert_steps, seed + 1000 * i),
                d / f"rand{i}",
                device,
            )
            for i, s in enumerate(rand_shards)
        ]
        for model in [*rand_fm, rand_router]:
            model.advance(1.0)
        row = evaluate(_ensemble(rand_fm, ["fm"] * k, rand_router, pipe_config), reference, ev_one)[0]
        rows["random_shards"] = {**row, "train_flops": sum(e.flops for e in rand_fm) + rand_router.flops}
    # 6. Samplers: under each ODE solver at a few step counts (FID against expert calls), the all-FM ensemble, the
    #    monolith (so the two sides are compared with the best solver for each) and the proportional-steps ensemble.
    sweep = []
    if questions and not hetero_only:
        sweep_models = {
            "ensemble": _ensemble(fm, ["fm"] * k, router, pipe_config),
            "monolith": ModelSampler(mono.model, "fm", "monolith", mono_info),
            "proportional": _ensemble(proportional, ["fm"] * k, router, pipe_config),
        }
        for model_name, sampler in sweep_models.items():
            for solver in SOLVERS:
                for steps in config.sampler_steps:
                    row = evaluate(sampler, reference, dataclasses.replace(ev_one, steps=steps, solver=solver))[0]
                    sweep.append({"model": model_name, "solver": solver, "steps": steps, "fid": row["fid"],
                                  "expert_calls_per_sample": row["expert_calls_per_sample"]})  # fmt: skip
                    on_row(f"seed {seed}: sampler {solver} x {steps}, {model_name}: FID {row['fid']:.3f}")
    on_row(f"seed {seed}: " + ", ".join(f"{name} {rows[name]['fid']:.3f}" for name in CONFIGS if name in rows))
    if samples_dir is not None and config.video:
        save_video_samples(_ensemble(fm, ["fm"] * k, router, pipe_config), samples_dir, 30, max(config.guidance, 3.0))
        save_video_samples(_ensemble(fm, ["fm"] * k, text_router, pipe_config), samples_dir, 30,
                           max(config.guidance, 3.0), stem="video_samples_text_router")  # fmt: skip
    return {"rows": rows, "curve": curve, "expert_steps": expert_steps, "router_steps": router_steps,
            "samplers": sweep, "router_flops": router_flops, "budget": budget,
            "cluster_sizes": torch.bincount(km).tolist()}  # fmt: skip


def summarise(config: BenchConfig, per_seed: list[dict], ref: dict, command: str, wall: float) -> dict:
    """Mean and spread over seeds per configuration; `ref` holds n, fid_floor, noise_fid and real_accuracy."""

    def stat(values):
        arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
        if len(arr) == 0:
            return None, None
        return round(float(arr.mean()), 4), round(float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, 4)

    out: dict = {
        "command": command,
        "scale": f"{config.items} procedural {'clips' if config.video else 'items'} at "
        + (f"{config.frames}x" if config.video else "")
        + f"{config.resolution}x{config.resolution}, {config.preset}, "
        f"K={config.experts}, monolith {config.mono_steps} steps x batch {config.batch}, {len(per_seed)} seeds, "
        f"{'FVD' if config.video else 'FID'} at n={ref['n']} with {config.sample_steps} sampling steps",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()},
        **{k: ref[k] for k in ("n", "fid_floor", "noise_fid", "real_accuracy")},
        "wall_time_s": round(wall, 1),
        "seeds_completed": len(per_seed),
        "per_seed": per_seed,
        "curve": {name: [s["curve"][name] for s in per_seed] for name in per_seed[0]["curve"]},
    }  # fmt: skip
    # Runs with no DDPM experts write no hetero rows; files from before that (merged later) hold hetero rows that are
    # the all-FM ensemble again: not reported as hetero.
    out["configs"] = [name for name in CONFIGS if all(name in s["rows"] for s in per_seed)
                      and not (name.startswith("hetero") and config.hetero_ddpm == 0)]  # fmt: skip
    for name in out["configs"]:
        rows = [s["rows"][name] for s in per_seed]
        fid_mean, fid_std = stat(r["fid"] for r in rows)
        acc_mean, acc_std = stat(r["accuracy"] for r in rows)
        out[name] = {
            "fid_mean": fid_mean, "fid_std": fid_std, "fid_per_seed": [r["fid"] for r in rows],
            "accuracy_mean": acc_mean, "accuracy_std": acc_std, "routing": rows[0]["routing"],
            "diversity_mean": stat(r["diversity"] for r in rows)[0],
            "expert_calls_per_sample": stat(r["expert_calls_per_sample"] for r in rows)[0],
            "seconds_per_sample": stat(r["seconds_per_sample"] for r in rows)[0],
            "train_flops": int(np.mean([r["train_flops"] for r in rows])),
        }  # fmt: skip
    # Sampler rows by (model, solver, steps): seeds from older runs swept the all-FM ensemble only, so only the rows
    # every seed has are averaged.
    sweeps = [{(r.get("model", "ensemble"), r["solver"], r["steps"]): r for r in s.get("samplers") or []}
              for s in per_seed]  # fmt: skip
    out["samplers"] = []
    for key, first in sweeps[0].items() if sweeps else ():
        if not all(key in sw for sw in sweeps):
            continue
        fid_mean, fid_std = stat(sw[key]["fid"] for sw in sweeps)
        calls = first["expert_calls_per_sample"]
        out["samplers"].append({"model": key[0], "solver": key[1], "steps": key[2], "fid_mean": fid_mean,
                                "fid_std": fid_std, "expert_calls_per_sample": calls})  # fmt: skip
    return out


def markdown(result: dict) -> str:
    metric = "FVD" if result["config"].get("video") else "FID"
    lines = [
        f"Scale: {result['scale']} ({result['seeds_completed']} of them completed).",
        f"Real-vs-real {metric} floor {result['fid_floor']:.3f}; uniform noise {result['noise_fid']:.1f}.",
        "",
        f"| configuration | routing | {metric} (mean ± sd) | class accuracy | expert calls / sample "
        "| training FLOPs |",
        "|---|---|---|---|---|---|",
    ]
    for name in result.get("configs", BASE_CONFIGS):
        r = result[name]
        acc = "-" if r["accuracy_mean"] is None else f"{r['accuracy_mean']:.3f}"
        lines.append(
            f"| {name} | {r['routing']} | {r['fid_mean']:.3f} ± {r['fid_std']:.3f} | {acc} | "
            f"{r['expert_calls_per_sample']:.0f} | {r['train_flops']:.3g} |"
        )
    if result.get("samplers"):
        header = f"| model | sampler | steps | expert calls / sample | {metric} (mean ± sd) |"
        lines += ["", f"Samplers (the ensembles route {result['config']['routing']}):", "", header]
        lines.append("|---|---|---|---|---|")
        for r in result["samplers"]:
            label = SWEEP_LABELS[r.get("model", "ensemble")]
            lines.append(f"| {label} | {r['solver']} | {r['steps']} | {r['expert_calls_per_sample']:.0f} | "
                         f"{r['fid_mean']:.3f} ± {r['fid_std']:.3f} |")  # fmt: skip
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def _new_figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 4))


def _save_figure(fig, ax, path: Path) -> None:
    """Legend (beside the axes when it is long), layout, and the PNG written atomically."""
    import io

    import matplotlib.pyplot as plt

    if len(ax.get_legend_handles_labels()[1]) > 6:
        fig.set_size_inches(9, 4)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot(result: dict, path: Path) -> None:
    fig, ax = _new_figure()
    # The monolith first and in the same colour in every plot (JSON round trips sort the keys).
    names = sorted(result["curve"], key=lambda name: (name != "monolith", name))
    for color, name in zip(("tab:blue", "tab:orange", "tab:green"), names, strict=False):
        arr = np.asarray(result["curve"][name], dtype=np.float64)  # [seeds, P, 2]
        flops, fid = arr[..., 0].mean(0), arr[..., 1]
        ax.errorbar(flops, fid.mean(0), yerr=fid.std(0, ddof=1) if len(fid) > 1 else None, marker="o", capsize=3,
                    color=color, label=name.replace("_", " "))  # fmt: skip
    ax.axhline(result["fid_floor"], color="gray", linestyle="--", label="real vs real (floor)")
    ax.set_xlabel("training FLOPs")
    metric = "FVD" if result["config"].get("video") else "FID"
    ax.set_ylabel(f"{metric} (n={result['config']['n']}, classifier features)")
    ax.set_yscale("log")
    ax.set_title(f"iso-FLOP: monolith vs {result['config']['experts']}-expert ensemble")
    _save_figure(fig, ax, path)


def plot_samplers(result: dict, path: Path) -> None:
    """FID against expert calls per sample, one line per ODE solver (the sampler sweep)."""
    fig, ax = _new_figure()
    styles = {"ensemble": ("-", "o"), "monolith": (":", "s"), "proportional": ("--", "^")}  # line, marker
    colors = dict(zip(SOLVERS, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=True))
    for key in dict.fromkeys((r.get("model", "ensemble"), r["solver"]) for r in result["samplers"]):
        rows = [r for r in result["samplers"] if (r.get("model", "ensemble"), r["solver"]) == key]
        ax.errorbar([r["expert_calls_per_sample"] for r in rows], [r["fid_mean"] for r in rows],
                    yerr=[r["fid_std"] for r in rows], marker=styles[key[0]][1], capsize=3,
                    linestyle=styles[key[0]][0], color=colors.get(key[1]),
                    label=f"{SWEEP_LABELS[key[0]]}, {key[1]}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("expert calls per sample")
    metric = "FVD" if result["config"].get("video") else "FID"
    ax.set_ylabel(f"{metric} (n={result['config']['n']})")
    ax.set_title(f"samplers (ensembles: {result['config']['routing']})")
    _save_figure(fig, ax, path)


def write_results(result: dict, out: Path, stem: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{stem}.json", json.loads(json.dumps(result, default=float)))
    atomic_write_bytes(out / f"{stem}.md", markdown(result).encode())
    plot(result, out / f"{stem}.png")
    if result.get("samplers"):
        plot_samplers(result, out / f"{stem}_samplers.png")
    return result


def merge(paths: list[Path], command: str) -> dict:
    """One result from runs of the same configuration on different seeds (e.g. one process per seed)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    base = {k: v for k, v in runs[0]["config"].items() if k != "seeds"}
    per_seed = []
    for path, run in zip(paths, runs, strict=True):
        if {k: v for k, v in run["config"].items() if k != "seeds"} != base or run["fid_floor"] != runs[0][
            "fid_floor"
        ]:
            raise SystemExit(f"{path}: another configuration than {paths[0]}; only seeds may differ")
        for i, seed_result in enumerate(run["per_seed"]):
            if "rows" not in seed_result:  # older single-seed files: the rows are the summary entries
                assert len(run["per_seed"]) == 1, f"{path}: per-seed rows missing"
                seed_result = {**seed_result, "curve": {k: v[i] for k, v in run["curve"].items()}, "rows": {
                    c: {"fid": run[c]["fid_per_seed"][0], "accuracy": run[c]["accuracy_mean"],
                        "diversity": run[c]["diversity_mean"], "routing": run[c]["routing"],
                        "expert_calls_per_sample": run[c]["expert_calls_per_sample"],
                        "seconds_per_sample": run[c]["seconds_per_sample"], "train_flops": run[c]["train_flops"]}
                    for c in BASE_CONFIGS}}  # fmt: skip
            per_seed.append(seed_result)
    seeds = tuple(s for run in runs for s in run["config"]["seeds"])
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    config = BenchConfig(
        **{k: (tuple(v) if k == "seeds" else v) for k, v in base.items() if k in fields} | {"seeds": seeds}
    )
    ref = {"n": runs[0].get("n", config.n), "fid_floor": runs[0]["fid_floor"], "noise_fid": runs[0]["noise_fid"],
           "real_accuracy": runs[0]["real_accuracy"]}  # fmt: skip
    result = summarise(config, per_seed, ref, " ; ".join([r["command"] for r in runs] + [command]), 0.0)
    result["wall_time_s"] = max(r["wall_time_s"] for r in runs)  # the runs went in parallel
    return result


def _yes_no(text: str) -> bool:
    if text.lower() in ("yes", "true", "1"):
        return True
    if text.lower() in ("no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: use yes or no")


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a few minutes on one CPU core")
    parser.add_argument("--video", action="store_true", help="text-to-video clips with Wan experts (Paris 2.0)")
    defaults = BenchConfig()
    for f in dataclasses.fields(BenchConfig):
        if f.name in ("feature_overrides", "video"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, tuple):  # seeds, sampler_steps
            parser.add_argument(flag, type=int, nargs="+", default=None, help=f"default {list(default)}")
        elif isinstance(default, bool):
            parser.add_argument(flag, type=_yes_no, default=None, metavar="yes|no", help=f"default {default}")
        else:
            parser.add_argument(flag, type=type(getattr(defaults, f.name)), default=None,
                                help=f"default {getattr(defaults, f.name)}")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--work", type=Path, default=None, help="training folder (default: a temporary one)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature-network cache")
    parser.add_argument("--samples-out", type=Path, default=None, help="video: the first seed's sample clips go here")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="combine result JSONs of runs of one configuration with other --seeds (run in parallel)",
    )
    args = parser.parse_args(argv)
    if args.merge:
        result = merge(args.merge, "python benchmarks/iso_flop.py " + " ".join(shlex.quote(a) for a in argv))
        write_results(result, args.out, "iso_flop_video" if result["config"].get("video") else "iso_flop")
        print(markdown(result))
        return result
    if args.video:
        config = VIDEO_QUICK if args.quick else VIDEO
    else:
        config = QUICK if args.quick else defaults
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig) if getattr(args, f.name, None)
                 is not None}  # fmt: skip
    for name in ("seeds", "sampler_steps"):
        if name in overrides:
            overrides[name] = tuple(overrides[name])
    config = dataclasses.replace(config, **overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("isles.trainer",):
        logging.getLogger(name).setLevel(logging.WARNING)
    device = pick_device(args.device)
    start = time.perf_counter()
    command = "python benchmarks/iso_flop.py " + " ".join(shlex.quote(a) for a in argv)

    if config.video:
        data, text_spec = _video_data(config)
        data.meta["text_encoder"] = text_spec
        source = f"procedural-video:{config.items}"
    else:
        data = procedural.load(f"procedural:{config.items}", resolution=config.resolution)
        source = f"procedural:{config.items}"
    data.val_mask = split_mask(len(data), config.val_fraction)
    frames = config.frames if config.video else None
    reference = build_reference(source, config.n, 3, config.resolution, cache_dir=args.cache_dir, device=str(device),
                                feature_overrides=config.feature_overrides, frames=frames)  # fmt: skip
    noise = torch.rand(
        reference.n, 3, *([frames] if frames else []), config.resolution, config.resolution,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    noise_fid = metrics.fid(reference.net.embed_all(noise * 2 - 1)[0], reference.features)
    log.info("reference: n=%d, real-vs-real floor %.3f, noise %.1f", reference.n, reference.floor, noise_fid)
    ref = {"n": reference.n, "fid_floor": round(reference.floor, 4), "noise_fid": round(noise_fid, 4),
           "real_accuracy": reference.real_accuracy}  # fmt: skip

    stem = ("iso_flop_video" if config.video else "iso_flop") + ("_quick" if args.quick else "")
    per_seed: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="iso-flop-") as tmp:
        work = args.work or Path(tmp)
        for seed in config.seeds:
            samples = args.samples_out if seed == config.seeds[0] else None
            per_seed.append(
                run_seed(config, seed, data, reference, work, device, lambda line: log.info("%s", line), samples)
            )
            # Written after every seed: a long run that is stopped still leaves the seeds it finished.
            result = summarise(config, per_seed, ref, command, time.perf_counter() - start)
            write_results(result, args.out, stem)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
