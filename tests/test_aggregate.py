"""The aggregator: poisoned releases (bad hashes, NaN weights, trained on noise) are rejected with the reason, an
honest release of the same unit is accepted, and a restarted aggregator (a new `isles aggregate` process) publishes
the same ensemble revision. Real DHT peers on 127.0.0.1, a local store, tiny models trained for a few steps.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import LOOPBACK, aggregate_once, wait_for

pytestmark = pytest.mark.timeout(300)

TRAIN = dict(steps=60, global_batch=32, lr=2e-3, warmup_steps=5, ema_decay=0.99)


@pytest.fixture(scope="module")
def swarm_run(tmp_path_factory):
    """A digits run with 2 experts, its manifest on an in-process bootstrap peer, and a volunteer peer."""
    from isles.protocol.dht import DHTConfig, open_dht
    from isles.protocol.swarm import Swarm
    from isles.router.partition import PartitionConfig, partition

    work = tmp_path_factory.mktemp("agg")
    result = partition(
        PartitionConfig(
            identity=work / "owner-id",  # the run owner, and its only aggregator
            source="digits",
            experts=2,
            out=work / "run",
            store=str(work / "store"),
            name="agg-test",
            steps=TRAIN["steps"],
            global_batch=32,
            router_preset="cnn-tiny",
            router_steps=60,
        )
    )
    boot = open_dht(DHTConfig(host_maddrs=(LOOPBACK,)))
    Swarm(boot).publish_manifest(result.manifest)
    peer = boot.visible_maddrs()[0]
    volunteer = open_dht(DHTConfig(initial_peers=(peer,), client_mode=True, host_maddrs=(LOOPBACK,)))
    yield {"work": work, "manifest": result.manifest, "peer": peer, "volunteer": Swarm(volunteer)}
    volunteer.shutdown()
    boot.shutdown()


def _train(task, folder, seed: int) -> dict:
    from isles.experts.trainer import TrainRecipe, train

    recipe = TrainRecipe(seed=seed, checkpoint_every_steps=None, checkpoint_every_seconds=None, **TRAIN)
    result = train(task, recipe, folder, device="cpu")
    assert result.completed
    return result.metrics


def _expert_task(manifest, store_root, noise: bool = False):
    from isles.experts.data import load_shard
    from isles.experts.expert import ExpertTask
    from isles.protocol.artifacts import open_store

    ref = manifest.shards[0]
    dest = store_root / "pulled" / ref.path
    open_store(manifest.store).pull_file(ref.repo, ref.revision, ref.path, dest, ref.sha256, kind="dataset")
    shard = load_shard(dest)
    if noise:  # a volunteer that trained on noise instead of its shard
        shard.items = torch.randint(
            0, 256, shard.items.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
        )
    return ExpertTask(shard, preset=manifest.experts[0].preset, objective="fm")


def _release(swarm, manifest, unit, folder, *, attempt: int, val_loss=None, files=None, tag: str = "", ckpts=None):
    """Publish `folder` with its training's last checkpoint (in `ckpts`, default beside it) and checkpoint chain, and
    write a release record for it, as a volunteer would."""
    from isles.client.unit_checkpoints import stage_release
    from isles.experts.checkpoints import latest_checkpoint
    from isles.protocol.artifacts import folder_files, open_store
    from isles.protocol.chain import Chain
    from isles.protocol.records import FencingToken, Release
    from isles.protocol.swarm import dht_time

    chain = Chain(manifest.run_id, unit)
    folder = stage_release(folder, latest_checkpoint(ckpts or folder.parent / "checkpoints"), TRAIN["steps"], chain)
    repo = f"{manifest.run_id}-{unit}{tag}"
    revision = open_store(manifest.store).publish(repo, folder)
    token = FencingToken(unit=unit, attempt=attempt, owner=swarm.peer_id, claimed_time=dht_time())
    release = Release(
        run_id=manifest.run_id,
        unit=unit,
        token=token,
        repo=repo,
        revision=revision,
        files=files or folder_files(folder),
        steps=TRAIN["steps"],
        val_loss=val_loss,
        released_time=dht_time(),
        volunteer=f"tester{tag}",
        chain_head=chain.head,
    )
    assert swarm.put_release(release)
    return release


def _aggregator(run, work_dir):
    from isles.client.aggregate import AggregateConfig, Aggregator
    from isles.client.run_access import open_swarm
    from isles.protocol.artifacts import open_store
    from isles.protocol.dht import DHTConfig

    m = run["manifest"]
    config = AggregateConfig(
        swarm=DHTConfig(
            initial_peers=(run["peer"],),
            host_maddrs=(LOOPBACK,),
            client_mode=True,
            identity_dir=run["work"] / "owner-id",
        ),
        run_id=m.run_id,
        work_dir=work_dir,
        sample_steps=5,
    )
    node, swarm = open_swarm(config.swarm)
    store = open_store(m.store)
    return node, Aggregator(config, swarm, m, store, store, node.peer_id)


def test_poisoned_releases_rejected_honest_accepted_and_restart_gives_same_ensemble(swarm_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from isles.client.run_access import make_router_task

    run, m = swarm_run, swarm_run["manifest"]
    vol = run["volunteer"]
    honest = _train(_expert_task(m, tmp_path), tmp_path / "honest", seed=m.experts[0].seed)
    honest_dir = tmp_path / "honest" / "model"

    # 1. Files that do not match their hashes: the record names other bytes than the store holds.
    tampered = {path: ("0" * 64 if path.endswith(".safetensors") else h) for path, h in _files(honest_dir).items()}
    bad_hash = _release(vol, m, "expert-0", honest_dir, attempt=1, files=tampered, tag="-tampered")
    # 2. NaN weights, correctly hashed.
    nan_dir = tmp_path / "nan"
    shutil.copytree(honest_dir, nan_dir)
    weights = load_file(str(nan_dir / "diffusion_pytorch_model.safetensors"))
    first = sorted(weights)[0]
    weights[first] = torch.full_like(weights[first], float("nan"))
    save_file(weights, str(nan_dir / "diffusion_pytorch_model.safetensors"))
    ckpts = tmp_path / "honest" / "checkpoints"
    nan = _release(vol, m, "expert-0", nan_dir, attempt=2, tag="-nan", ckpts=ckpts)
    # ... and the only release of expert-1 is poisoned too: once rejected, volunteers see that unit as open again.
    _release(vol, m, "expert-1", nan_dir, attempt=1, tag="-nan", ckpts=ckpts)
    # 3. Trained on noise: a well-formed model that did not learn its shard.
    _train(_expert_task(m, tmp_path, noise=True), tmp_path / "noise", seed=0)
    on_noise = _release(vol, m, "expert-0", tmp_path / "noise" / "model", attempt=3, tag="-noise")
    # 4. The honest release, last; and an honest router so an ensemble can be assembled.
    good = _release(vol, m, "expert-0", honest_dir, attempt=4, val_loss=honest["val_loss"])
    shard_tasks = {}
    from isles.experts.data import load_shard
    from isles.protocol.artifacts import open_store

    for i, ref in enumerate(m.shards):
        dest = tmp_path / "shards" / ref.path
        open_store(m.store).pull_file(ref.repo, ref.revision, ref.path, dest, ref.sha256, kind="dataset")
        shard_tasks[i] = load_shard(dest)
    router = _train(make_router_task(m, shard_tasks), tmp_path / "router", seed=m.router.seed)
    _release(vol, m, "router", tmp_path / "router" / "model", attempt=1, val_loss=router["val_loss"])

    node, agg = _aggregator(run, tmp_path / "agg1")
    try:
        # The DHT is eventually consistent: poll until all 5 releases of the experts were seen and judged.
        def judged_every_release():
            agg.poll()
            return agg.published is not None and len([k for k in agg.judged if k[0] != "router"]) == 5

        wait_for(judged_every_release, 120, interval=1.0, message=f"every release judged: {agg.judged}")
        reasons = {key[1]: reason for key, reason in agg.judged.items() if key[0] == "expert-0"}  # by attempt
        assert "do not match their hashes" in reasons[bad_hash.token.attempt]
        assert "non-finite weights" in reasons[nan.token.attempt]
        assert "validation loss" in reasons[on_noise.token.attempt] and "not below" in reasons[on_noise.token.attempt]
        assert agg.accepted["expert-0"].release.revision == good.revision
        assert agg.accepted["router"].release.unit == "router"

        # The rejections are in the DHT with their reasons, for `isles status` and the volunteers.
        def stored_reasons():
            return {(r.unit, r.token.attempt): r.reason for r in agg.swarm.get_rejections(m.run_id)}

        stored = wait_for(lambda: len(stored_reasons()) == 4 and stored_reasons(), 60, message="rejection records")
        assert "non-finite weights" in stored[("expert-0", nan.token.attempt)]
        from isles.client.run_access import released_units

        wait_for(lambda: sorted(released_units(agg.swarm, m)) == ["expert-0", "router"], 60, message="open units")
        first = agg.published
        assert first is not None and sorted(first.units) == ["expert-0", "router"]
        assert (first.folder / "samples.png").is_file() and (first.folder / "README.md").is_file()
        ensemble = wait_for(lambda: agg.swarm.latest_ensemble(m.run_id), 60, message="the ensemble record")
        assert ensemble.revision == first.revision and not ensemble.complete
    finally:
        node.shutdown()

    # A restarted aggregator (a new process, empty work folder) rebuilds the same state and the same revision.
    expected_units = {"expert-0": "accepted", "expert-1": "missing", "router": "accepted"}
    for _attempt in range(3):  # a DHT read can miss a record under load: the next pass sees it
        owner = str(run["work"] / "owner-id")
        summary = aggregate_once(run["peer"], m.run_id, tmp_path / "agg2", "--sample-steps", "5", "--identity", owner)
        if {u["unit"]: u["state"] for u in summary["units"]} == expected_units and len(summary["rejections"]) == 4:
            break
    assert summary["revision"] == first.revision
    assert len(summary["rejections"]) == 4
    assert {u["unit"]: u["state"] for u in summary["units"]} == {
        "expert-0": "accepted",
        "expert-1": "missing",
        "router": "accepted",
    }

    # The published partial ensemble loads and samples (expert-1 missing, router renormalised).
    from isles.router.ensemble import EnsemblePipeline

    pipe = EnsemblePipeline.from_pretrained(summary["ensemble"], device="cpu")
    images = pipe(n=4, class_labels=3, steps=4, seed=0).images
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    # Each accepted expert carries its held-out velocity error per noise level, measured by the aggregator (the same
    # after the restart: the revision did not change), which calibrated routing weighs it by.
    from isles.router.calibration import PROFILE_KEY

    profile = pipe.experts[0].meta[PROFILE_KEY]
    assert len(profile) == 10 and all(v > 0 for v in profile)
    calibrated = pipe(n=4, class_labels=3, steps=4, seed=0, routing="calibrated:top1", solver="dpm++2m").images
    assert torch.isfinite(calibrated).all()


def _files(folder):
    from isles.protocol.artifacts import folder_files

    return folder_files(folder)


def test_a_release_the_store_cannot_serve_right_now_is_judged_again_later(tmp_path):
    """An unreachable store is not the release's fault: it is neither rejected nor remembered, so the next poll
    judges it (a restarted aggregator would accept it, and both must build the same ensemble)."""
    from types import SimpleNamespace

    from isles.client.aggregate import AggregateConfig, Aggregator
    from isles.protocol.artifacts import StoreUnavailable, open_store
    from isles.protocol.dht import DHTConfig

    releases = [
        SimpleNamespace(
            run_id="r",
            unit="expert-0",
            token=SimpleNamespace(unit="expert-0", attempt=attempt, owner="peer"),
            repo="x",
            revision=str(attempt) * 40,
            files=_REQUIRED_FILES,
        )
        for attempt in (1, 2)
    ]
    rejections = []
    swarm = SimpleNamespace(
        get_releases=lambda run_id, unit: releases if unit == "expert-0" else [], put_rejection=rejections.append
    )
    store = open_store(tmp_path / "store")
    pulls = []

    def unreachable(*args, **kwargs):
        pulls.append(args)
        raise StoreUnavailable("the Hub is unreachable")

    store.pull = unreachable
    recipe = SimpleNamespace(
        preset="unet-tiny", channels=1, resolution=8, num_classes=10, objective="fm", text_width=None, frames=None
    )
    manifest = SimpleNamespace(run_id="r", units=["expert-0", "router"], store=store.uri, experts=[recipe])
    config = AggregateConfig(swarm=DHTConfig(), work_dir=tmp_path / "agg")
    agg = Aggregator(config, swarm, manifest, store, store, "me")
    assert agg.poll() is False and agg.poll() is False
    # The later release is not judged before the first: "the first valid one" must not depend on the store's mood.
    assert [args[1] for args in pulls] == ["1" * 40] * 2 and agg.judged == {} and rejections == []


_REQUIRED_FILES = {"config.json": "0" * 64, "diffusion_pytorch_model.safetensors": "0" * 64}


def test_an_expert_config_must_name_every_recipe_field_and_the_class(tmp_path):
    """A key left out of config.json loads as the library's default, and another class loads the same keys: both
    would let a release of another architecture than the recipe's through."""
    from types import SimpleNamespace

    from isles.client.aggregate import AggregateConfig, Aggregator
    from isles.experts.presets import build_model
    from isles.protocol.artifacts import open_store
    from isles.protocol.dht import DHTConfig

    recipe = SimpleNamespace(
        preset="unet-tiny", channels=1, resolution=8, num_classes=10, objective="fm", text_width=None, frames=None
    )
    store = open_store(tmp_path / "store")
    manifest = SimpleNamespace(run_id="r", units=["expert-0", "router"], store=store.uri, experts=[recipe])
    config = AggregateConfig(swarm=DHTConfig(), work_dir=tmp_path / "agg")
    agg = Aggregator(config, SimpleNamespace(), manifest, store, store, "me")
    folder = tmp_path / "release"
    build_model("unet-tiny", 1, 8, 10).save_pretrained(folder)
    assert agg._check_config("expert-0", folder) is None
    honest = json.loads((folder / "config.json").read_text())

    (folder / "config.json").write_text(json.dumps({k: v for k, v in honest.items() if k != "num_class_embeds"}))
    assert "num_class_embeds is missing" in agg._check_config("expert-0", folder)
    (folder / "config.json").write_text(json.dumps({**honest, "_class_name": "DiTTransformer2DModel"}))
    assert "_class_name" in agg._check_config("expert-0", folder)
    # Every key is compared, not only the recipe's: an extra constructor argument could allocate huge layers.
    (folder / "config.json").write_text(json.dumps({**honest, "time_embedding_dim": 1 << 20}))
    assert "time_embedding_dim is 1048576, expected None" in agg._check_config("expert-0", folder)
    (folder / "config.json").write_text(json.dumps({**honest, "extra_layers": 64}))
    assert "extra_layers is not part of the recipe" in agg._check_config("expert-0", folder)
    (folder / "config.json").write_text(json.dumps({**honest, "mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}))
    assert "mid_block_type" in agg._check_config("expert-0", folder)


def test_oversized_releases_are_refused_unread_and_judgments_survive_a_restart(tmp_path):
    """A release larger than the recipe's model is refused before download, the refusal is kept in the work folder
    (a restarted aggregator does not pull it again), and nothing of a rejected release stays on disk."""
    from types import SimpleNamespace

    from isles.client.aggregate import AggregateConfig, Aggregator
    from isles.experts.presets import build_model
    from isles.protocol.artifacts import folder_files, open_store
    from isles.protocol.dht import DHTConfig
    from isles.protocol.records import FencingToken

    store = open_store(tmp_path / "store")
    folder = tmp_path / "huge"
    build_model("unet-tiny", 1, 8, 10).save_pretrained(folder)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * (64 << 20))  # 64 MiB for a ~1 MiB model
    revision = store.publish("huge", folder)
    token = FencingToken(unit="expert-0", attempt=1, owner="peer", claimed_time=0.0)
    release = SimpleNamespace(
        run_id="r", unit="expert-0", token=token, repo="huge", revision=revision, files=folder_files(folder)
    )
    rejections = []
    swarm = SimpleNamespace(
        get_releases=lambda run_id, unit: [release] if unit == "expert-0" else [], put_rejection=rejections.append
    )
    recipe = SimpleNamespace(
        preset="unet-tiny", channels=1, resolution=8, num_classes=10, objective="fm", text_width=None, frames=None
    )
    manifest = SimpleNamespace(run_id="r", units=["expert-0", "router"], store=store.uri, experts=[recipe])
    config = AggregateConfig(swarm=DHTConfig(), work_dir=tmp_path / "agg")
    pulls = []
    pull = store.pull
    store.pull = lambda *args, **kwargs: (pulls.append(args), pull(*args, **kwargs))[1]

    agg = Aggregator(config, swarm, manifest, store, store, "me")
    assert agg.poll() is False
    assert len(rejections) == 1 and "too large" in rejections[0].reason and len(pulls) == 1
    assert not (tmp_path / "agg" / "r" / "releases" / "expert-0" / revision).exists()
    assert (tmp_path / "agg" / "r" / "judgments.json").is_file()

    again = Aggregator(config, swarm, manifest, store, store, "me")  # a restart: same work folder
    assert again.poll() is False
    assert len(pulls) == 1 and len(rejections) == 1  # judged from the file, not downloaded again
    assert "too large" in again.summary()["rejections"][0]["reason"]
