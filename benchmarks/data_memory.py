"""Data memory: does training one expert need memory that grows with its shard? Peak resident memory (VmHWM) of a
fresh process that opens a text + latent shard lazily (`load_shard`) and trains a pixart-tiny expert on it.

Run: `python benchmarks/data_memory.py [--sizes 0.25 1 2] [--json]` (generates ~3.3 GB in a temporary folder under
--tmp, removed afterwards; a few minutes on 2 cores); `--quick` (0.04 / 0.16 / 0.32 GB, what the tests run).
Each size trains in its own subprocess (`--child SHARD`), so one run's memory never counts in another's. Passes when
the largest peak is at most 1.15x the smallest; generation and training times are printed, not judged.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from isles.experts.data import ShardData, shard_header, split_mask
from isles.experts.shard_file import ShardWriter

SIZES_GB = (0.25, 1.0, 2.0)
QUICK_SIZES_GB = (0.04, 0.16, 0.32)  # 8x like the full sizes; large enough that reading the whole shard fails
MAX_RATIO = 1.15  # the largest shard's peak over the smallest's
GB = 1e9
# A Paris-style row: SD-VAE latents of a 128x128 image, and a caption as 16 MiniLM-width (384) token embeddings.
LATENT_SHAPE = (4, 16, 16)
TEXT_LENGTH, TEXT_WIDTH = 16, 384
ROW_BYTES = 4 * 4 * 16 * 16 + 2 * TEXT_LENGTH * TEXT_WIDTH + TEXT_LENGTH + 8 + 1  # items, text, mask, cluster, val


def write_text_latent_shard(path: Path, n: int, seed: int = 0, chunk: int = 2048) -> Path:
    """A random (seeded) text + latent shard of n rows, written `chunk` rows at a time: memory stays at one chunk."""
    generator = torch.Generator().manual_seed(seed)
    val_mask = split_mask(n)
    writer = ShardWriter(path)
    try:
        for start in range(0, n, chunk):
            rows = min(chunk, n - start)
            lengths = torch.randint(1, TEXT_LENGTH + 1, (rows, 1), generator=generator)
            writer.append(
                items=torch.randn(rows, *LATENT_SHAPE, generator=generator),
                text=torch.randn(rows, TEXT_LENGTH, TEXT_WIDTH, generator=generator).to(torch.float16),
                text_mask=(torch.arange(TEXT_LENGTH) < lengths).to(torch.uint8),  # real tokens, then padding
                clusters=torch.zeros(rows, dtype=torch.int64),
                val_mask=val_mask[start : start + rows].to(torch.uint8),
            )
        null_text = torch.randn(TEXT_LENGTH, TEXT_WIDTH, generator=generator).to(torch.float16)
        writer.set_extra("null_text", null_text)
        writer.set_extra("null_text_mask", (torch.arange(TEXT_LENGTH) < 2).to(torch.uint8))  # [CLS] [SEP]
    except BaseException:
        writer.abort()
        raise
    writer.close(shard_header({"source": "synthetic text+latent", "num_classes": None}))
    return path


def rows_for(gb: float) -> int:
    return max(64, round(gb * GB / ROW_BYTES))


def _memory_mb(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process in MB; ru_maxrss where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e6  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def child(path: Path, steps: int, batch: int, device: str) -> dict:
    """Train one expert on the shard at `path` (read lazily); its memory and times, as the parent reads them."""
    from diffusers import PixArtTransformer2DModel  # noqa: F401 (imported now, so loaded_rss_mb counts it)

    from isles.experts.data import load_shard
    from isles.experts.expert import ExpertTask
    from isles.experts.trainer import TrainRecipe, train

    start = time.perf_counter()
    shard: ShardData = load_shard(path)
    task = ExpertTask(shard, preset="pixart-tiny", conditioning="text")
    loaded_rss = _memory_mb("VmRSS")
    recipe = TrainRecipe(
        steps=steps, global_batch=batch, warmup_steps=0, checkpoint_every_steps=None, checkpoint_every_seconds=None
    )
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="isles-data-memory-") as out:
        result = train(task, recipe, out, device=device, export=False)  # writes one final checkpoint
    train_s = time.perf_counter() - start
    return {
        "items": len(shard),
        "peak_rss_mb": round(_memory_mb("VmHWM"), 1),
        "loaded_rss_mb": round(loaded_rss, 1),  # torch, diffusers and the opened shard, before training
        "load_s": round(load_s, 2),
        "train_s": round(train_s, 2),
        "final_loss": result.metrics["final_loss"],
    }


def measure(gb: float, tmp: Path, args: argparse.Namespace) -> dict:
    """Generate a shard of about `gb` GB, train on it in a fresh process, delete it; one row of the table."""
    path = tmp / f"shard-{gb:g}gb.safetensors"
    start = time.perf_counter()
    write_text_latent_shard(path, rows_for(gb), seed=args.seed)
    generate_s = time.perf_counter() - start
    size = path.stat().st_size
    cmd = [sys.executable, __file__, "--child", str(path), "--steps", str(args.steps), "--batch", str(args.batch)]
    cmd += ["--device", args.device, "--threads", str(args.threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    finally:
        path.unlink(missing_ok=True)
    if proc.returncode != 0:
        sys.exit(f"Error: the training child for {gb:g} GB failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"target_gb": gb, "shard_gb": round(size / GB, 4), "generate_s": round(generate_s, 2), **report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=None, help="shard sizes in GB (default 0.25 1 2)")
    parser.add_argument("--quick", action="store_true", help=f"sizes {' '.join(map(str, QUICK_SIZES_GB))} GB")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="host memory is what is measured; cpu by default")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on a shared machine)")
    parser.add_argument("--tmp", default=None, help="where the shards are generated (default: the system's temp)")
    parser.add_argument("--child-timeout", type=float, default=600.0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: train on this shard, report
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(Path(args.child), args.steps, args.batch, args.device)), flush=True)
        return

    sizes = args.sizes or (QUICK_SIZES_GB if args.quick else SIZES_GB)
    rows = []
    with tempfile.TemporaryDirectory(prefix="isles-data-memory-", dir=args.tmp) as tmp:
        for gb in sizes:
            rows.append(measure(gb, Path(tmp), args))
            print(f"{gb:g} GB: peak {rows[-1]['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    peaks = [r["peak_rss_mb"] for r in rows]
    ratio = max(peaks) / min(peaks)
    result = {
        "shard_gb": [r["shard_gb"] for r in rows],
        "peak_rss_mb": peaks,
        "items": [r["items"] for r in rows],
        "ratio_to_smallest": [round(p / peaks[0], 4) for p in peaks],
        "ratio": round(ratio, 4),
        "max_ratio": MAX_RATIO,
        "passed": ratio <= MAX_RATIO,
        "loaded_rss_mb": [r["loaded_rss_mb"] for r in rows],
        "generate_s": [r["generate_s"] for r in rows],
        "train_s": [r["train_s"] for r in rows],
        "steps": args.steps,
        "batch": args.batch,
        "device": args.device,
        "threads": args.threads,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"pixart-tiny, {args.steps} steps of batch {args.batch} on {args.device}, shard read lazily (load_shard)")
    print("| shard GB | items | peak RSS MB | ratio | RSS before training MB | generate s | train s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['shard_gb']:.3f} | {r['items']} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / peaks[0]:.3f} "
            f"| {r['loaded_rss_mb']:.0f} | {r['generate_s']:.1f} | {r['train_s']:.1f} |"
        )
    verdict = "PASS" if result["passed"] else "FAIL"
    print(f"{verdict}: peak memory max/min = {ratio:.3f} (limit {MAX_RATIO}) across {sizes[0]:g}..{sizes[-1]:g} GB")


if __name__ == "__main__":
    main()
