"""What a video expert costs: seconds per training step, samples per second and peak accelerator memory of each Wan
preset at its clip shape, with the trainer's own precision choice (bf16 autocast where supported), AdamW and EMA.

Run: `python benchmarks/video_presets.py` (CPU: wan-tiny only); on a GPU
`python benchmarks/video_presets.py --presets wan-tiny wan-small wan-base wan-1.3b --device cuda`. Prints a table and
the ratio of each preset's step time to wan-tiny's measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from isles.experts.conditioning import TextCondition
from isles.experts.device import pick_device
from isles.experts.objectives import draw_noise, loss_at
from isles.experts.presets import build_model, clip_shape, count_parameters, model_forward

TEXT = (16, 4096)  # tokens x width: Wan 2.1's umT5 embeddings (the cost of cross-attention grows with them)


def measure(preset: str, batch: int, steps: int, device: torch.device) -> dict:
    c, f, side = clip_shape(preset)
    model = build_model(preset, c, side, None, text_width=TEXT[1], frames=f).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = [p.detach().clone() for p in model.parameters()]
    x0 = torch.randn(batch, c, f, side, side, device=device)
    cond = TextCondition(torch.randn(batch, *TEXT, device=device), torch.ones(batch, TEXT[0], device=device))
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        t, eps = draw_noise(x0, None)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_at("fm", lambda x, ts: model_forward(model, x, ts, cond), x0, t, eps)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(model.parameters()), 1e-3)

    for _ in range(2):  # warm-up: allocator, kernels
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "preset": preset, "parameters": count_parameters(model), "shape": [c, f, side, side], "batch": batch,
        "precision": "bf16 autocast" if bf16 else "fp32", "s_per_step": round(seconds, 4),
        "samples_per_s": round(batch / seconds, 1), "peak_gib": None if peak is None else round(peak, 2),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["wan-tiny"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    rows = [measure(p, args.batch, args.steps, device) for p in args.presets]
    base = rows[0]["s_per_step"]
    for row in rows:
        row["step_vs_first"] = round(row["s_per_step"] / base, 2)
    if args.json:
        print(json.dumps(rows, indent=2))
        return rows
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'})")
    print("| preset | parameters | clip shape | batch | precision | s/step | samples/s | peak GiB | vs first |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        cells = [r["preset"], f"{r['parameters'] / 1e6:.1f}M", shape, r["batch"], r["precision"]]
        cells += [f"{r['s_per_step']:.3f}", r["samples_per_s"], r["peak_gib"] or "-", r["step_vs_first"]]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    return rows


if __name__ == "__main__":
    main()
