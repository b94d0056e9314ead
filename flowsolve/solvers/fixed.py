"""One-step deterministic and churned solvers: Euler, Heun (EDM Alg. 1), EDM's stochastic sampler (Alg. 2)."""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import torch

from .base import PathGrid, Run
from .. import grids
from ..errors import ArgumentError


def euler(run: Run, x: torch.Tensor) -> torch.Tensor:
    """x_{i+1} = x_i + (t_{i+1} − t_i) v(x_i, t_i): first order, one evaluation per step."""
    t = run.times
    for i in run.steps():
        x = x + (t[i + 1] - t[i]) * run.f(x, i)
        x = run.tick(i, x)
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
        x = run.tick(i, x)
    return x


def flow_map(run: Run, x: torch.Tensor) -> torch.Tensor:
    """x_{i+1} = x_i + (t_{i+1} − t_i) ū(x_i, t_i, t_{i+1}): a flow-map model's own transitions (AnyFlow's
    FlowMapEulerDiscreteScheduler; MeanFlow's one- and few-step sampling), one evaluation per step,
    exact at any step count where the map is (`fs.sample` refuses fields that are not flow maps)."""
    for i in run.steps():
        x = run.jump(x, i)
        x = run.tick(i, x)
    return x


def heun(run: Run, x: torch.Tensor) -> torch.Tensor:
    """EDM's second-order step (Karras et al. 2022, Alg. 1), Euler on a last step to σ = 0. The
    predictor is a stage that inpainting blends as diffusers' pipelines do (`Run.stage`)."""
    t = run.times
    for i in run.steps():
        d, h = run.f(x, i), t[i + 1] - t[i]
        x_next = x + h * d  # Euler predictor
        if run.evaluable[i + 1]:  # the trapezoidal corrector
            x_next = x + (0.5 * h) * (d + run.f(run.stage(i, x_next), i + 1))
        x = run.tick(i, x_next)
    return x


def heunpp2(run: Run, x: torch.Tensor) -> torch.Tensor:
    """ComfyUI's Heun++ (`heunpp2`, from sd-webui-samplers-scheduler): from t_i, Euler predictors to
    t_{i+1} and on to t_{i+2}, and the step to t_{i+1} along w₁ f_i + w₂ f_{i+1} + w₃ f_{i+2} with
    w₂ = t_{i+1}/(3 t_0), w₃ = t_{i+2}/(3 t_0), w₁ = 1 − w₂ − w₃ (three evaluations); the step before
    the last is Heun's with w₂ = t_{i+1}/(2 t_0), the last is Euler. In the field's own time, as
    ComfyUI runs it on σ (EDM) or a flow's t: 3·steps − 3 evaluations."""
    t, n = run.times, len(run.times) - 1
    for i in run.steps():
        d, h = run.f(x, i), t[i + 1] - t[i]
        x_2 = x + h * d  # Euler to t_{i+1}
        if i == n - 1:  # the last step: Euler
            x = x_2
        elif i == n - 2:  # the step before: Heun, the later slope weighted by t_{i+1}/(2 t_0)
            w_2 = t[i + 1] / (2 * t[0])
            x = x + h * ((1 - w_2) * d + w_2 * run.f(x_2, i + 1))
        else:
            d_2 = run.f(x_2, i + 1)
            d_3 = run.f(x_2 + (t[i + 2] - t[i + 1]) * d_2, i + 2)  # Euler on to t_{i+2}
            w_2, w_3 = t[i + 1] / (3 * t[0]), t[i + 2] / (3 * t[0])
            x = x + h * ((1 - w_2 - w_3) * d + w_2 * d_2 + w_3 * d_3)
        x = run.tick(i, x)
    return x


def _churn_euler(p: PathGrid, i: int, xt: torch.Tensor, den: torch.Tensor, rho_hat: float, rho_next: float):
    """Euler from (x̃, σ̂) to ρ_{i+1} on dx̃/dσ̃ = (x̃ − D)/σ̃ (k-diffusion's `sample_euler`)."""
    return xt + (rho_next - rho_hat) / rho_hat * (xt - den)


def _ve_heun(xt: torch.Tensor, den: torch.Tensor, rho: float, rho_next: float, denoise_next) -> torch.Tensor:
    """Heun's step on dx̃/dρ = (x̃ − D)/ρ from ρ to ρ_next: the Euler predictor, then the trapezoidal
    corrector with D at the predicted point (`denoise_next`; None where the field is singular: Euler)."""
    h = rho_next - rho
    d = (xt - den) / rho
    xt_next = xt + h * d
    if denoise_next is not None:
        d_next = (xt_next - denoise_next(xt_next)) / rho_next
        xt_next = xt + (0.5 * h) * (d + d_next)
    return xt_next


def _churn_heun(p: PathGrid, i: int, xt: torch.Tensor, den: torch.Tensor, rho_hat: float, rho_next: float):
    """Alg. 2 lines 7–11: the Euler predictor, then the trapezoidal corrector at ρ_{i+1} (skipped at σ = 0)."""
    at_next = rho_next > 0 and p.run.evaluable[i + 1]
    return _ve_heun(xt, den, rho_hat, rho_next, (lambda v: p.denoise(p.a[i + 1] * v, i + 1)) if at_next else None)


def dpm_2_step(
    p: PathGrid, i: int, xt: torch.Tensor, den: torch.Tensor, rho_hat: float, rho_next: float, staged: bool = False
):
    """DPM-Solver-2 (k-diffusion's `sample_dpm_2`; `dpm_2`, and `edm`'s step="dpm_2"): from (x̃, σ̂) an Euler
    half step to the log-midpoint ρ_m = √(σ̂ ρ_{i+1}), the full step with the midpoint's slope; Euler on
    a last step to σ = 0. `staged`: the midpoint is a stage that inpainting blends (`Run.stage`)."""
    if rho_next == 0:
        return _churn_euler(p, i, xt, den, rho_hat, rho_next)
    rho_m = math.sqrt(rho_hat * rho_next)
    xt_m = xt + (rho_m - rho_hat) / rho_hat * (xt - den)
    if staged:
        xt_m = p.stage_ve(i, xt_m, -math.log(rho_m))
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
        x = run.tick(i, x)
    return x


def _check_restarts(restarts: Any) -> list[tuple[float, float, int, int]]:
    out = []
    for r in restarts:
        ok = isinstance(r, (tuple, list)) and len(r) == 4
        if ok:
            lo, hi, steps, times = r
            ok = (
                all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi))
                and 0 < lo < hi < math.inf
                and all(isinstance(v, int) and not isinstance(v, bool) for v in (steps, times))
                and steps >= 1
                and times >= 0
            )
        if not ok:
            raise ArgumentError(
                f"restarts: expected (rho_min, rho_max, steps, times) tuples with 0 < rho_min < rho_max, "
                f"steps >= 1 and times >= 0, got {r!r}"
            )
        out.append((float(lo), float(hi), int(steps), int(times)))
    return out


def restart_evals(restarts: Any) -> int:
    """Evaluations the restart intervals add per sample: two per Heun step, `steps` · `times` each."""
    return sum(2 * steps * times for _, _, steps, times in _check_restarts(restarts))


def restart(
    run: Run,
    x: torch.Tensor,
    *,
    restarts: Sequence[tuple[float, float, int, int]] = ((0.1, 2.0, 9, 1),),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023): Heun's ODE steps down the grid (EDM's Alg. 1), and for each
    interval (ρ_min, ρ_max, steps, times) in `restarts`, on reaching the knot nearest ρ_min, `times`
    times over: forward noise up to the knot nearest ρ_max (x̃ + √(ρ_max² − ρ_min²) s_noise ε, the
    forward process's exact transition), then `steps` Heun steps back down on a Karras grid (exponent
    7) between the two knots. The noise contracts the errors the ODE accumulated in the interval;
    the ODE steps keep the discretisation error low. The default interval is AUTOMATIC1111's (ρ from
    2 to 0.1, 9 steps, once). Levels are in the path's VE coordinates x̃ = x/α, ρ = σ/α, as in `edm`,
    so flow matching and TrigFlow run it as EDM does. The NFE budget counts 2 · steps · times per
    interval besides the grid's Heun steps."""
    intervals = _check_restarts(restarts)
    if not (isinstance(s_noise, (int, float)) and s_noise >= 0 and math.isfinite(s_noise)):
        raise ArgumentError(f"s_noise: expected a finite number >= 0, got {s_noise!r}")
    p = PathGrid(run)
    rhos = [p.rho(i) for i in range(len(run.times))]
    nearest = lambda r: min(range(len(rhos)), key=lambda j: abs(rhos[j] - r))  # noqa: E731 (A1111's argmin)
    at: dict[int, list[tuple[int, int, int]]] = {}
    for lo, hi, steps, times in intervals:
        i_lo, i_hi = nearest(lo), nearest(hi)
        if i_hi < i_lo and rhos[i_lo] > 0:  # an interval the grid resolves, above σ = 0
            at.setdefault(i_lo, []).append((i_hi, steps, times))
    for i in run.steps():
        rho, rho_next = rhos[i], rhos[i + 1]
        if math.isinf(rho):  # from pure noise: the Euler step's exact limit, as `edm` takes it
            xt = p.first_order(i, x, p.denoise(x, i), rho_next)
        else:
            xt = _churn_heun(p, i, x / p.a[i], p.denoise(x, i), rho, rho_next)
        for i_hi, steps, times in at.get(i + 1, []):
            levels = grids.karras(steps, rho_next, rhos[i_hi], final_zero=False).tolist()
            last = rho_next
            for _ in range(times):
                xt = xt + (math.sqrt(levels[0] ** 2 - last**2) * s_noise) * run.noise()  # up to ρ_max
                for a, b in zip(levels[:-1], levels[1:]):  # and down again
                    at_b = functools.partial(p.denoise_ve, lam=-math.log(b))
                    xt = _ve_heun(xt, p.denoise_ve(xt, -math.log(a)), a, b, at_b)
                last = levels[-1]
        x = p.a[i + 1] * xt
        x = run.tick(i, x)
    return x
