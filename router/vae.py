"""Items <-> latents with a diffusers `AutoencoderKL` (Paris 1.0: stabilityai/sd-vae-ft-mse, 256 px -> 32x32x4).

`codec = load_vae("hf:stabilityai/sd-vae-ft-mse")`; `z = codec.encode(uint8 pixels)` is unit-scale (the posterior
mean, shifted and scaled by the VAE's own factors); `codec.decode(z)` -> float images in [-1, 1].
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import asdict, dataclass

import torch

from isles.experts.data import to_model_space
from isles.experts.device import pick_device
from isles.protocol.errors import IslesError

from .pretrained import ModelSource, load_error, resolve_source

VAE_HINT = "pass a diffusers AutoencoderKL: hf:<id> (e.g. hf:stabilityai/sd-vae-ft-mse) or a local folder"
BATCH_SIZE = 64


@dataclass(frozen=True)
class VaeSpec:
    """What the run manifest and ensemble.json record: which VAE, and how its latents were brought to unit scale."""

    id: str  # "hf:<repo id>" or a local folder path as given
    revision: str | None  # the resolved commit for Hub ids, None for local folders
    scaling_factor: float  # z = (mean - shift_factor) * scaling_factor has roughly unit variance
    shift_factor: float  # 0.0 for SD-1/2 VAEs; nonzero for SD3 / FLUX ones
    latent_channels: int
    downsample: int  # pixels per latent along each side: 2 ** (len(block_out_channels) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VaeSpec:
        try:
            revision = d.get("revision")
            return cls(
                id=str(d["id"]),
                revision=None if revision is None else str(revision),
                scaling_factor=float(d["scaling_factor"]),
                shift_factor=float(d.get("shift_factor") or 0.0),
                latent_channels=int(d["latent_channels"]),
                downsample=int(d["downsample"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IslesError(f"bad VAE record: {exc!r}", hint="re-create the file that holds it") from None


class LatentCodec:
    """A frozen AutoencoderKL with its spec: uint8 pixels -> unit-scale latents and back, batched, no grad."""

    def __init__(self, vae, spec: VaeSpec, device: torch.device, batch_size: int = BATCH_SIZE):
        self.vae, self.spec, self.device, self.batch_size = vae, spec, device, batch_size
        self.in_channels, self.out_channels = int(vae.config.in_channels), int(vae.config.out_channels)

    @torch.no_grad()
    def encode(self, pixels_uint8: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] uint8 -> float32 [B, c, H/d, W/d] = (posterior mean - shift) * scaling, on the CPU."""
        pixels = self._check_pixels(pixels_uint8)
        out = []
        for start in range(0, pixels.shape[0], self.batch_size):
            x = to_model_space(pixels[start : start + self.batch_size]).to(self.device)
            mean = self.vae.encode(x).latent_dist.mean  # the mean, not a sample: the same image, the same latent
            out.append(((mean - self.spec.shift_factor) * self.spec.scaling_factor).float().cpu())
        if not out:
            d = self.spec.downsample
            return torch.zeros(0, self.spec.latent_channels, pixels.shape[2] // d, pixels.shape[3] // d)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unit-scale latents [B, c, h, w] -> float32 images in [-1, 1], [B, C, h*d, w*d], on the CPU."""
        if latents.ndim != 4 or latents.shape[1] != self.spec.latent_channels:
            raise IslesError(
                f"the VAE decodes [B, {self.spec.latent_channels}, h, w] latents, got {list(latents.shape)}",
                hint="decode latents made by the same VAE",
            )
        out = []
        for start in range(0, latents.shape[0], self.batch_size):
            z = latents[start : start + self.batch_size].to(self.device, torch.float32)
            z = z / self.spec.scaling_factor + self.spec.shift_factor
            out.append(self.vae.decode(z).sample.float().clamp(-1, 1).cpu())
        if not out:
            d = self.spec.downsample
            return torch.zeros(0, self.out_channels, latents.shape[2] * d, latents.shape[3] * d)
        return torch.cat(out)

    def _check_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype != torch.uint8 or pixels.ndim != 4:
            raise IslesError(
                f"the VAE encodes uint8 pixels [B, C, H, W], got {pixels.dtype} {list(pixels.shape)}",
                hint="encode images, not latents",
            )
        if pixels.shape[1] == 1 and self.in_channels == 3:  # grayscale: the same image on every channel
            pixels = pixels.expand(-1, 3, -1, -1)
        if pixels.shape[1] != self.in_channels:
            raise IslesError(
                f"the VAE takes {self.in_channels}-channel images, these have {pixels.shape[1]}",
                hint="use a VAE that matches the data's channels",
            )
        d = self.spec.downsample
        if pixels.shape[2] % d or pixels.shape[3] % d:
            raise IslesError(
                f"{pixels.shape[2]}x{pixels.shape[3]} images do not divide into the VAE's {d}x{d} latent cells",
                hint=f"resize the images to a multiple of {d}",
            )
        return pixels


def load_vae(name: str, *, revision: str | None = None, device: str | torch.device | None = None) -> LatentCodec:
    """'hf:<id>' | a repo id | a local folder -> a LatentCodec (safetensors weights only).

    A diffusers pipeline (a folder or repo with a `vae/` subfolder, like stabilityai/stable-diffusion-*) gives its VAE.
    """
    name = name.strip()
    source = resolve_source(name, revision, "VAE", VAE_HINT)
    torch_device = pick_device(str(device) if device is not None else None)
    subfolder = "vae" if source.has_file("vae/config.json") else None
    try:
        vae = _load_autoencoder(source, subfolder)
    except Exception as exc:  # missing files, not an AutoencoderKL, pickle-only weights, network: one line
        raise load_error("VAE", name, source, exc, VAE_HINT) from None
    config = vae.config
    spec = VaeSpec(
        id=source.spec_id if source.hub else name,
        revision=source.pinned_revision(f"{subfolder}/config.json" if subfolder else "config.json"),
        scaling_factor=float(config.scaling_factor),
        shift_factor=float(getattr(config, "shift_factor", None) or 0.0),
        latent_channels=int(config.latent_channels),
        downsample=2 ** (len(config.block_out_channels) - 1),
    )
    return LatentCodec(vae.to(torch_device).eval().requires_grad_(False), spec, torch_device)


def _load_autoencoder(source: ModelSource, subfolder: str | None):
    from diffusers import AutoencoderKL

    kwargs = source.load_kwargs()
    if subfolder is not None:
        kwargs["subfolder"] = subfolder
    # Low-memory loading needs `accelerate`; asking for it without accelerate only earns a warning on every load.
    low_cpu_mem_usage = importlib.util.find_spec("accelerate") is not None
    with warnings.catch_warnings():  # diffusers still passes huggingface_hub an argument it has deprecated
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        return AutoencoderKL.from_pretrained(
            source.path, use_safetensors=True, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs
        )


def load_recorded_vae(record: dict, device: str | torch.device | None = None) -> LatentCodec:
    """The VAE a manifest, ensemble.json or expert.json records."""
    spec = VaeSpec.from_dict(record)
    return load_vae(spec.id, revision=spec.revision, device=device)
