"""One-step deterministic and churned solvers: Euler, Heun (EDM Alg. 1), EDM's stochastic sampler (Alg. 2)."""

from __future__ import annotations

import math

import torch

from .base import PathGrid, Run
from ..errors import ArgumentError


def euler(run: Run, x: torch.Tensor) -> torch.Tensor:
    """x_{i+1} = x_i + (t_{i+1} − t_i) v(x_i, t_i): first order, one evaluation per step."""
    t = run.times
    for i in run.steps():
        x = x + (t[i + 1] - t[i]) * run.f(x, i)
        run.tick(i, x)
    return x


def gradient_estimation(run: Run, x: torch.Tensor, *, gamma: float = 2.0) -> torch.Tensor:
    """Gradient estimation (Permenter & Yuan 2024; ComfyUI's `gradient_estimation`, `ge_gamma`): Euler
    with the derivative extrapolated from the last step, x_{i+1} = x_i + (t_{i+1} − t_i)(γ v_i + (1 − γ) v_{i−1}).
    The first step, and a last step to the field's singular end (σ = 0, where Euler lands on the data
    prediction), are plain Euler; γ = 1 is Euler throughout. Any field, one evaluation per step."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
        raise ArgumentError(f"gamma: expected a finite number (1: Euler, 2: the paper's), got {gamma!r}")
    t = run.times
    prev = None
    for i in run.steps():
        v = run.f(x, i)
        d = v if prev is None or not run.evaluable[i + 1] else gamma * v + (1.0 - gamma) * prev
        x = x + (t[i + 1] - t[i]) * d
        prev = v
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


def _churn_euler(p: PathGrid, i: int, xt: torch.Tensor, den: torch.Tensor, rho_hat: float, rho_next: float):
    """Euler from (x̃, σ̂) to ρ_{i+1} on dx̃/dσ̃ = (x̃ − D)/σ̃ (k-diffusion's `sample_euler`)."""
    return xt + (rho_next - rho_hat) / rho_hat * (xt - den)


def _churn_heun(p: PathGrid, i: int, xt: torch.Tensor, den: torch.Tensor, rho_hat: float, rho_next: float):
    """Alg. 2 lines 7–11: the Euler predictor, then the trapezoidal corrector at ρ_{i+1} (skipped at σ = 0)."""
    h = rho_next - rho_hat
    d = (xt - den) / rho_hat
    xt_next = xt + h * d
    if rho_next > 0 and p.run.evaluable[i + 1]:
        d_next = (xt_next - p.denoise(p.a[i + 1] * xt_next, i + 1)) / rho_next
        xt_next = xt + (0.5 * h) * (d + d_next)
    return xt_next


def dpm_2_step(p: PathGrid, i: int, xt: torch.Tensor, den: torch.Tensor, rho_hat: float, rho_next: float):
    """DPM-Solver-2 (k-diffusion's `sample_dpm_2`; `dpm_2`, and `edm`'s step="dpm_2"): from (x̃, σ̂) an Euler
    half step to the log-midpoint ρ_m = √(σ̂ ρ_{i+1}), the full step with the midpoint's slope; Euler on
    a last step to σ = 0."""
    if rho_next == 0:
        return _churn_euler(p, i, xt, den, rho_hat, rho_next)
    rho_m = math.sqrt(rho_hat * rho_next)
    xt_m = xt + (rho_m - rho_hat) / rho_hat * (xt - den)
    return xt + (rho_next - rho_hat) / rho_m * (xt_m - p.denoise_ve(xt_m, -math.log(rho_m)))


_CHURN_STEPS = {"heun": _churn_heun, "euler": _churn_euler, "dpm_2": dpm_2_step}


def edm(
    run: Run,
    x: torch.Tensor,
    *,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    step: str = "heun",
) -> torch.Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2): raise σ_i to σ̂ = (1 + γ_i) σ_i by adding
    fresh noise, γ_i = min(S_churn/N, √2 − 1) for σ_i ∈ [S_min, S_max], then a step to σ_{i+1}: `step`
    "heun" (Alg. 2), "euler" or "dpm_2" (k-diffusion's `sample_heun`, `sample_euler`, `sample_dpm_2`
    with `s_churn`; one evaluation per step under "euler", two under the others, one on a last step to
    σ = 0). It runs in the path's VE coordinates x̃ = x/α_t, σ̃ = σ_t/α_t (S_min, S_max in σ̃), the
    variable EDM's algorithm is written in, so it serves flow matching and TrigFlow as it serves EDM;
    a step from pure noise (σ̃ = ∞) is the exact Euler (DDIM) limit x̃' = σ̃' x/σ_t + D."""
    for name, v in (("S_churn", S_churn), ("S_min", S_min), ("S_noise", S_noise)):
        if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
            raise ArgumentError(f"{name}: expected a finite number >= 0, got {v!r}")
    if not S_max >= S_min:
        raise ArgumentError(f"S_max: expected a number >= S_min={S_min}, got {S_max!r}")
    if step not in _CHURN_STEPS:
        raise ArgumentError(f"step: expected one of {', '.join(map(repr, _CHURN_STEPS))}, got {step!r}")
    take = _CHURN_STEPS[step]
    p = PathGrid(run)
    gamma_max = min(S_churn / (len(run.times) - 1), math.sqrt(2.0) - 1.0)  # Alg. 2 line 3
    for i in run.steps():
        rho, rho_next = p.rho(i), p.rho(i + 1)
        if math.isinf(rho):  # from pure noise: the Euler step's limit, exact for the first-order part
            xt = p.first_order(i, x, p.denoise(x, i), rho_next)
        else:
            xt = x / p.a[i]
            gamma = gamma_max if S_min <= rho <= S_max else 0.0
            rho_hat = rho * (1.0 + gamma)  # Alg. 2 line 5: σ̂ = (1 + γ) σ
            if gamma > 0:  # line 6: x̂ = x + √(σ̂² − σ²) S_noise ε
                xt = xt + (math.sqrt(rho_hat**2 - rho**2) * S_noise) * run.noise()
                den = p.denoise_ve(xt, -math.log(rho_hat))
            else:
                den = p.denoise(x, i)
            xt = take(p, i, xt, den, rho_hat, rho_next)  # lines 7–11 (or Euler / DPM-2)
        x = p.a[i + 1] * xt
        run.tick(i, x)
    return x
