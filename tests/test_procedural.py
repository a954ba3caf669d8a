"""The procedural benchmark data set: deterministic from its seed, prefix-stable, all classes, disjoint streams."""

from __future__ import annotations

import pytest
import torch

from isles.experts import procedural
from isles.protocol.errors import IslesError


def test_same_seed_same_items_and_prefix_stable_across_chunks():
    x1, y1 = procedural.generate(1100, seed=3)
    x2, y2 = procedural.generate(1500, seed=3)
    assert torch.equal(x1, x2[:1100]) and torch.equal(y1, y2[:1100])
    x3, _ = procedural.generate(1100, seed=3)
    assert torch.equal(x1, x3)


def test_seeds_and_streams_differ():
    a, _ = procedural.generate(64, seed=0)
    b, _ = procedural.generate(64, seed=1)
    c, _ = procedural.generate(64, seed=0, stream="reference")
    d, _ = procedural.generate(64, seed=0, stream="features")
    for other in (b, c, d):
        assert not torch.equal(a, other)


def test_items_are_rgb_uint8_every_class_present_and_no_duplicates():
    x, y = procedural.generate(2000)
    assert x.shape == (2000, 3, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.int64
    counts = torch.bincount(y, minlength=procedural.NUM_CLASSES)
    assert len(counts) == procedural.NUM_CLASSES == 18
    assert int(counts.min()) > 20
    # Families are a quarter each, whatever their number of classes.
    for family, classes in procedural.FAMILIES.items():
        share = float(counts[list(classes)].sum()) / len(y)
        assert 0.2 < share < 0.3, (family, share)
    assert len(torch.unique(x.flatten(1), dim=0)) == 2000
    # Items use the dynamic range: not blank, not saturated everywhere.
    assert 30 < float(x.float().std()) < 120


def test_families_look_different():
    """Textures have much more high-frequency energy than gradients: the families are far apart in pixel space."""
    x, y = procedural.generate(1000)
    x = x.float()
    energy = (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))
    textures = energy[(y == 14) | (y == 15)].mean()
    gradients = energy[(y == 16) | (y == 17)].mean()
    assert textures > 5 * gradients


def test_other_resolution():
    x, _ = procedural.generate(10, resolution=16)
    assert x.shape == (10, 3, 16, 16)


def test_spec_parsing_and_load():
    assert procedural.parse_spec("procedural") == (procedural.DEFAULT_ITEMS, 0)
    assert procedural.parse_spec("procedural:500") == (500, 0)
    assert procedural.parse_spec("procedural:500:7") == (500, 7)
    for bad in ("procedural:abc", "procedural:0", "procedural:1:2:3", "digits"):
        with pytest.raises(IslesError):
            procedural.parse_spec(bad)
    shard = procedural.load("procedural:300:2", resolution=16)
    assert len(shard) == 300 and shard.shape == (3, 16, 16)
    assert shard.num_classes == 18 and shard.meta["source"] == "procedural:300:2"
    assert torch.equal(shard.items, procedural.generate(300, seed=2, resolution=16)[0])
    assert procedural.is_procedural("procedural:10") and not procedural.is_procedural("digits")
