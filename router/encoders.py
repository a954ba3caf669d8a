"""Image encoders that turn items into feature vectors for clustering: pixels + PCA (built in, no download), and
DINOv2 / CLIP through `transformers` (optional: `pip install isles[real]`), imported only when asked for.
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
