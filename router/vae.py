"""Items <-> latents with a diffusers `AutoencoderKL` (Paris 1.0: stabilityai/sd-vae-ft-mse, 256 px -> 32x32x4), or
clips <-> latents with Wan 2.1's video `AutoencoderKLWan` (17 frames of 256x256 -> 16 x 5 x 32 x 32).

`codec = load_vae("hf:stabilityai/sd-vae-ft-mse")`; `z = codec.encode(uint8 pixels)` is unit-scale (the posterior
mean, shifted and scaled by the VAE's own factors: per channel for Wan); `codec.decode(z)` -> floats in [-1, 1].
A video VAE keeps the first frame and compresses each later `temporal_downsample` frames into one latent frame, so a
clip has 1 + k * temporal_downsample frames.
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

VAE_HINT = (
    "pass a diffusers AutoencoderKL (e.g. hf:stabilityai/sd-vae-ft-mse) or AutoencoderKLWan "
    "(e.g. hf:Wan-AI/Wan2.1-T2V-1.3B-Diffusers, its vae/ folder): hf:<id> or a local folder"
)
VIDEO_VAE_CLASS = "AutoencoderKLWan"
WAN_CHUNK_FRAMES = 4  # AutoencoderKLWan encodes the first frame, then the rest 4 frames at a time
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
    temporal_downsample: int = 1  # video VAEs: frames per latent frame after the first; 1 for image VAEs
    channel_mean: tuple[float, ...] | None = None  # video VAEs: per-channel latent statistics (Wan's latents_mean)
    channel_std: tuple[float, ...] | None = None

    @property
    def is_video(self) -> bool:
        return self.channel_mean is not None

    def to_dict(self) -> dict:
        out = asdict(self)
        if not self.is_video:  # image VAE records stay as they were
            for key in ("temporal_downsample", "channel_mean", "channel_std"):
                out.pop(key)
        else:
            out["channel_mean"], out["channel_std"] = list(self.channel_mean), list(self.channel_std)
        return out

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a clip of `frames` frames, which must be 1 + 4k: Wan's encoder reads the first frame alone,
        then chunks of 4 (WAN_CHUNK_FRAMES), each becoming 4 / temporal_downsample latent frames."""
        step = max(WAN_CHUNK_FRAMES, self.temporal_downsample)
        if (frames - 1) % step:
            raise IslesError(
                f"the video VAE takes clips of 1 + k * {step} frames, not {frames}",
                hint=f"use --frames {1 + step * max(1, (frames - 1) // step)} (Wan 2.1 samples 81)",
            )
        return 1 + (frames - 1) // self.temporal_downsample

    def clip_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.temporal_downsample

    @classmethod
    def from_dict(cls, d: dict) -> VaeSpec:
        try:
            revision = d.get("revision")
            mean, std = d.get("channel_mean"), d.get("channel_std")
            return cls(
                id=str(d["id"]),
                revision=None if revision is None else str(revision),
                scaling_factor=float(d["scaling_factor"]),
                shift_factor=float(d.get("shift_factor") or 0.0),
                latent_channels=int(d["latent_channels"]),
                downsample=int(d["downsample"]),
                temporal_downsample=int(d.get("temporal_downsample") or 1),
                channel_mean=None if mean is None else tuple(float(v) for v in mean),
                channel_std=None if std is None else tuple(float(v) for v in std),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IslesError(f"bad VAE record: {exc!r}", hint="re-create the file that holds it") from None


class LatentCodec:
    """A frozen VAE with its spec: uint8 pixels (or clips) -> unit-scale latents and back, batched, no grad."""

    def __init__(self, vae, spec: VaeSpec, device: torch.device, batch_size: int = BATCH_SIZE):
        self.vae, self.spec, self.device, self.batch_size = vae, spec, device, batch_size
        self.in_channels, self.out_channels = int(vae.config.in_channels), int(vae.config.out_channels)

    @torch.no_grad()
    def encode(self, pixels_uint8: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] uint8 -> float32 [B, c, H/d, W/d] = (posterior mean - shift) * scaling, on the CPU; clips
        [B, C, F, H, W] -> [B, c, 1 + (F - 1) / t, H/d, W/d] through a video VAE."""
        pixels = self._check_pixels(pixels_uint8)
        out = []
        for start in range(0, pixels.shape[0], self.batch_size):
            x = to_model_space(pixels[start : start + self.batch_size]).to(self.device)
            mean = self.vae.encode(x).latent_dist.mean  # the mean, not a sample: the same image, the same latent
            out.append(self._normalise(mean).float().cpu())
        if not out:
            d = self.spec.downsample
            frames = [self.spec.latent_frames(pixels.shape[2])] if self.spec.is_video else []
            return torch.zeros(0, self.spec.latent_channels, *frames, pixels.shape[-2] // d, pixels.shape[-1] // d)
        return torch.cat(out)

    def _channel_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1) + (1,) * (like.ndim - 2)
        mean = torch.tensor(self.spec.channel_mean, device=like.device, dtype=like.dtype).reshape(shape)
        std = torch.tensor(self.spec.channel_std, device=like.device, dtype=like.dtype).reshape(shape)
        return mean, std

    def _normalise(self, mean: torch.Tensor) -> torch.Tensor:
        if self.spec.is_video:  # Wan: z = (mu - latents_mean) / latents_std, channel by channel
            channel_mean, channel_std = self._channel_stats(mean)
            return (mean - channel_mean) / channel_std
        return (mean - self.spec.shift_factor) * self.spec.scaling_factor

    def _denormalise(self, z: torch.Tensor) -> torch.Tensor:
        if self.spec.is_video:
            channel_mean, channel_std = self._channel_stats(z)
            return z * channel_std + channel_mean
        return z / self.spec.scaling_factor + self.spec.shift_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unit-scale latents [B, c, h, w] -> float32 images in [-1, 1], [B, C, h*d, w*d], on the CPU (a video VAE:
        [B, c, f, h, w] -> clips [B, C, 1 + (f - 1) t, h*d, w*d])."""
        ndim = 5 if self.spec.is_video else 4
        if latents.ndim != ndim or latents.shape[1] != self.spec.latent_channels:
            layout = "f, h, w" if self.spec.is_video else "h, w"
            raise IslesError(
                f"the VAE decodes [B, {self.spec.latent_channels}, {layout}] latents, got {list(latents.shape)}",
                hint="decode latents made by the same VAE",
            )
        out = []
        for start in range(0, latents.shape[0], self.batch_size):
            z = self._denormalise(latents[start : start + self.batch_size].to(self.device, torch.float32))
            out.append(self.vae.decode(z).sample.float().clamp(-1, 1).cpu())
        if not out:
            d = self.spec.downsample
            frames = [self.spec.clip_frames(latents.shape[2])] if self.spec.is_video else []
            return torch.zeros(0, self.out_channels, *frames, latents.shape[-2] * d, latents.shape[-1] * d)
        return torch.cat(out)

    def _check_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        ndim, layout = (5, "clips [B, C, F, H, W]") if self.spec.is_video else (4, "pixels [B, C, H, W]")
        if pixels.dtype != torch.uint8 or pixels.ndim != ndim:
            kind = "a video VAE: it encodes clips" if self.spec.is_video else "an image VAE: it encodes images"
            raise IslesError(
                f"the VAE encodes uint8 {layout}, got {pixels.dtype} {list(pixels.shape)}",
                hint=f"this is {kind}, not latents",
            )
        if self.spec.is_video:
            self.spec.latent_frames(pixels.shape[2])  # 1 + k * t frames, or a clear error
        if pixels.shape[1] == 1 and self.in_channels == 3:  # grayscale: the same image on every channel
            pixels = pixels.expand(-1, 3, *pixels.shape[2:])
        if pixels.shape[1] != self.in_channels:
            raise IslesError(
                f"the VAE takes {self.in_channels}-channel images, these have {pixels.shape[1]}",
                hint="use a VAE that matches the data's channels",
            )
        d = self.spec.downsample
        if pixels.shape[-2] % d or pixels.shape[-1] % d:
            raise IslesError(
                f"{pixels.shape[-2]}x{pixels.shape[-1]} images do not divide into the VAE's {d}x{d} latent cells",
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
    revision = source.pinned_revision(f"{subfolder}/config.json" if subfolder else "config.json")
    if type(vae).__name__ == VIDEO_VAE_CLASS:
        spec = VaeSpec(
            id=source.spec_id if source.hub else name,
            revision=revision,
            scaling_factor=1.0,
            shift_factor=0.0,
            latent_channels=int(config.z_dim),
            downsample=2 ** (len(config.dim_mult) - 1),
            temporal_downsample=2 ** sum(bool(t) for t in config.temperal_downsample),  # diffusers' spelling
            channel_mean=tuple(float(v) for v in config.latents_mean),
            channel_std=tuple(float(v) for v in config.latents_std),
        )
        if len(spec.channel_mean) != spec.latent_channels or len(spec.channel_std) != spec.latent_channels:
            raise IslesError(f"VAE {name}: latents_mean/std do not have z_dim entries", hint=VAE_HINT)
    else:
        spec = VaeSpec(
            id=source.spec_id if source.hub else name,
            revision=revision,
            scaling_factor=float(config.scaling_factor),
            shift_factor=float(getattr(config, "shift_factor", None) or 0.0),
            latent_channels=int(config.latent_channels),
            downsample=2 ** (len(config.block_out_channels) - 1),
        )
    return LatentCodec(vae.to(torch_device).eval().requires_grad_(False), spec, torch_device)


def _load_autoencoder(source: ModelSource, subfolder: str | None):
    from diffusers import AutoencoderKL, AutoencoderKLWan

    kwargs = source.load_kwargs()
    if subfolder is not None:
        kwargs["subfolder"] = subfolder
    config = AutoencoderKL.load_config(source.path, **kwargs)  # reads config.json only: which class to build
    cls = AutoencoderKLWan if config.get("_class_name") == VIDEO_VAE_CLASS else AutoencoderKL
    # Low-memory loading needs `accelerate`; asking for it without accelerate only earns a warning on every load.
    low_cpu_mem_usage = importlib.util.find_spec("accelerate") is not None
    with warnings.catch_warnings():  # diffusers still passes huggingface_hub an argument it has deprecated
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        return cls.from_pretrained(source.path, use_safetensors=True, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)


def load_recorded_vae(record: dict, device: str | torch.device | None = None) -> LatentCodec:
    """The VAE a manifest, ensemble.json or expert.json records."""
    spec = VaeSpec.from_dict(record)
    return load_vae(spec.id, revision=spec.revision, device=device)
