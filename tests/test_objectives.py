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


def optimal_ddpm_v(x_s: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """E[sqrt(ab) eps - sqrt(1-ab) x0 | x_s] on the cosine schedule (v prediction, Salimans & Ho 2022)."""
    ab = cosine_alpha_bar((timestep / TIMESTEP_SCALE).to(x_s.dtype)).view(-1, 1, 1, 1)
    a, b = ab.sqrt(), (1 - ab).sqrt()
    e_eps = optimal_ddpm(x_s, timestep)
    return a * e_eps - b * (x_s - b * e_eps) / a.clamp_min(1e-12)


def test_optimal_ddpm_and_fm_experts_give_the_same_velocity_at_every_t():
    gen = torch.Generator().manual_seed(0)
    t = torch.cat([torch.tensor([0.0, 1e-4, 0.5, 0.98, 0.99]), torch.linspace(0.01, 0.97, 40)]).double()
    x0 = MU + SIGMA * torch.randn(len(t), 2, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v_fm = expert_velocity("fm", optimal_fm, x_t, t)
    v_ddpm = expert_velocity("ddpm", optimal_ddpm, x_t, t)
    torch.testing.assert_close(v_ddpm, v_fm, rtol=1e-6, atol=1e-6)
    inner = t < 0.99  # at t = 1 alpha_bar = 0 and this closed form of E[v_vp] divides by it; the expert does not
    v_ddpm_v = expert_velocity("ddpm-v", optimal_ddpm_v, x_t[inner], t[inner])
    torch.testing.assert_close(v_ddpm_v, v_fm[inner], rtol=1e-6, atol=1e-6)


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


@pytest.mark.parametrize("objective", ["fm", "ddpm", "ddpm-v"])
def test_the_optimal_expert_has_the_lowest_loss_and_losses_are_reproducible(objective):
    optimal = {"fm": optimal_fm, "ddpm": optimal_ddpm, "ddpm-v": optimal_ddpm_v}[objective]
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


def test_a_v_prediction_experts_velocity_error_stays_bounded_at_high_noise_without_guards():
    """v = eps_hat - x0_hat = (s - a) x_vp + (a + s) v_hat: an error in v_hat reaches the velocity at most sqrt(2)
    times at any t, where eps prediction's grows as 1 / (1 - t)."""
    gen = torch.Generator().manual_seed(5)
    x0 = MU + SIGMA * torch.randn(256, 1, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    for t_value in (0.1, 0.5, 0.9, 0.99):
        t = torch.full((256,), t_value, dtype=torch.float64)
        x_t = (1 - t_value) * x0 + t_value * eps
        error = 0.1 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        exact = expert_velocity("ddpm-v", optimal_ddpm_v, x_t, t, clip_x0=None)
        noisy_v = expert_velocity("ddpm-v", lambda x, ts, e=error: optimal_ddpm_v(x, ts) + e, x_t, t, clip_x0=None)
        noisy_eps = expert_velocity("ddpm", lambda x, ts, e=error: optimal_ddpm(x, ts) + e, x_t, t, clip_x0=None,
                                    rescale_above=None)  # fmt: skip
        v_error = (noisy_v - exact).pow(2).mean().sqrt() / error.pow(2).mean().sqrt()
        eps_error = noisy_eps - expert_velocity("ddpm", optimal_ddpm, x_t, t, clip_x0=None, rescale_above=None)
        assert 1.0 - 1e-9 <= v_error <= 2**0.5 + 1e-9, t_value
        assert eps_error.pow(2).mean().sqrt() / error.pow(2).mean().sqrt() >= 1 / (1 - t_value) - 1e-6, t_value
