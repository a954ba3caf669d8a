"""Image encoders that turn items into feature vectors for clustering: pixels + PCA (built in, no download), and
DINOv2 / CLIP through `transformers` (optional: `pip install isles[real]`), imported only when asked for. Clips are
embedded as their frames' pooled embeddings plus motion features (`ClipEncoder`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional as F

from isles.protocol.errors import IslesError

ENCODERS_HELP = "pixels, pixels:D (PCA to D dims), dinov2, clip, or hf:<model id>"
HF_ALIASES = {"dinov2": "facebook/dinov2-small", "clip": "openai/clip-vit-base-patch32"}


def to_float_images(items: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [B,C,H,W] -> float in [-1, 1]; float items (latents) pass through unchanged."""
    if items.dtype == torch.uint8:
        return items.float() / 127.5 - 1.0
    return items.float()


class PixelPCAEncoder:
    """Downsampled pixels projected on their first principal components. Fitted on a seeded sample of the data."""

    name = "pixels"

    def __init__(self, dim: int = 32, size: int = 16, fit_items: int = 20000, seed: int = 0):
        self.dim, self.size, self.fit_items, self.seed = dim, size, fit_items, seed
        self.mean: np.ndarray | None = None
        self.components: np.ndarray | None = None

    def _flat(self, batch: torch.Tensor) -> np.ndarray:
        x = to_float_images(batch)
        if x.shape[-1] > self.size or x.shape[-2] > self.size:
            x = F.adaptive_avg_pool2d(x, (min(self.size, x.shape[-2]), min(self.size, x.shape[-1])))
        return x.reshape(x.shape[0], -1).numpy().astype(np.float64)

    def fit(self, items: torch.Tensor) -> None:
        n = items.shape[0]
        rng = np.random.default_rng(self.seed)
        idx = np.sort(rng.choice(n, size=min(n, self.fit_items), replace=False))
        x = self._flat(items[torch.from_numpy(idx)])
        self.mean = x.mean(axis=0)
        # SVD of the centred sample: rows of vt are the principal directions.
        _, _, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.components = vt[: min(self.dim, vt.shape[0])]

    def encode(self, batch: torch.Tensor) -> np.ndarray:
        if self.components is None:
            raise RuntimeError("PixelPCAEncoder.encode before fit")
        return ((self._flat(batch) - self.mean) @ self.components.T).astype(np.float32)


class HFImageEncoder:
    """A self-supervised image encoder from the Hub (DINOv2 CLS token, or CLIP image embedding), L2-normalised."""

    def __init__(self, model_id: str, device: str | torch.device = "cpu"):
        try:
            import transformers
        except ImportError as exc:
            raise IslesError(
                f"encoder {model_id!r} needs the transformers package", hint="pip install 'isles[real]'"
            ) from exc
        self.name = model_id
        self.device = torch.device(device)
        self.processor = transformers.AutoImageProcessor.from_pretrained(model_id)
        self.model = transformers.AutoModel.from_pretrained(model_id, use_safetensors=True).to(self.device).eval()
        self.is_clip = hasattr(self.model, "get_image_features")

    def fit(self, items: torch.Tensor) -> None:  # pretrained: nothing to fit
        return None

    @torch.no_grad()
    def encode(self, batch: torch.Tensor) -> np.ndarray:
        if batch.dtype != torch.uint8:
            raise IslesError(
                f"encoder {self.name!r} needs pixel images, the data holds latents", hint="use --encoder pixels"
            )
        if batch.shape[1] == 1:
            batch = batch.expand(-1, 3, -1, -1)
        images = [img.permute(1, 2, 0).numpy() for img in batch]
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        if self.is_clip:
            features = self.model.get_image_features(**inputs)
        else:
            features = self.model(**inputs).last_hidden_state[:, 0]
        return F.normalize(features.float(), dim=-1).cpu().numpy()


class ClipEncoder:
    """Clips [B, C, F, H, W] -> [frame embedding pooled over `pool_frames` evenly spaced frames ; motion features]:
    the PCA of each clip's last frame minus its first (a moving item leaves a signed trail, a growing one a ring, a
    colour change a colour shift). Each half is scaled to unit mean norm at fit, so content and motion weigh alike in
    k-means."""

    def __init__(self, frame_encoder, motion_dim: int = 16, pool_frames: int = 4, seed: int = 0):
        self.frame_encoder = frame_encoder
        self.name = f"{getattr(frame_encoder, 'name', 'frames')}+motion"
        self.motion = PixelPCAEncoder(dim=motion_dim, seed=seed)
        self.pool_frames = pool_frames
        # Clips held back to fit the PCAs (each gives pool_frames frames to the frame encoder's own fit).
        self.fit_items = max(1, min(getattr(frame_encoder, "fit_items", 0), 4000))
        self.scales = (1.0, 1.0)

    def _frames(self, clips: torch.Tensor) -> torch.Tensor:
        f = clips.shape[2]
        pick = torch.linspace(0, f - 1, min(self.pool_frames, f)).round().long()
        return clips[:, :, pick].transpose(1, 2).reshape(-1, clips.shape[1], *clips.shape[3:])

    @staticmethod
    def _change(clips: torch.Tensor) -> torch.Tensor:
        x = to_float_images(clips)
        return (x[:, :, -1] - x[:, :, 0]) / 2  # in [-1, 1] like an image

    def _parts(self, clips: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        frames = self.frame_encoder.encode(self._frames(clips))
        pooled = frames.reshape(clips.shape[0], -1, frames.shape[-1]).mean(axis=1)
        return pooled, self.motion.encode(self._change(clips))

    def fit(self, items: torch.Tensor) -> None:
        if items.ndim != 5:
            raise IslesError(f"ClipEncoder embeds clips [N, C, F, H, W], got {list(items.shape)}")
        self.frame_encoder.fit(self._frames(items))
        self.motion.fit(self._change(items))
        pooled, motion = self._parts(items[: min(len(items), 1024)])
        norm = lambda a: float(np.linalg.norm(a, axis=1).mean()) or 1.0  # noqa: E731
        self.scales = (norm(pooled), norm(motion))

    def encode(self, batch: torch.Tensor) -> np.ndarray:
        pooled, motion = self._parts(batch)
        return np.concatenate([pooled / self.scales[0], motion / self.scales[1]], axis=1).astype(np.float32)


def make_encoder(spec: str, device: str | torch.device = "cpu", seed: int = 0):
    """'pixels' | 'pixels:D' | 'dinov2' | 'clip' | 'hf:<model id>' -> an encoder with fit() and encode()."""
    name = spec.strip()
    if name == "pixels" or name.startswith("pixels:"):
        dim = 32
        if ":" in name:
            try:
                dim = int(name.split(":", 1)[1])
            except ValueError:
                dim = 0
            if dim < 1:
                raise IslesError(f"bad encoder {spec!r}", hint=f"use one of: {ENCODERS_HELP}")
        return PixelPCAEncoder(dim=dim, seed=seed)
    if name in HF_ALIASES:
        return HFImageEncoder(HF_ALIASES[name], device=device)
    if name.startswith("hf:") and len(name) > 3:
        return HFImageEncoder(name[3:], device=device)
    raise IslesError(f"unknown encoder {spec!r}", hint=f"use one of: {ENCODERS_HELP}")


def embed_items(
    items: torch.Tensor,
    encoder,
    batch_size: int = 1024,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Fit the encoder if it needs it, then encode `items` in batches; `on_batch(n)` reports progress."""
    encoder.fit(items)
    chunks = []
    for start in range(0, items.shape[0], batch_size):
        batch = items[start : start + batch_size]
        chunks.append(encoder.encode(batch))
        if on_batch is not None:
            on_batch(batch.shape[0])
    return np.concatenate(chunks, axis=0)
