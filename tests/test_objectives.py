"""Objectives: the DDPM -> velocity conversion is exact for analytically optimal experts, and sampling works."""

from __future__ import annotations

import pytest
import torch

from isles.experts.objectives import (
    TIMESTEP_SCALE,
    cosine_alpha_bar,
    ddpm_input,
    expert_velocity,
    loss_at,
    sample_flow,
    training_loss,
)
from isles.protocol.errors import IslesError

MU, SIGMA = 0.3, 0.2  # data x0 ~ N(MU, SIGMA^2 I): every optimal prediction has a closed form


def optimal_fm(x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """E[eps - x0 | x_t] for x_t = (1-t) x0 + t eps (jointly Gaussian)."""
    t = (timestep / TIMESTEP_SCALE).to(x_t.dtype).view(-1, 1, 1, 1)
    var = (1 - t) ** 2 * SIGMA**2 + t**2
    centred = x_t - (1 - t) * MU
    e_eps = t / var * centred
    e_x0 = MU + (1 - t) * SIGMA**2 / var * centred
    return e_eps - e_x0


def optimal_ddpm(x_s: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """E[eps | x_s] for x_s = sqrt(ab) x0 + sqrt(1-ab) eps on the cosine schedule at position timestep / 1000."""
    ab = cosine_alpha_bar((timestep / TIMESTEP_SCALE).to(x_s.dtype)).view(-1, 1, 1, 1)
    a, b = ab.sqrt(), (1 - ab).sqrt()
    return b / (a**2 * SIGMA**2 + b**2) * (x_s - a * MU)


def test_optimal_ddpm_and_fm_experts_give_the_same_velocity_at_every_t():
    gen = torch.Generator().manual_seed(0)
    t = torch.cat([torch.tensor([0.0, 1e-4, 0.5, 0.98, 0.99]), torch.linspace(0.01, 0.97, 40)]).double()
    x0 = MU + SIGMA * torch.randn(len(t), 2, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v_fm = expert_velocity("fm", optimal_fm, x_t, t)
    v_ddpm = expert_velocity("ddpm", optimal_ddpm, x_t, t)
    torch.testing.assert_close(v_ddpm, v_fm, rtol=1e-6, atol=1e-6)


def test_float32_conversion_is_exact_to_float_tolerance():
    # Below t ~ 0.02 float32 cannot resolve sqrt(1 - alpha_bar) of the cosine schedule itself; float64 is exact.
    gen = torch.Generator().manual_seed(1)
    t = torch.linspace(0.02, 0.95, 64)
    x_t = (1 - t.view(-1, 1, 1, 1)) * (MU + SIGMA * torch.randn(64, 1, 8, 8, generator=gen))
    x_t = x_t + t.view(-1, 1, 1, 1) * torch.randn(64, 1, 8, 8, generator=gen)
    torch.testing.assert_close(
        expert_velocity("ddpm", optimal_ddpm, x_t, t), expert_velocity("fm", optimal_fm, x_t, t), rtol=1e-3, atol=1e-3
    )


def test_ddpm_input_matches_the_signal_to_noise_ratio_of_the_flow_path():
    x0, eps = torch.randn(5, 3, 2, 2, dtype=torch.float64), torch.randn(5, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    x_vp, timestep = ddpm_input(x_t, t)
    ab = cosine_alpha_bar(timestep / TIMESTEP_SCALE).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_vp, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    assert timestep[0] == 0 and timestep[-1] == TIMESTEP_SCALE


def test_euler_sampling_with_the_optimal_velocity_recovers_the_data_distribution():
    gen = torch.Generator().manual_seed(2)
    x = sample_flow(lambda x, t: optimal_fm(x, t * TIMESTEP_SCALE), (4096, 1, 2, 2), steps=100, generator=gen)
    assert abs(x.mean().item() - MU) < 0.01
    assert abs(x.std().item() - SIGMA) < 0.01


@pytest.mark.parametrize("objective", ["fm", "ddpm"])
def test_the_optimal_expert_has_the_lowest_loss_and_losses_are_reproducible(objective):
    optimal = optimal_fm if objective == "fm" else optimal_ddpm
    x0 = MU + SIGMA * torch.randn(512, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    loss = training_loss(objective, optimal, x0, torch.Generator().manual_seed(4))
    again = training_loss(objective, optimal, x0, torch.Generator().manual_seed(4))
    worse = training_loss(objective, lambda x, ts: optimal(x, ts) * 1.2, x0, torch.Generator().manual_seed(4))
    assert loss == again and loss < worse
    t = torch.rand(512, generator=torch.Generator().manual_seed(4))
    assert loss_at(objective, optimal, x0, t, torch.zeros_like(x0)).ndim == 0


def test_unknown_objective_is_a_user_error():
    with pytest.raises(IslesError, match="unknown objective"):
        expert_velocity("edm", optimal_fm, torch.zeros(1, 1, 2, 2), torch.zeros(1))


def test_the_papers_guards_bound_a_noisy_ddpm_experts_velocity_at_high_noise():
    """x0_hat = (x_t - t eps_hat) / (1 - t) carries eps_hat's error times t / (1 - t); the guards (x0_hat clamped,
    its RMS capped at 1 above t = 0.85) keep the velocity's error bounded there, and leave low noise alone."""
    from isles.experts.objectives import LATENT_X0_CLAMP, x0_clamp

    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((64, 4, 8, 8), 0.5)
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.full((64,), 0.97)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    noisy = lambda x, ts: optimal_ddpm(x, ts) + 0.3 * torch.randn(x.shape, generator=gen)  # noqa: E731
    truth = eps - x0
    for latent in (False, True):
        unguarded = expert_velocity("ddpm", noisy, x_t, t, clip_x0=None, rescale_above=None)
        guarded = expert_velocity("ddpm", noisy, x_t, t, clip_x0=x0_clamp(latent))
        assert (guarded - truth).pow(2).mean() < 0.2 * (unguarded - truth).pow(2).mean(), latent
    assert x0_clamp(True) == LATENT_X0_CLAMP == 20.0 and x0_clamp(False) == 1.0
    low = torch.full((64,), 0.3)  # below 0.85 the RMS cap does not apply: only the clamp
    x_low = (1 - low.view(-1, 1, 1, 1)) * x0 + low.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(
        expert_velocity("ddpm", optimal_ddpm, x_low, low, clip_x0=None),
        expert_velocity("ddpm", optimal_ddpm, x_low, low, clip_x0=None, rescale_above=None),
    )
