"""VAE codec with a tiny random AutoencoderKL saved to a folder: shapes, the scaling and shift, determinism, the
`vae/` subfolder of a pipeline, grayscale input, the spec round trip, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from isles.protocol.errors import IslesError
from isles.router.vae import LatentCodec, VaeSpec, load_vae


def tiny_autoencoder(shift_factor: float | None = None, in_channels: int = 3):
    """A 2-level AutoencoderKL (downsample 2), 32 px in, 4 latent channels, float32."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        layers_per_block=1,
        scaling_factor=0.5,
        shift_factor=shift_factor,
    ).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "autoencoder"
    vae = tiny_autoencoder(shift_factor=0.25)
    vae.save_pretrained(folder)
    return folder, vae


def pixels(n: int, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def test_encode_and_decode_shapes_scaling_and_determinism(saved):
    folder, raw = saved
    codec = load_vae(str(folder), device="cpu")
    assert codec.spec == VaeSpec(
        id=str(folder), revision=None, scaling_factor=0.5, shift_factor=0.25, latent_channels=4, downsample=2
    )
    images = pixels(5)
    latents = codec.encode(images)
    assert latents.shape == (5, 4, 16, 16) and latents.dtype == torch.float32
    with torch.no_grad():
        mean = raw.encode(images.float() / 127.5 - 1).latent_dist.mean
    torch.testing.assert_close(latents, (mean - 0.25) * 0.5, atol=1e-5, rtol=1e-5)
    assert torch.equal(codec.encode(images), latents)  # the posterior mean: no sampling noise
    decoded = codec.decode(latents)
    assert decoded.shape == (5, 3, 32, 32) and decoded.dtype == torch.float32
    assert decoded.min() >= -1 and decoded.max() <= 1
    with torch.no_grad():
        expected = raw.decode(latents / 0.5 + 0.25).sample.clamp(-1, 1)
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=1e-5)


def test_batches_split_internally_and_grayscale_repeats(saved):
    folder, _ = saved
    codec = load_vae(str(folder), device="cpu")
    images = pixels(5, seed=1)
    whole = codec.encode(images)
    codec.batch_size = 2  # three batches of at most 2
    torch.testing.assert_close(codec.encode(images), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(codec.decode(whole), LatentCodec(codec.vae, codec.spec, codec.device).decode(whole))
    gray = pixels(2, channels=1, seed=2)
    assert torch.equal(codec.encode(gray), codec.encode(gray.expand(-1, 3, -1, -1)))
    assert codec.encode(pixels(0)).shape == (0, 4, 16, 16)
    assert codec.decode(torch.zeros(0, 4, 8, 8)).shape == (0, 3, 16, 16)


def test_a_pipeline_folder_uses_its_vae_subfolder(tmp_path):
    pipeline = tmp_path / "pipeline"
    tiny_autoencoder().save_pretrained(pipeline / "vae")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    codec = load_vae(str(pipeline), device="cpu")
    assert codec.spec.id == str(pipeline) and codec.spec.shift_factor == 0.0 and codec.spec.scaling_factor == 0.5
    assert codec.encode(pixels(1)).shape == (1, 4, 16, 16)


def test_spec_round_trips(saved):
    folder, _ = saved
    spec = load_vae(str(folder), device="cpu").spec
    record = json.loads(json.dumps({**spec.to_dict(), "comment": "from a newer isles"}))
    assert VaeSpec.from_dict(record) == spec
    with pytest.raises(IslesError, match="bad VAE record"):
        VaeSpec.from_dict({"id": "x"})


def test_bad_inputs_and_missing_vaes_are_one_line_errors(saved, tmp_path):
    folder, _ = saved
    codec = load_vae(str(folder), device="cpu")
    with pytest.raises(IslesError, match="uint8 pixels"):
        codec.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(IslesError, match="3-channel"):
        codec.encode(pixels(1, channels=2))
    with pytest.raises(IslesError, match="latent cells"):
        codec.encode(pixels(1, size=31))
    with pytest.raises(IslesError, match=r"decodes \[B, 4, h, w\]"):
        codec.decode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(IslesError, match="no VAE folder"):
        load_vae(str(tmp_path / "missing"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IslesError, match="cannot load the VAE") as info:
        load_vae(str(tmp_path / "empty"), device="cpu")
    assert "\n" not in str(info.value) and "AutoencoderKL" in info.value.hint
