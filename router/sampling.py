"""Ensemble sampling in flow-matching velocity space: routing modes and the sampler that mixes experts.

x_t = (1-t) x0 + t eps, t=1 is noise; each expert gives a velocity v_k(x_t, t) = eps - x0 (DDPM experts are converted
by their objective first), the router gives p(k | x_t, t[, c]), and an ODE solver (experts/solvers.py: Euler, Heun,
multistep) integrates sum_k w_k v_k with w from p, or from p and each expert's measured reliability at t
(router/calibration.py).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from isles.experts.conditioning import TextCondition, cat_conditions
from isles.experts.solvers import integrate
from isles.protocol.errors import IslesError

from .calibration import Reliability, calibrated_probabilities

# velocity_fn(x_t [B,...], t [B], condition) -> v [B,...]; condition: class labels [B], a TextCondition, or None
VelocityFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
# router_fn(x_t, t, condition) -> logits [B, K] (the router may ignore the condition, as the papers' does)
RouterFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]

ROUTING_HELP = (
    "top1, top2, topk:K, full, or threshold:P (every expert with p >= P, at least the most probable); "
    "calibrated[:MODE] weighs the router by each expert's measured reliability at t first (e.g. calibrated:top1)"
)


@dataclass(frozen=True)
class Routing:
    """How router probabilities become mixing weights. `mode` is one of top-k, full and threshold; `calibrated`
    reweighs the probabilities by each expert's measured reliability at t before the mode applies."""

    mode: str  # "topk" | "full" | "threshold"
    k: int = 1
    p: float = 0.0
    calibrated: bool = False

    def __str__(self) -> str:
        plain = {"topk": f"top{self.k}", "full": "full", "threshold": f"threshold:{self.p:g}"}[self.mode]
        if self.calibrated:
            return "calibrated" if self.mode == "full" else f"calibrated:{plain}"
        return plain


def parse_routing(spec: str) -> Routing:
    """'top1', 'top2', 'topk:3', 'full', 'threshold:0.2', 'calibrated', 'calibrated:top2' -> Routing; anything else
    raises IslesError."""
    text = spec.strip().lower()
    if text == "calibrated":
        return Routing("full", calibrated=True)
    if text.startswith("calibrated:") and not text[len("calibrated:") :].startswith("calibrated"):
        return dataclasses.replace(parse_routing(text[len("calibrated:") :]), calibrated=True)
    if text == "full":
        return Routing("full")
    if match := re.fullmatch(r"top(?:k:|-|_)?(\d+)", text):
        k = int(match.group(1))
        if k >= 1:
            return Routing("topk", k=k)
    if match := re.fullmatch(r"threshold:([0-9]*\.?[0-9]+)", text):
        p = float(match.group(1))
        if 0.0 <= p <= 1.0:
            return Routing("threshold", p=p)
    raise IslesError(f"unknown routing mode {spec!r}", hint=f"use one of: {ROUTING_HELP}")


def router_probabilities(logits: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """softmax over the experts present only: a partial ensemble renormalises the router over what it has."""
    logits = logits.float()
    if present is not None:
        if not bool(present.any()):
            raise IslesError("the ensemble has no experts", hint="publish at least one expert before sampling")
        logits = logits.masked_fill(~present.to(logits.device)[None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)


def routing_weights(probs: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Mixing weights [B, K] from probabilities [B, K]: zero outside the chosen experts, each row sums to one."""
    if routing.mode == "full":
        weights = probs.clone()
    elif routing.mode == "topk":
        # Missing experts have probability 0: if chosen they get weight 0, so top-k degrades to the present ones.
        top = probs.topk(min(routing.k, probs.shape[-1]), dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
    elif routing.mode == "threshold":
        keep = probs >= routing.p
        keep.scatter_(-1, probs.argmax(dim=-1, keepdim=True), True)  # never an empty set
        weights = torch.where(keep, probs, torch.zeros_like(probs))
    else:
        raise IslesError(f"unknown routing mode {routing.mode!r}", hint=f"use one of: {ROUTING_HELP}")
    return weights / weights.sum(dim=-1, keepdim=True)


def guided(velocity_fn: VelocityFn, guidance_scale: float, null) -> VelocityFn:
    """Classifier-free guidance on one expert, before mixing: v = v(null) + w (v(c) - v(null)), in one forward pass
    over [c; null]. `null` is the null class index (class models) or the empty caption's TextCondition (one row)."""
    if guidance_scale == 1.0 or null is None:
        return velocity_fn

    def fn(x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        if cond is None:
            return velocity_fn(x_t, t, None)
        if isinstance(cond, TextCondition):
            uncond_input = null.expand(len(cond)).to(x_t.device)
        else:
            uncond_input = torch.full_like(cond, null)
        both = velocity_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_conditions(cond, uncond_input))
        v_cond, v_uncond = both.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    return fn


def mixed_velocity(
    experts: Sequence[VelocityFn | None],
    weights: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    class_labels=None,
) -> torch.Tensor:
    """sum_k w_k v_k(x_t, t); each expert runs only on the rows that give it a non-zero weight. `class_labels` is the
    experts' condition: class labels [B] or a TextCondition."""
    out = torch.zeros_like(x_t, dtype=torch.float32)
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    for k, fn in enumerate(experts):
        rows = (weights[:, k] > 0).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        if fn is None:
            raise IslesError(f"expert_{k} is missing but was given weight", hint="renormalise over present experts")
        labels = class_labels[rows] if class_labels is not None else None
        v = fn(x_t[rows], t[rows], labels).float()
        out[rows] += weights[rows, k].reshape(shape) * v
    return out


@dataclass
class SampleResult:
    images: torch.Tensor  # [B, C, H, W] in the data scale, [-1, 1] for pixels (decoded when the ensemble has a VAE)
    weights: torch.Tensor | None = None  # [calls, B, K] mixing weights of each velocity call (one per Euler step)
    times: torch.Tensor | None = None  # [calls] the t of each call
    latents: torch.Tensor | None = None  # what the experts produced, before the VAE decoded it (latent ensembles)

    @property
    def choices(self) -> torch.Tensor | None:
        """[steps, B]: the expert with the largest weight at each step (the one that served it under top-1)."""
        return None if self.weights is None else self.weights.argmax(dim=-1)


@torch.no_grad()
def sample_ensemble(
    experts: Sequence[VelocityFn | None],
    router: RouterFn,
    shape: tuple[int, ...],
    *,
    steps: int = 30,
    routing: Routing | str = "top1",
    class_labels=None,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    return_routing: bool = False,
    callback: Callable[[int], None] | None = None,
    solver: str = "euler",
    reliability: Reliability | None = None,
) -> SampleResult:
    """Integrate from t=1 (noise) to t=0 the routed mixture of expert velocities with `solver` (experts/solvers.py);
    seeded through `generator`.

    `experts[k]` is None where expert k is missing; the router is renormalised over the others. `class_labels` is
    the condition passed to the experts and the router: class labels [B], a TextCondition, or None. A calibrated
    routing needs `reliability` (router/calibration.py). `callback(i)` runs after the solver's i-th velocity call
    (a progress bar's tick; Heun makes 2 steps - 1 of them).
    """
    routing = parse_routing(routing) if isinstance(routing, str) else routing
    if routing.calibrated and reliability is None:
        raise IslesError(
            "calibrated routing needs each expert's measured velocity error, and this ensemble has none",
            hint="re-publish it with a current aggregator, or use top1",
        )
    present = torch.tensor([fn is not None for fn in experts], dtype=torch.bool)
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    if class_labels is not None:
        class_labels = class_labels.to(device)
    trace, times = [], []

    def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        probs = router_probabilities(router(x_t, t, class_labels), present.to(x_t.device))
        if routing.calibrated:
            probs = calibrated_probabilities(probs, reliability.at(t))
        weights = routing_weights(probs, routing)
        if return_routing:
            trace.append(weights.cpu())
            times.append(float(t[0]))
        return mixed_velocity(experts, weights, x_t, t, class_labels)

    x = integrate(velocity, x, solver=solver, steps=steps, callback=callback)
    return SampleResult(
        images=x,
        weights=torch.stack(trace) if return_routing else None,
        times=torch.tensor(times) if return_routing else None,
    )
