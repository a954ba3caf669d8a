"""Trainer overhead: the isles trainer against a bare PyTorch loop (same model, data, batch, steps) in one process.

Run: `python benchmarks/train_overhead.py [--preset unet-tiny --batch 64 --steps 40 --repeats 3] [--json]`.
Prints samples/s of each and their ratio (target >= 0.97); warm-up steps are not timed; best of --repeats.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from isles.experts.data import load_source, to_model_space
from isles.experts.device import pick_device, synchronize
from isles.experts.expert import ExpertTask
from isles.experts.objectives import loss_at
from isles.experts.presets import build_model, model_forward
from isles.experts.trainer import TrainRecipe, train


def bare_loop(shard, preset: str, batch: int, steps: int, warmup: int, device: torch.device, lr: float) -> float:
    """The loop anyone would write: sample a batch, flow-matching loss, AdamW step. Returns samples/s."""
    torch.manual_seed(0)
    train_split = shard.train_split()
    x_all, labels_all = to_model_space(train_split.items), train_split.labels
    model = build_model(preset, *shard.shape[:2], shard.num_classes).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        idx = torch.randint(0, len(x_all), (batch,), generator=generator)
        x0, labels = x_all[idx].to(device), labels_all[idx].to(device)
        t = torch.rand(batch, generator=generator).to(device)
        eps = torch.randn(x0.shape, generator=generator).to(device)
        loss = loss_at("fm", lambda x, ts, lab=labels: model_forward(model, x, ts, lab), x0, t, eps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def isles_loop(shard, preset: str, batch: int, steps: int, warmup: int, device: torch.device, lr: float) -> float:
    """The isles trainer on the same work (EMA, clipping and label dropout included); warm-up steps untimed."""
    marks: dict[int, float] = {}

    def on_progress(p) -> None:
        if p.step in (warmup, warmup + steps):
            synchronize(device)
            marks[p.step] = time.perf_counter()

    recipe = TrainRecipe(
        steps=warmup + steps, global_batch=batch, lr=lr, warmup_steps=0,
        checkpoint_every_steps=None, checkpoint_every_seconds=None,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        train(
            ExpertTask(shard, preset, "fm"), recipe, out, device=device, progress=on_progress,
            progress_every_steps=1, export=False, precision="fp32",  # the bare loop has no bf16 autocast either
        )  # fmt: skip
    return steps * batch / (marks[warmup + steps] - marks[warmup])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="unet-tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    shard = load_source("digits")
    bare, isles = [], []
    for _ in range(args.repeats):  # interleaved, so a noisy neighbour slows both alike
        bare.append(bare_loop(shard, args.preset, args.batch, args.steps, args.warmup, device, 1e-3))
        isles.append(isles_loop(shard, args.preset, args.batch, args.steps, args.warmup, device, 1e-3))
    result = {
        "preset": args.preset,
        "batch": args.batch,
        "steps": args.steps,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "isles_samples_per_s": round(max(isles), 2),
        "bare_samples_per_s": round(max(bare), 2),
        "ratio": round(max(isles) / max(bare), 4),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{args.preset} batch {args.batch} on {device}: isles {result['isles_samples_per_s']:.1f} samples/s, "
            f"bare {result['bare_samples_per_s']:.1f} samples/s, ratio {result['ratio']:.3f} (target >= 0.97)"
        )


if __name__ == "__main__":
    main()
