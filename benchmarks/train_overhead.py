"""Trainer overhead: the isles trainer against a bare PyTorch loop (same model, data, batch, steps) in one process.

Run: `python benchmarks/train_overhead.py [--case digits|text-latent|all] [--preset P --batch 64 --steps 40
--repeats 3] [--json]`. digits (the default): unet-tiny on 8x8 digits held in memory (target >= 0.97); text-latent:
pixart-tiny on a text + latent shard written to a temporary file and read lazily with `load_shard`, both loops
reading their batches' rows from disk (target >= 0.95). Prints samples/s of each and their ratio; warm-up steps are
not timed; best of --repeats, the two loops interleaved.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from data_memory import write_text_latent_shard  # benchmarks/data_memory.py, beside this script

from isles.experts.conditioning import TextCondition
from isles.experts.data import load_shard, load_source, to_model_space
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


def bare_text_loop(shard, preset: str, batch: int, steps: int, warmup: int, device: torch.device, lr: float) -> float:
    """The same loop for a text model on a lazily read shard: each batch's latents, embeddings and masks are read
    from the file (as the trainer reads them), a TextCondition, flow-matching loss, AdamW. Returns samples/s."""
    torch.manual_seed(0)
    train_split = shard.train_split()  # lazy views: nothing is read until a batch is indexed
    model = build_model(preset, *shard.shape[:2], text_width=shard.text.shape[2]).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        idx = torch.randint(0, len(train_split), (batch,), generator=generator)
        x0 = to_model_space(train_split.items[idx]).to(device)
        cond = TextCondition.from_rows(train_split.text[idx], train_split.text_mask[idx]).to(device)
        t = torch.rand(batch, generator=generator).to(device)
        eps = torch.randn(x0.shape, generator=generator).to(device)
        loss = loss_at("fm", lambda x, ts, c=cond: model_forward(model, x, ts, c), x0, t, eps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def isles_loop(shard, preset: str, batch: int, steps: int, warmup: int, device: torch.device, lr: float) -> float:
    """The isles trainer on the same work (EMA, clipping and label/caption dropout included); warm-up untimed."""
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


CASES = {  # default preset, bare loop, target ratio
    "digits": ("unet-tiny", bare_loop, 0.97),
    "text-latent": ("pixart-tiny", bare_text_loop, 0.95),
}


def run_case(case: str, args: argparse.Namespace, device: torch.device, tmp: Path) -> dict:
    default_preset, bare_fn, target = CASES[case]
    preset = args.preset or default_preset
    if case == "digits":
        shard = load_source("digits")
    else:
        shard = load_shard(write_text_latent_shard(tmp / "text-latent.safetensors", args.items))
    bare, isles = [], []
    for _ in range(args.repeats):  # interleaved, so a noisy neighbour slows both alike
        bare.append(bare_fn(shard, preset, args.batch, args.steps, args.warmup, device, 1e-3))
        isles.append(isles_loop(shard, preset, args.batch, args.steps, args.warmup, device, 1e-3))
    return {
        "case": case,
        "preset": preset,
        "batch": args.batch,
        "steps": args.steps,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "items": len(shard),
        "isles_samples_per_s": round(max(isles), 2),
        "bare_samples_per_s": round(max(bare), 2),
        "ratio": round(max(isles) / max(bare), 4),
        "ratios": [round(i / b, 4) for i, b in zip(isles, bare, strict=True)],  # per interleaved pair: the noise
        "target": target,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="digits")
    parser.add_argument("--preset", default=None, help="default: unet-tiny (digits), pixart-tiny (text-latent)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--items", type=int, default=8192, help="rows of the text-latent shard (16 KB each)")
    parser.add_argument("--tmp", default=None, help="where the text-latent shard is written (default: system temp)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cases = list(CASES) if args.case == "all" else [args.case]
    with tempfile.TemporaryDirectory(prefix="isles-train-overhead-", dir=args.tmp) as tmp:
        results = [run_case(case, args, device, Path(tmp)) for case in cases]
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {r["case"]: r for r in results}, indent=2))
        return
    for r in results:
        print(
            f"{r['case']}: {r['preset']} batch {r['batch']} on {device}: isles {r['isles_samples_per_s']:.1f} "
            f"samples/s, bare {r['bare_samples_per_s']:.1f} samples/s, ratio {r['ratio']:.3f} "
            f"(target >= {r['target']})"
        )


if __name__ == "__main__":
    main()
