"""Optional pre-encoding of an image shard into VAE latents (diffusers AutoencoderKL): experts train in latent space.

`encode_shard(shard, vae)` -> a float ShardData of latents times the VAE's scaling factor (unit scale);
`decode_latents(latents, vae)` -> images in [-1, 1]. The VAE's identity goes in the shard's meta["latent"].
"""

from __future__ import annotations

from pathlib import Path

import torch

from isles.protocol.errors import IslesError

from .data import ShardData, to_model_space


def load_vae(name_or_folder: str | Path, device: torch.device | str = "cpu"):
    """An AutoencoderKL from a local diffusers folder or a Hub name (e.g. stabilityai/sd-vae-ft-mse), safetensors."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(str(name_or_folder), use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise IslesError(f"cannot load the VAE {name_or_folder!r}: {exc}", hint="pass an AutoencoderKL") from None
    return vae.to(device).eval().requires_grad_(False)


def _scaling(vae) -> tuple[float, float]:
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return float(vae.config.scaling_factor), float(shift)


@torch.no_grad()
def encode_shard(shard: ShardData, vae, batch_size: int = 32, vae_name: str | None = None) -> ShardData:
    """Encode every image of a uint8 shard to latents (the posterior mean, deterministic) at unit scale."""
    if shard.is_latent:
        raise IslesError("this shard already holds latents")
    if shard.shape[0] != vae.config.in_channels:
        raise IslesError(
            f"the VAE takes {vae.config.in_channels}-channel images but the shard's have {shard.shape[0]}",
            hint="use a VAE that matches the data's channels",
        )
    device = next(vae.parameters()).device
    scale, shift = _scaling(vae)
    out = []
    for start in range(0, len(shard), batch_size):
        x = to_model_space(shard.items[start : start + batch_size]).to(device)
        mean = vae.encode(x).latent_dist.mean
        out.append(((mean - shift) * scale).float().cpu())
    latents = torch.cat(out)
    latent_meta = {
        "vae": vae_name or getattr(vae.config, "_name_or_path", None) or "AutoencoderKL",
        "scaling_factor": scale,
        "shift_factor": shift,
        "image_shape": list(shard.shape),
    }
    return ShardData(
        items=latents.contiguous(),
        labels=shard.labels,
        clusters=shard.clusters,
        val_mask=shard.val_mask,
        meta={**shard.meta, "latent": latent_meta},
    )


@torch.no_grad()
def decode_latents(latents: torch.Tensor, vae, batch_size: int = 32) -> torch.Tensor:
    """Unit-scale latents -> images in [-1, 1] (float, on the CPU)."""
    device = next(vae.parameters()).device
    scale, shift = _scaling(vae)
    out = []
    for start in range(0, latents.shape[0], batch_size):
        z = latents[start : start + batch_size].to(device, torch.float32) / scale + shift
        out.append(vae.decode(z).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)
