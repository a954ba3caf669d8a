"""The ODE solvers (experts/solvers.py) integrate a known velocity field to its exact solution: a Gaussian's flow has
a closed form, a Gaussian mixture's is integrated with 20,000 Euler steps as the reference. Higher-order solvers get
closer than Euler at the same number of velocity calls. Run: pytest tests/test_solvers.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from isles.experts.solvers import SOLVERS, calls_per_sample, check_solver, integrate
from isles.protocol.errors import IslesError


def gaussian_velocity(mu: torch.Tensor, s: float):
    """E[eps - x0 | x_t] for x0 ~ N(mu, s^2 I) on x_t = (1-t) x0 + t eps."""

    def v(x, t):
        t = t.reshape(-1, 1).to(x.dtype)
        mean, var = (1 - t) * mu, (1 - t) ** 2 * s**2 + t**2
        return (t - (1 - t) * s**2) / var * (x - mean) - mu

    return v


def mixture_velocity(mus, sigmas, weights):
    """The same for a mixture: each component's velocity weighted by its posterior at (x_t, t)."""

    def v(x, t):
        t = t.reshape(-1, 1).to(x.dtype)
        logs, vs = [], []
        for mu, s, w in zip(mus, sigmas, weights, strict=True):
            mean, var = (1 - t) * mu, (1 - t) ** 2 * s**2 + t**2
            logs.append((math.log(w) - 0.5 * ((x - mean) ** 2 / var + torch.log(var))).sum(-1, keepdim=True))
            vs.append((t - (1 - t) * s**2) / var * (x - mean) - mu)
        return (torch.softmax(torch.stack(logs), 0) * torch.stack(vs)).sum(0)

    return v


NOISE = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
MU, S = torch.tensor([0.5, -1.0]), 0.3
MIXTURE = mixture_velocity([torch.tensor([1.0, 1.0]), torch.tensor([-1.0, -0.5])], [0.3, 0.5], [0.4, 0.6])


@pytest.mark.parametrize("solver,tolerance", [("euler", 0.06), ("heun", 0.002), ("dpm++2m", 0.01), ("unipc", 0.01)])
def test_each_solver_integrates_a_gaussians_flow_to_its_exact_solution(solver, tolerance):
    exact = MU + S * NOISE  # the flow of a Gaussian is affine: noise z lands on mu + s z
    out = integrate(gaussian_velocity(MU, S), NOISE.clone(), solver=solver, steps=50)
    assert float((out - exact).abs().max()) < tolerance


def test_higher_order_solvers_beat_euler_at_equal_velocity_calls_on_a_mixture():
    reference = integrate(MIXTURE, NOISE.clone(), solver="euler", steps=20_000)

    def error(solver, steps):
        return float((integrate(MIXTURE, NOISE.clone(), solver=solver, steps=steps) - reference).abs().mean())

    euler = error("euler", 40)
    assert error("heun", 20) < euler / 3  # 39 calls
    assert error("dpm++2m", 40) < euler / 3 and error("unipc", 40) < euler / 3
    for solver in SOLVERS:  # every solver converges to the reference
        assert error(solver, 50) < 0.02, solver


def test_solvers_call_the_velocity_as_often_as_they_say_from_t_1_to_0():
    for solver in SOLVERS:
        times = []

        def v(x, t, times=times):
            times.append(float(t[0]))
            return torch.zeros_like(x)

        ticks = []
        integrate(v, torch.zeros(3, 2), solver=solver, steps=10, callback=ticks.append)
        assert len(times) == len(ticks) == calls_per_sample(solver, 10), solver
        assert times[0] == 1.0 and min(times) >= 0.0 and times == sorted(times, reverse=True), (solver, times)


def test_an_unknown_sampler_is_one_clear_error():
    with pytest.raises(IslesError, match="unknown sampler") as info:
        check_solver("rk45")
    assert "euler" in info.value.hint
    with pytest.raises(IslesError, match="at least 1"):
        integrate(MIXTURE, NOISE.clone(), solver="heun", steps=0)
