"""The router: save/load round trip, class-aware routing, training as a trainer task (accuracy per noise level,
exact resume) on the digits partition."""

from __future__ import annotations

import json

import pytest
import torch

from isles.experts.data import load_shard
from isles.experts.trainer import TrainRecipe, train
from isles.protocol.errors import IslesError
from isles.router.model import RouterConfig, RouterModel, router_config
from isles.router.partition import PartitionConfig, partition
from isles.router.router_task import RouterTask


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = partition(PartitionConfig(source="digits", experts=4, out=out))
    return [load_shard(p) for p in result.shard_paths]


def test_router_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = RouterModel(RouterConfig(num_experts=3, in_channels=3, resolution=16, num_classes=5, width=8))
    model.save_pretrained(tmp_path / "router")
    assert sorted(p.name for p in (tmp_path / "router").iterdir()) == ["config.json", "model.safetensors"]
    loaded = RouterModel.from_pretrained(tmp_path / "router")
    x, t = torch.randn(4, 3, 16, 16), torch.rand(4)
    labels = torch.tensor([0, 1, 4, 2])
    model.eval()
    torch.testing.assert_close(model(x, t, labels), loaded(x, t, labels))
    # Class-aware: the class changes the routing; None means the null class (unconditional routing).
    assert not torch.allclose(loaded(x, t, labels), loaded(x, t, torch.zeros(4, dtype=torch.long)))
    torch.testing.assert_close(loaded(x, t, None), loaded(x, t, torch.full((4,), 5)))
    (tmp_path / "router" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(IslesError, match="unreadable"):
        RouterModel.from_pretrained(tmp_path / "router")
    with pytest.raises(IslesError, match="unknown router preset"):
        router_config("huge", 4, 1, 8, None)


def test_router_trains_well_above_chance_and_reports_accuracy_per_noise_level(digit_shards, tmp_path):
    task = RouterTask(digit_shards, preset="cnn-tiny")
    assert task.num_classes == 10 and task.describe()["num_experts"] == 4
    recipe = TrainRecipe(steps=250, global_batch=64, lr=2e-3, warmup_steps=20, checkpoint_every_steps=None)
    result = train(task, recipe, tmp_path / "router", device="cpu")
    metrics = result.metrics
    by_t = metrics["accuracy_by_t"]
    assert set(by_t) == {"0.05", "0.25", "0.5", "0.75", "0.95"}
    print("router accuracy by t:", by_t, "chance:", metrics["chance_accuracy"])
    assert metrics["chance_accuracy"] < 0.35
    assert by_t["0.05"] > 0.7  # well above chance (~0.27) on nearly clean inputs
    assert by_t["0.05"] >= by_t["0.95"] - 0.05  # no better on noise than on clean inputs
    # The router's cost is counted like an expert's (it is on the ensemble's side of an iso-FLOP comparison).
    assert metrics["train_flops"] == metrics["train_flops_per_sample"] * 250 * 64 > 0
    exported = tmp_path / "router" / "model"
    info = json.loads((exported / "router.json").read_text())
    assert info["num_experts"] == 4 and info["metrics"]["accuracy_by_t"] == by_t
    loaded = RouterModel.from_pretrained(exported)
    assert loaded.config.num_classes == 10 and loaded.config.num_experts == 4


def test_router_training_resumes_exactly(digit_shards, tmp_path):
    task = RouterTask(digit_shards, preset="cnn-tiny", max_items_per_shard=64)
    recipe = TrainRecipe(steps=12, global_batch=16, lr=1e-3, warmup_steps=2, checkpoint_every_steps=4)
    whole = train(task, recipe, tmp_path / "a", device="cpu")
    first = train(task, recipe, tmp_path / "b", device="cpu", stop_at_step=6)
    assert not first.completed
    second = train(task, recipe, tmp_path / "b", device="cpu")
    assert second.completed
    a = RouterModel.from_pretrained(whole.export_dir).state_dict()
    b = RouterModel.from_pretrained(second.export_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unconditional_router_ignores_labels(digit_shards):
    task = RouterTask(digit_shards, preset="cnn-tiny", conditional=False)
    assert task.num_classes is None and task.build_model().class_embed is None
    batch = task.make_batch(torch.arange(8), torch.Generator().manual_seed(0))
    assert "labels" not in batch and batch["x_t"].shape == (8, 1, 8, 8)


def _captioned_shards(k: int = 2, n: int = 192, width: int = 24, length: int = 6) -> list:
    """k shards of identically distributed noise images whose captions alone tell the clusters apart: a caption is
    its cluster's direction plus noise, padded to `length` tokens."""
    from isles.experts.data import ShardData

    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(k, width, generator=gen)
    shards = []
    for c in range(k):
        real = torch.randint(2, length + 1, (n,), generator=gen)
        mask = (torch.arange(length)[None] < real[:, None]).to(torch.uint8)
        text = directions[c][None, None] + 0.3 * torch.randn(n, length, width, generator=gen)
        shards.append(
            ShardData(
                items=torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=gen),
                labels=None,
                clusters=torch.full((n,), c),
                val_mask=torch.arange(n) % 4 == 0,
                meta={"num_classes": None, "source": "test"},
                text=(text * mask[..., None]).to(torch.float16),
                text_mask=mask,
                null_text=(torch.full((length, width), 0.5, dtype=torch.float16), (torch.arange(length) < 1).byte()),
            )
        )
    return shards


def test_text_aware_router_routes_by_the_prompt_where_the_noisy_item_cannot_tell(tmp_path):
    """Clusters that differ only in their captions: the papers' text-blind router stays at chance at every noise
    level, a text-aware one (it reads the pooled prompt) routes almost every item right, even from pure noise."""
    shards = _captioned_shards()
    recipe = TrainRecipe(steps=120, global_batch=32, lr=3e-3, warmup_steps=10, checkpoint_every_steps=None)
    aware = train(RouterTask(shards, preset="cnn-tiny", text_aware=True), recipe, tmp_path / "aware", device="cpu")
    blind = train(RouterTask(shards, preset="cnn-tiny"), recipe, tmp_path / "blind", device="cpu")
    assert aware.metrics["accuracy_by_t"]["0.95"] > 0.9 and aware.metrics["val_accuracy"] > 0.9
    assert blind.metrics["val_accuracy"] < 0.7
    info = json.loads((aware.export_dir / "router.json").read_text())
    assert info["text_aware"] is True
    # The export loads back text-aware; the caption moves the routing, and no caption is the dropout's zero prompt.
    from isles.experts.conditioning import TextCondition

    router = RouterModel.from_pretrained(aware.export_dir)
    assert router.config.text_dim == 24
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 0.9)
    first = TextCondition.from_rows(shards[0].text[:4], shards[0].text_mask[:4])
    second = TextCondition.from_rows(shards[1].text[:4], shards[1].text_mask[:4])
    assert (router(x, t, first).argmax(-1) == 0).all() and (router(x, t, second).argmax(-1) == 1).all()
    # A dropped caption is the empty caption (what a prompt of "" embeds to), as for the experts.
    dropped = RouterTask(shards, preset="cnn-tiny", text_aware=True, label_dropout=1.0)
    batch = dropped.make_batch(torch.arange(4), torch.Generator().manual_seed(0))
    assert (batch["text"] == 0.5).all() and batch["text_mask"].tolist() == [[1, 0, 0, 0, 0, 0]] * 4
    # A text-blind router's config.json is what it was before text-aware routers (no text_dim key).
    assert "text_dim" not in json.loads((blind.export_dir / "config.json").read_text())


def test_text_aware_router_needs_captions(digit_shards):
    with pytest.raises(IslesError, match="needs captioned shards"):
        RouterTask(digit_shards, preset="cnn-tiny", text_aware=True)
