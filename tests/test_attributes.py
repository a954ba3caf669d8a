"""Captions of the procedural set and text-image agreement: captions follow the drawn parameters, the pixels are
those of `generate`, and the attribute reader agrees with real items but not with shuffled prompts."""

from __future__ import annotations

import math

import pytest
import torch

from isles.experts import procedural
from isles.router import attributes as attr


def test_caption_examples():
    assert procedural.caption([7, 0, 0, 0]) == "a small red 7 at the top left"
    assert procedural.caption([13, 5, 4, 1]) == "a large blue ring in the center"
    assert procedural.caption([14, 3, -1, -1]) == "green stripes"
    assert procedural.caption([15, 1, -1, -1]) == "an orange checkerboard"
    assert procedural.caption([16, 6, -1, -1]) == "a purple linear gradient"
    assert procedural.caption([17, 4, 7, -1]) == "a cyan radial gradient at the bottom"
    names = procedural.attribute_names()
    assert list(names) == list(procedural.ATTRIBUTES) == ["class", "colour", "position", "size"]
    assert [len(v) for v in names.values()] == [18, 8, 9, 2]


def test_captions_deterministic_and_match_attributes():
    x, y, a, captions = procedural.generate_captioned(600, seed=1)
    x2, y2, a2, captions2 = procedural.generate_captioned(600, seed=1)
    assert torch.equal(x, x2) and torch.equal(a, a2) and captions == captions2
    assert a.shape == (600, 4) and a.dtype == torch.int64 and torch.equal(a[:, 0], y)
    names = procedural.attribute_names()
    for row, text in zip(a.tolist(), captions, strict=True):
        label, colour, position, size = row
        assert text == procedural.caption(row)
        assert names["colour"][colour] in text.split(" ")
        assert (size >= 0) == (label < 14) and (position >= 0) == (label < 14 or label == 17)
        if label < 10:
            assert text.split(" ")[3] == str(label) and text.split(" ")[1] == names["size"][size]
    # Every value of every attribute occurs, objects sit in every cell of the grid, and the two sizes are even.
    for k, values in enumerate(names.values()):
        assert set(a[:, k][a[:, k] >= 0].tolist()) == set(range(len(values)))
    assert 0.35 < float(a[a[:, 3] >= 0, 3].float().mean()) < 0.65


def test_generate_captioned_pixels_equal_generate():
    for resolution in (32, 16):
        x, y = procedural.generate(1100, seed=3, stream="reference", resolution=resolution)
        xc, yc, a, captions = procedural.generate_captioned(1100, seed=3, stream="reference", resolution=resolution)
        assert torch.equal(x, xc) and torch.equal(y, yc) and len(a) == len(captions) == 1100
    empty = procedural.generate_captioned(0)
    assert empty[0].shape == (0, 3, 32, 32) and empty[2].shape == (0, 4) and empty[3] == []
    shard, a, captions = procedural.load_captioned("procedural:300:2", resolution=16)
    plain = procedural.load("procedural:300:2", resolution=16)
    assert torch.equal(shard.items, plain.items) and torch.equal(shard.labels, plain.labels)
    assert shard.meta == plain.meta and len(a) == len(captions) == 300


def test_position_and_colour_are_visible_in_the_pixels():
    """Shapes: the centroid of the bright (foreground) pixels lies in the captioned third, and the brightest pixels'
    dominant channel agrees with the colour name (a human would read the same)."""
    x, y, a, _ = procedural.generate_captioned(2000, seed=0)
    shapes = (y >= 10) & (y < 14)
    img = x[shapes].float() / 255
    value = img.amax(dim=1)  # the foreground is drawn at value >= 0.7, the background at <= 0.35
    fg = (value > 0.55).float()
    grid = (torch.arange(32) + 0.5) / 32
    cx = (fg.sum(1) * grid).sum(1) / fg.sum((1, 2))
    cy = (fg.sum(2) * grid).sum(1) / fg.sum((1, 2))
    cell = ((torch.stack([cx, cy], 1) - 0.3) / 0.4 * 3).floor().clamp(0, 2).long()
    position = cell[:, 1] * 3 + cell[:, 0]
    assert float((position == a[shapes, 2]).float().mean()) > 0.9
    red, blue = a[shapes, 1] == 0, a[shapes, 1] == 5
    mean_rgb = (img * fg[:, None]).sum((2, 3)) / fg.sum((1, 2))[:, None]
    assert bool((mean_rgb[red].argmax(1) == 0).all()) and bool((mean_rgb[blue].argmax(1) == 2).all())


@pytest.fixture(scope="module")
def small_reader(tmp_path_factory):
    """A reader trained on few items (~10 s); the default one trains on 8x more and reads better."""
    spec = attr.ReaderSpec(train_items=6000, epochs=2)
    cache_dir = tmp_path_factory.mktemp("readers")
    return attr.load_or_train(spec, cache_dir=cache_dir), spec, cache_dir


def test_agreement_high_on_real_items_and_near_chance_on_shuffled_prompts(small_reader):
    reader, *_ = small_reader
    x, _, a, _ = procedural.generate_captioned(1500, stream="reference")
    images = x.float() / 127.5 - 1
    real = attr.attribute_agreement(images, a, reader=reader)
    shuffled = attr.attribute_agreement(
        images, a[torch.randperm(len(a), generator=torch.Generator().manual_seed(0))], reader=reader
    )
    for name in ("class", "colour", "position", "size"):
        assert 0 < real["chance"][name] < 0.6 and real["n"][name] > 0
        assert real[name] > max(0.8, real["chance"][name] + 0.3) or name == "class", (name, real)
        assert shuffled[name] < shuffled["chance"][name] + 0.05, (name, shuffled)
    assert real["class"] > 0.4 and real["all"] > 0.3 and shuffled["all"] < 0.05
    assert real["n"]["all"] == 1500


def test_agreement_counts_only_asked_attributes(small_reader):
    reader, *_ = small_reader
    x, _, a, _ = procedural.generate_captioned(64, stream="reference")
    textures = a[:, 0] == 14
    result = attr.attribute_agreement(x[textures], a[textures], reader=reader)  # uint8 accepted
    assert result["n"]["position"] == result["n"]["size"] == 0
    assert math.isnan(result["position"]) and math.isnan(result["chance"]["size"])
    assert result["n"]["class"] == int(textures.sum())


def test_reader_is_cached_and_training_is_deterministic(small_reader, tmp_path):
    reader, spec, cache_dir = small_reader
    (entry,) = cache_dir.glob("attributes-*.safetensors")
    assert entry.name == f"{spec.key()}.safetensors"
    cached = attr.load_or_train(spec, cache_dir=cache_dir)
    assert all(torch.equal(v, cached.state_dict()[k]) for k, v in reader.state_dict().items())
    tiny = attr.ReaderSpec(train_items=256, epochs=1, width=8)
    a, b = (attr.load_or_train(tiny, cache_dir=tmp_path / name).state_dict() for name in ("a", "b"))
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    # A stale entry (wrong shapes) is retrained from the seeded initialisation, not from what it half-loaded.
    from safetensors.torch import save_file

    stale = {k: v.float() + 1 for k, v in a.items()}
    stale["hidden.0.weight"] = torch.zeros(3, 3)
    save_file(stale, tmp_path / "a" / f"{tiny.key()}.safetensors")
    c = attr.load_or_train(tiny, cache_dir=tmp_path / "a").state_dict()
    assert all(torch.equal(v, c[k]) for k, v in a.items())


def test_reader_at_resolution_16(tmp_path):
    spec = attr.ReaderSpec(resolution=16, train_items=1500, epochs=1)
    reader = attr.load_or_train(spec, cache_dir=tmp_path)
    x, _, a, _ = procedural.generate_captioned(500, stream="reference", resolution=16)
    result = attr.attribute_agreement(x, a, reader=reader)
    assert result["colour"] > result["chance"]["colour"] + 0.2
