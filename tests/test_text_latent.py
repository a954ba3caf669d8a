"""Text-to-image on VAE latents, end to end without a network: a captioned image folder is partitioned with a small
AutoencoderKL built from a config and the offline MiniLM text encoder; experts (PixArt, UNet2DCondition) and the router
train on the lazily read latent shards; the assembled ensemble samples from prompts and decodes with its VAE.
Bad input (undecodable images, missing captions, a prompt for a class model) fails or is counted as a user expects.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import ISLES, save_tiny_vae

pytestmark = pytest.mark.timeout(600)


def _captioned_folder(root, n: int = 48, broken: int = 0):
    """n procedural images as PNGs with their captions in metadata.jsonl (imagefolder), plus `broken` bad files."""
    from PIL import Image

    from isles.experts import procedural

    pixels, _, _, captions = procedural.generate_captioned(n, resolution=16)
    root.mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.fromarray(pixels[i].permute(1, 2, 0).numpy()).save(root / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": captions[i]}))
    for j in range(broken):
        (root / f"broken-{j}.png").write_bytes(b"not a png")
        lines.append(json.dumps({"file_name": f"broken-{j}.png", "text": "nothing"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root, captions


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    from isles.router.partition import PartitionConfig, partition

    tmp = tmp_path_factory.mktemp("latent-run")
    folder, captions = _captioned_folder(tmp / "images", broken=1)
    vae = save_tiny_vae(tmp / "vae", shift_factor=0.1)
    result = partition(
        PartitionConfig(
            source=str(folder),
            experts=2,
            out=tmp / "run",
            resolution=16,
            conditioning="text",
            text_encoder="minilm",
            text_max_length=16,
            vae=str(vae),
            preset="pixart-tiny",
            steps=6,
            global_batch=8,
            warmup_steps=2,
            router_preset="cnn-tiny",
            router_steps=6,
            router_batch=8,
        )
    )
    return tmp, result, captions


def test_partition_encodes_latents_and_captions_once_into_lazy_shards(latent_run):
    from isles.experts.data import decode_captions, load_shard
    from isles.experts.shard_file import LazyColumn
    from isles.router.vae import load_vae

    tmp, result, captions = latent_run
    m = result.manifest
    assert result.skipped == 1 and result.skipped_examples == ["broken-0.png"]  # counted, not fatal
    assert sum(result.sizes) == 48
    assert m.vae is not None and m.vae.scaling_factor == 0.5 and m.vae.shift_factor == 0.1 and m.vae.downsample == 2
    assert m.text_encoder is not None and m.text_encoder.id == "minilm" and m.text_encoder.width == 384
    assert m.text_encoder.max_length == 16
    assert all(e.conditioning == "text" and e.text_width == 384 and e.num_classes is None for e in m.experts)
    assert m.experts[0].channels == 4 and m.experts[0].resolution == 8  # latents of 16x16 images
    assert m.router.class_conditional is False  # the router sees x_t and t only

    shard = load_shard(result.shard_paths[0], sha256=m.shards[0].sha256)
    assert isinstance(shard.items, LazyColumn) and isinstance(shard.text, LazyColumn)  # read on demand
    assert shard.items.dtype == torch.float32 and tuple(shard.shape) == (4, 8, 8)
    assert shard.text.shape[1:] == (16, 384) and shard.null_text[0].shape == (16, 384)
    # The stored latents are the VAE's scaled posterior means of the stored captions' images.
    names = decode_captions(shard.captions[:])
    assert set(names) <= set(captions)
    first = captions.index(names[0])
    from isles.experts import procedural

    pixels = procedural.generate_captioned(48, resolution=16)[0][first : first + 1]
    expected = load_vae(str(tmp / "vae")).encode(pixels)
    assert torch.allclose(shard.items[0], expected[0], atol=1e-4)


def test_text_experts_train_on_latents_and_the_ensemble_samples_prompts(latent_run, tmp_path):
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

    from isles.experts.data import load_shard
    from isles.experts.expert import ExpertTask
    from isles.experts.trainer import TrainRecipe, train
    from isles.router.ensemble import EnsemblePipeline
    from isles.router.router_task import RouterTask

    _, result, _ = latent_run
    m = result.manifest
    shards = [load_shard(p) for p in result.shard_paths]
    recipe = TrainRecipe(steps=4, global_batch=8, warmup_steps=1, checkpoint_every_steps=None)
    folders = {}
    for i, (shard, preset) in enumerate(zip(shards, ["pixart-tiny", "unet-cond-tiny"], strict=True)):
        task = ExpertTask(shard, preset=preset, conditioning="text")
        out = train(task, recipe, tmp_path / f"expert-{i}", device="cpu")
        assert out.completed and out.metrics["val_loss"] > 0
        folders[i] = out.export_dir
    # Every exported expert is a plain diffusers folder.
    assert isinstance(PixArtTransformer2DModel.from_pretrained(folders[0]), PixArtTransformer2DModel)
    assert isinstance(UNet2DConditionModel.from_pretrained(folders[1]), UNet2DConditionModel)
    router = train(RouterTask(shards, preset="cnn-tiny", conditional=False), recipe, tmp_path / "router", device="cpu")

    pipe = EnsemblePipeline.assemble(folders, router.export_dir)
    assert pipe.conditioning == "text" and pipe.config["vae"]["id"] == m.vae.id
    pipe.save_pretrained(tmp_path / "ensemble")
    loaded = EnsemblePipeline.from_pretrained(tmp_path / "ensemble", device="cpu")
    prompts = ["a large red 3 in the center", "blue stripes", "a small green circle on the left"]
    out = loaded(prompt=prompts, routing="top2", steps=4, seed=0, guidance_scale=3.0, return_routing=True)
    assert out.images.shape == (3, 3, 16, 16) and out.latents.shape == (3, 4, 8, 8)  # decoded by the named VAE
    assert out.images.min() >= -1 and out.images.max() <= 1 and torch.isfinite(out.latents).all()
    again = loaded(prompt=prompts, routing="top2", steps=4, seed=0, guidance_scale=3.0)
    assert torch.equal(again.latents, out.latents)  # seeded
    other = loaded(prompt=["a pink checkerboard"] * 3, routing="top2", steps=4, seed=0, guidance_scale=3.0)
    assert not torch.allclose(other.latents, out.latents)  # the prompt reaches the experts
    one = loaded(prompt="blue stripes", n=2, steps=2, seed=0)
    assert one.images.shape[0] == 2

    from isles.protocol.errors import IslesError

    with pytest.raises(IslesError, match="takes a prompt, not a class"):
        loaded(class_labels=3, steps=2)
    with pytest.raises(IslesError, match="needs a prompt"):
        loaded(n=2, steps=2)

    # The CLI: one labelled row per prompt of a file, decoded by the VAE, the latents kept beside the PNG.
    (tmp_path / "prompts.txt").write_text("a large red 3 in the center\n\nblue stripes\n")
    out_png = tmp_path / "grid.png"
    proc = subprocess.run(
        ISLES
        + ["sample", str(tmp_path / "ensemble"), "--prompts", str(tmp_path / "prompts.txt"), "--n", "2"]
        + ["--steps", "2", "--out", str(out_png), "--json"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = json.loads(proc.stdout)
    assert written["prompts"] == ["a large red 3 in the center", "blue stripes"] and written["guidance"] == 4.5
    from PIL import Image
    from safetensors.torch import load_file

    assert load_file(written["latents"])["latents"].shape == (4, 4, 8, 8)
    with Image.open(out_png) as image:
        assert image.width > image.height  # the prompts' labels stand left of the 2 x 2 grid
    proc = subprocess.run(
        ISLES + ["sample", str(tmp_path / "ensemble"), "--class", "3", "--steps", "2", "--out", str(out_png)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 1 and "Error: this ensemble is text-conditioned" in proc.stderr
    assert "Hint: pass --prompt" in proc.stderr and "Traceback" not in proc.stderr


def test_partition_cli_reports_bad_captioned_input(tmp_path):
    folder, _ = _captioned_folder(tmp_path / "images", n=12)
    (folder / "extra.png").write_bytes((folder / "000.png").read_bytes())  # an image no caption names
    base = ["partition", str(folder), "--experts", "2", "--conditioning", "text", "--text-encoder", "minilm"]
    proc = subprocess.run(
        ISLES + base + ["--out", str(tmp_path / "run"), "--preset", "pixart-tiny", "--resolution", "16"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("Error:") and "extra.png" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "manifest.json").exists()
    assert not list((tmp_path / "run").rglob("*.safetensors"))  # nothing half-written

    proc = subprocess.run(
        ISLES + base + ["--out", str(tmp_path / "run2"), "--preset", "unet-tiny"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "does not fit text conditioning" in proc.stderr and "Hint:" in proc.stderr
