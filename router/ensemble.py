"""EnsemblePipeline: experts + router as one model, saved and loaded in the published layout (DESIGN.md).

    <folder>/ ensemble.json  expert_<i>/{config.json, diffusion_pytorch_model.safetensors, expert.json}
              router/{config.json, model.safetensors}
`ensemble.json` lists every file with its sha256; loading verifies them. Experts absent from it are skipped and the
router is renormalised over the others, so a partial ensemble samples too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from isles.protocol.errors import IslesError
from isles.protocol.files import atomic_write_json, sha256_file, sha256_folder

from .model import RouterModel
from .sampling import Routing, SampleResult, guided, parse_routing, sample_ensemble

log = logging.getLogger(__name__)

FORMAT = "isles-ensemble/1"
ENSEMBLE_FILE = "ensemble.json"
EXPERT_FILE = "expert.json"


@dataclass
class Expert:
    """One trained expert: a diffusers model, the objective it was trained with, and what the aggregator knows."""

    index: int
    model: torch.nn.Module
    objective: str  # "fm" | "ddpm"
    meta: dict[str, Any] = field(default_factory=dict)  # expert.json: release repo/revision, losses, preset...

    def velocity_fn(self, guidance_scale: float = 1.0, clip_x0: float | None = 1.0):
        """(x_t, t, labels) -> velocity in the common flow-matching space, with CFG applied to this expert alone."""
        from isles.experts.objectives import expert_velocity
        from isles.experts.presets import model_forward, null_class

        model, objective = self.model, self.objective

        def fn(x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            return expert_velocity(objective, lambda x, ts: model_forward(model, x, ts, labels), x_t, t, clip_x0)

        return guided(fn, guidance_scale, null_class(model))


def expert_dir(index: int) -> str:
    return f"expert_{index}"


class EnsemblePipeline:
    """Sample with `pipe(n=16, class_labels=..., routing="top2", steps=30, seed=0)`; see `router.sampling`."""

    def __init__(self, experts: dict[int, Expert], router: RouterModel, config: dict[str, Any] | None = None):
        self.router = router.eval()
        self.num_experts = router.config.num_experts
        bad = [i for i in experts if not 0 <= i < self.num_experts]
        if bad:
            raise IslesError(f"expert index {bad[0]} outside the router's {self.num_experts} experts")
        if not experts:
            raise IslesError("the ensemble has no experts", hint="publish at least one expert before sampling")
        self.experts = dict(sorted(experts.items()))
        self.config = dict(config or {})
        self.device = torch.device("cpu")

    # -- properties of the data the ensemble makes -------------------------------------------------------------
    @property
    def channels(self) -> int:
        return self.router.config.in_channels

    @property
    def resolution(self) -> int:
        return self.router.config.resolution

    @property
    def num_classes(self) -> int | None:
        return self.router.config.num_classes

    @property
    def missing(self) -> list[int]:
        return [i for i in range(self.num_experts) if i not in self.experts]

    def to(self, device: str | torch.device) -> EnsemblePipeline:
        self.device = torch.device(device)
        self.router.to(self.device)
        for expert in self.experts.values():
            expert.model.to(self.device)
        return self

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
    ) -> SampleResult:
        """n samples (in the data scale, [-1, 1] for pixels); seeded, so the same call gives the same images."""
        routing = parse_routing(routing) if isinstance(routing, str) else routing
        labels = self._labels(n, class_labels)
        clip = None if self.config.get("data_kind") == "latents" else 1.0
        fns = [
            self.experts[i].velocity_fn(guidance_scale, clip) if i in self.experts else None
            for i in range(self.num_experts)
        ]
        # Class-aware router (r(x_t, t, c)): None labels mean the null class, i.e. unconditional routing.
        return sample_ensemble(
            fns,
            lambda x, t, c: self.router(x, t, c),
            (n, self.channels, self.resolution, self.resolution),
            steps=steps,
            routing=routing,
            class_labels=labels,
            generator=torch.Generator().manual_seed(seed),
            device=self.device,
            return_routing=return_routing,
        )

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
            files = sha256_folder(staging)
            manifest = {
                **self.config,
                "format": FORMAT,
                "num_experts": self.num_experts,
                "num_classes": self.num_classes,
                "channels": self.channels,
                "resolution": self.resolution,
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
            if (meta.get("data") or {}).get("latent"):
                config.setdefault("data_kind", "latents")
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
            folder = _pull(store, str(source), revision, cache_dir)
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


def _read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / ENSEMBLE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise IslesError(f"{folder / ENSEMBLE_FILE} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IslesError(f"{folder / ENSEMBLE_FILE} is not an isles ensemble (format {FORMAT} expected)")
    return manifest


def _broken_files(folder: Path, files: dict[str, str], prefix: str) -> str | None:
    """The first file under `prefix` that is missing or differs from its recorded sha256, described; else None."""
    listed = {p: h for p, h in files.items() if p.startswith(prefix + "/")}
    if not listed:
        return f"{prefix}/ is not listed in {ENSEMBLE_FILE}"
    for path, digest in sorted(listed.items()):
        target = folder / path
        if not target.is_file():
            return f"{path} is missing"
        if sha256_file(target) != digest:
            return f"{path} is corrupt (sha256 differs from {ENSEMBLE_FILE})"
    return None


def _load_folder(folder: Path, skip_broken: bool) -> EnsemblePipeline:
    from isles.experts.presets import load_model

    manifest = _read_manifest(folder)
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
    problem = _broken_files(folder, files, "router")
    if problem:
        raise IslesError(f"ensemble {folder}: router {problem}", hint="re-download or re-assemble the ensemble")
    router = RouterModel.from_pretrained(folder / "router")
    experts: dict[int, Expert] = {}
    for index, path, objective in entries:
        problem = _broken_files(folder, files, path)
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
    keep = ("run_id", "name", "data_kind", "class_names", "router_metrics")
    config = {k: manifest[k] for k in keep if k in manifest}
    pipe = EnsemblePipeline(experts, router, config)
    if pipe.missing:
        log.warning("partial ensemble: experts %s missing; routing renormalised over the others", pipe.missing)
    return pipe


def _pull(store, repo: str, revision: str | None, cache_dir) -> Path:
    """Download a published ensemble into the cache, every file verified against its ensemble.json."""
    import hashlib

    revision = revision or store.list_revisions(repo)[-1]
    raw = store.read_bytes(repo, revision, ENSEMBLE_FILE)
    try:
        manifest = json.loads(raw)
        expected = {**manifest["files"], ENSEMBLE_FILE: hashlib.sha256(raw).hexdigest()}
    except (ValueError, KeyError, TypeError) as exc:
        raise IslesError(f"{repo}@{revision[:12]}: {ENSEMBLE_FILE} is not an isles ensemble ({exc})") from None
    if cache_dir is None:
        from platformdirs import user_cache_dir

        cache_dir = user_cache_dir("isles")
    dest = Path(cache_dir) / "ensembles" / repo.replace("/", "--") / revision
    return Path(store.pull(repo, revision, dest, expected))
