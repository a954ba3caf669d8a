"""Sample-quality metrics: Frechet distance (FID) on feature statistics, class accuracy and diversity.

FID here is computed on the features of a small classifier trained by router/features.py (for the built-in data sets);
`inception_fid` gives the standard Inception FID for real images through torch-fidelity (`pip install isles[fid]`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import linalg

from isles.protocol.errors import IslesError

# Added to both covariances: dead feature units make them singular and sqrtm unstable (the usual FID fix, scaled up
# because our reference sets are small and our features few).
DEFAULT_EPS = 1e-6


def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] of features [N, D], in float64."""
    x = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise IslesError(
            f"need at least 2 feature vectors [N, D] for FID, got shape {tuple(x.shape)}",
            hint="evaluate with more samples (--n)",
        )
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = DEFAULT_EPS
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Frechet distance between two Gaussians.

    eps * I is added to both covariances before the matrix square root (Heusel et al. 2017; Dowson & Landau 1982).
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise IslesError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape}", hint="use one feature network")
    offset = np.eye(s1.shape[0]) * eps
    s1, s2 = s1 + offset, s2 + offset
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # sqrtm failed on a near-singular product: retry with a larger jitter
        offset = np.eye(s1.shape[0]) * max(eps, 1e-6) * 1e3
        s1, s2 = s1 + offset, s2 + offset  # the traces below must be of the same jittered covariances
        covmean = linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)  # tiny imaginary parts are numerical noise of sqrtm
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def fid(
    features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray, eps: float = DEFAULT_EPS
) -> float:
    """FID between two sets of features [N, D] (use the same N on both sides: FID is biased by the sample count)."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b), eps=eps)


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of class-conditional samples the classifier assigns to the class they were asked for."""
    if len(labels) == 0:
        return math.nan
    return float((logits.argmax(dim=-1).cpu() == labels.cpu()).float().mean())


def class_entropy(logits: torch.Tensor, num_classes: int) -> float:
    """Entropy of the predicted-class histogram over log(num_classes): 1 = every class equally often, 0 = one class.

    Mode collapse onto a few classes shows here even for unconditional models.
    """
    counts = torch.bincount(logits.argmax(dim=-1).cpu(), minlength=num_classes).double()
    p = counts / counts.sum().clamp_min(1)
    h = -(p[p > 0] * p[p > 0].log()).sum()
    return float(h / math.log(num_classes)) if num_classes > 1 else 0.0


def diversity(features: torch.Tensor, max_items: int = 1000) -> float:
    """Mean pairwise L2 distance between feature vectors (on the first `max_items`): low means near-duplicates.

    Compare with the same number on real items; the ratio is what matters.
    """
    x = features[:max_items].double().cpu()
    n = len(x)
    if n < 2:
        return 0.0
    d = torch.cdist(x, x)
    return float(d.sum() / (n * (n - 1)))


def inception_fid(generated: torch.Tensor, reference: torch.Tensor, device: str | None = None) -> float:
    """Standard Inception-v3 FID between two uint8 image sets [N, 3, H, W] via torch-fidelity (optional extra).

    torch-fidelity downloads the Inception weights on first use; meant for real-image runs, not the built-in sets.
    """
    try:
        import torch_fidelity
    except ImportError:
        raise IslesError(
            "Inception FID needs the optional torch-fidelity package", hint="pip install 'isles[fid]'"
        ) from None

    class _Images(torch.utils.data.Dataset):
        def __init__(self, x: torch.Tensor):
            self.x = x if x.shape[1] == 3 else x.expand(-1, 3, -1, -1)

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> torch.Tensor:
            return self.x[i]

    if generated.dtype != torch.uint8 or reference.dtype != torch.uint8:
        raise IslesError("Inception FID takes uint8 images", hint="convert samples with to_uint8() first")
    metrics = torch_fidelity.calculate_metrics(
        input1=_Images(generated.cpu()),
        input2=_Images(reference.cpu()),
        fid=True,
        cuda=(device or "").startswith("cuda") or (device is None and torch.cuda.is_available()),
        verbose=False,
    )
    return float(metrics["frechet_inception_distance"])


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model-space images in [-1, 1] -> uint8 pixels in [0, 255]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_model_space(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (the data scaling the objectives assume)."""
    return pixels.float() / 127.5 - 1.0
