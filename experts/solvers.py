"""ODE solvers for sampling in flow-matching velocity space: dx/dt = v(x, t), from t = 1 (noise) to t = 0 (data).

`euler` is isles' own loop (uniform steps, one velocity call each); `heun`, `dpm++2m` and `unipc` are diffusers'
flow-matching schedulers (FlowMatchHeunDiscreteScheduler; DPMSolverMultistepScheduler and UniPCMultistepScheduler
with flow sigmas and flow_prediction), which take the same velocity v = eps - x0 on the same path x_t = (1-t) x0 +
t eps. Heun is second order with two calls a step (the last step to t = 0 is Euler); the multistep solvers are second
order with one call a step, reusing the previous velocity.

    x0 = integrate(velocity, x1, solver="dpm++2m", steps=20)   # velocity(x, t [B]) -> v
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from isles.protocol.errors import IslesError

SOLVERS = ("euler", "heun", "dpm++2m", "unipc")
SOLVER_HELP = "euler (1 call a step), heun (2 calls a step), dpm++2m or unipc (second-order multistep, 1 call a step)"

# velocity(x [B, ...], t [B]) -> v [B, ...]
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_solver(name: str) -> str:
    text = name.strip().lower()
    if text not in SOLVERS:
        raise IslesError(f"unknown sampler {name!r}", hint=f"use one of: {SOLVER_HELP}")
    return text


def calls_per_sample(solver: str, steps: int) -> int:
    """Velocity evaluations the solver makes for `steps` steps (each is one call of every routed expert)."""
    return 2 * steps - 1 if check_solver(solver) == "heun" else steps


def _scheduler(solver: str):
    """A diffusers flow-matching scheduler on the plain path (no timestep shift), ending at t = 0."""
    if solver == "heun":
        from diffusers import FlowMatchHeunDiscreteScheduler

        return FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    common = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0, solver_order=2,
                  final_sigmas_type="zero", lower_order_final=True)  # fmt: skip
    if solver == "dpm++2m":
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **common)
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(**common)


def integrate(
    velocity: Velocity,
    x: torch.Tensor,
    *,
    solver: str = "euler",
    steps: int = 30,
    callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Integrate from x at t = 1 to t = 0 in `steps` steps; `callback(i)` runs after each velocity call."""
    solver = check_solver(solver)
    if steps < 1:
        raise IslesError(f"steps must be at least 1, got {steps}", hint="use --steps 30")
    batch = x.shape[0]
    if solver == "euler":
        times = torch.linspace(1.0, 0.0, steps + 1)
        for i in range(steps):
            v = velocity(x, torch.full((batch,), float(times[i]), device=x.device))
            x = x + float(times[i + 1] - times[i]) * v  # dt < 0: toward the data
            if callback is not None:
                callback(i)
        return x
    scheduler = _scheduler(solver)
    scheduler.set_timesteps(steps, device="cpu")
    if solver != "heun":
        # The multistep schedulers' own grid starts at t = 1 - 1/1000: the noise would be taken for a point 0.001
        # away. Their update rules read the grid from these two tensors, so give them the whole path, 1 -> 0.
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        scheduler.sigmas = grid.to(scheduler.sigmas.dtype)
        scheduler.timesteps = grid[:-1] * 1000
    sigmas = scheduler.sigmas  # the sigma (t) of the i-th velocity call is sigmas[i] for these schedulers
    dtype = x.dtype
    for i, timestep in enumerate(scheduler.timesteps):
        v = velocity(x, torch.full((batch,), float(sigmas[i]), device=x.device)).to(dtype)
        x = scheduler.step(v, timestep, x, return_dict=False)[0].to(dtype)
        if callback is not None:
            callback(i)
    return x
