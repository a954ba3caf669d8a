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

from .data import ShardData, to_model_space, to_pixels
from .objectives import check_objective, draw_noise, expert_velocity, loss_at, sample_euler
from .presets import build_model, get_preset, model_forward, model_num_classes, null_class, preset_stats

EXPERT_FORMAT = "isles-expert-1"
VAL_SEED = 1234  # validation noise is fixed, so two evaluations of one model give the same number
VAL_MAX_ITEMS = 1024


@dataclass
class ExpertTask:
    shard: ShardData
    preset: str = "unet-tiny"
    objective: str = "fm"
    label_dropout: float = 0.1  # labels replaced by the null class this often, so CFG works at sampling
    conditional: bool = True  # use the shard's labels when it has them
    shard_info: dict[str, Any] = field(default_factory=dict)  # where the shard came from (repo, sha256, cluster)
    recipe: dict[str, Any] = field(default_factory=dict)  # recorded in expert.json

    def __post_init__(self) -> None:
        check_objective(self.objective)
        self.preset = get_preset(self.preset).name
        c, h, w = self.shard.shape
        if h != w:
            raise IslesError(f"items are {h}x{w}; isles presets need square items", hint="resize the data")
        self.num_classes = self.shard.num_classes if (self.conditional and self.shard.labels is not None) else None
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

    # --- the trainer's task protocol -----------------------------------------------------------------------------
    def describe(self) -> dict:
        c, h, _ = self.shard.shape
        return {
            "kind": "expert",
            "preset": self.preset,
            "objective": self.objective,
            "shape": [c, h, h],
            "num_classes": self.num_classes,
            "label_dropout": self.label_dropout,
            "train_items": len(self._train),
            "shard_sha256": self.shard_info.get("sha256"),
        }

    def build_model(self) -> torch.nn.Module:
        c, h, _ = self.shard.shape
        return build_model(self.preset, c, h, self.num_classes)

    def train_size(self) -> int:
        return len(self._train)

    def flops_per_sample(self) -> int:
        c, h, _ = self.shard.shape
        return preset_stats(self.preset, c, h, self.num_classes)["train_flops_per_sample"]

    def make_batch(self, indices: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x0 = to_model_space(self._train.items[indices])  # per batch: uint8 stays 4x smaller than floats in memory
        t, eps = draw_noise(x0, generator)
        batch = {"x0": x0, "t": t, "eps": eps}
        if self.num_classes is not None:
            labels = self._train.labels[indices]
            drop = torch.rand(len(indices), generator=generator) < self.label_dropout
            batch["labels"] = torch.where(drop, self.num_classes, labels)  # num_classes is the null class
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch.get("labels")
        return loss_at(
            self.objective, lambda x, ts: model_forward(model, x, ts, labels), batch["x0"], batch["t"], batch["eps"]
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
        data = data.subset(torch.arange(min(len(data), VAL_MAX_ITEMS)))
        generator = torch.Generator().manual_seed(VAL_SEED)
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for start in range(0, len(data), 128):
            x0 = to_model_space(data.items[start : start + 128])
            _, eps = draw_noise(x0, generator)
            idx = torch.arange(start, start + len(x0))
            t = (idx.float() * 0.618034 + 0.5) % 1.0  # a low-discrepancy spread of t over the whole range
            labels = None if self.num_classes is None else data.labels[start : start + 128].to(device)
            loss = loss_at(
                self.objective,
                lambda x, ts, lab=labels: model_forward(model, x, ts, lab),
                x0.to(device),
                t.to(device),
                eps.to(device),
            )
            total += float(loss) * len(x0)
            count += len(x0)
        model.train(was_training)
        return total / count

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
) -> None:
    """Write a diffusers folder + expert.json + README.md (model card with Hub metadata) for one expert."""
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
        "data": {"source": data_meta.get("source"), "latent": data_meta.get("latent")},
        "shard": shard or {},
        "recipe": recipe or {},
        "metrics": metrics or {},
    }
    atomic_write_json(folder / "expert.json", info)
    atomic_write_bytes(folder / "README.md", model_card(info).encode())


def model_card(info: dict) -> str:
    metrics = info.get("metrics", {})
    tags = ["isles", "decentralized-diffusion", "diffusion", f"objective-{info['objective']}", info["preset"]]
    front = ["---", "library_name: diffusers", "license: apache-2.0", "pipeline_tag: unconditional-image-generation"]
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
        f"- classes: {info['num_classes'] if info['num_classes'] is not None else 'unconditional'}"
        + (f" (null class {info['null_class']} for classifier-free guidance)" if info["num_classes"] else ""),
        f"- shard: `{json.dumps(info.get('shard', {}), sort_keys=True)}`",
        f"- steps: {metrics.get('steps')}, final loss: {metrics.get('final_loss')}, "
        f"validation loss: {metrics.get('val_loss')}, wall time: {metrics.get('wall_time_s')} s",
        f"- hardware: {metrics.get('hardware', {}).get('name', '?')} ({metrics.get('hardware', {}).get('device')})",
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
    labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    clip_x0: float | None = 1.0,
) -> torch.Tensor:
    """n samples (model space, [-1, 1] for pixels) from one expert with Euler steps in velocity space; with labels
    and guidance_scale != 1, classifier-free guidance v = v_null + s (v_label - v_null)."""
    model.eval()
    device = next(model.parameters()).device
    config = model.config
    c = config.in_channels
    res = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    if labels is not None:
        labels = labels.to(device)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = expert_velocity(objective, lambda xi, ts: model_forward(model, xi, ts, labels), x, t, clip_x0)
        if labels is None or guidance_scale == 1.0:
            return cond
        uncond = expert_velocity(objective, lambda xi, ts: model_forward(model, xi, ts, None), x, t, clip_x0)
        return uncond + guidance_scale * (cond - uncond)

    return sample_euler(velocity, (n, c, res, res), steps, generator=generator, device=device)


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
