"""EnsemblePipeline: experts + router as one model, saved and loaded in the published layout (DESIGN.md).

    <folder>/ ensemble.json  model_index.json  router/{config.json, model.safetensors}
              expert_<i>/{config.json, diffusion_pytorch_model.safetensors, expert.json}
`ensemble.json` lists every file with its sha256; loading verifies them and reads nothing else (model_index.json, the
diffusers view of the same pipeline, is only checked). Experts absent from it are skipped and the router is
renormalised over the others, so a partial ensemble samples too.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline

from isles.experts.objectives import x0_clamp
from isles.experts.solvers import calls_per_sample
from isles.protocol.errors import IslesError
from isles.protocol.files import atomic_write_json, sha256_folder

from .calibration import PROFILE_KEY, Reliability, check_profile
from .ensemble_files import ENSEMBLE_FILE, FORMAT, broken_file, broken_files, pull_ensemble, read_manifest
from .model import RouterModel
from .sampling import Routing, SampleResult, guided, parse_routing, sample_ensemble

log = logging.getLogger(__name__)

EXPERT_FILE = "expert.json"
CPU = torch.device("cpu")
MODEL_INDEX_FILE = DiffusionPipeline.config_name  # "model_index.json": diffusers' list of components, hashed too


@dataclass
class Expert:
    """One trained expert: a diffusers model, the objective it was trained with, and what the aggregator knows."""

    index: int
    model: torch.nn.Module
    objective: str  # "fm" | "ddpm" | "ddpm-v" (experts/objectives.py)
    meta: dict[str, Any] = field(default_factory=dict)  # expert.json: release repo/revision, losses, preset...

    def velocity_fn(self, guidance_scale: float = 1.0, clip_x0: float | None = 1.0, null_text=None):
        """(x_t, t, cond) -> velocity in the common flow-matching space, with CFG applied to this expert alone.
        cond: class labels or a TextCondition; `null_text` is the empty caption's TextCondition (text experts)."""
        from isles.experts.objectives import expert_velocity
        from isles.experts.presets import is_text_model, model_forward, null_class

        model, objective = self.model, self.objective

        def fn(x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
            return expert_velocity(objective, lambda x, ts: model_forward(model, x, ts, cond), x_t, t, clip_x0)

        return guided(fn, guidance_scale, null_text if is_text_model(model) else null_class(model))


def expert_dir(index: int) -> str:
    return f"expert_{index}"


class EnsemblePipeline(DiffusionPipeline):
    """Sample with `pipe(n=16, class_labels=..., routing="top2", steps=30, seed=0)`; see `router.sampling`.

    A diffusers `DiffusionPipeline`: `components` holds the router, each present `expert_<i>` and, once loaded, the
    text encoder, tokenizer and VAE; `.to()`, `progress_bar` and `enable_model_cpu_offload()` (with accelerate) work as
    in diffusers. `config` is the ensemble's own config (kept in ensemble.json), not diffusers' module index: that is
    `model_index()`, saved as model_index.json. The text encoder and VAE stay methods (`vae()` gives the LatentCodec).
    """

    # Offload: the text encoder makes way for the router, the router for the VAE. Experts are hooked apart from this
    # chain and swapped in one at a time as the routing asks for them (`_velocity_fn`).
    model_cpu_offload_seq = "text_encoder->router->vae"

    def __init__(self, experts: dict[int, Expert], router: RouterModel, config: dict[str, Any] | None = None):
        super().__init__()
        self.num_experts = router.config.num_experts
        bad = [i for i in experts if not 0 <= i < self.num_experts]
        if bad:
            raise IslesError(f"expert index {bad[0]} outside the router's {self.num_experts} experts")
        if not experts:
            raise IslesError("the ensemble has no experts", hint="publish at least one expert before sampling")
        self.experts = dict(sorted(experts.items()))
        self._ensemble_config = dict(config or {})
        text_dim = router.config.text_dim
        if text_dim is not None:  # a text-aware router reads the prompts' embeddings: they must be its width
            encoder = self._ensemble_config.get("text_encoder") or {}
            width = encoder.get("width") if isinstance(encoder, dict) else None
            if width != text_dim:
                raise IslesError(
                    f"the router reads {text_dim}-wide caption embeddings, but the ensemble's text encoder "
                    f"gives {width or 'none'}",
                    hint="assemble the router trained on this ensemble's captions",
                )
        self._text_encoder = None  # loaded on the first prompt
        self._vae = None  # loaded on the first decode
        self.register_modules(router=router.eval(), **{expert_dir(i): e.model for i, e in self.experts.items()})
        self.set_progress_bar_config(disable=None)  # tqdm's None: a bar in a terminal, none in logs and pipes

    # -- properties of the data the ensemble makes -------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """The ensemble's config: name, run_id, data_kind, class_names, conditioning, text_encoder, vae..."""
        return self._ensemble_config

    @property
    def channels(self) -> int:
        return self.router.config.in_channels

    @property
    def resolution(self) -> int:
        return self.router.config.resolution

    @property
    def frames(self) -> int | None:
        """Frames per clip for a video ensemble; None for images."""
        return self.router.config.frames

    @property
    def is_video(self) -> bool:
        return self.frames is not None

    @property
    def item_shape(self) -> tuple[int, ...]:
        """One sample's shape in the experts' space: [C, H, W], or [C, F, H, W] for clips."""
        return (self.channels, *([self.frames] if self.frames else []), self.resolution, self.resolution)

    @property
    def num_classes(self) -> int | None:
        return self.router.config.num_classes

    @property
    def conditioning(self) -> str:
        """ "text" (prompts), "class" or "none"."""
        return self.config.get("conditioning") or ("class" if self.num_classes else "none")

    @property
    def missing(self) -> list[int]:
        return [i for i in range(self.num_experts) if i not in self.experts]

    # -- diffusers: components, devices, the module index --------------------------------------------------------
    @property
    def components(self) -> dict[str, Any]:
        """The router, each present `expert_<i>`, and the text encoder, tokenizer and VAE once they are loaded."""
        found = {name: getattr(self, name) for name in self._registered()}
        if self._text_encoder is not None:
            found.update(text_encoder=self._text_encoder.model, tokenizer=self._text_encoder.tokenizer)
        if self._vae is not None:
            found["vae"] = self._vae.vae
        return found

    @classmethod
    def _get_signature_keys(cls, obj):
        # diffusers reads module names off __init__'s signature; ours are the registered attributes (router, expert_i)
        if isinstance(obj, EnsemblePipeline):
            return obj._registered(), []
        return super()._get_signature_keys(obj)

    def _registered(self) -> list[str]:
        return [name for name in self._internal_dict if not name.startswith("_")]

    def _modules(self) -> list[torch.nn.Module]:
        return [m for m in self.components.values() if isinstance(m, torch.nn.Module)]

    @property
    def device(self) -> torch.device:
        """Where the modules are: the accelerator when any is on one (as in diffusers), else the CPU."""
        devices = [p.device for m in self._modules() for p in itertools.islice(m.parameters(), 1)] or [CPU]
        return next((d for d in devices if d.type not in ("cpu", "meta")), devices[0])

    @property
    def dtype(self) -> torch.dtype:
        return next((p.dtype for m in self._modules() for p in itertools.islice(m.parameters(), 1)), torch.float32)

    def to(self, *args, **kwargs) -> EnsemblePipeline:
        """Move every module (router, experts, a loaded text encoder and VAE) to a device; returns the pipeline.

        diffusers' forms: `to("cuda")`, `to(device=...)`. The sampler works in float32, so other dtypes are refused."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        kwargs.pop("silence_dtype_warnings", None)  # diffusers' offloading passes it
        if kwargs or len(args) > 2:
            raise TypeError(f"to() takes a device and a dtype, got {args} {kwargs}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif arg is not None:
                device = arg
        if dtype not in (None, torch.float32):
            raise IslesError(f"the ensemble samples in float32, not {dtype}", hint="move it with .to(device) only")
        if device is not None:
            device = torch.device(device)
            if getattr(self, "_all_hooks", None) and device.type != "cpu":
                log.warning("model CPU offload is on: it moves each module to %s when it runs", device)
            for module in self._modules():
                module.to(device)
        return self

    def model_index(self) -> dict[str, Any]:
        """model_index.json: every component as diffusers' [library, class]. The text encoder and VAE are named by
        id (`_isles`) and are not in the folder; loading reads ensemble.json only, never this file."""
        index: dict[str, Any] = {"_class_name": type(self).__name__, "_diffusers_version": diffusers.__version__}
        index.update({name: list(self._internal_dict[name]) for name in self._registered()})
        refs: dict[str, Any] = {"manifest": ENSEMBLE_FILE}
        if self.config.get("text_encoder"):
            from .text_encoder import DEFAULT_TEXT_ENCODER, TextEncoderSpec

            spec = TextEncoderSpec.from_dict(self.config["text_encoder"])
            # The exact class is known once loaded; named from the id alone, so that saving is deterministic.
            clip = spec.id in ("clip", f"hf:{DEFAULT_TEXT_ENCODER}")
            index["text_encoder"] = ["transformers", "CLIPTextModel" if clip else "AutoModel"]
            index["tokenizer"] = ["transformers", "CLIPTokenizerFast" if clip else "AutoTokenizer"]
            refs["text_encoder"] = {"id": spec.id, "revision": spec.revision}
        if self.config.get("vae"):
            from .vae import VaeSpec

            vae = VaeSpec.from_dict(self.config["vae"])
            index["vae"] = ["diffusers", "AutoencoderKLWan" if vae.is_video else "AutoencoderKL"]
            refs["vae"] = {"id": vae.id, "revision": vae.revision}
        index["_isles"] = refs
        return index

    # -- sampling ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        n: int = 16,
        class_labels: int | list[int] | torch.Tensor | None = None,
        routing: str | Routing = "top1",
        steps: int = 30,
        seed: int = 0,
        guidance_scale: float = 1.0,
        return_routing: bool = False,
        prompt: str | list[str] | None = None,
        decode: bool = True,
        solver: str = "euler",
    ) -> SampleResult:
        """n samples (in the data scale, [-1, 1] for pixels; clips [n, C, F, H, W] from a video ensemble); seeded, so
        the same call gives the same samples.

        A text ensemble takes `prompt`: one string for n samples of it, or a list (one sample per prompt). An
        ensemble of latents returns images decoded by its VAE (`decode=False`: the latents). `solver`: euler, heun,
        dpm++2m or unipc (experts/solvers.py); `steps` are its steps (Heun calls the experts 2 steps - 1 times)."""
        routing = parse_routing(routing) if isinstance(routing, str) else routing
        reliability = self.reliability() if routing.calibrated else None
        null_text = None
        if self.conditioning == "text":
            if class_labels is not None:
                raise IslesError(
                    "this ensemble is text-conditioned: it takes a prompt, not a class",
                    hint='pass --prompt "..." (or --prompts FILE)',
                )
            cond, null_text = self._prompts(n, prompt)
            n = len(cond)
        else:
            if prompt is not None:
                kind = "class-conditional: it takes a class" if self.conditioning == "class" else "unconditional"
                raise IslesError(f"this ensemble is {kind}, not a prompt", hint="leave out --prompt")
            cond = self._labels(n, class_labels)
        clip = x0_clamp(self.config.get("data_kind") == "latents")
        fns = [self._velocity_fn(i, guidance_scale, clip, null_text) for i in range(self.num_experts)]
        with self.progress_bar(total=calls_per_sample(solver, steps)) as bar:

            def route(x: torch.Tensor, t: torch.Tensor, c) -> torch.Tensor:
                # A class-aware router reads the class (None: unconditional routing), a text-aware one the prompt;
                # the papers' router neither (RouterModel ignores what it was not trained on).
                return self.router(x, t, c)

            result = sample_ensemble(
                fns,
                route,
                (n, *self.item_shape),
                steps=steps,
                routing=routing,
                class_labels=cond,
                generator=torch.Generator().manual_seed(seed),
                device=self._execution_device,
                return_routing=return_routing,
                callback=lambda _step: bar.update(1),
                solver=solver,
                reliability=reliability,
            )
        if decode and self.config.get("vae"):
            result.latents = result.images
            result.images = self.vae().decode(result.images)
        self.maybe_free_model_hooks()
        return result

    def reliability(self) -> Reliability:
        """The experts' measured velocity error per noise level (expert.json, written by the aggregator), for
        calibrated routing; an error naming what is missing when an expert has none."""
        profiles: list[list[float] | None] = []
        for i in range(self.num_experts):
            expert = self.experts.get(i)
            if expert is None:
                profiles.append(None)
                continue
            if PROFILE_KEY not in expert.meta:
                raise IslesError(
                    f"expert {i} has no measured velocity error ({PROFILE_KEY} in its expert.json): calibrated "
                    "routing cannot weigh it",
                    hint="re-publish the ensemble with a current aggregator, or use --routing top1",
                )
            profiles.append(check_profile(expert.meta[PROFILE_KEY], f"expert {i}"))
        return Reliability(profiles)

    def _velocity_fn(self, index: int, guidance_scale: float, clip, null_text):
        """Expert `index`'s velocity (None when missing). Under model CPU offload the other experts are moved off the
        accelerator before it runs, so one expert at a time is there (diffusers' offload chain assumes fixed order)."""
        if index not in self.experts:
            return None
        fn = self.experts[index].velocity_fn(guidance_scale, clip, null_text)
        others = [e.model for i, e in self.experts.items() if i != index]
        hooks = [h for h in getattr(self, "_all_hooks", None) or [] if any(h.model is m for m in others)]
        if not hooks:
            return fn

        def swapped(x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
            for hook in hooks:
                hook.offload()
            return fn(x_t, t, cond)

        return swapped

    def text_encoder(self):
        """The text encoder the ensemble names (router/text_encoder.py), loaded once."""
        if self._text_encoder is None:
            from .text_encoder import load_recorded_text_encoder

            self._text_encoder = load_recorded_text_encoder(self.config["text_encoder"], device=self.device)
            self._rehook()
        self._text_encoder.device = self._execution_device
        return self._text_encoder

    def vae(self):
        """The VAE whose latents the experts model (router/vae.py), loaded once."""
        if self._vae is None:
            from .vae import load_recorded_vae

            self._vae = load_recorded_vae(self.config["vae"], device=self.device)
            self._rehook()
        self._vae.device = self._execution_device
        return self._vae

    def _rehook(self) -> None:
        """A module loaded after `enable_model_cpu_offload()` joins the offloading, as diffusers' own reset does."""
        if getattr(self, "_all_hooks", None):
            self.enable_model_cpu_offload(device=self._offload_device)

    def _prompts(self, n: int, prompt):
        if prompt is None or (isinstance(prompt, list) and not prompt):
            raise IslesError("this ensemble is text-conditioned: it needs a prompt", hint='--prompt "a red 7"')
        prompts = [prompt] * n if isinstance(prompt, str) else [str(p) for p in prompt]
        return self.text_encoder().prompts(prompts)

    def _labels(self, n: int, class_labels) -> torch.Tensor | None:
        if class_labels is None:
            return None
        if self.num_classes is None:
            raise IslesError("this ensemble is unconditional: it takes no class", hint="leave out --class")
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(n).clone()
        if labels.numel() != n:
            raise IslesError(f"{labels.numel()} class labels for {n} samples")
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise IslesError(
                f"class {int(labels.max() if labels.max() >= self.num_classes else labels.min())} out of range",
                hint=f"classes are 0..{self.num_classes - 1}",
            )
        return labels

    # -- save / load -------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> dict[str, Any]:
        """Write the published layout into `folder` (replaced whole, atomically); returns ensemble.json."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            experts = []
            for i, expert in self.experts.items():
                sub = staging / expert_dir(i)
                expert.model.save_pretrained(sub, safe_serialization=True)
                atomic_write_json(sub / EXPERT_FILE, {**expert.meta, "index": i, "objective": expert.objective})
                experts.append({"index": i, "path": expert_dir(i), "objective": expert.objective})
            self.router.save_pretrained(staging / "router")
            atomic_write_json(staging / MODEL_INDEX_FILE, self.model_index())
            files = sha256_folder(staging)
            manifest = {
                **self.config,
                "format": FORMAT,
                "num_experts": self.num_experts,
                "conditioning": self.conditioning,
                "num_classes": self.num_classes,
                "channels": self.channels,
                "resolution": self.resolution,
                "frames": self.frames,
                "experts": experts,
                "router": {"path": "router"},
                "files": files,
            }
            atomic_write_json(staging / ENSEMBLE_FILE, manifest)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return manifest

    @classmethod
    def assemble(
        cls,
        expert_folders: dict[int, str | os.PathLike],
        router_folder: str | os.PathLike,
        config: dict[str, Any] | None = None,
    ) -> EnsemblePipeline:
        """An ensemble from exported units: {index: expert folder (diffusers + expert.json)} and a router folder.

        Indices absent from `expert_folders` are missing experts (a partial ensemble)."""
        from isles.experts.presets import load_model

        router = RouterModel.from_pretrained(router_folder)
        experts, config = {}, dict(config or {})
        router_info = Path(router_folder) / "router.json"
        if router_info.is_file():  # accuracy per noise level, kept in ensemble.json for the model card
            config.setdefault("router_metrics", json.loads(router_info.read_text()).get("metrics", {}))
        for index, folder in sorted(expert_folders.items()):
            info_path = Path(folder) / EXPERT_FILE
            if not info_path.is_file():
                raise IslesError(
                    f"expert {index}: {info_path} is missing", hint="pass the folder the trainer exported"
                )
            meta = json.loads(info_path.read_text())
            experts[index] = Expert(index, load_model(folder).eval(), str(meta.get("objective", "fm")), meta)
            if meta.get("class_names") and "class_names" not in config:
                config["class_names"] = meta["class_names"]
            data = meta.get("data") or {}
            if data.get("latent"):
                config.setdefault("data_kind", "latents")
            if data.get("vae"):
                config.setdefault("vae", data["vae"])
            if meta.get("conditioning") == "text":
                config.setdefault("conditioning", "text")
                config.setdefault("text_encoder", meta.get("text_encoder"))
        return cls(experts, router, config)

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        *,
        store=None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        skip_broken: bool = False,
    ) -> EnsemblePipeline:
        """Load from a local folder, or from repo `source` of an ArtifactStore (`store`, at `revision` or newest).

        Every file is checked against ensemble.json: a missing or corrupt expert raises IslesError naming it, or
        with `skip_broken` is left out (with a warning) and the ensemble samples without it.
        """
        if store is not None:
            folder = pull_ensemble(store, str(source), revision, cache_dir)
        else:
            folder = Path(source)
            if not (folder / ENSEMBLE_FILE).is_file():
                raise IslesError(
                    f"{folder} is not an ensemble folder ({ENSEMBLE_FILE} is missing)",
                    hint="pass the folder written by `isles aggregate`, or a repo with --store",
                )
        pipe = _load_folder(folder, skip_broken)
        from isles.experts.device import pick_device

        return pipe.to(device if isinstance(device, torch.device) else pick_device(device))


def _load_folder(folder: Path, skip_broken: bool) -> EnsemblePipeline:
    from isles.experts.presets import load_model

    manifest = read_manifest(folder)
    files = manifest.get("files", {})
    entries = manifest.get("experts", [])
    try:  # ensemble.json may come from the network: a malformed one is an error line, not a traceback
        entries = [(int(e["index"]), str(e["path"]), str(e["objective"])) for e in entries]
        files = {str(k): str(v) for k, v in files.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise IslesError(
            f"{folder / ENSEMBLE_FILE} is malformed ({type(exc).__name__}: {exc})",
            hint="re-download or re-assemble the ensemble",
        ) from None
    # model_index.json is never read, only verified (when listed: older ensembles lack it): a release loads whole.
    problem = MODEL_INDEX_FILE in files and broken_file(folder, MODEL_INDEX_FILE, files[MODEL_INDEX_FILE])
    if problem:
        raise IslesError(f"ensemble {folder}: {problem}", hint="re-download or re-assemble the ensemble")
    problem = broken_files(folder, files, "router")
    if problem:
        raise IslesError(f"ensemble {folder}: router {problem}", hint="re-download or re-assemble the ensemble")
    router = RouterModel.from_pretrained(folder / "router")
    experts: dict[int, Expert] = {}
    for index, path, objective in entries:
        problem = broken_files(folder, files, path)
        if problem:
            if not skip_broken:
                raise IslesError(
                    f"ensemble {folder}: expert {index} ({problem})",
                    hint="re-download the ensemble, or sample without that expert (--skip-broken)",
                )
            log.warning("skipping expert %d: %s", index, problem)
            continue
        meta = json.loads((folder / path / EXPERT_FILE).read_text()) if (folder / path / EXPERT_FILE).is_file() else {}
        experts[index] = Expert(index, load_model(folder / path).eval(), objective, meta)
    keep = ("run_id", "name", "data_kind", "class_names", "router_metrics", "conditioning", "text_encoder", "vae")
    config = {k: manifest[k] for k in keep if k in manifest}
    pipe = EnsemblePipeline(experts, router, config)
    if pipe.missing:
        log.warning("partial ensemble: experts %s missing; routing renormalised over the others", pipe.missing)
    return pipe
