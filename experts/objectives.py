"""Training objectives and the one common velocity space every expert is sampled in (see DOMAIN.md).

Time: flow-matching path x_t = (1 - t) x0 + t eps, t in [0, 1], t = 1 is pure noise, velocity v = eps - x0.
Data is scaled to [-1, 1] (pixels) or is unit-scale VAE latents. Model timesteps are continuous, `1000 * s`.
Objectives: "fm" (flow matching, velocity), "ddpm" (DDPM's cosine schedule, eps prediction, as in the DDM paper) and
"ddpm-v" (the same schedule and process, v prediction: Salimans & Ho 2022, the parameterisation of SD 2 and Imagen
Video). An eps expert's velocity carries its error times 1 / (1 - t), unbounded at high noise; a v expert's at most
sqrt(2) times, so a DDPM expert can sit in a flow-matching ensemble without the guards (`expert_velocity`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

OBJECTIVES = ("fm", "ddpm", "ddpm-v")
TIMESTEP_SCALE = 1000.0  # models see timesteps in [0, 1000], the range diffusers' sinusoidal embeddings expect
_COSINE_OFFSET = 0.008  # Nichol & Dhariwal (2021), eq. 17
_MIN_ONE_MINUS_T = 0.01  # DOMAIN.md: x0_hat = (x_t - t * eps_hat) / max(1 - t, 0.01)
# The heterogeneous-objective paper's guards on the eps -> velocity conversion (DOMAIN.md): x0_hat clamped to [-1, 1]
# for pixels (their range) and [-20, 20] for latents, and the velocity rescaled above t = 0.85, where x0_hat carries
# eps_hat's error times t / (1 - t). The summary gives no formula for the rescale. Ours scales x0_hat down, per item,
# to RMS 1 where it is larger: both pixels and isles' normalised latents are unit-scale, and at high noise the exact
# E[x0 | x_t] shrinks toward the data mean, so an exact expert is left alone (tests/test_ensemble.py). Since
# v = (x_t - x0_hat) / t, this bounds the velocity's error where the conversion amplifies it most.
PIXEL_X0_CLAMP, LATENT_X0_CLAMP = 1.0, 20.0
RESCALE_ABOVE_T = 0.85
_X0_RMS_CAP = 1.0


def x0_clamp(latent: bool) -> float:
    """The x0_hat clamp of DDPM experts: the data's range for pixels, the paper's [-20, 20] for latents."""
    return LATENT_X0_CLAMP if latent else PIXEL_X0_CLAMP


ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_in, timestep [B]) -> raw model output


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        from isles.protocol.errors import IslesError

        raise IslesError(f"unknown objective {objective!r}", hint=f"use one of: {', '.join(OBJECTIVES)}")
    return objective


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


# --- DDPM cosine schedule, continuous in s in [0, 1] ------------------------------------------------------------


def cosine_alpha_bar(s: torch.Tensor) -> torch.Tensor:
    """alpha_bar(s) = f(s) / f(0), f(s) = cos^2((s + 0.008) / 1.008 * pi / 2) (Nichol & Dhariwal, eq. 17)."""
    f = torch.cos((s + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2
    f0 = math.cos(_COSINE_OFFSET / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2
    return (f / f0).clamp(0.0, 1.0)


def cosine_s_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """The inverse of `cosine_alpha_bar`: the schedule position with this alpha_bar."""
    f0 = math.cos(_COSINE_OFFSET / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2
    angle = torch.arccos(torch.sqrt((alpha_bar * f0).clamp(0.0, 1.0)))
    return (angle * 2 / math.pi * (1 + _COSINE_OFFSET) - _COSINE_OFFSET).clamp(0.0, 1.0)


def ddpm_input(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map a point of the flow path to the DDPM expert's own input at the same signal-to-noise ratio.

    alpha_bar = (1-t)^2 / ((1-t)^2 + t^2) and x_vp = x_t / sqrt((1-t)^2 + t^2), so that
    x_vp = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps with the same x0 and eps. Returns (x_vp, timestep).
    """
    t = t.to(torch.float64)
    norm = torch.sqrt((1 - t) ** 2 + t**2)
    alpha_bar = (1 - t) ** 2 / norm**2
    s = cosine_s_from_alpha_bar(alpha_bar)
    x_vp = x_t / _expand(norm, x_t)
    out_dtype = x_t.dtype if x_t.dtype == torch.float64 else torch.float32  # float64 only for exactness checks
    return x_vp, (s * TIMESTEP_SCALE).to(out_dtype)


# --- the common velocity space -----------------------------------------------------------------------------------


def expert_velocity(
    objective: str,
    model_fn: ModelFn,
    x_t: torch.Tensor,
    t: torch.Tensor,
    clip_x0: float | None = PIXEL_X0_CLAMP,
    rescale_above: float | None = RESCALE_ABOVE_T,
) -> torch.Tensor:
    """The velocity v = eps - x0 an expert predicts at (x_t, t), whatever objective it was trained with.

    fm: the model predicts v directly at timestep 1000 t.
    ddpm: evaluate at the SNR-matched input (`ddpm_input`), then x0_hat = (x_t - t eps_hat) / max(1 - t, 0.01),
    clamped to [-clip_x0, clip_x0] (`x0_clamp`; None: unclamped); above t = rescale_above (None: never) each item's
    x0_hat is scaled down to RMS 1 where it is larger; v = eps_hat - x0_hat.
    ddpm-v: at the same input the model predicts v_vp = a eps - s x0 (a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar)),
    so x0_hat = a x_vp - s v_vp and eps_hat = s x_vp + a v_vp, exact at every t; x0_hat is clamped as for ddpm (the
    rescale guards an amplification that v prediction does not have); v = eps_hat - x0_hat.
    """
    check_objective(objective)
    t = t.to(x_t.device, torch.float64 if x_t.dtype == torch.float64 else torch.float32)
    if objective == "fm":
        return model_fn(x_t, t * TIMESTEP_SCALE)
    x_vp, timestep = ddpm_input(x_t, t)
    x_vp = x_vp.to(x_t.dtype)
    out = model_fn(x_vp, timestep.to(x_t.device)).to(x_t.dtype)
    te = _expand(t, x_t)
    if objective == "ddpm-v":
        # a = (1 - t) / norm and s = t / norm at the SNR-matched point (`ddpm_input`)
        norm = te.square().add(te.neg().add(1).square()).sqrt()
        a, s = te.neg().add(1) / norm, te / norm
        eps_hat, x0_hat = s * x_vp + a * out, a * x_vp - s * out
        if clip_x0 is not None:
            x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
        return eps_hat - x0_hat
    eps_hat = out
    x0_hat = (x_t - te * eps_hat) / te.neg().add(1).clamp_min(_MIN_ONE_MINUS_T)
    if clip_x0 is not None:
        x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
    if rescale_above is not None:
        rms = x0_hat.flatten(1).pow(2).mean(1).sqrt()
        cap = torch.where(t > rescale_above, (_X0_RMS_CAP / rms.clamp_min(1e-12)).clamp(max=1.0), 1.0)
        x0_hat = x0_hat * _expand(cap, x0_hat)
    return eps_hat - x0_hat


# --- training losses ---------------------------------------------------------------------------------------------


def draw_noise(x0: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The randomness of one loss evaluation: t ~ U(0, 1) per item and eps ~ N(0, I), drawn on the generator's
    device (CPU by default, so a run is reproducible on any accelerator) and moved to x0's device."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    t = torch.rand(x0.shape[0], generator=generator, device=gen_device)
    eps = torch.randn(x0.shape, generator=generator, device=gen_device)
    return t.to(x0.device), eps.to(x0.device, x0.dtype)


def loss_at(objective: str, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The objective's mean squared error for given clean data, times and noise.

    fm (Lipman et al. 2023; Liu et al. 2023): x_t = (1 - t) x0 + t eps, target v = eps - x0.
    ddpm (Ho et al. 2020, eq. 14, cosine schedule): x_s = sqrt(ab(s)) x0 + sqrt(1 - ab(s)) eps, target eps; here
    the uniform draw t plays the role of the schedule position s.
    ddpm-v: the same x_s, target v = sqrt(ab(s)) eps - sqrt(1 - ab(s)) x0 (Salimans & Ho 2022).
    """
    check_objective(objective)
    te = _expand(t, x0)
    if objective == "fm":
        x_t = (1 - te) * x0 + te * eps
        target = eps - x0
        pred = model_fn(x_t, t * TIMESTEP_SCALE)
    else:
        ab = _expand(cosine_alpha_bar(t.float()), x0)
        x_s = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        target = eps if objective == "ddpm" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
        pred = model_fn(x_s, t * TIMESTEP_SCALE)
    return torch.mean((pred.float() - target.float()) ** 2)


def training_loss(
    objective: str, model_fn: ModelFn, x0: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """One Monte-Carlo estimate of the objective's loss on a batch of clean data x0 (scalar)."""
    t, eps = draw_noise(x0, generator)
    return loss_at(objective, model_fn, x0, t, eps)


# --- sampling ----------------------------------------------------------------------------------------------------


def sample_flow(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    steps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    solver: str = "euler",
) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data) in `steps` steps of `solver` (experts/solvers.py);
    returns x0. `velocity_fn(x_t, t)` takes t as a float tensor [B]; the noise is drawn on `generator`'s device and
    moved."""
    from .solvers import integrate

    gen_device = generator.device if generator is not None else torch.device("cpu")
    x = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device or gen_device)
    return integrate(lambda x_t, t: velocity_fn(x_t, t).to(x_t.dtype), x, solver=solver, steps=steps)
