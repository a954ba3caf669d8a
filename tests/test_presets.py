"""Model presets: a configuration sweep (build, one training step, save_pretrained / from_pretrained round trip),
FLOPs counted by torch's flop counter, and clear errors for shapes a preset cannot take."""

from __future__ import annotations

import os

import pytest
import torch

from isles.experts.conditioning import TextCondition
from isles.experts.objectives import training_loss
from isles.experts.presets import (
    PRESETS,
    build_model,
    clip_shape,
    count_parameters,
    get_preset,
    is_text_preset,
    is_video_model,
    is_video_preset,
    load_model,
    model_forward,
    model_num_classes,
    null_class,
    preset_stats,
    text_width_of,
)
from isles.protocol.errors import IslesError

# The largest DiTs, PixArts and conditional UNets take GBs to train even on 8x8 inputs: swept with ISLES_FULL_SWEEP=1.
BIG = {"dit-b-2", "dit-b-4", "dit-l-2", "dit-xl-2", "pixart-b-2", "pixart-xl-2", "unet-cond-base"}
BIG |= {"wan-base", "wan-1.3b"}
FULL = os.environ.get("ISLES_FULL_SWEEP") == "1"
SWEPT = [name for name in PRESETS if (FULL or name not in BIG) and not is_text_preset(name)]
SWEPT_TEXT = [
    name for name in PRESETS if (FULL or name not in BIG) and is_text_preset(name) and not is_video_preset(name)
]
SWEPT_VIDEO = [name for name in PRESETS if (FULL or name not in BIG) and is_video_preset(name)]
SHAPES = [(1, 8, 10), (3, 16, None)]  # (channels, resolution, num_classes): digits, and unconditional RGB
TEXT_SHAPES = [(4, 8, 32, 6), (3, 16, 48, 11)]  # (channels, resolution, caption width, tokens): latents, RGB


@pytest.mark.parametrize("shape", SHAPES, ids=["gray8-cond", "rgb16-uncond"])
@pytest.mark.parametrize("name", SWEPT)
def test_every_preset_builds_trains_and_round_trips(name, shape, tmp_path):
    channels, resolution, num_classes = shape
    torch.manual_seed(0)
    model = build_model(name, channels, resolution, num_classes)
    assert model_num_classes(model) == num_classes
    x = torch.randn(2, channels, resolution, resolution)
    labels = None if num_classes is None else torch.tensor([0, num_classes])  # a real label and the null class
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    loss = training_loss("fm", lambda xi, ts: model_forward(model, xi, ts, labels), x, gen)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert type(loaded) is type(model) and null_class(loaded) == null_class(model)
    model.eval()
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        torch.testing.assert_close(model_forward(loaded, x, t, labels), model_forward(model, x, t, labels))


@pytest.mark.parametrize("shape", TEXT_SHAPES, ids=["latent8", "rgb16"])
@pytest.mark.parametrize("name", SWEPT_TEXT)
def test_every_text_preset_builds_trains_round_trips_and_reads_its_caption(name, shape, tmp_path):
    channels, resolution, width, tokens = shape
    torch.manual_seed(0)
    model = build_model(name, channels, resolution, text_width=width)
    assert model_num_classes(model) is None and null_class(model) is None and text_width_of(model) == width
    x = torch.randn(2, channels, resolution, resolution)
    mask = torch.ones(2, tokens)
    mask[1, tokens // 2 :] = 0  # the second caption is shorter: padding is masked out
    text = TextCondition(torch.randn(2, tokens, width), mask)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    loss = training_loss("fm", lambda xi, ts: model_forward(model, xi, ts, text), x, torch.Generator().manual_seed(0))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)

    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path).eval()
    assert type(loaded) is type(model)
    model.eval()
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        out = model_forward(model, x, t, text)
        torch.testing.assert_close(model_forward(loaded, x, t, text), out)
        other = TextCondition(torch.randn(2, tokens, width), mask)
        assert not torch.allclose(model_forward(model, x, t, other), out)  # the caption reaches the output
        padded = TextCondition(text.emb.clone(), mask)
        padded.emb[1, tokens // 2 :] = 100.0  # what lies under the mask is ignored
        torch.testing.assert_close(model_forward(model, x, t, padded)[1], out[1], atol=1e-4, rtol=1e-4)
    with pytest.raises(IslesError, match="needs a caption"):
        model_forward(model, x, t, torch.tensor([1, 2]))


@pytest.mark.parametrize("name", SWEPT_VIDEO)
def test_every_video_preset_builds_trains_round_trips_and_reads_its_caption(name, tmp_path):
    # wan-micro's 2x2x2 and wan-tiny's 2x4x4 patches take pixel clips; the others' 1x2x2 take VAE latents (and
    # unet-frames-* takes either).
    channels, frames, resolution = (3, 4, 16) if get_preset(name).patch_frames > 1 else (4, 3, 8)
    width, tokens = 32, 6
    torch.manual_seed(0)
    model = build_model(name, channels, resolution, text_width=width, frames=frames)
    assert text_width_of(model) == width and model_num_classes(model) is None
    x = torch.randn(2, channels, frames, resolution, resolution)
    mask = torch.ones(2, tokens)
    mask[1, tokens // 2 :] = 0
    text = TextCondition(torch.randn(2, tokens, width), mask)
    loss = training_loss("fm", lambda xi, ts: model_forward(model, xi, ts, text), x, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path).eval()  # strictly: every weight of the file, no other
    model.eval()
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        out = model_forward(model, x, t, text)
        assert out.shape == x.shape
        torch.testing.assert_close(model_forward(loaded, x, t, text), out)
        assert not torch.allclose(model_forward(model, x, t, TextCondition(torch.randn(2, tokens, width), mask)), out)
        padded = TextCondition(text.emb.clone(), mask)
        padded.emb[1, tokens // 2 :] = 100.0  # zeroed like Wan's own pipeline does with padding tokens
        torch.testing.assert_close(model_forward(model, x, t, padded), out)
    with pytest.raises(IslesError, match="makes clips"):
        model_forward(model, x[:, :, 0], t, text)  # an image into a video model


def test_a_unet_frames_expert_is_a_plain_diffusers_unet_that_knows_its_frame_count(tmp_path):
    from diffusers import UNet2DConditionModel

    model = build_model("unet-frames-micro", 3, 8, text_width=16, frames=4)
    assert type(model) is UNet2DConditionModel and model.config.in_channels == 12
    model.save_pretrained(tmp_path)
    plain = UNet2DConditionModel.from_pretrained(tmp_path)  # what anyone outside isles loads: frames in channels
    assert plain.config.in_channels == 12
    loaded = load_model(tmp_path)
    assert is_video_model(loaded) and not is_video_model(build_model("unet-cond-tiny", 3, 8, text_width=16))
    text = TextCondition(torch.randn(1, 3, 16), torch.ones(1, 3))
    with pytest.raises(IslesError, match="clips of 4 frames, not 2"):
        model_forward(loaded, torch.randn(1, 3, 2, 8, 8), torch.ones(1), text)
    with pytest.raises(IslesError, match="video preset"):
        build_model("unet-frames-micro", 3, 8, text_width=16)  # images
    # Every full-resolution feature passes through `base` channels a pixel, and at high noise the velocity holds
    # channels x frames independent values a pixel: a narrower model is refused, naming what fits.
    with pytest.raises(IslesError, match=r"32 channels wide, narrower than 16 frames of 3 channels stacked \(48") as e:
        build_model("unet-frames-tiny", 3, 32, text_width=16, frames=16)
    assert "at most 10 frames" in e.value.hint and "unet-frames-small" in e.value.hint
    assert build_model("unet-frames-tiny", 3, 32, text_width=16, frames=10).config.in_channels == 30


def test_text_and_class_presets_refuse_the_other_conditioning():
    with pytest.raises(IslesError, match="text-conditioned preset"):
        build_model("pixart-tiny", 4, 8, num_classes=10)
    with pytest.raises(IslesError, match="not text"):
        build_model("unet-tiny", 4, 8, text_width=32)
    with pytest.raises(IslesError, match="not text-conditioned"):
        model_forward(
            build_model("unet-tiny", 1, 8, 10),
            torch.randn(1, 1, 8, 8),
            torch.ones(1),
            TextCondition(torch.randn(1, 4, 8), torch.ones(1, 4)),
        )


def test_pixart_xl_is_paris_sized_and_text_flops_grow_with_the_caption():
    stats = preset_stats("pixart-xl-2", 4, 32, None, 768, 77)
    assert 550e6 < stats["parameters"] < 650e6  # DiT-XL/2 with adaLN-single + cross-attention (Paris 1.0: 605M)
    short = preset_stats("pixart-xl-2", 4, 32, None, 768, 16)
    assert short["train_flops_per_sample"] < stats["train_flops_per_sample"]


def test_flops_are_counted_not_guessed_and_match_the_dit_paper():
    stats = preset_stats("dit-xl-2", 4, 32, 1000)
    # DiT paper (Peebles & Xie), table 4: DiT-XL/2 forward = 118.6 GFLOPs at 256px (fvcore counts one
    # multiply-add as one flop; torch counts two). Training = forward + backward = 3x forward.
    forward_gmacs = stats["train_flops_per_sample"] / 3 / 2 / 1e9
    assert forward_gmacs == pytest.approx(118.6, rel=0.02)
    assert stats["parameters"] > 600e6
    small = preset_stats("unet-tiny", 1, 8, 10)
    assert small["parameters"] == count_parameters(build_model("unet-tiny", 1, 8, 10))
    assert 0 < small["train_flops_per_sample"] < stats["train_flops_per_sample"]


def test_every_preset_reports_stats_for_the_papers_latent_shape():
    for name in PRESETS:
        if is_video_preset(name):  # Wan 2.1 VAE latents of a 17-frame clip (wan-micro, wan-tiny: their pixel clips)
            channels, frames, side = clip_shape(name)
            stats = preset_stats(name, channels, side, None, 768, 77, frames)
        elif is_text_preset(name):
            stats = preset_stats(name, 4, 32, None, 768, 77)  # CLIP ViT-L/14 token embeddings, as Paris 1.0
        else:
            stats = preset_stats(name, 4, 32, 1000)
        assert stats["parameters"] > 0 and stats["train_flops_per_sample"] > 0


def test_unknown_preset_and_shapes_that_do_not_fit_are_user_errors():
    with pytest.raises(IslesError, match="unknown model preset"):
        build_model("unet-huge", 3, 32)
    with pytest.raises(IslesError, match="patches"):
        build_model("dit-s-4", 3, 10)
    with pytest.raises(IslesError, match="even resolution"):
        build_model("unet-tiny", 3, 7)
    # wan-tiny's 128-wide tokens cannot stand for 2x4x4 patches of Wan's 16-channel VAE latents (512 values).
    with pytest.raises(IslesError, match="narrower than its 2x4x4 patches of 16 channels"):
        build_model("wan-tiny", 16, 32, text_width=384, frames=4)


def test_alias_tiny_is_the_tiny_unet():
    assert type(build_model("tiny", 1, 8)).__name__ == "UNet2DModel"


def test_conditional_model_without_labels_uses_the_null_class():
    torch.manual_seed(0)
    model = build_model("dit-tiny", 1, 8, 10).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        uncond = model_forward(model, x, t, None)
        null = model_forward(model, x, t, torch.full((2,), null_class(model)))
        labelled = model_forward(model, x, t, torch.tensor([3, 3]))
    torch.testing.assert_close(uncond, null)
    assert not torch.allclose(uncond, labelled)


def test_a_damaged_model_folder_is_a_user_error(tmp_path):
    """What a volunteer or `isles sample` pulls may not match: one error line, not a diffusers traceback."""
    import json

    build_model("unet-tiny", 1, 8).save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "block_out_channels": [64, 128]}))
    with pytest.raises(IslesError, match="cannot load the model"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(IslesError, match="not valid JSON"):
        load_model(tmp_path)
