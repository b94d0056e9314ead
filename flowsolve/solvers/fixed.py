"""One-step deterministic and churned solvers: Euler, Heun (EDM Alg. 1), EDM's stochastic sampler (Alg. 2)."""

from __future__ import annotations

import math

import torch

from .base import Run
from ..errors import ArgumentError


def euler(run: Run, x: torch.Tensor) -> torch.Tensor:
    """x_{i+1} = x_i + (t_{i+1} − t_i) v(x_i, t_i): first order, one evaluation per step."""
    t = run.times
    for i in run.steps():
        x = x + (t[i + 1] - t[i]) * run.f(x, i)
        run.tick(i, x)
    return x


def flow_map(run: Run, x: torch.Tensor) -> torch.Tensor:
    """x_{i+1} = x_i + (t_{i+1} − t_i) ū(x_i, t_i, t_{i+1}): a flow-map model's own transitions (AnyFlow's
    FlowMapEulerDiscreteScheduler; MeanFlow's one- and few-step sampling), one evaluation per step,
    exact at any step count where the map is (`fs.sample` refuses fields that are not flow maps)."""
    for i in run.steps():
        x = run.jump(x, i)
        run.tick(i, x)
    return x


def _heun_step(run: Run, x: torch.Tensor, d: torch.Tensor, h: float, i_next: int) -> torch.Tensor:
    """Euler predictor, trapezoidal corrector at grid point i_next; plain Euler when the field is
    singular there (σ = 0)."""
    x_next = x + h * d
    if run.evaluable[i_next]:
        x_next = x + (0.5 * h) * (d + run.f(x_next, i_next))
    return x_next


def heun(run: Run, x: torch.Tensor) -> torch.Tensor:
    """EDM's second-order step (Karras et al. 2022, Alg. 1), Euler on a last step to σ = 0."""
    t = run.times
    for i in run.steps():
        x = _heun_step(run, x, run.f(x, i), t[i + 1] - t[i], i + 1)
        run.tick(i, x)
    return x


def edm(
    run: Run,
    x: torch.Tensor,
    *,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
) -> torch.Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2): raise σ_i to σ̂ = (1 + γ_i) σ_i by adding
    fresh noise, γ_i = min(S_churn/N, √2 − 1) for σ_i ∈ [S_min, S_max], then a Heun step to σ_{i+1}."""
    for name, v in (("S_churn", S_churn), ("S_min", S_min), ("S_noise", S_noise)):
        if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
            raise ArgumentError(f"{name}: expected a finite number >= 0, got {v!r}")
    if not run.field.time_is_sigma:
        raise ArgumentError(
            f"solver: 'edm' churns the noise level σ of an EDM-time field; "
            f"{type(run.field).__name__} is not one (use heun, or sde)"
        )
    if not S_max >= S_min:
        raise ArgumentError(f"S_max: expected a number >= S_min={S_min}, got {S_max!r}")
    t = run.times
    N = len(t) - 1
    gamma_max = min(S_churn / N, math.sqrt(2.0) - 1.0)
    for i in run.steps():
        gamma = gamma_max if S_min <= t[i] <= S_max else 0.0
        t_hat = t[i] + gamma * t[i]
        if gamma > 0:
            x = x + (math.sqrt(t_hat**2 - t[i] ** 2) * S_noise) * run.noise()
            d = run.f_at(x, t_hat)
        else:
            d = run.f(x, i)
        x = _heun_step(run, x, d, t[i + 1] - t_hat, i + 1)
        run.tick(i, x)
    return x
