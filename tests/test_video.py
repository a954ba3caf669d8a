"""Text-to-video (Paris 2.0) without a network: the procedural video set moves as its captions say; it is partitioned
into clip shards with MiniLM caption embeddings; Wan experts and the router train on them; the ensemble samples clips
with every routing mode, partially too; `isles sample` writes a GIF, an MP4 and a frame sheet; `isles eval` measures
an FVD-style distance and reads content and motion back. Images and clips are never mixed up silently.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import ISLES

pytestmark = pytest.mark.timeout(600)

QUICK_FEATURES = {"train_items": 1024, "epochs": 3}  # reads motion back ~0.97 of the time (class ~0.15) at 8x16x16


def _centroid(clip: torch.Tensor) -> torch.Tensor:
    """[F, 2] (x, y) of the brightest pixels of each frame (the foreground is drawn bright on a dark background)."""
    value = clip.float().amax(dim=0)  # [F, H, W]
    low, high = value.flatten(1).amin(1), value.flatten(1).amax(1)
    weight = (value > ((low + high) / 2)[:, None, None]).float()
    ys, xs = torch.meshgrid(torch.arange(clip.shape[-2]), torch.arange(clip.shape[-1]), indexing="ij")
    total = weight.sum(dim=(1, 2))
    return torch.stack([(weight * xs).sum((1, 2)) / total, (weight * ys).sum((1, 2)) / total], dim=1)


def test_procedural_clips_are_deterministic_and_move_as_their_captions_say():
    from isles.experts import procedural_video as pv

    clips, attributes, captions = pv.generate_clips(300, resolution=32, frames=16)
    assert clips.shape == (300, 3, 16, 32, 32) and clips.dtype == torch.uint8
    again, _, _ = pv.generate_clips(40, resolution=32, frames=16)
    assert torch.equal(again, clips[:40])  # clip i depends on (seed, stream, i) only
    other, _, _ = pv.generate_clips(40, resolution=32, frames=16, stream="reference")
    assert not torch.equal(other, clips[:40])
    assert captions[0] == pv.caption(attributes[0].tolist()) and " moving " in "a red 3 moving right"
    motion = attributes[:, 2]
    assert set(motion.tolist()) == set(range(len(pv.MOTION_NAMES)))  # every motion occurs
    # Motion is visible: the foreground's centre moves the way the caption says, and a growing item grows.
    expected = (("moving right", 0, 1), ("moving left", 0, -1), ("moving up", 1, -1), ("moving down", 1, 1))
    for name, axis, sign in expected:
        idx = (motion == pv.MOTION_NAMES.index(name)).nonzero().flatten()[:10]
        shift = torch.stack([(_centroid(clips[i])[-1] - _centroid(clips[i])[0])[axis] for i in idx])
        assert (shift * sign > 3).float().mean() > 0.8, (name, shift)
    grow = (motion == pv.MOTION_NAMES.index("growing")).nonzero().flatten()[:10]
    area = lambda clip, f: float((clip[:, f].float().amax(0) > 128).float().sum())  # noqa: E731
    assert all(area(clips[i], -1) > area(clips[i], 0) for i in grow)
    with pytest.raises(Exception, match="procedural video set name"):
        pv.parse_spec("procedural-video:x")


def test_wan_presets_fit_clips_and_refuse_images():
    from isles.experts.presets import build_model, model_config, preset_stats
    from isles.protocol.errors import IslesError

    config = model_config("wan-tiny", 3, 32, None, text_width=384, frames=16)
    assert config["_class_name"] == "WanTransformer3DModel" and config["patch_size"] == [2, 4, 4]
    stats = preset_stats("wan-tiny", 3, 32, None, 384, 16, 16)
    assert 0.8e6 < stats["parameters"] < 1.3e6  # ~1M parameters, 512 space-time tokens
    big = preset_stats("wan-1.3b", 16, 32, None, 4096, 77, 5)["parameters"]
    assert 1.3e9 < big < 1.5e9  # Wan 2.1 T2V-1.3B
    with pytest.raises(IslesError, match="video preset"):
        build_model("wan-tiny", 3, 32, None, text_width=384)  # images
    with pytest.raises(IslesError, match="image preset"):
        build_model("pixart-tiny", 3, 32, None, text_width=384, frames=8)  # clips
    with pytest.raises(IslesError, match="do not tile"):
        model_config("wan-tiny", 3, 32, None, text_width=384, frames=7)


@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
    """procedural-video:80 at 8 frames of 16x16 in 2 shards, Wan-tiny experts and a router trained a few steps, and
    the assembled ensemble saved in the published layout."""
    from isles.client.run_access import make_router_task
    from isles.experts.data import load_shard
    from isles.experts.expert import ExpertTask
    from isles.experts.trainer import TrainRecipe, train
    from isles.router.ensemble import EnsemblePipeline
    from isles.router.partition import PartitionConfig, partition

    tmp = tmp_path_factory.mktemp("video-run")
    result = partition(
        PartitionConfig(
            source="procedural-video:80",
            experts=2,
            out=tmp / "run",
            resolution=16,
            frames=8,
            conditioning="text",
            text_encoder="minilm",
            text_max_length=16,
            preset="wan-tiny",
            steps=6,
            global_batch=8,
            warmup_steps=2,
            router_preset="cnn-tiny",
            router_steps=6,
            router_batch=8,
            router_text=True,
        )  # fmt: skip
    )
    refs = result.manifest.shards
    shards = [load_shard(p, sha256=ref.sha256) for p, ref in zip(result.shard_paths, refs, strict=True)]
    recipe = TrainRecipe(steps=4, global_batch=8, warmup_steps=1, checkpoint_every_steps=None)
    folders = {}
    for i, shard in enumerate(shards):
        task = ExpertTask(shard, preset="wan-tiny", objective=["fm", "ddpm"][i])
        out = train(task, recipe, tmp / f"e{i}", device="cpu")
        assert out.completed and out.metrics["val_loss"] > 0
        folders[i] = out.export_dir
    # The router as a volunteer trains it from the manifest's recipe: text-aware, as this run asked.
    router = train(make_router_task(result.manifest, dict(enumerate(shards))), recipe, tmp / "router", device="cpu")
    pipe = EnsemblePipeline.assemble(folders, router.export_dir)
    pipe.save_pretrained(tmp / "ensemble")
    return tmp, result, shards, folders


def test_partition_clusters_clips_into_lazy_clip_shards(video_run):
    from isles.experts.shard_file import LazyColumn

    _, result, shards, _ = video_run
    m = result.manifest
    assert sum(result.sizes) == 80 and all(size > 0 for size in result.sizes)
    assert all(e.frames == 8 and e.resolution == 16 and e.channels == 3 for e in m.experts)
    assert all(e.conditioning == "text" and e.text_width == 384 for e in m.experts)
    assert m.router.class_conditional is False and m.router.text_aware is True
    assert isinstance(shards[0].items, LazyColumn) and tuple(shards[0].shape) == (3, 8, 16, 16)
    assert shards[0].frames == 8 and shards[0].items[:2].shape == (2, 3, 8, 16, 16)
    assert "clips" in m.description and "3x8x16x16" in m.description


def test_wan_experts_export_plain_diffusers_folders_and_the_ensemble_samples_clips(video_run):
    from diffusers import WanTransformer3DModel

    from isles.experts.expert import read_expert_info
    from isles.protocol.errors import IslesError
    from isles.router.ensemble import EnsemblePipeline
    from isles.router.sampling import parse_routing

    tmp, _, _, folders = video_run
    config = WanTransformer3DModel.load_config(folders[0])
    assert config["_class_name"] == "WanTransformer3DModel" and config["text_dim"] == 384
    assert read_expert_info(folders[0])["shape"] == [3, 8, 16, 16]
    pipe = EnsemblePipeline.from_pretrained(tmp / "ensemble", device="cpu")
    assert pipe.is_video and pipe.item_shape == (3, 8, 16, 16)
    prompts = ["a red 3 moving right", "a blue circle growing"]
    for routing in ("top1", "top2", "full", "threshold:0.3"):
        out = pipe(prompt=prompts, routing=parse_routing(routing), steps=3, seed=0, guidance_scale=3.0)
        assert out.images.shape == (2, 3, 8, 16, 16) and torch.isfinite(out.images).all()
    again = pipe(prompt=prompts, routing="top1", steps=3, seed=0, guidance_scale=3.0)
    first = pipe(prompt=prompts, routing="top1", steps=3, seed=0, guidance_scale=3.0)
    assert torch.equal(again.images, first.images)  # seeded
    other = pipe(prompt=["a green 7 shrinking"] * 2, routing="top1", steps=3, seed=0, guidance_scale=3.0)
    assert not torch.allclose(other.images, first.images)  # the prompt reaches the experts
    # The text-aware router (the run's --router-text) passes the aggregator's config check against the recipe.
    from isles.client.release_checks import RecipeChecks

    _, result, _, _ = video_run
    assert pipe.router.config.text_dim == 384
    assert RecipeChecks(result.manifest).check_config("router", tmp / "router" / "model") is None
    # ... and the pipeline hands it the prompt: from the same noise, two prompts are routed differently at once.
    a, b = (pipe(prompt=[p], routing="full", steps=2, seed=0, return_routing=True) for p in prompts)
    assert not torch.equal(a.weights[0], b.weights[0])
    narrower = {**pipe.config, "text_encoder": {**pipe.config["text_encoder"], "width": 16}}
    with pytest.raises(IslesError, match="reads 384-wide caption embeddings"):
        EnsemblePipeline(pipe.experts, pipe.router, narrower)
    # A partial ensemble (expert_1 missing) samples with the router renormalised over expert_0.
    partial = EnsemblePipeline.assemble({0: folders[0]}, tmp / "router" / "model")
    out = partial(prompt=prompts, routing="top2", steps=2, seed=0, return_routing=True)
    assert out.images.shape == (2, 3, 8, 16, 16) and bool((out.weights[..., 1] == 0).all())


def test_sample_cli_writes_gif_mp4_and_frame_sheet_and_refuses_gif_for_images(video_run, tmp_path):
    import av
    from PIL import Image

    tmp, _, _, _ = video_run
    out = tmp_path / "clips.gif"
    proc = subprocess.run(
        ISLES + ["sample", str(tmp / "ensemble"), "--prompt", "a red 3 moving right", "--n", "3", "--steps", "2"]
        + ["--out", str(out), "--show-routing", "--json"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = json.loads(proc.stdout)
    with Image.open(written["gif"]) as gif:
        assert gif.n_frames == 8 and gif.is_animated  # one GIF frame per clip frame
    with av.open(written["mp4"]) as container:
        assert sum(1 for _ in container.decode(video=0)) == 8
    with Image.open(written["frames"]) as sheet:
        assert sheet.width > sheet.height  # rows of 8 frames, a label at the left
    assert sum(written["steps_per_expert"]) == 3 * 2 and (tmp_path / "clips-routing.png").is_file()

    from isles.experts.presets import build_model
    from isles.router.ensemble import EnsemblePipeline, Expert
    from isles.router.model import RouterModel, router_config

    images = EnsemblePipeline({0: Expert(0, build_model("unet-micro", 1, 8, 10), "fm")},
                              RouterModel(router_config("cnn-tiny", 1, 1, 8, 10)))  # fmt: skip
    images.save_pretrained(tmp_path / "image-ensemble")
    proc = subprocess.run(
        ISLES + ["sample", str(tmp_path / "image-ensemble"), "--out", str(tmp_path / "x.gif"), "--steps", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "Error: this ensemble makes images, not clips" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.gif").exists()


def test_fvd_reference_and_readback_of_content_and_motion(video_run, tmp_path):
    from isles.experts import procedural_video as pv
    from isles.protocol.errors import IslesError
    from isles.router import metrics
    from isles.router.ensemble import EnsemblePipeline
    from isles.router.evaluate import EnsembleSampler, EvalConfig, build_reference, evaluate
    from isles.router.video_features import clip_agreement

    tmp, _, _, _ = video_run
    ref = build_reference(
        "procedural-video", 24, 3, 16, cache_dir=tmp_path, feature_overrides=QUICK_FEATURES, frames=8
    )
    assert ref.is_video and ref.pixels.shape == (24, 3, 8, 16, 16) and ref.floor >= 0
    # Real clips read back far above chance; shuffled attributes (a model ignoring its prompt) near chance.
    real = clip_agreement(ref.net, metrics.to_model_space(ref.pixels), ref.attributes)
    shuffled = clip_agreement(ref.net, metrics.to_model_space(ref.pixels), ref.attributes.roll(1, dims=0))
    assert real["motion"] > shuffled["motion"] + 0.3 and real["motion"] > 0.6
    pipe = EnsemblePipeline.from_pretrained(tmp / "ensemble", device="cpu")
    rows = evaluate(EnsembleSampler(pipe), ref, EvalConfig(n=24, routings=("top1",), steps=2, cache_dir=tmp_path))
    row = rows[0]
    assert row["video"] and set(row["agreement"]) == {"class", "colour", "motion", "all"}
    assert row["fid"] > ref.floor  # an ensemble trained 4 steps is far from real clips
    with pytest.raises(IslesError, match="holds images"):
        build_reference("procedural", 8, 3, 16, cache_dir=tmp_path, frames=8)
    with pytest.raises(IslesError, match="makes images"):
        build_reference("procedural-video", 8, 3, 16, cache_dir=tmp_path, feature_overrides=QUICK_FEATURES)
    assert pv.NUM_CLASSES == 14


def test_clip_encoder_separates_motion_from_content():
    """The partition's clip features: clips of one class moving left and right land in different k-means clusters."""
    from isles.experts import procedural_video as pv
    from isles.router.encoders import ClipEncoder, make_encoder
    from isles.router.partition import kmeans

    clips, attributes, _ = pv.generate_clips(400, resolution=16, frames=8)
    pick = ((attributes[:, 2] == 0) | (attributes[:, 2] == 1)).nonzero().flatten()  # moving right / left
    encoder = ClipEncoder(make_encoder("pixels"))
    encoder.fit(clips)
    features = encoder.encode(clips[pick])
    labels = kmeans(features, 2, seed=0)
    motion = attributes[pick, 2].numpy()
    purity = max((labels == motion).mean(), (labels != motion).mean())
    assert purity > 0.8, purity


def _video_folder(root, n: int = 6):
    """n procedural clips as MP4s (16 frames of 32x32) with captions in metadata.jsonl, plus a file ffmpeg cannot
    read, a 3-frame clip (under half of 8 frames: skipped) and a 6-frame one (padded with its last frame)."""
    from isles.experts import procedural_video as pv
    from isles.experts.video_decode import write_test_video

    clips, _, captions = pv.generate_clips(n + 2, resolution=32, frames=16)
    root.mkdir(parents=True)
    lines = []
    for i in range(n):
        write_test_video(root / f"{i:02d}.mp4", clips[i])
        lines.append(json.dumps({"file_name": f"{i:02d}.mp4", "text": captions[i]}))
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    write_test_video(root / "short.mp4", clips[n][:, :3])
    write_test_video(root / "padded.mp4", clips[n + 1][:, :6])
    for name, text in (("broken.mp4", "nothing"), ("short.mp4", captions[n]), ("padded.mp4", captions[n + 1])):
        lines.append(json.dumps({"file_name": name, "text": text}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_video_files_are_decoded_skipped_or_padded_as_documented(tmp_path):
    import io
    import tarfile

    from isles.experts.captioned import open_captioned

    folder = _video_folder(tmp_path / "videos")
    stream = open_captioned(str(folder), resolution=16, frames=8)
    items = list(stream)
    assert [i.key for i in items] == [f"{i:02d}.mp4" for i in range(6)] + ["padded.mp4"]
    assert all(i.pixels.shape == (3, 8, 16, 16) and i.pixels.dtype == torch.uint8 for i in items)
    assert stream.report.skipped_undecodable == 1 and stream.report.skipped_examples == ["broken.mp4"]
    assert stream.report.skipped_short == 1
    assert "1 undecodable videos skipped (broken.mp4)" in stream.report.summary()
    padded = items[-1].pixels
    assert torch.equal(padded[:, 6], padded[:, 5]) and torch.equal(padded[:, 7], padded[:, 5])  # last frame held
    # --fps: 16 frames at the file's 8 fps sampled at 4 fps are every other frame.
    half = next(iter(open_captioned(str(folder), resolution=16, frames=4, fps=4.0)))
    full = items[0].pixels
    assert (half.pixels.float() - full[:, [0, 2, 4, 6]].float()).abs().mean() < 3
    # A WebDataset tar of mp4 + txt members reads the same clips.
    with tarfile.open(tmp_path / "clips.tar", "w") as tar:
        for i in range(3):
            for name, data in ((f"{i:05d}.mp4", (folder / f"{i:02d}.mp4").read_bytes()), (f"{i:05d}.txt", b"a clip")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    from_tar = list(open_captioned(str(tmp_path / "clips.tar"), resolution=16, frames=8))
    assert len(from_tar) == 3 and torch.equal(from_tar[0].pixels, items[0].pixels)


def test_partition_cli_makes_clip_shards_from_a_video_folder(tmp_path):
    folder = _video_folder(tmp_path / "videos")
    base = ISLES + ["partition", str(folder), "--experts", "2", "--out", str(tmp_path / "run"), "--resolution", "16"]
    proc = subprocess.run(
        base + ["--frames", "8", "--conditioning", "text", "--text-encoder", "minilm", "--preset", "wan-tiny"]
        + ["--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["items"] == 7 and summary["skipped"] == 1 and summary["skipped_short"] == 1
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["experts"][0]["frames"] == 8 and manifest["experts"][0]["preset"] == "wan-tiny"
    assert (tmp_path / "run" / "clusters" / "cluster-0.gif").is_file()
    # A video source needs captions, and a video preset needs clips.
    no_captions = base + ["--frames", "8", "--preset", "wan-tiny"]
    proc = subprocess.run(no_captions, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Error:" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        ISLES + ["partition", "procedural:200", "--experts", "2", "--out", str(tmp_path / "img"), "--resolution", "16"]
        + ["--conditioning", "text", "--text-encoder", "minilm", "--preset", "wan-tiny"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1 and "video preset" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "img" / "manifest.json").exists()


def test_video_latents_through_wan_vae_train_and_decode_to_clips(tmp_path):
    """Clips encoded once by an AutoencoderKLWan at partition time; a Wan expert trains on the latent clips; the
    ensemble samples latents and decodes them to clips of 1 + (f - 1) t frames with the VAE it names."""
    from conftest import save_tiny_video_vae

    from isles.experts.data import load_shard
    from isles.experts.expert import ExpertTask
    from isles.experts.trainer import TrainRecipe, train
    from isles.protocol.errors import IslesError
    from isles.router.ensemble import EnsemblePipeline
    from isles.router.partition import PartitionConfig, partition
    from isles.router.router_task import RouterTask
    from isles.router.vae import load_vae

    vae = save_tiny_video_vae(tmp_path / "vae")
    codec = load_vae(str(vae))
    assert codec.spec.is_video and codec.spec.temporal_downsample == 2 and codec.spec.downsample == 4
    with pytest.raises(IslesError, match="1 \\+ k \\* 4 frames"):
        codec.encode(torch.zeros(1, 3, 8, 32, 32, dtype=torch.uint8))
    with pytest.raises(IslesError, match="encodes uint8 clips"):
        codec.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    result = partition(
        PartitionConfig(
            source="procedural-video:24",
            experts=2,
            out=tmp_path / "run",
            resolution=32,
            frames=9,
            vae=str(vae),
            conditioning="text",
            text_encoder="minilm",
            text_max_length=16,
            preset="wan-small",
            steps=3,
            global_batch=4,
            warmup_steps=1,
            router_preset="cnn-tiny",
            router_steps=3,
            router_batch=4,
        )  # fmt: skip
    )
    m = result.manifest
    assert m.vae.temporal_downsample == 2 and m.vae.channel_mean == [0.1, -0.2, 0.0, 0.3]
    assert m.experts[0].frames == 5 and m.experts[0].resolution == 8 and m.experts[0].channels == 4
    shards = [load_shard(p) for p in result.shard_paths]
    assert shards[0].is_latent and tuple(shards[0].shape) == (4, 5, 8, 8)  # wan-small: 1x2x2 patches, 80 tokens
    recipe = TrainRecipe(steps=2, global_batch=4, warmup_steps=1, checkpoint_every_steps=None)
    # One expert is enough here (30M parameters): the ensemble samples partially, routed over what it has.
    folders = {0: train(ExpertTask(shards[0], preset="wan-small"), recipe, tmp_path / "e0", device="cpu").export_dir}
    router = train(RouterTask(shards, preset="cnn-tiny", conditional=False), recipe, tmp_path / "r", device="cpu")
    pipe = EnsemblePipeline.assemble(folders, router.export_dir)
    pipe.save_pretrained(tmp_path / "ensemble")
    assert json.loads((tmp_path / "ensemble" / "model_index.json").read_text())["vae"][1] == "AutoencoderKLWan"
    loaded = EnsemblePipeline.from_pretrained(tmp_path / "ensemble", device="cpu")
    out = loaded(prompt="a red 3 moving right", n=2, steps=2, seed=0)
    assert out.latents.shape == (2, 4, 5, 8, 8) and out.images.shape == (2, 3, 9, 32, 32)
    assert out.images.min() >= -1 and out.images.max() <= 1


def test_wan_expert_stops_and_resumes_bit_identically(video_run, tmp_path):
    from isles.experts import checkpoints
    from isles.experts.expert import ExpertTask
    from isles.experts.trainer import TrainRecipe, train

    _, _, shards, _ = video_run
    recipe = TrainRecipe(steps=4, global_batch=4, lr=1e-3, warmup_steps=1, checkpoint_every_steps=None,
                         checkpoint_every_seconds=None)  # fmt: skip

    def task():
        return ExpertTask(shards[1], preset="wan-tiny", objective="ddpm")

    straight = train(task(), recipe, tmp_path / "a", device="cpu", export=False)
    first = train(task(), recipe, tmp_path / "b", device="cpu", stop_at_step=2, export=False)
    second = train(task(), recipe, tmp_path / "b", device="cpu", export=False)
    assert straight.completed and not first.completed and second.completed and second.step == 4
    a, b = (checkpoints.read_checkpoint(checkpoints.latest_checkpoint(tmp_path / d / "checkpoints")) for d in "ab")
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key])


def test_iso_flop_video_quick_compares_clip_ensembles_at_equal_flops(tmp_path):
    """benchmarks/iso_flop.py --video --quick: the monolith and the ensemble of Wan experts train on equal FLOPs; every
    configuration gets an FVD-style distance and content/motion read-back; the table says FVD."""
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "iso_flop.py"
    args = [sys.executable, str(script), "--video", "--quick", "--out", str(tmp_path), "--threads", "1"]
    proc = subprocess.run(
        args + ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--text-encoder", "minilm"],
        capture_output=True, text=True, timeout=500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "iso_flop_video_quick.json").read_text())
    budget = result["monolith"]["train_flops"]
    # text_*: the same experts under a text-aware router, trained on the same share of the budget.
    for name in ("monolith", "top1", "top2", "full", "hetero", "random_shards", "text_top1", "text_full"):
        assert abs(result[name]["train_flops"] - budget) <= 0.05 * budget, name  # iso-FLOP, router included
        assert result[name]["fid_mean"] > result["fid_floor"]
    row = result["per_seed"][0]["rows"]["top1"]
    assert set(row["agreement"]) == {"class", "colour", "motion", "all"}
    assert "| configuration | routing | FVD" in (tmp_path / "iso_flop_video_quick.md").read_text()
