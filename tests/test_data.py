"""Shard data: the digits source, the shard file format (sha256, atomic, corrupt files refused), image folders and
VAE latents with a randomly initialised tiny AutoencoderKL."""

from __future__ import annotations

import json

import pytest
import torch

from isles.experts.data import ShardData, load_data, load_shard, load_source, save_shard, to_model_space
from isles.protocol.errors import IslesError
from isles.protocol.files import sha256_file


def test_digits_ship_with_scikit_learn_and_have_a_held_out_split():
    shard = load_source("digits")
    assert len(shard) == 1797 and shard.shape == (1, 8, 8) and shard.items.dtype == torch.uint8
    assert shard.num_classes == 10 and set(shard.labels.tolist()) == set(range(10))
    assert int(shard.val_mask.sum()) == 180 and torch.equal(shard.clusters, torch.zeros(1797, dtype=torch.long))
    assert torch.equal(load_source("digits").val_mask, shard.val_mask)  # the split is fixed
    x = to_model_space(shard.items)
    assert x.min() == -1 and x.max() == 1
    assert len(shard.train_split()) + len(shard.val_split()) == 1797


def test_procedural_benchmark_set_is_a_built_in_source():
    shard = load_source("procedural:300:7", resolution=16)
    assert len(shard) == 300 and shard.shape == (3, 16, 16) and shard.num_classes == 18
    assert int(shard.val_mask.sum()) == 30
    assert torch.equal(load_source("procedural:300:7", resolution=16).items, shard.items)  # fixed by its seed


def test_shard_round_trip_with_sha256(tmp_path):
    shard = load_source("digits").subset(torch.arange(50))
    shard.clusters[:] = 3
    path = tmp_path / "shard.safetensors"
    digest = save_shard(shard, path)
    assert digest == sha256_file(path)
    assert [p.name for p in tmp_path.iterdir()] == ["shard.safetensors"]  # no temporary file left behind
    back = load_shard(path, sha256=digest)
    assert torch.equal(back.items[:], shard.items) and torch.equal(back.labels, shard.labels)
    assert torch.equal(back.clusters, shard.clusters) and torch.equal(back.val_mask, shard.val_mask)
    assert back.meta == shard.meta
    assert save_shard(shard, tmp_path / "again.safetensors") == digest  # same data, same bytes


def test_unlabelled_latent_shard_round_trip(tmp_path):
    shard = ShardData(
        items=torch.randn(6, 4, 4, 4),
        labels=None,
        clusters=torch.zeros(6, dtype=torch.long),
        val_mask=torch.tensor([1, 0, 0, 0, 0, 0], dtype=torch.bool),
        meta={"source": "test"},
    )
    save_shard(shard, tmp_path / "z.safetensors")
    back = load_shard(tmp_path / "z.safetensors")
    assert back.labels is None and back.is_latent and back.num_classes is None
    assert torch.equal(back.items[:], shard.items)


def test_missing_corrupt_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(IslesError, match="not found"):
        load_shard(tmp_path / "nope.safetensors")
    with pytest.raises(IslesError, match="not found"):
        load_data(str(tmp_path / "nope.safetensors"))
    path = tmp_path / "s.safetensors"
    digest = save_shard(load_source("digits").subset(torch.arange(10)), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IslesError, match="sha256 does not match"):
        load_shard(path, sha256=digest)
    with pytest.raises(IslesError, match="not a readable shard"):
        load_shard(path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(IslesError, match="not an isles shard"):
        load_shard(tmp_path / "other.safetensors")
    header = json.dumps({"format": "isles-shard-1", "meta": {}})  # the right header, a tensor missing
    items = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    save_file({"items": items}, tmp_path / "partial.safetensors", {"isles": header})
    with pytest.raises(IslesError, match="not an isles shard"):
        load_shard(tmp_path / "partial.safetensors")
    with pytest.raises(IslesError, match="unknown data source"):
        load_source("imagenet-please")


def test_inconsistent_shapes_are_refused():
    with pytest.raises(IslesError, match="labels"):
        ShardData(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.long), torch.zeros(3), torch.zeros(3).bool())
    with pytest.raises(IslesError, match=r"\[N, C, H, W\]"):
        ShardData(torch.zeros(3, 2, 2), None, torch.zeros(3), torch.zeros(3).bool())


def _write_images(folder, count, size, color, mode="RGB"):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new(mode, size, color).save(folder / f"{i}.png")


def test_image_folder_with_class_subfolders(tmp_path):
    _write_images(tmp_path / "cats", 3, (40, 30), (255, 0, 0))
    _write_images(tmp_path / "dogs", 2, (20, 20), (0, 0, 255))
    shard = load_source(str(tmp_path), resolution=16)
    assert shard.shape == (3, 16, 16) and len(shard) == 5
    assert shard.labels.tolist() == [0, 0, 0, 1, 1] and shard.meta["class_names"] == ["cats", "dogs"]
    assert shard.items[0, 0].float().mean() > 250 and shard.items[4, 2].float().mean() > 250


def test_flat_grayscale_image_folder_has_no_labels(tmp_path):
    _write_images(tmp_path, 4, (8, 8), 128, mode="L")
    shard = load_source(str(tmp_path), resolution=8)
    assert shard.labels is None and shard.num_classes is None and shard.shape == (1, 8, 8)


def test_empty_folder_and_hf_without_datasets(tmp_path):
    with pytest.raises(IslesError, match="no images"):
        load_source(str(tmp_path))
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(IslesError, match="datasets"):
            load_source("hf:cifar10")
