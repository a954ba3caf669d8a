"""The router: a small timestep-conditioned CNN r(x_t, t[, c]) -> K logits over the experts, where c is the class or,
for a text-aware router, the caption (its token embeddings mean-pooled, as MiniLM's sentence embedding is).
Clips [C, F, H, W] enter with their frames stacked as channels (early fusion): the first convolution sees motion.

It predicts which cluster the clean item of a noisy input came from. Saved as `config.json` + `model.safetensors`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from isles.experts.conditioning import TextCondition
from isles.protocol.errors import IslesError
from isles.protocol.files import atomic_write_bytes, atomic_write_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class RouterConfig:
    num_experts: int
    in_channels: int = 1
    resolution: int = 16
    # None: unconditional. With labels the router must see the class, since k-means clusters mix classes.
    num_classes: int | None = None
    width: int = 32  # channels of the first stage; doubled per downsampling stage
    stages: int = 2
    embed_dim: int = 128
    frames: int | None = None  # clips: frames per clip (items [C, F, H, W]); None: images
    # Text-aware: the width of the caption embeddings the router reads (None: it never sees the caption, as in the
    # papers). Motion and content clusters are hard to tell from a nearly pure-noise clip, and trivial from a prompt.
    text_dim: int | None = None

    def saved(self) -> dict:
        """config.json's keys. A text-blind router omits text_dim, so its config is the same as before text-aware
        routers existed (aggregators compare the keys exactly, and older releases lack it)."""
        out = {"_class_name": "IslesRouter", **asdict(self)}
        if self.text_dim is None:
            del out["text_dim"]
        return out


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 like a DDPM step index), as in the DDPM/DiT papers."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _Block(nn.Module):
    """Conv -> GroupNorm -> FiLM(t, c) -> SiLU, twice, with a residual connection."""

    def __init__(self, channels_in: int, channels_out: int, embed_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(min(8, channels_out), channels_out)
        self.film = nn.Linear(embed_dim, 2 * channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(8, channels_out), channels_out)
        self.skip = nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.norm1(self.conv1(x))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(h * (1 + scale) + shift)
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


def pooled_text(condition: TextCondition) -> torch.Tensor:
    """The mean of a caption's real token embeddings [B, D] (padding excluded)."""
    mask = condition.mask.to(condition.emb.dtype)[..., None]
    return (condition.emb * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class RouterModel(nn.Module):
    """r(x_t, t[, c]) -> logits [B, K]. c: class labels (index `num_classes`, or None, means "no class given"), or
    a TextCondition for a text-aware router (None: no caption, a zero pooled embedding as in training's dropout)."""

    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        # One extra row: the null class, for unconditional sampling from a class-aware router.
        self.class_embed = nn.Embedding(config.num_classes + 1, d) if config.num_classes else None
        self.text_proj = (
            nn.Sequential(nn.Linear(config.text_dim, d), nn.SiLU(), nn.Linear(d, d)) if config.text_dim else None
        )
        self.stem = nn.Conv2d(config.in_channels * (config.frames or 1), config.width, 3, padding=1)
        blocks, channels = [], config.width
        for stage in range(config.stages):
            out = config.width * (2**stage)
            blocks.append(_Block(channels, out, d))
            channels = out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(channels + d, config.num_experts))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition=None) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.config.embed_dim))
        class_labels = condition if isinstance(condition, torch.Tensor) else None
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full((x_t.shape[0],), self.config.num_classes, device=x_t.device)
            emb = emb + self.class_embed(class_labels.long())
        if self.text_proj is not None:
            if isinstance(condition, TextCondition):
                pooled = pooled_text(condition.to(x_t.device))
            else:
                pooled = torch.zeros(x_t.shape[0], self.config.text_dim, device=x_t.device)
            emb = emb + self.text_proj(pooled)
        if x_t.ndim == 5:  # [B, C, F, H, W] -> [B, C * F, H, W]
            x_t = x_t.flatten(1, 2)
        h = self.stem(x_t)
        for i, block in enumerate(self.blocks):
            h = block(h, emb)
            if i < len(self.blocks) - 1 and min(h.shape[-2:]) >= 2:
                h = F.avg_pool2d(h, 2)
        pooled = h.mean(dim=(-2, -1))
        return self.head(torch.cat([pooled, emb], dim=-1))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `config.json` and `model.safetensors` (both atomically) into `folder`."""
        from safetensors.torch import save

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write_bytes(folder / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
        atomic_write_json(folder / CONFIG_NAME, self.config.saved())

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> RouterModel:
        """Load a router saved by `save_pretrained`; a missing or unreadable file raises IslesError."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise IslesError(f"router file missing: {path}", hint="re-download or re-export the router")
        try:
            raw = json.loads(config_path.read_text())
            known = {f.name for f in fields(RouterConfig)}
            config = RouterConfig(**{k: v for k, v in raw.items() if k in known})
            model = cls(config)
            model.load_state_dict(load_file(str(weights_path), device="cpu"))
        except IslesError:
            raise
        except Exception as exc:
            raise IslesError(f"router at {folder} is unreadable: {exc}", hint="re-download or re-export it") from exc
        return model.to(device).eval()


# Named router sizes for the manifest's router recipe (the papers use a DiT-B/2: ~4% of the experts' FLOPs).
ROUTER_PRESETS: dict[str, dict[str, int]] = {
    "cnn-tiny": {"width": 16, "stages": 2, "embed_dim": 64},
    "cnn-small": {"width": 32, "stages": 2, "embed_dim": 128},
    "cnn-base": {"width": 64, "stages": 3, "embed_dim": 256},
}


def router_config(
    preset: str,
    num_experts: int,
    channels: int,
    resolution: int,
    num_classes: int | None,
    frames: int | None = None,
    text_dim: int | None = None,
) -> RouterConfig:
    """The RouterConfig of a named preset for data of this shape (clips of `frames` frames; class-aware when
    num_classes is given, text-aware when text_dim is)."""
    if preset not in ROUTER_PRESETS:
        raise IslesError(f"unknown router preset {preset!r}", hint=f"use one of: {', '.join(ROUTER_PRESETS)}")
    return RouterConfig(
        num_experts=num_experts,
        in_channels=channels,
        resolution=resolution,
        num_classes=num_classes,
        frames=frames,
        text_dim=text_dim,
        **ROUTER_PRESETS[preset],
    )
