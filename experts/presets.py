"""Named model sizes: real diffusers models that adapt to the data's shape. Class-conditional or unconditional:
UNet2DModel, DiTTransformer2DModel; text-conditioned (cross-attention to caption token embeddings):
PixArtTransformer2DModel (adaLN-single, the shape of Paris 1.0's experts) and UNet2DConditionModel; text-to-video on
clips [C, F, H, W]: WanTransformer3DModel (Wan 2.1's space-time transformer, flow matching, text cross-attention)
and, for short clips, UNet2DConditionModel with the frames stacked as channels (unet-frames-*).

`build_model("unet-tiny", channels=1, resolution=8, num_classes=10)`, `build_model("pixart-tiny", 4, 16,
text_width=384)`; `model_forward(model, x, timestep, labels | TextCondition)`; `load_model(folder)`.
Class-conditional models keep one extra "null" class for classifier-free guidance; text models use the empty caption.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from isles.protocol.errors import IslesError


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "unet" or "dit" (class / unconditional), "pixart" or "unet-cond" (text), "wan" or "unet-frames"
    # unet: base width, per-level multipliers, resnets per level, levels (from the finest) that get attention
    base: int = 0
    mults: tuple[int, ...] = ()
    layers_per_block: int = 1
    attn_from_level: int = 1
    # dit: transformer depth, heads, head width, patch size (the DiT paper's S/B/L/XL at /2, /4)
    layers: int = 0
    heads: int = 0
    head_dim: int = 0
    patch: int = 2
    patch_frames: int = 1  # wan: frames per patch (the space-time patch is patch_frames x patch x patch)
    ffn_dim: int = 0  # wan: the feed-forward width
    note: str = ""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("unet-micro", "unet", base=16, mults=(1, 2, 2), layers_per_block=1, note="capacity-limited on a CPU"),
        Preset("unet-tiny", "unet", base=32, mults=(1, 2, 2), layers_per_block=1, note="trains on a CPU in minutes"),
        Preset("unet-small", "unet", base=64, mults=(1, 2, 2, 2), layers_per_block=2),
        Preset("unet-base", "unet", base=128, mults=(1, 2, 2, 2), layers_per_block=2, note="DDPM CIFAR-10 size"),
        Preset("unet-large", "unet", base=192, mults=(1, 2, 3, 4), layers_per_block=2),
        Preset("dit-tiny", "dit", layers=4, heads=4, head_dim=32, patch=2, note="trains on a CPU in minutes"),
        Preset("dit-s-2", "dit", layers=12, heads=6, head_dim=64, patch=2),
        Preset("dit-s-4", "dit", layers=12, heads=6, head_dim=64, patch=4),
        Preset("dit-b-2", "dit", layers=12, heads=12, head_dim=64, patch=2, note="Paris 1.0 router size"),
        Preset("dit-b-4", "dit", layers=12, heads=12, head_dim=64, patch=4),
        Preset("dit-l-2", "dit", layers=24, heads=16, head_dim=64, patch=2),
        Preset("dit-xl-2", "dit", layers=28, heads=16, head_dim=72, patch=2, note="DDM / Paris 1.0 expert size"),
        # Text-conditioned: cross-attention to the caption's token embeddings (Paris 1.0: DiT-XL/2 + adaLN-single).
        Preset("pixart-tiny", "pixart", layers=4, heads=4, head_dim=32, patch=2, note="text; trains on a CPU"),
        Preset("pixart-s-2", "pixart", layers=12, heads=6, head_dim=64, patch=2, note="text"),
        Preset("pixart-b-2", "pixart", layers=12, heads=12, head_dim=64, patch=2, note="text; Paris 1.0 DiT-B/2"),
        Preset("pixart-xl-2", "pixart", layers=28, heads=16, head_dim=72, patch=2, note="text; Paris 1.0 expert"),
        Preset("unet-cond-tiny", "unet-cond", base=32, mults=(1, 2, 2), layers_per_block=1, note="text; CPU"),
        Preset("unet-cond-small", "unet-cond", base=64, mults=(1, 2, 2, 2), layers_per_block=2, note="text"),
        Preset("unet-cond-base", "unet-cond", base=128, mults=(1, 2, 2, 2), layers_per_block=2, note="text"),
        # Text-to-video (Paris 2.0): Wan 2.1's transformer. Token count, not parameters, sets the cost: the micro and
        # tiny presets cut pixel clips into 2x2x2 and 2x4x4 patches (wan-tiny: 512 tokens for 16x32x32); the others
        # use Wan's 1x2x2 on VAE latents.
        Preset(
            "wan-tiny",
            "wan",
            layers=4,
            heads=4,
            head_dim=32,
            patch=4,
            patch_frames=2,
            ffn_dim=256,
            note="video; ~1M params, trains on a CPU",
        ),
        Preset(
            "wan-micro",
            "wan",
            layers=2,
            heads=2,
            head_dim=32,
            patch=2,
            patch_frames=2,
            ffn_dim=128,
            note="video; ~180k params, capacity-limited on a CPU",
        ),
        # Text-to-video with a 2D UNet that sees a clip's frames stacked as channels: every output pixel sees the
        # whole clip, so motion is learnt in a few thousand steps on a CPU where wan-micro and wan-tiny learn none.
        # Frames cost channels, so it suits short clips (8-16 pixel frames, or a few latent frames), not Wan's length:
        # the first level must be at least as wide as the stacked channels (`_check_width_holds_frames`).
        Preset("unet-frames-micro", "unet-frames", base=24, mults=(1, 2, 2), layers_per_block=1, note="video; CPU"),
        Preset("unet-frames-tiny", "unet-frames", base=32, mults=(1, 2, 2), layers_per_block=1, note="video; CPU"),
        Preset("unet-frames-small", "unet-frames", base=64, mults=(1, 2, 2, 2), layers_per_block=2, note="video"),
        Preset("wan-small", "wan", layers=12, heads=6, head_dim=64, patch=2, ffn_dim=1536, note="video"),
        Preset("wan-base", "wan", layers=20, heads=12, head_dim=64, patch=2, ffn_dim=3072, note="video"),
        Preset(
            "wan-1.3b",
            "wan",
            layers=30,
            heads=12,
            head_dim=128,
            patch=2,
            ffn_dim=8960,
            note="video; Wan 2.1 T2V-1.3B, a 24-48 GB GPU",
        ),
    ]
}
TEXT_FAMILIES = ("pixart", "unet-cond", "wan", "unet-frames")
VIDEO_FAMILIES = ("wan", "unet-frames")
# A unet-frames model is a plain UNet2DConditionModel; this hidden config key (diffusers keeps keys that start with
# "_" through save and load, and passes none of them to the constructor) records how many frames its channels hold.
FRAMES_KEY = "_isles_frames"
TEXT_CLASSES = ("PixArtTransformer2DModel", "UNet2DConditionModel", "WanTransformer3DModel")
VIDEO_CLASSES = ("WanTransformer3DModel",)
ALIASES = {"tiny": "unet-tiny", "small": "unet-small", "dit": "dit-tiny"}


def get_preset(name: str) -> Preset:
    name = ALIASES.get(name, name)
    if name not in PRESETS:
        raise IslesError(
            f"unknown model preset {name!r}",
            hint=f"use one of: {', '.join(list(ALIASES) + list(PRESETS))} (see `isles train-expert --help`)",
        )
    return PRESETS[name]


def _groups(width: int) -> int:
    return math.gcd(32, width)


def is_text_preset(preset: str) -> bool:
    return get_preset(preset).family in TEXT_FAMILIES


def is_video_preset(preset: str) -> bool:
    return get_preset(preset).family in VIDEO_FAMILIES


def model_config(
    preset: str,
    channels: int,
    resolution: int,
    num_classes: int | None,
    text_width: int | None = None,
    frames: int | None = None,
) -> dict:
    """The diffusers constructor arguments of `preset` for items of shape [channels, resolution, resolution] (images)
    or [channels, frames, resolution, resolution] (clips), conditioned on num_classes classes, on caption token
    embeddings of width text_width, or on nothing."""
    p = get_preset(preset)
    if channels < 1 or resolution < 2:
        raise IslesError(f"cannot build {p.name} for data of shape [{channels}, {resolution}, {resolution}]")
    if (frames is not None) != (p.family in VIDEO_FAMILIES):
        if frames is None:
            raise IslesError(
                f"{p.name} is a video preset: it trains on clips, the data holds images",
                hint="pick an image preset (unet-*, dit-*, pixart-*), or partition a video source",
            )
        raise IslesError(
            f"{p.name} is an image preset: the data holds clips of {frames} frames",
            hint="pick a video preset: wan-* or unet-frames-*",
        )
    if num_classes is not None and num_classes < 1:
        raise IslesError(f"num_classes must be at least 1 (got {num_classes}); use None for unconditional models")
    if p.family in TEXT_FAMILIES:
        if text_width is None or num_classes is not None:
            raise IslesError(
                f"{p.name} is a text-conditioned preset: it needs captioned data (and takes no classes)",
                hint="partition a captioned source with --conditioning text, or pick a unet-*/dit-* preset",
            )
        return _text_model_config(p, channels, resolution, text_width, frames)
    if text_width is not None:
        raise IslesError(
            f"{p.name} takes a class or nothing, not text", hint="pick a text preset: pixart-* or unet-cond-*"
        )
    if p.family == "unet":
        widths, down, up = _unet_blocks(p, resolution, "Attn")
        return {
            "_class_name": "UNet2DModel",
            "sample_size": resolution,
            "in_channels": channels,
            "out_channels": channels,
            "block_out_channels": widths,
            "down_block_types": down,
            "up_block_types": up,
            "layers_per_block": p.layers_per_block,
            "attention_head_dim": 32 if p.base >= 64 else 16,
            "norm_num_groups": _groups(p.base),
            "num_class_embeds": None if num_classes is None else num_classes + 1,  # + the null class
        }
    if resolution % p.patch:
        raise IslesError(
            f"{p.name} uses {p.patch}x{p.patch} patches, which do not tile a {resolution}x{resolution} input",
            hint="pick a preset whose patch size divides the resolution (e.g. a /2 preset), or resize the data",
        )
    _check_tokens_hold_patches(p, channels)
    return {
        "_class_name": "DiTTransformer2DModel",
        "sample_size": resolution,
        "in_channels": channels,
        "out_channels": channels,
        "num_layers": p.layers,
        "num_attention_heads": p.heads,
        "attention_head_dim": p.head_dim,
        "patch_size": p.patch,
        # diffusers' DiT always embeds a label; it keeps one extra row (index num_embeds_ada_norm) for "no label".
        # Unconditional models are 1-class models that are always fed the null class.
        "num_embeds_ada_norm": 1 if num_classes is None else num_classes,
    }


def _unet_levels(p: Preset, resolution: int) -> tuple[int, ...]:
    """Widths of a UNet's levels: each level but the last halves the resolution; stop at 4x4 (digits are 8x8)."""
    if resolution % 2:
        raise IslesError(
            f"{p.name} needs an even resolution (got {resolution})", hint="resize the data or use a dit preset"
        )
    max_levels = max(1, int(math.log2(resolution)) - 1)
    while max_levels > 1 and resolution % (2 ** (max_levels - 1)):
        max_levels -= 1
    return tuple(p.base * m for m in p.mults[:max_levels])


def _unet_blocks(p: Preset, resolution: int, attention: str) -> tuple[tuple[int, ...], tuple, tuple]:
    """Level widths and the down / up block types, with `attention` ("Attn" or "CrossAttn") blocks from level
    attn_from_level on."""
    widths = _unet_levels(p, resolution)
    down = tuple(f"{attention}DownBlock2D" if i >= p.attn_from_level else "DownBlock2D" for i in range(len(widths)))
    up = tuple(
        f"{attention}UpBlock2D" if i >= p.attn_from_level else "UpBlock2D" for i in reversed(range(len(widths)))
    )
    return widths, down, up


def _text_model_config(p: Preset, channels: int, resolution: int, text_width: int, frames: int | None = None) -> dict:
    if p.family == "wan":
        return _wan_config(p, channels, resolution, text_width, frames)
    if p.family == "unet-frames":
        _check_width_holds_frames(p, channels, frames)
        folded = _text_model_config(replace(p, family="unet-cond"), channels * frames, resolution, text_width)
        return {**folded, FRAMES_KEY: frames}
    if p.family == "pixart":
        if resolution % p.patch:
            raise IslesError(f"{p.name} uses {p.patch}x{p.patch} patches, which do not tile {resolution}x{resolution}")
        _check_tokens_hold_patches(p, channels)
        return {
            "_class_name": "PixArtTransformer2DModel",
            "sample_size": resolution,
            "in_channels": channels,
            "out_channels": channels,  # no learned variance: isles predicts velocity or noise only
            "num_layers": p.layers,
            "num_attention_heads": p.heads,
            "attention_head_dim": p.head_dim,
            "patch_size": p.patch,
            "cross_attention_dim": p.heads * p.head_dim,
            "caption_channels": text_width,  # the text encoder's width, projected to the model's
            "norm_type": "ada_norm_single",  # adaLN-single: one timestep MLP shared by every block (PixArt-alpha)
            "num_embeds_ada_norm": 1000,
            "use_additional_conditions": False,  # no resolution / aspect-ratio embedding
        }
    widths, down, up = _unet_blocks(p, resolution, "CrossAttn")
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": resolution,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": widths,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "layers_per_block": p.layers_per_block,
        "attention_head_dim": 4 if p.base < 64 else 8,  # heads per block, in UNet2DConditionModel's naming
        "norm_num_groups": _groups(p.base),
        "cross_attention_dim": text_width,
    }


def _check_tokens_hold_patches(p: Preset, channels: int) -> None:
    """A transformer's token must be at least as wide as the patch it stands for. Each output patch is a linear map of
    one token, so a narrower token cannot carry the per-value noise the model has to remove: a 64-wide Wan on 2x4x4
    patches of 3 channels (96 values) trained to a normal-looking loss, yet its clips scored worse than uniform
    noise."""
    values = channels * p.patch_frames * p.patch * p.patch
    width = p.heads * p.head_dim
    if width < values:
        shape = f"{p.patch_frames}x{p.patch}x{p.patch}" if p.patch_frames > 1 else f"{p.patch}x{p.patch}"
        raise IslesError(
            f"{p.name}'s tokens are {width} wide, narrower than its {shape} patches of {channels} channels "
            f"({values} values): the model could not represent the noise it has to remove",
            hint="pick a preset with smaller patches or wider tokens"
            + (" (e.g. wan-small for 16-channel VAE latents)" if p.family == "wan" else ""),
        )


def _check_width_holds_frames(p: Preset, channels: int, frames: int) -> None:
    """The frames-as-channels UNet carries every full-resolution feature in `base` channels a pixel (its first level
    and the skips around it), while at high noise the velocity it predicts holds channels x frames independent noise
    values a pixel: a narrower model cannot represent them. Measured: 16 wide for 8 RGB frames (24 values), it
    reached a loss of 0.53 after 3,875 steps (24 wide: 0.53 after 600; 32 wide: 0.38) and sampled noise (FVD 731
    against uniform noise's 713)."""
    if p.base < channels * frames:
        fit = p.base // channels
        wider = [q.name for q in PRESETS.values() if q.family == "unet-frames" and q.base >= channels * frames]
        raise IslesError(
            f"{p.name} is {p.base} channels wide, narrower than {frames} frames of {channels} channels stacked "
            f"({channels * frames}): the model could not represent the noise it has to remove",
            hint=(f"use at most {fit} frames" if fit else "use fewer channels")
            + (f", or a wider preset ({', '.join(wider)})" if wider else ""),
        )


def _wan_config(p: Preset, channels: int, resolution: int, text_width: int, frames: int) -> dict:
    if frames % p.patch_frames or resolution % p.patch:
        raise IslesError(
            f"{p.name} cuts clips into {p.patch_frames}x{p.patch}x{p.patch} patches, which do not tile "
            f"{frames}x{resolution}x{resolution}",
            hint="pick a frame count and resolution the patch divides, or another wan preset",
        )
    _check_tokens_hold_patches(p, channels)
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": [p.patch_frames, p.patch, p.patch],
        "num_attention_heads": p.heads,
        "attention_head_dim": p.head_dim,
        "in_channels": channels,
        "out_channels": channels,
        "text_dim": text_width,  # the text encoder's width (umT5-XXL's 4096 in Wan 2.1), projected to the model's
        "freq_dim": 256,
        "ffn_dim": p.ffn_dim,
        "num_layers": p.layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "image_dim": None,  # text-to-video: no image conditioning branch
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


def _model_classes() -> dict[str, type]:
    from diffusers import (
        DiTTransformer2DModel,
        PixArtTransformer2DModel,
        UNet2DConditionModel,
        UNet2DModel,
        WanTransformer3DModel,
    )

    return {
        "UNet2DModel": UNet2DModel,
        "DiTTransformer2DModel": DiTTransformer2DModel,
        "PixArtTransformer2DModel": PixArtTransformer2DModel,
        "UNet2DConditionModel": UNet2DConditionModel,
        "WanTransformer3DModel": WanTransformer3DModel,
    }


def _instantiate(config: dict) -> torch.nn.Module:
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    model = _model_classes()[config["_class_name"]](**kwargs)
    hidden = {k: v for k, v in config.items() if k.startswith("_") and k != "_class_name"}
    if hidden:
        model.register_to_config(**hidden)
    return _prepare(model)


def _prepare(model: torch.nn.Module) -> torch.nn.Module:
    # DiT drops labels itself in train mode with the global RNG; isles does label dropout in the task instead
    # (reproducible, same for both families), so switch the built-in one off. The null row stays in the table.
    from diffusers.models.embeddings import LabelEmbedding

    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model


def build_model(
    preset: str,
    channels: int,
    resolution: int,
    num_classes: int | None = None,
    text_width: int | None = None,
    frames: int | None = None,
) -> torch.nn.Module:
    """A freshly initialised diffusers model of `preset` for [channels, resolution, resolution] data (or clips of
    `frames` such frames)."""
    return _instantiate(model_config(preset, channels, resolution, num_classes, text_width, frames))


def is_dit(model: torch.nn.Module) -> bool:
    return type(model).__name__ == "DiTTransformer2DModel"


def is_text_model(model: torch.nn.Module) -> bool:
    return type(model).__name__ in TEXT_CLASSES


def is_video_model(model: torch.nn.Module) -> bool:
    return type(model).__name__ in VIDEO_CLASSES or folded_frames(model) is not None


def folded_frames(model: torch.nn.Module) -> int | None:
    """The frame count of a unet-frames model (a 2D UNet whose channels hold a clip's frames); None for others."""
    if type(model).__name__ != "UNet2DConditionModel":
        return None
    frames = model.config.get(FRAMES_KEY)
    return frames if isinstance(frames, int) and frames > 0 else None


def text_width_of(model: torch.nn.Module) -> int | None:
    """The caption embedding width a text model takes (None for class / unconditional models)."""
    if type(model).__name__ == "PixArtTransformer2DModel":
        return model.config.caption_channels
    if type(model).__name__ == "UNet2DConditionModel":
        return model.config.cross_attention_dim
    if type(model).__name__ == "WanTransformer3DModel":
        return model.config.text_dim
    return None


def model_num_classes(model: torch.nn.Module) -> int | None:
    """Number of real classes a model is conditioned on; None for an unconditional or text model."""
    if is_text_model(model):
        return None
    if is_dit(model):
        n = model.config.num_embeds_ada_norm
        return None if n == 1 else n
    n = model.config.num_class_embeds
    return None if n is None else n - 1


def null_class(model: torch.nn.Module) -> int | None:
    """The label index meaning "no label" (classifier-free guidance); None for an unconditional UNet or text model."""
    if is_text_model(model):
        return None
    if is_dit(model):
        return model.config.num_embeds_ada_norm
    n = model.config.num_class_embeds
    return None if n is None else n - 1


def model_forward(model: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond=None) -> torch.Tensor:
    """The model's raw output for x [B, C, H, W] (images) or [B, C, F, H, W] (clips) at timesteps [B] (0..1000).

    cond: class labels [B] for a class model (None: the null class, i.e. unconditional; labels equal to
    `null_class(model)` are allowed too), or a TextCondition for a text model (which always needs one: pass the empty
    caption's embedding for "no caption")."""
    from .conditioning import TextCondition

    timestep = timestep.reshape(-1).to(x.device)
    if timestep.numel() == 1 and x.shape[0] > 1:
        timestep = timestep.expand(x.shape[0])
    if is_text_model(model):
        if not isinstance(cond, TextCondition):
            raise IslesError("this model is text-conditioned: it needs a caption (a prompt), not a class")
        text = cond.to(x.device)
        if is_video_model(model):
            if x.ndim != 5:
                raise IslesError("this is a video model: it makes clips [C, F, H, W], not images")
            frames = folded_frames(model)
            if frames is not None:
                b, c, f, h, w = x.shape
                if f != frames:
                    raise IslesError(f"this model makes clips of {frames} frames, not {f}")
                return _unet_cond_forward(model, x.reshape(b, c * f, h, w), timestep, text).reshape(b, c, f, h, w)
            # Wan has no attention mask: like its own pipeline, zero the caption's padding tokens instead.
            emb = text.emb * text.mask.to(text.emb.dtype)[:, :, None]
            return model(x, timestep, encoder_hidden_states=emb, return_dict=False)[0]
        if x.ndim != 4:
            raise IslesError("this is an image model: it makes images [C, H, W], not clips")
        if type(model).__name__ == "UNet2DConditionModel":
            return _unet_cond_forward(model, x, timestep, text)
        return model(
            x,
            encoder_hidden_states=text.emb,
            timestep=timestep,
            encoder_attention_mask=text.mask,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]
    if isinstance(cond, TextCondition):
        raise IslesError("this model is not text-conditioned: it takes a class or nothing, not a prompt")
    class_labels = cond
    null = null_class(model)
    if class_labels is None and null is not None:
        class_labels = torch.full((x.shape[0],), null, dtype=torch.long, device=x.device)
    elif class_labels is not None:
        if null is None:
            raise IslesError("this model is unconditional: it takes no class labels")
        class_labels = class_labels.to(x.device, torch.long)
    if is_dit(model):
        return model(x, timestep=timestep, class_labels=class_labels, return_dict=False)[0]
    return model(x, timestep, class_labels=class_labels, return_dict=False)[0]


def _unet_cond_forward(model: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, text) -> torch.Tensor:
    return model(x, timestep, encoder_hidden_states=text.emb, encoder_attention_mask=text.mask, return_dict=False)[0]


def load_model(folder: str | Path) -> torch.nn.Module:
    """A model from a diffusers folder (config.json + diffusion_pytorch_model.safetensors), safetensors only."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise IslesError(f"no diffusers model in {folder} (config.json is missing)")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IslesError(f"{config_path} is not valid JSON ({exc})", hint="re-export or re-download it") from None
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    classes = _model_classes()
    if class_name not in classes:
        raise IslesError(
            f"{config_path}: unsupported model class {class_name!r}", hint=f"expected one of {list(classes)}"
        )
    if not (folder / "diffusion_pytorch_model.safetensors").is_file():
        raise IslesError(f"no weights in {folder} (diffusion_pytorch_model.safetensors is missing)")
    try:
        cls = classes[class_name]
        if getattr(cls, "_keep_in_fp32_modules", None):
            model = _load_strict(cls, folder)
        else:
            model = cls.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, TypeError, RuntimeError) as exc:  # weights that do not fit the config, bad fields
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise IslesError(f"cannot load the model in {folder}: {first}", hint="re-export or re-download it") from None
    return _prepare(model)


def _load_strict(cls: type, folder: Path) -> torch.nn.Module:
    """Build from config.json and load every weight exactly (no missing or extra key). For classes that keep modules in
    float32 (Wan), whose from_pretrained needs accelerate's low-memory loader; isles trains and samples in float32."""
    from safetensors.torch import load_file

    model = cls.from_config(cls.load_config(folder))
    model.load_state_dict(load_file(str(folder / "diffusion_pytorch_model.safetensors")), strict=True)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=64)
def preset_stats(
    preset: str,
    channels: int,
    resolution: int,
    num_classes: int | None = None,
    text_width: int | None = None,
    text_length: int = 77,
    frames: int | None = None,
) -> dict[str, int]:
    """Parameter count and training FLOPs per sample (forward + backward, counted by torch.utils.flop_counter);
    text models are counted with captions of text_length tokens (cross-attention grows with it).

    The model is built on the meta device, so even DiT-XL/2 costs no memory and no arithmetic to count.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from .conditioning import TextCondition

    config = model_config(preset, channels, resolution, num_classes, text_width, frames)
    with torch.device("meta"):
        model = _instantiate(config)
        x = torch.zeros(1, channels, *([frames] if frames else []), resolution, resolution)
        t = torch.zeros(1)
        if text_width is not None:
            cond = TextCondition(torch.zeros(1, text_length, text_width), torch.ones(1, text_length))
        else:
            cond = None if num_classes is None else torch.zeros(1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model_forward(model, x, t, cond)
        out.float().pow(2).mean().backward()
    return {"parameters": count_parameters(model), "train_flops_per_sample": int(counter.get_total_flops())}


def clip_shape(preset: str, latent_side: int = 32) -> tuple[int, int, int]:
    """(channels, frames, side) a video preset is measured at: the procedural set's 3x16x32x32 pixel clips for presets
    with 2-frame patches (wan-micro, wan-tiny), 8 such frames for unet-frames ones (what their widths hold), else
    Wan 2.1's VAE latents of a 17-frame 256x256 clip, 16x5x32x32."""
    p = get_preset(preset)
    if p.family == "unet-frames":
        return (3, 8, 32)
    return (3, 16, 32) if p.patch_frames > 1 else (16, 5, latent_side)


def describe_presets(
    channels: int = 4, resolution: int = 32, num_classes: int | None = 1000, text_width: int = 768
) -> list[dict]:
    """One row per preset for a data shape (default: the papers' 32x32x4 SD-VAE latents, ImageNet classes for class
    presets, 77 CLIP ViT-L/14 tokens of width 768 for text presets; clips for video presets, as the code says)."""
    rows = []
    for name, p in PRESETS.items():
        try:
            if p.family in VIDEO_FAMILIES:
                c, frames, side = clip_shape(name, resolution)
                stats = preset_stats(name, c, side, None, text_width, frames=frames)
            elif p.family in TEXT_FAMILIES:
                stats = preset_stats(name, channels, resolution, None, text_width)
            else:
                stats = preset_stats(name, channels, resolution, num_classes)
        except IslesError as exc:
            stats = {"error": exc.message}
        rows.append({"preset": name, "family": p.family, "note": p.note, **stats})
    return rows
