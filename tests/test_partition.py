"""`isles partition`: clusters, shards with held-out splits, published shards and a valid run manifest; bad input is
one clear error line."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import ISLES
from hub_server import hub_server  # noqa: F401 (fixture)
from sklearn.datasets import load_digits

from isles.experts.data import load_shard
from isles.protocol.artifacts import open_store
from isles.protocol.errors import IslesError
from isles.protocol.records import load_manifest_json
from isles.router.encoders import make_encoder
from isles.router.partition import PartitionConfig, kmeans, parse_objectives, partition


def test_kmeans_finds_separated_blobs_and_orders_clusters_by_size():
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = [50, 200, 100]
    x = np.concatenate([c + rng.normal(size=(n, 2)) for c, n in zip(centers, sizes, strict=True)])
    ids = kmeans(x, 3, seed=0)
    assert np.bincount(ids).tolist() == [200, 100, 50]
    assert (ids[:50] == 2).all() and (ids[50:250] == 0).all()
    with pytest.raises(IslesError, match="cannot make 400 clusters from 350 items"):
        kmeans(x, 400)


def test_empty_cluster_is_an_error():
    x = np.zeros((10, 2))  # every item identical: k-means cannot fill 3 clusters
    with pytest.raises(IslesError, match="empty"):
        kmeans(x, 3)


def test_objectives_spec():
    assert parse_objectives("fm", 3) == ["fm"] * 3
    assert parse_objectives("mixed:2", 4) == ["ddpm", "ddpm", "fm", "fm"]
    assert parse_objectives("mixed-v:1", 3) == ["ddpm-v", "fm", "fm"]
    assert parse_objectives("ddpm-v", 2) == ["ddpm-v", "ddpm-v"]
    for bad in ("mixed:5", "adam", "mixed:", "mixed-v:5", "mixed-x:1"):
        with pytest.raises(IslesError):
            parse_objectives(bad, 4)


def test_encoder_specs():
    assert make_encoder("pixels:8").dim == 8
    with pytest.raises(IslesError, match="unknown encoder"):
        make_encoder("resnet")


def test_partition_digits_writes_shards_store_and_manifest(tmp_path):
    result = partition(
        PartitionConfig(source="digits", experts=4, out=tmp_path / "run", objectives="mixed:1", steps=50)
    )
    manifest = load_manifest_json((tmp_path / "run" / "manifest.json").read_text())
    assert manifest.run_id == result.manifest.run_id and len(manifest.shards) == 4
    assert sum(s.items for s in manifest.shards) == 1797
    assert [e.objective for e in manifest.experts] == ["ddpm", "fm", "fm", "fm"]
    assert manifest.experts[0].num_classes == 10 and manifest.experts[0].steps == 50
    assert manifest.router.class_conditional is True and len(manifest.units) == 5
    store = open_store(manifest.store)
    seen_labels = []
    for c, ref in enumerate(manifest.shards):
        dest = store.pull_file(ref.repo, ref.revision, ref.path, tmp_path / f"dl-{c}", ref.sha256, kind="dataset")
        shard = load_shard(dest, sha256=ref.sha256)
        assert len(shard) == ref.items and int(shard.val_mask.sum()) == ref.val_items > 0
        assert (shard.clusters == c).all() and shard.meta["num_classes"] == 10
        seen_labels.append(shard.labels)
    # Every item lands in exactly one shard: the class histogram of the union is the data set's.
    union = torch.cat(seen_labels)
    expected = torch.bincount(torch.from_numpy(load_digits().target), minlength=10)
    assert torch.equal(torch.bincount(union, minlength=10), expected)
    # Clusters are far from random: each holds a few dominant classes.
    for counts in result.class_counts:
        top3 = sum(sorted(counts.values(), reverse=True)[:3])
        assert top3 / sum(counts.values()) > 0.6


def test_cli_partition_prints_run_id_table_and_strips(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [*ISLES, "partition", "digits", "--experts", "3", "--out", str(out), "--steps", "10", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["run_id"] == manifest["run_id"]
    assert [row["items"] for row in summary["clusters"]] == [s["items"] for s in manifest["shards"]]
    assert abs(sum(row["share"] for row in summary["clusters"]) - 1) < 1e-9
    for row in summary["clusters"]:
        assert (out / "clusters" / f"cluster-{row['cluster']}.png").is_file()


@pytest.mark.parametrize(
    "args,message",
    [
        (["digits", "--experts", "5000"], "Error: cannot make 5000 clusters from 1797 items"),
        (["digits", "--experts", "4", "--objectives", "sgd"], "Error: unknown objectives 'sgd'"),
        (["/no/such/folder", "--experts", "2"], "Error: unknown data source"),
        (["digits", "--experts", "2", "--router-text"], "Error: a text-aware router (--router-text) needs captions"),
    ],
)
def test_cli_partition_bad_input_is_one_error_line(tmp_path, args, message):
    proc = subprocess.run(
        [*ISLES, "partition", *args, "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_partition_publishes_shards_to_the_hub(tmp_path, hub_server, monkeypatch):  # noqa: F811
    from isles.protocol.store_hub import HubStore

    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    out = tmp_path / "run"
    proc = subprocess.run(
        [*ISLES, "partition", "digits", "--experts", "2", "--out", str(out), "--store", "hf://alice", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = load_manifest_json((out / "manifest.json").read_text())
    assert manifest.store == "hf://alice"
    store = HubStore("alice", endpoint=hub_server.url)
    ref = manifest.shards[1]
    dest = store.pull_file(ref.repo, ref.revision, ref.path, tmp_path / "shard", ref.sha256, kind="dataset")
    assert len(load_shard(dest, sha256=ref.sha256)) == ref.items


def test_hf_encoder_plumbing_with_a_stand_in_transformers(monkeypatch):
    """DINOv2 / CLIP go through transformers (optional); a stand-in module checks the plumbing without a download."""
    import sys
    import types

    class Batch(dict):  # like transformers' BatchFeature: a dict with .to(device)
        def to(self, device):
            return self

    class Processor:
        @classmethod
        def from_pretrained(cls, model_id):
            return cls()

        def __call__(self, images, return_tensors):
            assert all(img.shape[-1] == 3 for img in images)  # grey items are given 3 channels
            return Batch(pixel_values=torch.stack([torch.from_numpy(img).float() for img in images]))

    class Dino(torch.nn.Module):
        @classmethod
        def from_pretrained(cls, model_id, use_safetensors):
            assert use_safetensors
            return cls()

        def forward(self, pixel_values):
            flat = pixel_values.reshape(pixel_values.shape[0], 1, -1)
            return types.SimpleNamespace(last_hidden_state=torch.cat([flat[..., :5], flat[..., 5:10]], dim=1))

    fake = types.ModuleType("transformers")
    fake.AutoImageProcessor, fake.AutoModel = Processor, Dino
    monkeypatch.setitem(sys.modules, "transformers", fake)
    encoder = make_encoder("dinov2")
    assert encoder.name == "facebook/dinov2-small"
    features = encoder.encode(torch.randint(0, 255, (3, 1, 8, 8), dtype=torch.uint8))
    assert features.shape == (3, 5)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(IslesError, match="latents"):
        encoder.encode(torch.randn(2, 4, 8, 8))


def test_hf_encoder_without_transformers_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(IslesError, match="transformers") as info:
        make_encoder("clip")
    assert "isles[real]" in info.value.hint


def test_default_run_names_come_from_the_source():
    from isles.router.partition import default_name

    assert default_name("procedural:2000") == "procedural-2000"
    assert default_name("hf:user/cifar10:train") == "cifar10-train"
    assert default_name("/data/faces/") == "faces" and default_name("digits") == "digits"


def test_steps_split_in_proportion_to_shard_size_keeps_the_total():
    from isles.router.partition import split_steps

    assert split_steps(100, [50, 30, 20], "equal") == [100, 100, 100]
    assert split_steps(100, [50, 30, 20], "proportional") == [150, 90, 60]
    uneven = split_steps(285, [7000, 5000, 4000, 3000], "proportional")
    assert sum(uneven) == 4 * 285 and uneven == sorted(uneven, reverse=True)
    assert min(split_steps(3, [1000, 1, 1], "proportional")) >= 1  # every expert trains
    with pytest.raises(IslesError, match="unknown steps split"):
        split_steps(10, [1, 2], "by-vibes")


def test_partition_can_split_steps_by_cluster_size(tmp_path):
    config = PartitionConfig(source="digits", experts=3, out=tmp_path / "run", steps=100, steps_split="proportional")
    manifest = partition(config).manifest
    steps = [e.steps for e in manifest.experts]
    items = [s.items for s in manifest.shards]
    assert sum(steps) == 300 and steps == sorted(steps, reverse=True) and items == sorted(items, reverse=True)
    proc = subprocess.run(
        [*ISLES, "partition", "digits", "--experts", "2", "--out", str(tmp_path / "r2"), "--steps-split", "sizes"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.startswith("Error: unknown steps split 'sizes'"), proc.stderr
