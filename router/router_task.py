"""The router as a trainer task: cross-entropy on the cluster of the clean item, over all noise levels.

`RouterTask(shards, preset="cnn-small")` plugs into `experts.trainer.train` like the expert task (checkpoints, exact
resume, EMA, export). The export is `config.json` + `model.safetensors` + `router.json` (metrics, accuracy per t).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from isles.experts.conditioning import TextCondition
from isles.experts.data import item_layout, to_model_space
from isles.protocol.errors import IslesError
from isles.protocol.files import atomic_write_json

from .model import RouterModel, router_config

ROUTER_FORMAT = "isles-router-1"
VAL_SEED = 4321
VAL_MAX_ITEMS = 2048
# Noise levels at which accuracy is reported: low t is nearly clean (easy), t near 1 is nearly pure noise.
VAL_TIMES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class RouterTask:
    """Train r(x_t, t[, c]) on a sample of every shard. `shards[k]` holds the items of cluster k."""

    shards: Sequence[Any]  # experts.data.ShardData, one per cluster, in cluster order
    preset: str = "cnn-small"
    max_items_per_shard: int | None = None  # a sample of every shard is enough (the router is ~4% of the compute)
    conditional: bool = True  # class-aware when the data has labels: clusters mix classes
    text_aware: bool = False  # reads the caption (pooled) when the data has text; the papers' router does not
    label_dropout: float = 0.1  # some steps without the class or caption, so unconditional sampling still routes
    recipe: dict[str, Any] = field(default_factory=dict)  # recorded in router.json

    def __post_init__(self) -> None:
        if not self.shards:
            raise IslesError("the router needs at least one shard")
        shapes = {tuple(s.shape) for s in self.shards}
        if len(shapes) != 1:
            raise IslesError(f"shards have different item shapes {sorted(shapes)}")
        self.num_experts = len(self.shards)
        has_labels = all(s.labels is not None for s in self.shards)
        self.num_classes = self.shards[0].num_classes if (self.conditional and has_labels) else None
        if self.text_aware and not all(s.has_text for s in self.shards):
            raise IslesError(
                "a text-aware router needs captioned shards, and these have no text",
                hint="partition a captioned source, or train the router without --router-text",
            )
        self.text_dim = self.shards[0].text.shape[2] if self.text_aware else None
        train, val = [], []
        for shard in self.shards:
            tr, va = shard.train_split(), shard.val_split()
            if self.max_items_per_shard is not None:
                tr = tr.subset(torch.arange(min(len(tr), self.max_items_per_shard)))
            train.append(tr)
            val.append(va)
        # Items stay in their shard files (read per batch): memory does not grow with the shards' size.
        self._train, self._val = _Rows(train, self.num_classes), _Rows(val, self.num_classes)
        if len(self._train) == 0:
            raise IslesError("the shards have no training items for the router")

    # --- the trainer's task protocol -----------------------------------------------------------------------------
    def describe(self) -> dict:
        return {
            "kind": "router",
            "preset": self.preset,
            "num_experts": self.num_experts,
            "shape": list(self.shards[0].shape),
            "num_classes": self.num_classes,
            "label_dropout": self.label_dropout,
            "train_items": len(self._train),
            # Only when set: checkpoints of a text-blind router keep the identity they had before text-aware ones.
            **({"text_dim": self.text_dim} if self.text_dim is not None else {}),
        }

    def config(self):
        c, frames, h, _ = item_layout(self.shards[0].shape)
        return router_config(self.preset, self.num_experts, c, h, self.num_classes, frames, self.text_dim)

    def build_model(self) -> torch.nn.Module:
        return RouterModel(self.config())

    def train_size(self) -> int:
        return len(self._train)

    def flops_per_sample(self) -> int:
        """Training FLOPs per item (forward + backward, torch.utils.flop_counter), so the router's cost is counted
        like an expert's: it belongs to the ensemble's side of an iso-FLOP comparison."""
        from torch.utils.flop_counter import FlopCounterMode

        model = self.build_model()
        x = torch.zeros(2, *self.shards[0].shape)
        condition = torch.zeros(2, dtype=torch.long) if self.num_classes is not None else None
        if self.text_aware:
            length = self.shards[0].text.shape[1]
            condition = TextCondition(torch.zeros(2, length, self.text_dim), torch.ones(2, length))
        with FlopCounterMode(display=False) as counter:
            model(x, torch.full((2,), 0.5), condition).sum().backward()
        return int(counter.get_total_flops()) // 2

    def make_batch(self, indices: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x0 = self._train.items(indices)
        t = torch.rand(len(indices), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        te = t.reshape(-1, *([1] * (x0.ndim - 1)))
        batch = {"x_t": (1 - te) * x0 + te * eps, "t": t, "target": self._train.cluster[indices]}
        if self.num_classes is None and not self.text_aware:
            return batch  # nothing to drop: no draw, so a text-blind router's data stream is what it always was
        drop = torch.rand(len(indices), generator=generator) < self.label_dropout
        if self.num_classes is not None:
            batch["labels"] = torch.where(drop, self.num_classes, self._train.labels[indices])  # the null class
        if self.text_aware:  # a dropped caption becomes the empty one, what a prompt of "" embeds to
            text = self._train.text(indices)
            null_emb, null_mask = (v.float() for v in self.shards[0].null_text)
            batch["text"] = torch.where(drop[:, None, None], null_emb, text.emb)
            batch["text_mask"] = torch.where(drop[:, None], null_mask, text.mask)
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["x_t"], batch["t"], _condition(batch))
        return F.cross_entropy(logits.float(), batch["target"])

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
        """Held-out cross-entropy and accuracy, overall and at each noise level of VAL_TIMES (fixed noise)."""
        n = min(len(self._val), VAL_MAX_ITEMS)
        if n == 0:
            return {"val_items": 0}
        idx = torch.linspace(0, len(self._val) - 1, n).round().long()  # spread over every shard
        condition = self._val.labels[idx] if self.num_classes is not None else None
        if self.text_aware:
            condition = self._val.text(idx)
        report = router_accuracy(model, self._val.items(idx), self._val.cluster[idx], condition, device, VAL_TIMES)
        return {
            "val_items": n,
            "val_loss": report["loss"],
            "val_accuracy": report["accuracy"],
            "accuracy_by_t": report["accuracy_by_t"],
            "chance_accuracy": float(torch.bincount(self._val.cluster[idx]).max()) / n,
        }

    def export(self, model: torch.nn.Module, folder: Path, metrics: dict[str, Any]) -> None:
        model.save_pretrained(folder)
        atomic_write_json(
            Path(folder) / "router.json",
            {
                "format": ROUTER_FORMAT,
                "preset": self.preset,
                "num_experts": self.num_experts,
                "num_classes": self.num_classes,
                "text_aware": self.text_aware,
                "label_dropout": self.label_dropout,
                "recipe": self.recipe,
                "metrics": metrics,
            },
        )


def _condition(batch: dict[str, torch.Tensor]):
    """What the router is conditioned on in a batch: the class labels, the caption, or nothing."""
    if "text" in batch:
        return TextCondition(batch["text"], batch["text_mask"])
    return batch.get("labels")


class _Rows:
    """The items of several shards as one indexable set: (shard, row) per position, items read on demand."""

    def __init__(self, parts: Sequence[Any], num_classes: int | None):
        self.parts = list(parts)
        sizes = [len(p) for p in self.parts]
        self.cluster = torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(sizes)])
        self.row = torch.cat([torch.arange(n) for n in sizes])
        self.labels = torch.cat(
            [p.labels.long() if num_classes is not None else torch.zeros(len(p), dtype=torch.long) for p in self.parts]
        )

    def __len__(self) -> int:
        return int(self.cluster.numel())

    def items(self, index: torch.Tensor) -> torch.Tensor:
        """Items at `index` (in order) in model space, read shard by shard."""
        shape = self.parts[0].shape
        out = torch.empty(len(index), *shape)
        clusters, rows = self.cluster[index], self.row[index]
        for k in clusters.unique().tolist():
            where = (clusters == k).nonzero(as_tuple=True)[0]
            out[where] = to_model_space(self.parts[k].items[rows[where]])
        return out

    def text(self, index: torch.Tensor) -> TextCondition:
        """The captions at `index` (in order): token embeddings and masks, read shard by shard."""
        first = self.parts[0]
        emb = torch.empty(len(index), *first.text.shape[1:])
        mask = torch.empty(len(index), first.text_mask.shape[1])
        clusters, rows = self.cluster[index], self.row[index]
        for k in clusters.unique().tolist():
            where = (clusters == k).nonzero(as_tuple=True)[0]
            emb[where] = self.parts[k].text[rows[where]].float()
            mask[where] = self.parts[k].text_mask[rows[where]].float()
        return TextCondition(emb, mask)


@torch.no_grad()
def router_accuracy(
    model: torch.nn.Module,
    x0: torch.Tensor,
    clusters: torch.Tensor,
    condition,
    device: torch.device | str = "cpu",
    times: Sequence[float] = VAL_TIMES,
    seed: int = VAL_SEED,
) -> dict[str, Any]:
    """Accuracy of the router at predicting the cluster of x0 from x_t = (1-t) x0 + t eps, at each t in `times`;
    `condition`: the items' class labels, captions (a TextCondition), or None."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    by_t, losses, correct_total = {}, [], 0
    for t_value in times:
        correct = 0
        for start in range(0, x0.shape[0], 256):
            x = x0[start : start + 256]
            eps = torch.randn(x.shape, generator=generator)
            t = torch.full((x.shape[0],), float(t_value))
            x_t = (1 - t_value) * x + t_value * eps
            cond = None if condition is None else condition[start : start + 256].to(device)
            logits = model(x_t.to(device), t.to(device), cond).float().cpu()
            target = clusters[start : start + 256]
            losses.append(F.cross_entropy(logits, target, reduction="sum").item())
            correct += int((logits.argmax(-1) == target).sum())
        by_t[f"{t_value:g}"] = correct / x0.shape[0]
        correct_total += correct
    model.train(was_training)
    count = x0.shape[0] * len(times)
    return {"loss": sum(losses) / count, "accuracy": correct_total / count, "accuracy_by_t": by_t}
