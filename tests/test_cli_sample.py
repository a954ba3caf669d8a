"""Digits end to end: partition into 4 clusters, train tiny experts and a class-aware router, then `isles sample`
writes a grid of the requested class; routing strips, determinism, partial ensembles, bad input, Hub round trip.

The module fixture trains everything once (~60 s on one CPU core)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import ISLES
from hub_server import HubServer, hub_server  # noqa: F401 (fixture)
from PIL import Image

from isles.experts.data import load_shard
from isles.experts.expert import ExpertTask
from isles.experts.trainer import TrainRecipe, train
from isles.router.ensemble import EnsemblePipeline
from isles.router.partition import PartitionConfig, partition
from isles.router.router_task import RouterTask

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    result = partition(PartitionConfig(source="digits", experts=4, out=root / "run", objectives="mixed:1"))
    shards = [load_shard(p) for p in result.shard_paths]
    experts = {}
    for k, shard in enumerate(shards):
        task = ExpertTask(shard, preset="unet-tiny", objective=result.manifest.experts[k].objective)
        recipe = TrainRecipe(steps=40, global_batch=64, lr=1e-3, warmup_steps=10, seed=k, checkpoint_every_steps=None)
        experts[k] = train(task, recipe, root / f"expert-{k}", device="cpu").export_dir
    recipe = TrainRecipe(steps=60, global_batch=128, lr=2e-3, warmup_steps=10, checkpoint_every_steps=None)
    router = train(RouterTask(shards, preset="cnn-small"), recipe, root / "router", device="cpu")
    pipe = EnsemblePipeline.assemble(experts, router.export_dir, {"run_id": result.manifest.run_id})
    pipe.save_pretrained(root / "ensemble")
    return root / "ensemble"


@pytest.fixture(scope="module")
def classifier():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    return LogisticRegression(max_iter=2000).fit(digits.data, digits.target)


def isles(*args, env=None):
    return subprocess.run(
        [*ISLES, *map(str, args)], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


def grid_items(path, n, size=8, pad=1, cols=4):
    """Cut a `--scale 1` grid PNG back into its n items (grey levels 0..255)."""
    image = np.asarray(Image.open(path).convert("L"))
    out = []
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (size + pad), pad + c * (size + pad)
        out.append(image[y : y + size, x : x + size])
    return np.stack(out)


def test_sample_grid_shows_the_requested_class(ensemble_dir, classifier, tmp_path):
    out = tmp_path / "grid.png"
    proc = isles(
        "sample", ensemble_dir, "--class", 3, "--n", 16, "--routing", "top2", "--steps", 20, "--seed", 0,
        "--out", out, "--scale", 1, "--show-routing", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    items = grid_items(out, 16)
    predicted = classifier.predict(items.reshape(16, -1) / 255.0 * 16.0)
    print("predicted classes for --class 3:", predicted.tolist())
    assert (predicted == 3).mean() >= 0.5
    strip = Image.open(tmp_path / "grid-routing.png")
    assert strip.size == (20 * 12, 16 * 12)
    assert len(report["choices"]) == 16 and len(report["choices"][0]) == 20
    assert sum(report["steps_per_expert"]) == 16 * 20
    # The same seed gives the same file; another seed another one.
    again = tmp_path / "again.png"
    assert isles("sample", ensemble_dir, "--class", 3, "--n", 16, "--routing", "top2", "--steps", 20,
                 "--seed", 0, "--out", again, "--scale", 1).returncode == 0  # fmt: skip
    assert again.read_bytes() == out.read_bytes()
    pipe = EnsemblePipeline.from_pretrained(ensemble_dir, device="cpu")
    a = pipe(n=4, class_labels=3, routing="top2", steps=20, seed=1)
    b = pipe(n=4, class_labels=3, routing="top2", steps=20, seed=0)
    assert not torch.equal(a.images, b.images)


def test_every_routing_mode_samples(ensemble_dir):
    pipe = EnsemblePipeline.from_pretrained(ensemble_dir, device="cpu")
    assert [e.objective for e in pipe.experts.values()] == ["ddpm", "fm", "fm", "fm"]
    for routing in ("top1", "topk:2", "full", "threshold:0.2"):
        out = pipe(n=4, class_labels=[0, 1, 2, 3], routing=routing, steps=5, seed=0, return_routing=True)
        assert torch.isfinite(out.images).all() and out.images.shape == (4, 1, 8, 8)
        torch.testing.assert_close(out.weights.sum(-1), torch.ones(5, 4))
    unconditional = pipe(n=2, steps=5, seed=0, guidance_scale=2.0)  # the null class routes and guides too
    assert torch.isfinite(unconditional.images).all()


def test_every_sampler_samples_from_the_command_line(ensemble_dir, tmp_path):
    for sampler, calls in (("heun", 5), ("dpm++2m", 3), ("unipc", 3), ("euler", 3)):
        args = ("--class", 2, "--n", 2, "--steps", 3, "--sampler", sampler, "--show-routing", "--json")
        proc = isles("sample", ensemble_dir, "--out", tmp_path / f"{sampler}.png", *args)
        assert proc.returncode == 0, proc.stderr
        written = json.loads(proc.stdout)
        assert written["sampler"] == sampler and sum(written["steps_per_expert"]) == 2 * calls, written


def test_missing_expert_is_named_and_skip_broken_samples_without_it(ensemble_dir, tmp_path):
    broken = tmp_path / "ensemble"
    shutil.copytree(ensemble_dir, broken)
    shutil.rmtree(broken / "expert_2")
    proc = isles("sample", broken, "--out", tmp_path / "x.png", "--class", 1)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: ") and "expert 2" in proc.stderr and "Traceback" not in proc.stderr
    assert "accelerate" not in proc.stderr  # diffusers' load-time chatter is silenced
    proc = isles(
        "sample", broken, "--skip-broken", "--class", 1, "--n", 4, "--steps", 5, "--out", tmp_path / "p",
        "--show-routing", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["steps_per_expert"][2] == 0
    assert Image.open(tmp_path / "p").format == "PNG"  # a PNG whatever the --out suffix


@pytest.mark.parametrize(
    "args,message",
    [
        (["--routing", "best"], "Error: unknown routing mode 'best'"),
        (["--class", "12"], "Error: class 12 out of range"),
        (["--sampler", "rk45"], "Error: unknown sampler 'rk45'"),
        (["--routing", "calibrated:top1"], "Error: expert 0 has no measured velocity error"),
    ],
)
def test_bad_input_is_one_error_line(ensemble_dir, tmp_path, args, message):
    proc = isles("sample", ensemble_dir, "--out", tmp_path / "x.png", "--steps", 2, *args)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_ensemble_there_is_one_error_line(tmp_path):
    proc = isles("sample", tmp_path / "nothing", "--out", tmp_path / "x.png")
    assert proc.returncode == 1 and proc.stderr.startswith("Error: no ensemble at"), proc.stderr


def test_round_trip_through_the_hub_test_server(ensemble_dir, tmp_path, hub_server):  # noqa: F811
    from isles.protocol.store_hub import HubStore

    store = HubStore("alice", token="hf_test_token", endpoint=hub_server.url, backoff_period=0.01)
    revision = store.publish("digits-ensemble", ensemble_dir, kind="model", message="ensemble")
    pipe = EnsemblePipeline.from_pretrained(
        "digits-ensemble", store=store, revision=revision, cache_dir=tmp_path / "cache", device="cpu"
    )
    local = EnsemblePipeline.from_pretrained(ensemble_dir, device="cpu")
    torch.testing.assert_close(
        pipe(n=3, class_labels=5, steps=4, seed=2).images, local(n=3, class_labels=5, steps=4, seed=2).images
    )
    # The CLI reads hf://<namespace>/<repo> from the same server (HF_ENDPOINT points a child process at it).
    out = tmp_path / "hub.png"
    proc = isles(
        "sample", "hf://alice/digits-ensemble", "--n", 4, "--steps", 3, "--out", out,
        env={"HF_ENDPOINT": hub_server.url, "XDG_CACHE_HOME": str(tmp_path / "xdg")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    # A corrupted file on the server is refused, naming the file.
    hub_server.tamper.add("expert_1/diffusion_pytorch_model.safetensors")
    with pytest.raises(Exception, match="expert_1/diffusion_pytorch_model.safetensors"):
        EnsemblePipeline.from_pretrained(
            "digits-ensemble", store=store, revision=revision, cache_dir=tmp_path / "cache2", device="cpu"
        )


def test_latent_ensemble_writes_latents_and_a_preview(tmp_path):
    from isles.experts.presets import build_model
    from isles.router.ensemble import Expert
    from isles.router.model import RouterConfig, RouterModel

    torch.manual_seed(0)
    experts = {i: Expert(i, build_model("unet-tiny", channels=4, resolution=8), "fm") for i in range(2)}
    router = RouterModel(RouterConfig(num_experts=2, in_channels=4, resolution=8, width=8))
    EnsemblePipeline(experts, router, {"data_kind": "latents"}).save_pretrained(tmp_path / "ens")
    proc = isles("sample", tmp_path / "ens", "--n", 2, "--steps", 2, "--out", tmp_path / "lat.png", "--json")
    assert proc.returncode == 0, proc.stderr
    from safetensors.torch import load_file

    assert load_file(json.loads(proc.stdout)["latents"])["latents"].shape == (2, 4, 8, 8)
    assert (tmp_path / "lat.png").is_file()
