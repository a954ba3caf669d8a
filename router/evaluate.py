"""Evaluate a model or an ensemble: one table row per routing mode with FID (and its real-vs-real floor), class
accuracy, diversity, seconds and expert calls per sample. `isles eval` (client/cli/eval.py) prints these rows.
Text models are prompted with the reference items' captions; on the procedural set their rows add text-image
agreement (the share of samples whose class, colour, position and size read back as asked, router/attributes.py),
and a CLIP score when a CLIP model is named.

FID is measured against n held-out real items with a feature network trained on other items (router/features.py);
the floor is the FID between those n items and n more held-out ones, so every FID comes with what "perfect" scores.
Video (the procedural video set): the same Frechet distance on a small video classifier's features (an FVD in the
style of the standard one, router/video_features.py), and the share of clips whose class, colour and motion read back
as their prompt asked.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from isles.experts.objectives import x0_clamp
from isles.experts.solvers import calls_per_sample
from isles.protocol.errors import IslesError

from . import features as feature_net
from . import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    n: int = 1000  # samples per row, and real items in the reference: FID depends on the count, keep it fixed
    routings: tuple[str, ...] = ("top1", "top2", "full")  # ensembles only; a single model has one row
    steps: int = 30  # solver steps per sample
    solver: str = "euler"  # experts/solvers.py: euler, heun, dpm++2m, unipc
    seed: int = 0
    batch_size: int = 250
    guidance_scale: float = 1.0
    inception: bool = False  # also the standard Inception FID (torch-fidelity; real images only)
    device: str | None = None
    cache_dir: Path | None = None  # the feature network's cache (default: the user cache dir)
    clip_model: str | None = None  # text models: also the CLIP score with this CLIP (hf:<id> or a folder)


@dataclass
class Reference:
    """n held-out real items (A), their features, and the floor FID(A, B) against n other held-out items (B)."""

    source: str
    pixels: torch.Tensor  # uint8 [n, C, H, W]
    labels: torch.Tensor | None
    num_classes: int | None
    net: feature_net.FeatureNet
    features: torch.Tensor
    floor: float
    real_accuracy: float | None
    real_diversity: float
    other_pixels: torch.Tensor = field(repr=False, default=None)  # B, for the Inception floor
    captions: list[str] | None = None  # the items' captions: the prompts of text models
    attributes: torch.Tensor | None = None  # procedural: what each caption asks for (class, colour, position, size)

    @property
    def is_video(self) -> bool:
        return self.pixels.ndim == 5

    @property
    def n(self) -> int:
        return len(self.pixels)


def build_reference(
    source: str,
    n: int,
    channels: int,
    resolution: int,
    cache_dir: Path | None = None,
    device: str = "cpu",
    feature_overrides: dict | None = None,
    frames: int | None = None,
) -> Reference:
    """The FID reference of a data source at a data shape (clips of `frames` frames for video models).

    procedural[:N[:SEED]]: 2n items of the generator's own held-out stream; the feature network is trained on a third
    stream. Any other source (digits, a folder, hf:...): a fixed half of the data trains the feature network and the
    other half is the reference pool (the evaluated model may have trained on those items: say so when reporting).
    """
    from isles.experts import procedural, procedural_video

    overrides = dict(feature_overrides or {})
    if procedural_video.is_procedural_video(source):
        return _video_reference(source, n, channels, resolution, frames, cache_dir, device, overrides)
    if frames is not None:
        raise IslesError(
            f"the model makes clips of {frames} frames, but {source} holds images",
            hint="evaluate a video model on a video source: --data procedural-video",
        )
    if procedural.is_procedural(source):
        _, seed = procedural.parse_spec(source)
        if channels != 3:
            raise IslesError(f"the procedural data set is RGB but the model makes {channels}-channel items")
        pixels, labels, attributes, captions = procedural.generate_captioned(
            2 * n, seed=seed, stream="reference", resolution=resolution
        )
        spec = feature_net.procedural_spec(resolution=resolution, **overrides)
        net = feature_net.load_or_train(spec, cache_dir=cache_dir, device=device)
        num_classes: int | None = procedural.NUM_CLASSES
    else:
        from isles.experts.data import load_source

        data = load_source(source, resolution=resolution)
        if data.is_latent:
            raise IslesError("FID needs pixel data; this source holds latents", hint="evaluate with a pixel data set")
        if data.labels is None:
            raise IslesError(f"{source} has no class labels to train the FID feature network on")
        if data.shape != (channels, resolution, resolution):
            raise IslesError(
                f"{source} items are {list(data.shape)}, the model makes {[channels, resolution, resolution]}",
                hint="pass the data set the model was trained on with --data",
            )
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
        train_idx, pool = order[: len(data) // 2], order[len(data) // 2 :]
        if len(pool) < 2 * n:
            log.warning("only %d held-out items: FID at n=%d instead of %d", len(pool), len(pool) // 2, n)
            n = len(pool) // 2
        spec = feature_net.data_spec(
            source, data.items[train_idx], data.labels[train_idx], data.num_classes, **overrides
        )
        net = feature_net.load_or_train(spec, data.items[train_idx], data.labels[train_idx], cache_dir, device)
        pixels, labels = data.items[pool[: 2 * n]], data.labels[pool[: 2 * n]]
        num_classes = data.num_classes
        attributes = captions = None
    feats, logits = net.embed_all(metrics.to_model_space(pixels))
    floor = metrics.fid(feats[:n], feats[n:])
    return Reference(
        source=source,
        pixels=pixels[:n],
        labels=labels[:n],
        num_classes=num_classes,
        net=net,
        features=feats[:n],
        floor=floor,
        real_accuracy=metrics.class_accuracy(logits[:n], labels[:n]),
        real_diversity=metrics.diversity(feats[:n]),
        other_pixels=pixels[n:],
        captions=None if captions is None else list(captions[:n]),
        attributes=None if attributes is None else attributes[:n],
    )


def _video_reference(source, n, channels, resolution, frames, cache_dir, device, overrides) -> Reference:
    """2n clips of the procedural video set's held-out stream; the classifier is trained on a third stream."""
    from isles.experts import procedural_video

    from . import video_features

    if frames is None:
        raise IslesError(f"{source} holds clips, but the model makes images", hint="evaluate it on an image source")
    if channels != 3:
        raise IslesError(f"the procedural video set is RGB but the model makes {channels}-channel clips")
    _, seed = procedural_video.parse_spec(source)
    clips, attributes, captions = procedural_video.generate_clips(
        2 * n, seed=seed, stream="reference", resolution=resolution, frames=frames
    )
    spec = video_features.VideoFeatureSpec(frames=frames, resolution=resolution, **overrides)
    net = video_features.load_or_train(spec, cache_dir=cache_dir, device=device)
    feats, logits = net.embed_all(metrics.to_model_space(clips))
    labels = attributes[:, 0]
    return Reference(
        source=source,
        pixels=clips[:n],
        labels=labels[:n],
        num_classes=procedural_video.NUM_CLASSES,
        net=net,
        features=feats[:n],
        floor=metrics.fid(feats[:n], feats[n:]),
        real_accuracy=metrics.class_accuracy(logits[:n], labels[:n]),
        real_diversity=metrics.diversity(feats[:n]),
        other_pixels=clips[n:],
        captions=list(captions[:n]),
        attributes=attributes[:n],
    )


class Sampler(Protocol):
    name: str
    num_classes: int | None
    conditioning: str  # "class", "text" or "none"
    is_ensemble: bool  # False: a single model, one row (routing does not apply)

    def sample(
        self, n: int, cond, routing: str, steps: int, seed: int, guidance_scale: float, solver: str = "euler"
    ) -> tuple[torch.Tensor, float]:
        """n samples in [-1, 1] (decoded, for latent models) and the mean number of expert (model) calls per sample.
        cond: class labels [n], n prompts (text models), or None."""


class EnsembleSampler:
    def __init__(self, pipe, name: str = "ensemble"):
        self.pipe, self.name, self.num_classes = pipe, name, pipe.num_classes
        self.conditioning = pipe.conditioning
        self.is_ensemble = True

    def sample(self, n, cond, routing, steps, seed, guidance_scale, solver="euler"):
        text = self.conditioning == "text"
        result = self.pipe(
            n=n,
            class_labels=None if text else cond,
            prompt=cond if text else None,
            routing=routing,
            steps=steps,
            seed=seed,
            guidance_scale=guidance_scale,
            return_routing=True,
            solver=solver,
        )
        calls = float((result.weights > 0).sum(dim=-1).float().sum(dim=0).mean())  # [calls, B, K] -> per sample
        if guidance_scale != 1.0 and cond is not None:
            calls *= 2
        return result.images.cpu(), calls


class ModelSampler:
    def __init__(self, model: torch.nn.Module, objective: str = "fm", name: str = "model", info: dict | None = None):
        from isles.experts.presets import is_text_model, model_num_classes

        self.model, self.objective, self.name = model.eval(), objective, name
        self.num_classes = model_num_classes(model)
        self.conditioning = "text" if is_text_model(model) else ("class" if self.num_classes else "none")
        self.is_ensemble = False
        self.info = info or {}
        self._encoder = self._vae = None

    def sample(self, n, cond, routing, steps, seed, guidance_scale, solver="euler"):
        from isles.experts.expert import sample_expert

        generator = torch.Generator().manual_seed(seed)
        null = None
        if self.conditioning == "text":
            cond, null = self._embed(cond)
        clip = x0_clamp(bool((self.info.get("data") or {}).get("latent")))
        shape = tuple(self.info["shape"]) if self.info.get("shape") else None  # video models: their clip shape
        images = sample_expert(
            self.model, self.objective, n, steps, cond, guidance_scale, generator, clip_x0=clip, null_cond=null,
            shape=shape, solver=solver,
        )  # fmt: skip
        if self.vae() is not None:
            images = self.vae().decode(images)
        calls = calls_per_sample(solver, steps)
        return images.cpu(), float(calls * (2 if guidance_scale != 1.0 and cond is not None else 1))

    def vae(self):
        """The VAE that decodes this model's latents (expert.json names it), or None for a pixel model."""
        named = (self.info.get("data") or {}).get("vae")
        if named and self._vae is None:
            from .vae import load_recorded_vae

            self._vae = load_recorded_vae(named)
        return self._vae

    def _embed(self, prompts):
        if self._encoder is None:
            from .text_encoder import load_recorded_text_encoder

            if not self.info.get("text_encoder"):
                raise IslesError(f"{self.name}: expert.json names no text encoder", hint="evaluate it in its ensemble")
            self._encoder = load_recorded_text_encoder(self.info["text_encoder"])
        return self._encoder.prompts(prompts)


def evaluate(sampler: Sampler, reference: Reference, config: EvalConfig) -> list[dict[str, Any]]:
    """One row per routing mode (one row for a single model), every FID at the reference's sample count."""
    n = reference.n
    text = sampler.conditioning == "text"
    if text and reference.captions is None:
        raise IslesError(
            f"{reference.source} has no captions to prompt a text model with",
            hint="evaluate text models on the captioned procedural set: --data procedural",
        )
    conditional = sampler.num_classes is not None and reference.labels is not None
    if conditional and sampler.num_classes != reference.num_classes:
        raise IslesError(
            f"the model has {sampler.num_classes} classes, the reference data {reference.num_classes}",
            hint="pass the data set the model was trained on with --data",
        )
    routings = config.routings if sampler.is_ensemble else ("single",)
    rows = []
    for routing in routings:
        images, calls, start = [], 0.0, time.perf_counter()
        for i in range(0, n, config.batch_size):
            count = min(config.batch_size, n - i)
            if text:
                cond = reference.captions[i : i + count]
            else:
                cond = reference.labels[i : i + count] if conditional else None
            batch, batch_calls = sampler.sample(
                count, cond, routing, config.steps, config.seed * 1_000_003 + i, config.guidance_scale, config.solver
            )
            images.append(batch)
            calls += batch_calls * count
        seconds = time.perf_counter() - start
        x = torch.cat(images)
        feats, logits = reference.net.embed_all(x)
        row = {
            "model": sampler.name,
            "routing": routing,
            "n": n,
            "fid": round(metrics.fid(feats, reference.features), 4),
            "fid_floor": round(reference.floor, 4),
            # Text prompts name the class too (procedural captions): its read-back is the class accuracy.
            "accuracy": round(metrics.class_accuracy(logits, reference.labels), 4)
            if conditional or (text and reference.labels is not None)
            else None,
            "real_accuracy": round(reference.real_accuracy, 4) if reference.real_accuracy is not None else None,
            "diversity": round(metrics.diversity(feats), 4),
            "real_diversity": round(reference.real_diversity, 4),
            "class_entropy": round(metrics.class_entropy(logits, reference.num_classes), 4)
            if reference.num_classes
            else None,
            "seconds_per_sample": round(seconds / n, 5),
            "expert_calls_per_sample": round(calls / n, 3),
            "steps": config.steps,
            "solver": config.solver,
        }
        if config.inception and not reference.is_video:
            row["inception_fid"] = metrics.inception_fid(metrics.to_uint8(x), reference.pixels, config.device)
        if reference.is_video:
            if x.ndim != 5:
                raise IslesError("the reference holds clips but the model made images", hint="evaluate on images")
            from .video_features import clip_agreement

            agreement = clip_agreement(reference.net, x, reference.attributes)
            row["video"] = True
            row["agreement"] = {k: round(v, 4) for k, v in agreement.items() if isinstance(v, float)}
            row["agreement_chance"] = {k: round(v, 4) for k, v in agreement["chance"].items()}
            row["real_agreement"] = round(clip_agreement(reference.net, metrics.to_model_space(reference.pixels),
                                                         reference.attributes)["all"], 4)  # fmt: skip
        elif text and reference.attributes is not None:
            from .attributes import attribute_agreement

            agreement = attribute_agreement(x, reference.attributes, cache_dir=config.cache_dir)
            row["agreement"] = {k: round(v, 4) for k, v in agreement.items() if isinstance(v, float)}
            row["agreement_chance"] = {k: round(v, 4) for k, v in agreement["chance"].items()}
            row["real_agreement"] = reference_agreement(reference, config.cache_dir)
        if text and config.clip_model:
            from .clip_score import clip_score

            row["clip_score"] = round(clip_score(x, reference.captions[:n], config.clip_model, config.device), 4)
        log.info("%s %s: FID %.3f (floor %.3f)", sampler.name, routing, row["fid"], row["fid_floor"])
        rows.append(row)
    return rows


def reference_agreement(reference: Reference, cache_dir: Path | None = None) -> float:
    """The attribute reader's "all attributes right" share on the real reference items: what a perfect model scores."""
    from .attributes import attribute_agreement

    return round(attribute_agreement(reference.pixels, reference.attributes, cache_dir=cache_dir)["all"], 4)


def load_sampler(path: str, store: str | None = None, revision: str | None = None, device: str | None = None):
    """A sampler for an ensemble (folder with ensemble.json, or a repo of `store`) or one model (a diffusers folder,
    with expert.json giving its objective), and the data source it records (None if unknown)."""
    from .ensemble import ENSEMBLE_FILE, EnsemblePipeline

    folder = Path(path)
    if store is not None or (folder / ENSEMBLE_FILE).is_file():
        from isles.protocol.artifacts import open_store

        pipe = EnsemblePipeline.from_pretrained(
            path, store=open_store(store) if store else None, revision=revision, device=device
        )
        source = next((e.meta.get("data", {}).get("source") for e in pipe.experts.values() if e.meta), None)
        return EnsembleSampler(pipe, name=folder.name or path), source
    if (folder / "config.json").is_file():
        from isles.experts.device import pick_device
        from isles.experts.presets import load_model

        info = json.loads((folder / "expert.json").read_text()) if (folder / "expert.json").is_file() else {}
        model = load_model(folder).to(pick_device(device))
        sampler = ModelSampler(model, info.get("objective", "fm"), name=folder.name, info=info)
        return sampler, info.get("data", {}).get("source")
    raise IslesError(
        f"{path} is neither an ensemble nor a model folder",
        hint="pass a folder with ensemble.json (isles aggregate) or config.json (one expert), or a repo with --store",
    )


def sampler_frames(sampler) -> int | None:
    """Frames per clip of a video sampler; None for images."""
    if isinstance(sampler, EnsembleSampler):
        frames = sampler.pipe.frames
        vae = sampler.pipe.vae() if sampler.pipe.config.get("vae") else None
    else:
        shape = sampler.info.get("shape") or []
        frames = shape[1] if len(shape) == 4 else None
        vae = sampler.vae()
    if frames is not None and vae is not None:  # a video VAE decodes f latent frames into 1 + (f - 1) t frames
        return vae.spec.clip_frames(frames)
    return frames


def sampler_shape(sampler) -> tuple[int, int]:
    """(channels, resolution) of the images a sampler makes (decoded by the VAE, for latent models)."""
    if isinstance(sampler, EnsembleSampler):
        channels, res = sampler.pipe.channels, sampler.pipe.resolution
        vae = sampler.pipe.vae() if sampler.pipe.config.get("vae") else None
    else:
        config = sampler.model.config
        channels = config.in_channels
        res = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
        vae = sampler.vae()
    if vae is not None:
        return vae.out_channels, res * vae.spec.downsample
    return channels, res
