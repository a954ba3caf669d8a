"""End-to-end check on digits: partition into 4 clusters, train tiny experts and a class-aware router, sample every
class with each routing mode and score the samples with a digits classifier.

Run: `python benchmarks/digits_ensemble.py --out benchmarks/results/digits-ensemble` (5-12 min on one CPU core;
`--quick` for a 1-minute smoke run). Writes results.json, results.md, grid-<routing>.png and the ensemble folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def digits_classifier():
    """Logistic regression on sklearn's 8x8 digits (pixels 0..16): ~0.96 held-out accuracy."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.data, digits.target, test_size=0.3, random_state=0)
    clf = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    return clf, float(clf.score(x_test, y_test))


def classify(clf, images: torch.Tensor):
    """Model-space samples [-1, 1] [N, 1, 8, 8] -> predicted digit per sample."""
    pixels = images.clamp(-1, 1).add(1).mul(8.0).reshape(images.shape[0], -1).cpu().numpy()  # back to 0..16
    return clf.predict(pixels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/digits-ensemble"))
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--preset", default="unet-tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--router-steps", type=int, default=300)
    parser.add_argument("--sample-steps", type=int, default=30)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--objectives", default="fm")
    parser.add_argument("--quick", action="store_true", help="tiny budget: checks the pipeline, not the quality")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.router_steps, args.per_class, args.sample_steps = 40, 60, 4, 10

    from isles.experts.data import load_shard
    from isles.experts.expert import ExpertTask, save_grid
    from isles.experts.trainer import TrainRecipe, train
    from isles.protocol.files import atomic_write_bytes
    from isles.router.ensemble import EnsemblePipeline
    from isles.router.partition import PartitionConfig, partition
    from isles.router.router_task import RouterTask

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.monotonic()
    result = partition(
        PartitionConfig(source="digits", experts=args.experts, out=out / "run", objectives=args.objectives)
    )
    timings["partition_s"] = time.monotonic() - start
    shards = [load_shard(p) for p in result.shard_paths]
    manifest = result.manifest
    print(f"run {manifest.run_id}: clusters {result.sizes}", flush=True)

    expert_dirs = {}
    for k, shard in enumerate(shards):
        t0 = time.monotonic()
        task = ExpertTask(shard, preset=args.preset, objective=manifest.experts[k].objective)
        recipe = TrainRecipe(
            steps=args.steps, global_batch=args.batch, lr=args.lr, warmup_steps=50, seed=k, checkpoint_every_steps=None
        )
        res = train(task, recipe, out / "units" / f"expert-{k}", device="cpu")
        expert_dirs[k] = res.export_dir
        timings[f"expert_{k}_s"] = time.monotonic() - t0
        print(f"expert {k}: val loss {res.metrics.get('val_loss'):.4f} ({timings[f'expert_{k}_s']:.0f} s)", flush=True)

    t0 = time.monotonic()
    router_task = RouterTask(shards, preset="cnn-small")
    recipe = TrainRecipe(
        steps=args.router_steps, global_batch=128, lr=2e-3, warmup_steps=20, checkpoint_every_steps=None
    )
    router_res = train(router_task, recipe, out / "units" / "router", device="cpu")
    timings["router_s"] = time.monotonic() - t0
    router_metrics = router_res.metrics
    print(f"router accuracy by t: {router_metrics['accuracy_by_t']} (chance {router_metrics['chance_accuracy']:.2f})")

    pipe = EnsemblePipeline.assemble(expert_dirs, router_res.export_dir, {"name": "digits", "run_id": manifest.run_id})
    pipe.save_pretrained(out / "ensemble")
    pipe = EnsemblePipeline.from_pretrained(out / "ensemble", device="cpu")

    clf, clf_accuracy = digits_classifier()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    scores = {}
    for routing in ("top1", "top2", "full"):
        t0 = time.monotonic()
        res = pipe(
            n=len(labels), class_labels=labels, routing=routing, steps=args.sample_steps, seed=0,
            guidance_scale=args.guidance, return_routing=True,
        )  # fmt: skip
        predicted = torch.as_tensor(classify(clf, res.images))
        scores[routing] = {
            "class_accuracy": float((predicted == labels).float().mean()),
            "sample_s": time.monotonic() - t0,
            "steps_per_expert": torch.bincount(res.choices.reshape(-1), minlength=pipe.num_experts).tolist(),
        }
        save_grid(res.images, out / f"grid-{routing}.png", nrow=args.per_class, scale=4)
        print(f"{routing}: class accuracy {scores[routing]['class_accuracy']:.3f}", flush=True)
    # One expert used alone for every class (what a class-blind deployment of a single cluster's model gives).
    for k in range(pipe.num_experts):
        solo = EnsemblePipeline({k: pipe.experts[k]}, pipe.router, pipe.config)
        res = solo(n=len(labels), class_labels=labels, routing="top1", steps=args.sample_steps, seed=0)
        predicted = torch.as_tensor(classify(clf, res.images))
        scores[f"expert_{k}_alone"] = {"class_accuracy": float((predicted == labels).float().mean())}

    summary = {
        "run_id": manifest.run_id,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cluster_sizes": result.sizes,
        "cluster_classes": result.class_counts,
        "classifier_accuracy_on_real_digits": clf_accuracy,
        "router": {k: router_metrics[k] for k in ("val_accuracy", "accuracy_by_t", "chance_accuracy", "val_loss")},
        "sampling": scores,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "hardware": router_metrics.get("hardware"),
    }
    atomic_write_bytes(out / "results.json", (json.dumps(summary, indent=2, default=str) + "\n").encode())
    lines = [
        f"# digits ensemble ({args.experts} experts, {args.preset}, {args.steps} steps; router {args.router_steps})",
        "",
        f"classifier accuracy on real held-out digits: {clf_accuracy:.3f}",
        "",
        "| sampler | class accuracy |",
        "|---|---|",
        *[f"| {name} | {s['class_accuracy']:.3f} |" for name, s in scores.items()],
        "",
        "router accuracy by noise level t: "
        + ", ".join(f"t={t}: {a:.3f}" for t, a in router_metrics["accuracy_by_t"].items())
        + f" (chance {router_metrics['chance_accuracy']:.3f})",
    ]
    atomic_write_bytes(out / "results.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
