"""The expert task for the trainer (diffusion loss on one shard), its export, and sampling one expert.

`ExpertTask(shard, preset="unet-tiny", objective="fm")` plugs into `experts.trainer.train`; the export is a
diffusers folder (config.json + diffusion_pytorch_model.safetensors) plus expert.json and a README.md model card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from isles.protocol.errors import IslesError
from isles.protocol.files import atomic_write_bytes, atomic_write_json
from isles.protocol.installation import isles_version

from .conditioning import CONDITIONINGS, TextCondition, cat_conditions
from .data import ShardData, item_layout, to_model_space, to_pixels
from .objectives import check_objective, draw_noise, expert_velocity, loss_at, sample_flow, x0_clamp
from .presets import (
    build_model,
    get_preset,
    is_text_preset,
    is_video_model,
    model_forward,
    model_num_classes,
    null_class,
    preset_stats,
)

EXPERT_FORMAT = "isles-expert-1"
VAL_SEED = 1234  # validation noise is fixed, so two evaluations of one model give the same number
VAL_MAX_ITEMS = 1024


@dataclass
class ExpertTask:
    shard: ShardData
    preset: str = "unet-tiny"
    objective: str = "fm"
    # Labels (or captions) replaced by the null class (or the empty caption) this often, so CFG works at sampling.
    label_dropout: float = 0.1
    # "class", "text" or "none"; "auto": text for a text preset, else class when the shard has labels.
    conditioning: str = "auto"
    hflip: bool = False  # flip each training item left-right with probability 1/2 (where the data allows it)
    shard_info: dict[str, Any] = field(default_factory=dict)  # where the shard came from (repo, sha256, cluster)
    recipe: dict[str, Any] = field(default_factory=dict)  # recorded in expert.json

    def __post_init__(self) -> None:
        check_objective(self.objective)
        self.preset = get_preset(self.preset).name
        _, self.frames, h, w = item_layout(self.shard.shape)
        if h != w:
            raise IslesError(f"items are {h}x{w}; isles presets need square items", hint="resize the data")
        self.conditioning = self._resolve_conditioning()
        self.text_width = self.shard.text.shape[2] if self.conditioning == "text" else None
        self.text_length = self.shard.text.shape[1] if self.conditioning == "text" else None
        self.num_classes = self.shard.num_classes if self.conditioning == "class" else None
        if self.num_classes is not None and len(self.shard):
            low, top = int(self.shard.labels.min()), int(self.shard.labels.max())
            if low < 0 or top >= self.num_classes:
                raise IslesError(
                    f"shard labels range over {low}..{top} but its num_classes is {self.num_classes}",
                    hint="labels must lie in 0..num_classes-1; rebuild the shard, or pass --unconditional",
                )
        self._train = self.shard.train_split()
        self._val = self.shard.val_split()
        if len(self._train) == 0:
            raise IslesError("the shard has no training items (all are held out for validation)")

    def _resolve_conditioning(self) -> str:
        text_preset = is_text_preset(self.preset)
        kind = self.conditioning
        if kind == "auto":
            kind = "text" if text_preset else "class"
        if kind not in CONDITIONINGS:
            raise IslesError(f"unknown conditioning {kind!r}", hint=f"use one of: {', '.join(CONDITIONINGS)}")
        if kind == "text":
            if not text_preset:
                raise IslesError(f"{self.preset} is not a text preset", hint="use pixart-* or unet-cond-*")
            if not self.shard.has_text:
                raise IslesError(
                    "the shard holds no caption embeddings",
                    hint="partition a captioned source with --conditioning text, or pick a class/unconditional preset",
                )
        elif text_preset:
            raise IslesError(f"{self.preset} is a text preset; it needs --conditioning text and captioned data")
        if kind == "class" and self.shard.labels is None:
            kind = "none"  # a class model of unlabelled data is an unconditional one
        return kind

    # --- the trainer's task protocol -----------------------------------------------------------------------------
    def describe(self) -> dict:
        identity = {
            "kind": "expert",
            "preset": self.preset,
            "objective": self.objective,
            "shape": list(self.shard.shape),
            "num_classes": self.num_classes,
            "label_dropout": self.label_dropout,
            "train_items": len(self._train),
            "shard_sha256": self.shard_info.get("sha256"),
        }
        if self.conditioning == "text":
            identity.update(conditioning="text", text_width=self.text_width, text_length=self.text_length)
        if self.hflip:
            identity["hflip"] = True
        return identity

    def build_model(self) -> torch.nn.Module:
        c, frames, h, _ = item_layout(self.shard.shape)
        return build_model(self.preset, c, h, self.num_classes, self.text_width, frames)

    def train_size(self) -> int:
        return len(self._train)

    def flops_per_sample(self) -> int:
        c, frames, h, _ = item_layout(self.shard.shape)
        stats = preset_stats(self.preset, c, h, self.num_classes, self.text_width, self.text_length or 77, frames)
        return stats["train_flops_per_sample"]

    def make_batch(self, indices: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x0 = to_model_space(self._train.items[indices])  # per batch: uint8 stays 4x smaller than floats in memory
        t, eps = draw_noise(x0, generator)
        batch = {"x0": x0, "t": t, "eps": eps}
        if self.num_classes is not None:
            labels = self._train.labels[indices]
            drop = torch.rand(len(indices), generator=generator) < self.label_dropout
            batch["labels"] = torch.where(drop, self.num_classes, labels)  # num_classes is the null class
        elif self.conditioning == "text":
            drop = torch.rand(len(indices), generator=generator) < self.label_dropout
            null_emb, null_mask = self.shard.null_text
            emb, mask = self._train.text[indices].float(), self._train.text_mask[indices].float()
            batch["text"] = torch.where(drop[:, None, None], null_emb.float(), emb)  # the empty caption
            batch["text_mask"] = torch.where(drop[:, None], null_mask.float(), mask)
        if self.hflip:  # drawn last, so runs without flips keep the random stream they always had
            flip = torch.rand(len(indices), generator=generator) < 0.5
            batch["x0"] = torch.where(flip.reshape(-1, *[1] * (x0.ndim - 1)), x0.flip(-1), x0)
        return batch

    def condition(self, batch: dict[str, torch.Tensor]):
        """The model's condition from a (micro-)batch: labels, a TextCondition, or None."""
        if "text" in batch:
            return TextCondition(batch["text"], batch["text_mask"])
        return batch.get("labels")

    def null_condition(self) -> TextCondition | None:
        """The empty caption's embedding (text tasks; one row), the null condition of classifier-free guidance."""
        return TextCondition.from_rows(*self.shard.null_text) if self.conditioning == "text" else None

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cond = self.condition(batch)
        return loss_at(
            self.objective, lambda x, ts: model_forward(model, x, ts, cond), batch["x0"], batch["t"], batch["eps"]
        )

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        """Loss on the held-out split and on as many training items, with fixed noise and stratified t."""
        out = {"val_items": len(self._val)}
        if len(self._val):
            out["val_loss"] = self._fixed_loss(model, self._val, device)
            n = min(len(self._val), len(self._train))
            out["train_eval_loss"] = self._fixed_loss(model, self._train.subset(torch.arange(n)), device)
        return out

    def _fixed_loss(self, model: torch.nn.Module, data: ShardData, device: torch.device) -> float:
        total, count = 0.0, 0
        for x0, t, eps, cond in self._fixed_draws(model, data, device):
            loss = loss_at(self.objective, lambda x, ts, c=cond: model_forward(model, x, ts, c), x0, t, eps)
            total += float(loss) * len(x0)
            count += len(x0)
        return total / count

    @torch.no_grad()
    def velocity_errors(self, model: torch.nn.Module, device: torch.device, bins: int = 10) -> list[float]:
        """Mean squared error of the velocity this expert gives in the common space (DDPM experts converted, as the
        ensemble samples them) on the held-out split, per noise-level bin: bin j covers t in [j/bins, (j+1)/bins).
        What calibrated mixing weighs experts by (router/calibration.py)."""
        if not len(self._val):
            raise IslesError("the shard has no held-out items", hint="partition with --val-fraction above 0")
        sums, counts = torch.zeros(bins, dtype=torch.float64), torch.zeros(bins, dtype=torch.float64)
        clip = x0_clamp(bool(self.shard.meta.get("latent")))
        for x0, t, eps, cond in self._fixed_draws(model, self._val, device):
            x_t = (1 - t.reshape(-1, *[1] * (x0.ndim - 1))) * x0 + t.reshape(-1, *[1] * (x0.ndim - 1)) * eps
            v = expert_velocity(self.objective, lambda x, ts, c=cond: model_forward(model, x, ts, c), x_t, t, clip)
            err = (v.float() - (eps - x0)).pow(2).flatten(1).mean(1).double().cpu()
            which = (t.cpu() * bins).long().clamp(0, bins - 1)
            sums.index_add_(0, which, err)
            counts.index_add_(0, which, torch.ones_like(err))
        return [float(v) for v in sums / counts.clamp_min(1)]

    def _fixed_draws(self, model: torch.nn.Module, data: ShardData, device: torch.device):
        """Batches (x0, t, eps, condition) on `device` with fixed noise and t spread low-discrepancy over [0, 1):
        the same draws for every evaluation of every model. The model is in eval mode while they are used."""
        data = data.subset(torch.arange(min(len(data), VAL_MAX_ITEMS)))
        generator = torch.Generator().manual_seed(VAL_SEED)
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(data), 128):
                x0 = to_model_space(data.items[start : start + 128])
                _, eps = draw_noise(x0, generator)
                idx = torch.arange(start, start + len(x0))
                t = (idx.float() * 0.618034 + 0.5) % 1.0  # a low-discrepancy spread of t over the whole range
                rows = slice(start, start + 128)
                if self.conditioning == "text":
                    cond = TextCondition.from_rows(data.text[rows], data.text_mask[rows]).to(device)
                else:
                    cond = None if self.num_classes is None else data.labels[rows].to(device)
                yield x0.to(device), t.to(device), eps.to(device), cond
        finally:
            model.train(was_training)

    def export(self, model: torch.nn.Module, folder: Path, metrics: dict[str, Any]) -> None:
        export_expert(
            model,
            folder,
            objective=self.objective,
            preset=self.preset,
            shard=self.shard_info,
            recipe=self.recipe,
            metrics=metrics,
            data_meta=self.shard.meta,
            label_dropout=self.label_dropout,
            conditioning=self.conditioning,
            shape=list(self.shard.shape),
        )


# --- export ------------------------------------------------------------------------------------------------------


def export_expert(
    model: torch.nn.Module,
    folder: str | Path,
    *,
    objective: str,
    preset: str,
    shard: dict | None = None,
    recipe: dict | None = None,
    metrics: dict | None = None,
    data_meta: dict | None = None,
    label_dropout: float = 0.1,
    conditioning: str | None = None,
    shape: list[int] | None = None,
) -> None:
    """Write a diffusers folder + expert.json + README.md (model card with Hub metadata) for one expert. `shape`: the
    item shape it was trained on ([C, H, W] or [C, F, H, W]; video models' configs do not hold it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    data_meta = data_meta or {}
    info = {
        "format": EXPERT_FORMAT,
        "model_class": type(model).__name__,
        "preset": preset,
        "objective": objective,
        "num_classes": model_num_classes(model),
        "null_class": null_class(model),
        "class_names": data_meta.get("class_names"),
        "label_dropout": label_dropout,
        "conditioning": conditioning or ("class" if model_num_classes(model) else "none"),
        "shape": shape,
        "text_encoder": data_meta.get("text_encoder"),  # what embeds prompts for this expert (text models)
        "data": {"source": data_meta.get("source"), "latent": data_meta.get("latent"), "vae": data_meta.get("vae")},
        "shard": shard or {},
        "recipe": recipe or {},
        "metrics": metrics or {},
    }
    atomic_write_json(folder / "expert.json", info)
    atomic_write_bytes(folder / "README.md", model_card(info).encode())


def model_card(info: dict) -> str:
    metrics = info.get("metrics", {})
    tags = ["isles", "decentralized-diffusion", "diffusion", f"objective-{info['objective']}", info["preset"]]
    text = info.get("conditioning") == "text"
    video = len(info.get("shape") or []) == 4
    tag = "text-to-video" if video else "text-to-image" if text else "unconditional-image-generation"
    front = ["---", "library_name: diffusers", "license: apache-2.0", f"pipeline_tag: {tag}"]
    front += ["tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    lines = [
        f"# isles expert ({info['preset']}, {info['objective']})",
        "",
        "One expert of a decentralized diffusion model trained with [isles](https://github.com/isles): an ordinary "
        "diffusion model trained in isolation on one data cluster. Sample it through its ensemble, or alone:",
        "",
        "```python",
        "from isles.experts.presets import load_model",
        "model = load_model('.')  # or diffusers' " + f"{info['model_class']}.from_pretrained('.')",
        "```",
        "",
        f"- objective: `{info['objective']}` (flow path x_t = (1-t) x0 + t eps; see expert.json)",
        f"- conditioning: captions embedded by `{(info.get('text_encoder') or {}).get('id')}` (empty caption for CFG)"
        if text
        else f"- classes: {info['num_classes'] if info['num_classes'] is not None else 'unconditional'}"
        + (f" (null class {info['null_class']} for classifier-free guidance)" if info["num_classes"] else ""),
        f"- shard: `{json.dumps(info.get('shard', {}), sort_keys=True)}`",
        f"- steps: {metrics.get('steps')}, final loss: {metrics.get('final_loss')}, "
        f"validation loss: {metrics.get('val_loss')}, wall time: {metrics.get('wall_time_s')} s",
        f"- hardware: {metrics.get('hardware', {}).get('name', '?')} ({metrics.get('hardware', {}).get('device')})",
        f"- trained with isles {isles_version()}",
        "",
    ]
    return "\n".join(front + lines)


def read_expert_info(folder: str | Path) -> dict:
    path = Path(folder) / "expert.json"
    if not path.is_file():
        raise IslesError(f"{folder} is not an isles expert (expert.json is missing)")
    return json.loads(path.read_text())


# --- sampling one expert -------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_expert(
    model: torch.nn.Module,
    objective: str,
    n: int,
    steps: int = 50,
    labels=None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    clip_x0: float | None = 1.0,
    null_cond: TextCondition | None = None,
    shape: tuple[int, ...] | None = None,
    solver: str = "euler",
) -> torch.Tensor:
    """n samples (model space, [-1, 1] for pixels) from one expert (`shape`: one item's, needed for video models, whose
    config does not hold it: expert.json's "shape") with `solver` steps in velocity space (experts/solvers.py).
    `labels`: class labels [n], or a TextCondition for a text model (then `null_cond`, the empty caption, is the
    unconditional input). With guidance_scale != 1, classifier-free guidance v = v_null + s (v_cond - v_null)."""
    model.eval()
    device = next(model.parameters()).device
    config = model.config
    if shape is None:
        if is_video_model(model):
            raise IslesError("a video model needs the clip shape to sample", hint="pass expert.json's shape")
        res = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
        shape = (config.in_channels, res, res)
    cond = None if labels is None else labels.to(device)
    if isinstance(cond, TextCondition) and null_cond is None:
        raise IslesError("a text model needs the empty caption's embedding to sample with guidance")
    null = null_cond.expand(n).to(device) if isinstance(cond, TextCondition) else None

    def predict(c, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return expert_velocity(objective, lambda xi, ts: model_forward(model, xi, ts, c), x, t, clip_x0)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if cond is None or guidance_scale == 1.0:
            return predict(cond, x, t)
        if null is None:  # a class model: no labels means the null class
            v_cond, v_null = predict(cond, x, t), predict(None, x, t)
        else:  # a text model: one pass over [prompt; empty caption]
            v_cond, v_null = predict(cat_conditions(cond, null), torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        return v_null + guidance_scale * (v_cond - v_null)

    return sample_flow(velocity, (n, *shape), steps, generator=generator, device=device, solver=solver)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 10, scale: int = 4) -> None:
    """Save model-space images ([-1, 1], [N, C, H, W]) as one PNG grid, upscaled `scale` times (nearest)."""
    import io

    from PIL import Image

    pixels = to_pixels(images)
    n, c, h, w = pixels.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    grid = torch.zeros(c, rows * (h + 1) + 1, ncol * (w + 1) + 1, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = pixels[i]
    array = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if c == 1 else array[:, :, :3])
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
