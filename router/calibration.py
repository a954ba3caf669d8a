"""Calibrated mixing: weigh each expert by the router's probability and by how reliable the expert measured to be at
the current noise level.

The aggregator measures every accepted expert's velocity error on its shard's held-out items per noise-level bin
(`ExpertTask.velocity_errors`; DDPM experts converted as the ensemble samples them) and publishes it in the expert's
expert.json ("velocity_mse_by_t"). At sampling time the reliability of expert k at t is 1 / mse_k(t), linear in t
between bin centres, and the weights are

    w_k(x_t, t) = p_k(x_t, t) r_k(t) / sum_j p_j(x_t, t) r_j(t)

the inverse-variance weighting of independent estimates, tilted by the router. Where every expert is equally reliable
it is the router's distribution; a DDPM expert whose converted velocity is poor at high noise loses weight there.
Top-k and thresholds then apply to the calibrated distribution (`--routing calibrated:top1`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from isles.protocol.errors import IslesError

PROFILE_KEY = "velocity_mse_by_t"  # in expert.json: [mse of bin 0, ...], bin j covering t in [j/M, (j+1)/M)
MAX_BINS = 100
_MSE_FLOOR = 1e-6  # an expert that measured (near) zero error must not take every weight at that t


def check_profile(profile, where: str) -> list[float]:
    """A published profile, validated: a list of 1..MAX_BINS finite, non-negative numbers."""
    if (
        not isinstance(profile, list)
        or not 1 <= len(profile) <= MAX_BINS
        or not all(isinstance(v, (int, float)) and v >= 0 and v == v and v != float("inf") for v in profile)
    ):
        raise IslesError(
            f"{where}: {PROFILE_KEY} is not a list of up to {MAX_BINS} finite non-negative numbers",
            hint="re-publish the ensemble with a current aggregator",
        )
    return [float(v) for v in profile]


class Reliability:
    """Per-expert reliability 1 / mse_k(t) from measured profiles [K, M]; rows of missing experts are ignored."""

    def __init__(self, profiles: Sequence[Sequence[float] | None]):
        known = [p for p in profiles if p is not None]
        if not known:
            raise IslesError("no expert of the ensemble has a measured velocity error", hint="use another routing")
        bins = len(known[0])
        if any(len(p) != bins for p in known):
            raise IslesError("the experts' velocity-error profiles have different bin counts")
        fill = [1.0] * bins  # a missing expert: never weighted anyway (its router probability is 0)
        self.mse = torch.tensor([list(p) if p is not None else fill for p in profiles], dtype=torch.float64)
        self.centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins

    def at(self, t: torch.Tensor) -> torch.Tensor:
        """[B, K] reliabilities at times t [B], interpolated linearly between bin centres (constant beyond)."""
        t = t.detach().to("cpu", torch.float64).clamp(float(self.centres[0]), float(self.centres[-1]))
        m = len(self.centres)
        pos = ((t * m) - 0.5).clamp(0, m - 1)
        lo = pos.floor().long().clamp(max=m - 1)
        hi = (lo + 1).clamp(max=m - 1)
        frac = (pos - lo.double())[:, None]
        mse = self.mse[:, lo].T * (1 - frac) + self.mse[:, hi].T * frac  # [B, K]
        return 1.0 / mse.clamp_min(_MSE_FLOOR)


def calibrated_probabilities(probs: torch.Tensor, reliability: torch.Tensor) -> torch.Tensor:
    """p_k r_k / sum_j p_j r_j for router probabilities [B, K] and reliabilities [B, K]; each row sums to one."""
    weighted = probs.double() * reliability.to(probs.device, torch.float64)
    total = weighted.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, weighted / total.clamp_min(1e-300), probs.double()).to(probs.dtype)
