"""The solvers users compare against, each on any Gaussian-path field (`fields.paths`: EDM's σ-time,
flow matching, TrigFlow), written in the half log-SNR λ = log(α/σ) and the data prediction D.

Notation for a step from t_i to t_j: α, σ, λ at each end, h = λ_j − λ_i, ρ = σ/α (the VE noise
level of the same path, x/α = x_0 + ρ ε), and the first-order (DDIM) step

    x_j = (σ_j/σ_i) x_i − α_j expm1(−h) D_i,

which is Euler on the VE ODE dx̃/dρ = (x̃ − D)/ρ, exact for a constant D. From pure noise
(λ_i = −∞, a flow's t = 1) it is x_j = σ_j x_i + α_j D_i; to the data (σ_j = 0) it is α_j D_i.

* `unipc`, `unipc_bh1`: UniPC (Zhao et al. 2023), predictor UniP-p and corrector UniC-p with B(h) = e^h − 1
  (bh2) or h (bh1), orders 1–3, diffusers' `UniPCMultistepScheduler` (predict_x0).
* `deis`: DEIS tAB (Zhang & Chen 2023, "ρAB"): Adams–Bashforth on dx̃/dρ = ε with ε interpolated by a
  Lagrange polynomial in log ρ and integrated exactly in ρ; diffusers' `DEISMultistepScheduler`.
* `dpm_2`: DPM-Solver-2 as k-diffusion runs it (midpoint in log ρ, Euler stages on the VE ODE).
* `dpmpp_2s`: DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1 with r = 1/2); `eta` > 0 is k-diffusion's
  ancestral variant.
* `pc`: predictor–corrector sampling of score SDEs (Song et al. 2021): Langevin corrector, reverse-diffusion predictor.
* `dpm_adaptive`: DPM-Solver-12/23 with PID step-size control (Lu et al. 2022a).
* `dpmpp_singlestep`: singlestep DPM-Solver++ with its stages on the grid's knots (diffusers' scheduler).
* `dpm_fast`: DPM-Solver-fast (Lu et al. 2022a): singlestep orders 3, 2, 1 sharing the NFE budget.
* `dpm_2_ancestral`, `dpmpp_sde`: DPM-Solver-2 with ancestral noise and the stochastic DPM-Solver++
  (2S with Brownian increments), as k-diffusion runs them.
* `euler_ancestral`, `dpmpp_2m_sde`, `dpmpp_3m_sde`: the stochastic samplers of k-diffusion with
  per-sample noise (`fs.sample(seed=)`), on any Gaussian path.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence
from collections import deque

import torch

from .base import (
    PathGrid,
    Run,
    combine,
    ddim_step,
    discrete_model,
    field_model,
    guided_model,
    lagrange_weights,
    lowered_order,
    lu_differences,
    model_timestep,
    own_schedule,
    scheduler_steps,
    sigma_lambda,
    takes_closing_step,
)
from .fixed import dpm_2_step
from ..fields.base import between_knots
from ..fields.paths import vp_reread
from ..grids import table_sigma
from .._checks import check_choice, check_int, check_number
from ..errors import ArgumentError


def _ancestral(rho: float, rho_next: float, eta: float) -> tuple[float, float]:
    """(ρ_down, ρ_up) of an ancestral step from ρ to ρ_next (k-diffusion's get_ancestral_step):
    ρ_up = min(ρ_next, η ρ_next √(1 − ρ_next²/ρ²)), ρ_down = √(ρ_next² − ρ_up²)."""
    if not eta or rho_next == 0:
        return rho_next, 0.0
    ratio = 0.0 if math.isinf(rho) else (rho_next / rho) ** 2
    up = min(rho_next, eta * rho_next * math.sqrt(max(1.0 - ratio, 0.0)))
    return math.sqrt(max(rho_next**2 - up**2, 0.0)), up


def _ancestral_noise(run: Run, p: PathGrid, i: int, xt: torch.Tensor, up: float, s_noise: float) -> torch.Tensor:
    """The state at knot i + 1 from x̃ at ρ_down: add ρ_up ε (per sample; none at the data), then x = α x̃."""
    if up > 0 and p.s[i + 1] > 0:
        xt = xt + (s_noise * up) * run.noise()
    return p.a[i + 1] * xt


def _check_eta(eta) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta < 0:
        raise ArgumentError(f"eta: expected a non-negative noise share (0: deterministic), got {eta!r}")
    return float(eta)


# -- UniPC ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1024)
def _unipc_coeffs(
    rks: tuple[float, ...], h: float, order: int, variant: str, predictor: bool, noise: bool = False
) -> tuple[float, tuple[float, ...]]:
    """(B(h), ρ-coefficients) of UniP/UniC (Zhao et al. 2023, Alg. 2–3 with B(h) of §3.3): with
    hh = −h (hh = h for the noise-prediction form), φ_k the k-th exponential remainder, solve R ρ = b
    with R_kj = r_j^{k−1}, b_k = k! φ_{k+1}(hh)/B(h); UniP-2 uses ρ = 1/2 and UniC-1 ρ = 1/2."""
    import numpy as np

    hh = h if noise else -h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    phi = math.expm1(hh) / hh - 1.0  # h φ₂-type remainder, then recursively
    fact, b = 1, []
    for k in range(1, order + 1):
        b.append(phi * fact / b_h)
        fact *= k + 1
        phi = phi / hh - 1.0 / fact
    r = rks + (1.0,)
    if predictor:
        if order == 2:
            return b_h, (0.5,)
        mat = np.array([[rj**k for rj in r[:-1]] for k in range(order - 1)])
        return b_h, tuple(float(c) for c in np.linalg.solve(mat, np.array(b[: order - 1])))
    if order == 1:
        return b_h, (0.5,)
    mat = np.array([[rj**k for rj in r] for k in range(order)])
    return b_h, tuple(float(c) for c in np.linalg.solve(mat, np.array(b[:order])))


def unipc(
    run: Run,
    x: torch.Tensor,
    *,
    order: int = 2,
    variant: str = "bh2",
    corrector: bool = True,
    lower_order_final: bool = True,
    disable_corrector: Sequence[int] = (),
    predict_x0: bool = True,
    final_corrector: bool | None = None,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023) on the data prediction, any Gaussian path.

    Predictor UniP-p from t_i (h = λ_{i+1} − λ_i, r_k = (λ_{i−k} − λ_i)/h, D1_k = (D_{i−k} − D_i)/r_k):
        x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1} (e^{−h} − 1) D_i − α_{i+1} B(h) Σ_k ρ^p_k D1_k.
    Corrector UniC-p, once D_{i+1} is evaluated at the predicted x_{i+1} (no extra evaluation):
        x_{i+1} ← the same from x_i with Σ_k ρ^c_k D1_k + ρ^c_p (D_{i+1} − D_i),
    and the next step starts from the corrected x_{i+1} while reusing D_{i+1}. The order ramps up
    from 1 and, with `lower_order_final`, is at most the number of steps left (diffusers' rule).
    `disable_corrector` lists the steps whose result is not corrected (diffusers' option of that name;
    UniPC's authors suggest [0] under strong guidance). `predict_x0=False` runs the same method on
    the noise prediction ε = (x − α D)/σ (diffusers' option of that name): the differences are of ε,
    weighted by σ_{i+1} instead of α_{i+1}, with hh = h in the coefficients.
    `final_corrector` also corrects the last step, with one more evaluation at the last knot, on a grid
    that ends above σ = 0. None (the default) does so where the model's diffusers scheduler does:
    a `final_sigmas_type="sigma_min"` schedule that already ends at σ_min steps from σ_min to itself,
    which evaluates the model there and corrects the step before (and the NFE budget allows it).
    """
    if isinstance(disable_corrector, (str, bytes)) or not all(
        isinstance(k, int) and not isinstance(k, bool) for k in disable_corrector
    ):
        raise ArgumentError(f"disable_corrector: expected a list of step indices, got {disable_corrector!r}")
    skip = frozenset(disable_corrector)
    order = check_int("order", order, 1, 3)
    if variant not in ("bh1", "bh2"):
        raise ArgumentError(f"variant: expected 'bh1' or 'bh2' (the B(h) of UniPC), got {variant!r}")
    p = PathGrid(run)
    n = scheduler_steps(run)  # as the model's scheduler counts them
    hist: deque = deque(maxlen=order)  # (λ_j, value_j, D_j) of finite λ, newest last (value: D or ε)
    weight = p.a if predict_x0 else p.s  # what multiplies B(h) Σ ρ D1: α_{i+1}, or σ_{i+1} for ε

    def base(xs: torch.Tensor, d: torch.Tensor, v: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """The first-order step from knot i to j with the model output held: on D (x_j = (σ_j/σ_i) x_i
        + ...) or, for the noise form, on ε (x_j = (α_j/α_i) x_i − σ_j (e^h − 1) ε); they differ once
        the corrector has moved x_i away from where D and ε were evaluated."""
        if predict_x0:
            return ddim_step(xs, d, p.s[i], p.s[j], p.a[j], p.lam[j] - p.lam[i])
        return (p.a[j] / p.a[i]) * xs - (p.s[j] * math.expm1(p.lam[j] - p.lam[i])) * v

    def correct(i: int, val: torch.Tensor) -> torch.Tensor:
        """UniC: step i − 1 → i again from x_{i−1}, with the value at the predicted x_i included."""
        assert x_prev is not None
        h = p.lam[i] - p.lam[i - 1]
        older = list(hist)[:-1][::-1][: prev_order - 1]  # values at i−2, i−3, ...
        _, m0, d0 = hist[-1]
        rks = tuple((e[0] - p.lam[i - 1]) / h for e in older)
        b_h, rho = _unipc_coeffs(rks, h, prev_order, variant, predictor=False, noise=not predict_x0)
        res = rho[-1] * (val - m0)
        for rk, e, c in zip(rks, older, rho[:-1]):
            res = res + (c / rk) * (e[1] - m0)
        return base(x_prev, d0, m0, i - 1, i) - (weight[i] * b_h) * res

    def corrects(i: int) -> bool:
        return corrector and x_prev is not None and prev_order > 0 and p.lam[i - 1] > -math.inf and i - 1 not in skip

    x_prev, prev_order = None, 0
    for i in run.steps():
        den = p.denoise(x, i)
        val = den if predict_x0 else (x - p.a[i] * den) / p.s[i]
        if corrects(i):
            x = correct(i, val)
        x_prev = x
        if p.lam[i] > -math.inf:
            hist.append((p.lam[i], val, den))
        if p.s[i + 1] == 0 or p.lam[i] == -math.inf or not hist:
            x = ddim_step(x, den, p.s[i], p.s[i + 1], p.a[i + 1], p.lam[i + 1] - p.lam[i])
            prev_order = 1 if p.lam[i] > -math.inf else 0
        else:
            k = min(order, len(hist), n - i) if lower_order_final else min(order, len(hist))
            h = p.lam[i + 1] - p.lam[i]
            older = list(hist)[:-1][::-1][: k - 1]
            rks = tuple((e[0] - p.lam[i]) / h for e in older)
            x = base(x, den, val, i, i + 1)
            if k > 1:
                b_h, rho = _unipc_coeffs(rks, h, k, variant, predictor=True, noise=not predict_x0)
                pred = combine([c / rk for rk, c in zip(rks, rho)], [e[1] - val for e in older])
                x = x - (weight[i + 1] * b_h) * pred
            prev_order = k
        x = run.tick(i, x)
    last = len(p.t) - 1
    if final_corrector is None:  # the scheduler's own last step from σ_min to itself evaluates there
        final_corrector = takes_closing_step(run)
    if final_corrector and p.s[last] > 0 and corrects(last):  # one more evaluation, at the last knot
        den = p.denoise(x, last)
        x = correct(last, den if predict_x0 else (x - p.a[last] * den) / p.s[last])
    return x


def unipc_bh1(
    run: Run,
    x: torch.Tensor,
    *,
    order: int = 2,
    corrector: bool = True,
    lower_order_final: bool = True,
    disable_corrector: Sequence[int] = (),
    predict_x0: bool = True,
    final_corrector: bool | None = None,
) -> torch.Tensor:
    """UniPC with B(h) = h (`unipc` with variant='bh1'; Zhao et al. recommend it for unconditional models)."""
    return unipc(
        run,
        x,
        order=order,
        variant="bh1",
        corrector=corrector,
        lower_order_final=lower_order_final,
        disable_corrector=disable_corrector,
        predict_x0=predict_x0,
        final_corrector=final_corrector,
    )


# -- DEIS ----------------------------------------------------------------------------------------
def deis(run: Run, x: torch.Tensor, *, order: int = 3, lower_order_final: bool = True) -> torch.Tensor:
    """DEIS tAB-k in ρ (Zhang & Chen 2023; diffusers' "logrho" DEIS): with x̃ = x/α, ρ = σ/α and the
    noise prediction ε_j = (x_j − α_j D_j)/σ_j,

        x̃_{i+1} = x̃_i + Σ_j c_j ε_j,   c_j = ∫_{ρ_i}^{ρ_{i+1}} ℓ_j(log ρ) dρ,

    ℓ_j the Lagrange basis in log ρ on the last k knots (k ramps up to `order`). With
    `lower_order_final` and fewer than 15 steps, the last two steps drop to orders 1 and 2
    (diffusers' rule)."""
    order = check_int("order", order, 1, 3)
    p = PathGrid(run)
    n = scheduler_steps(run)  # as the model's scheduler counts them
    hist: deque = deque(maxlen=order)  # (log ρ_j, ε_j) of finite ρ, newest last
    for i in run.steps():
        den = p.denoise(x, i)
        if p.s[i + 1] == 0 or p.a[i] == 0:  # to the data, or from pure noise: the exact first-order step
            x = ddim_step(x, den, p.s[i], p.s[i + 1], p.a[i + 1], p.lam[i + 1] - p.lam[i])
        else:
            hist.append((math.log(p.rho(i)), (x - p.a[i] * den) / p.s[i]))  # (log ρ_i, ε_i)
            k = min(lowered_order(order, n, i, lower_order_final, run.skipped), len(hist))
            recent = list(hist)[-k:][::-1]
            u_i, u_j = math.log(p.rho(i)), math.log(p.rho(i + 1))
            w = lagrange_weights([u for u, _ in recent], u_i, u_j, exp_kernel=True)  # ∫ e^{u − u_j} ℓ_j du
            step = combine([c * p.rho(i + 1) for c in w], [e for _, e in recent])  # c_j = ρ_{i+1} W_j
            x = (p.a[i + 1] / p.a[i]) * x + p.a[i + 1] * step
        x = run.tick(i, x)
    return x


# -- single-step second order ----------------------------------------------------------------------
def dpm_2(run: Run, x: torch.Tensor) -> torch.Tensor:
    """DPM-Solver-2 as k-diffusion's `sample_dpm_2`: an Euler half step on the VE ODE to the log-ρ
    midpoint ρ_m = √(ρ_i ρ_{i+1}), then the full step with the midpoint's slope,
    x̃_{i+1} = x̃_i + (ρ_{i+1} − ρ_i)(x̃_m − D_m)/ρ_m; Euler on the last step (to the data) and DDIM from
    pure noise. Two evaluations per step."""
    p = PathGrid(run)
    for i in run.steps():
        den = p.denoise(x, i)
        if p.a[i] == 0:  # from pure noise: DDIM
            x = ddim_step(x, den, p.s[i], p.s[i + 1], p.a[i + 1], p.lam[i + 1] - p.lam[i])
        else:  # in VE coordinates x̃ = x/α, `edm`'s DPM-2 step without churn
            x = p.a[i + 1] * dpm_2_step(p, i, x / p.a[i], den, p.rho(i), p.rho(i + 1), staged=True)
        x = run.tick(i, x)
    return x


def _dpmpp_2s_to(p: PathGrid, i: int, x: torch.Tensor, den: torch.Tensor, down: float, mid) -> torch.Tensor:
    """x̃ at ρ_down by DPM-Solver++(2S) from knot i, h = log(ρ_i/ρ_down), λ_m = λ_i + h/2:
    x̃_m = (ρ_m/ρ_i) x̃_i − expm1(−h/2) D_i, x̃' = (ρ_down/ρ_i) x̃_i − expm1(−h) mid(x̃_m, λ_m) (`mid` the midpoint's
    prediction); first order (DDIM) from pure noise or to ρ_down = 0."""
    rho_i = p.rho(i)
    if down == 0 or math.isinf(rho_i):
        return p.first_order(i, x, den, down)
    xs = x / p.s[i]  # x̃/ρ_i = x/σ_i
    h = math.log(rho_i / down)
    lam_m = -math.log(rho_i) + 0.5 * h
    xt_m = math.exp(-lam_m) * xs - math.expm1(-0.5 * h) * den  # ρ_m x̃/ρ_i − expm1(−h/2) D
    return down * xs - math.expm1(-h) * mid(xt_m, lam_m)


def dpmpp_2s(
    run: Run, x: torch.Tensor, *, eta: float = 0.0, s_noise: float = 1.0, split: str | None = None
) -> torch.Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1, r = 1/2) as k-diffusion's `sample_dpmpp_2s_ancestral`:
    in VE coordinates to ρ_down (ancestral split of ρ_{i+1} by `eta`), h = log(ρ_i/ρ_down),
        x̃_m = (ρ_m/ρ_i) x̃_i − expm1(−h/2) D_i,   x̃' = (ρ_down/ρ_i) x̃_i − expm1(−h) D(x_m),
    then x̃_{i+1} = x̃' + s_noise ρ_up ε. eta = 0 (default) is the deterministic solver; `split="rf"` is
    ComfyUI's `dpmpp_2s_ancestral_RF` (`euler_ancestral`'s `split`)."""
    eta = _check_eta(eta)
    split = _ancestral_split(run, split)
    p = PathGrid(run)
    for i in run.steps():
        den = p.denoise(x, i)
        down, up = _down_up(p, i, eta, split)
        xt_new = _dpmpp_2s_to(p, i, x, den, down, p.denoise_ve)
        x = _ancestral_noise(run, p, i, xt_new, up, s_noise)
        x = run.tick(i, x)
    return x


# -- CFG++ ----------------------------------------------------------------------------------------
def _uncond_data(run: Run, p: PathGrid, g, x: torch.Tensor, t: float, den: torch.Tensor) -> torch.Tensor:
    """D_u at (x, t) from the guided model's last unconditional branch in the field's own terms (a
    velocity, a score or D); the guided D where that call ran none (outside `interval`)."""
    u = g.last_uncond
    if u is None:
        return den
    if g.prediction == "velocity":
        return p.path.data_prediction(x, u, t)
    if getattr(run.field, "prediction", "denoiser") != "denoiser":  # a score model: D = x + σ² s
        return x + p.path.sigma(t) ** 2 * u
    return u


def euler_cfg_pp(run: Run, x: torch.Tensor) -> torch.Tensor:
    """CFG++ (Chung et al. 2024; ComfyUI's `euler_cfg_pp`): DDIM that denoises with the guided D_w and
    re-noises with the unconditional D_u, in VE coordinates x̃' = D_w + (ρ'/ρ)(x̃ − D_u) (from pure noise
    ρ' x/σ + D_w). Meant for small guidance scales (about 0 to 2). One evaluation per step."""
    return euler_ancestral_cfg_pp(run, x, eta=0.0)


def euler_ancestral_cfg_pp(
    run: Run, x: torch.Tensor, *, eta: float = 1.0, s_noise: float = 1.0, split: str | None = None
) -> torch.Tensor:
    """Euler ancestral with CFG++ (ComfyUI's `euler_ancestral_cfg_pp`): `euler_cfg_pp`'s step to ρ_down of
    ancestral split (`euler_ancestral`'s `split`), then ρ_up ε: x̃' = D_w + (ρ_down/ρ)(x̃ − D_u) + ρ_up ε."""
    eta = _check_eta(eta)
    split = _ancestral_split(run, split)
    g = guided_model(run.field)  # fs.sample refused unguided fields (`needs_guidance`)
    p = PathGrid(run)
    for i in run.steps():
        den = p.denoise(x, i)
        down, up = _down_up(p, i, eta, split)
        xt = p.first_order(i, x, den, down, _uncond_data(run, p, g, x, p.t[i], den))
        x = _ancestral_noise(run, p, i, xt, up, s_noise)
        x = run.tick(i, x)
    return x


def dpmpp_2m_cfg_pp(run: Run, x: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M) with CFG++ (ComfyUI's `dpmpp_2m_cfg_pp`): with h = λ' − λ and r = h_{i−1}/h,
    x̃' = D_w + e^{−h}(x̃ − D_u) − expm1(−h)(D_w − D_u,{i−1})/(2r), the first step and the last (to the data)
    without the second-order term, as `euler_cfg_pp`. One evaluation per step."""
    g = guided_model(run.field)  # fs.sample refused unguided fields (`needs_guidance`)
    p = PathGrid(run)
    old_u = None
    for i in run.steps():
        den = p.denoise(x, i)
        rho, rho_next = p.rho(i), p.rho(i + 1)
        den_u = _uncond_data(run, p, g, x, p.t[i], den)
        xt = p.first_order(i, x, den, rho_next, den_u)
        if old_u is not None and rho_next > 0 and not math.isinf(rho):  # the second-order term
            h, h_last = math.log(rho / rho_next), math.log(p.rho(i - 1) / rho)
            xt = xt - math.expm1(-h) * (h / (2.0 * h_last)) * (den - old_u)
        old_u = den_u
        x = p.a[i + 1] * xt
        x = run.tick(i, x)
    return x


def dpmpp_2s_ancestral_cfg_pp(
    run: Run, x: torch.Tensor, *, eta: float = 1.0, s_noise: float = 1.0, split: str | None = None
) -> torch.Tensor:
    """DPM-Solver++(2S) ancestral with CFG++ (ComfyUI's `dpmpp_2s_ancestral_cfg_pp`): `dpmpp_2s`'s step to
    ρ_down on the unconditional predictions (D_u at knot i and D_u at the midpoint), ρ_up ε, then the guidance
    D_w − D_u of knot i added once, x̃' = x̃'_u + ρ_up ε + (D_w − D_u). Its first-order form is `euler_ancestral_cfg_pp`'s
    step; the midpoint's guided evaluation serves only its unconditional branch. Two evaluations per step."""
    eta = _check_eta(eta)
    split = _ancestral_split(run, split)
    g = guided_model(run.field)  # fs.sample refused unguided fields (`needs_guidance`)
    p = PathGrid(run)
    for i in run.steps():
        den = p.denoise(x, i)
        den_u = _uncond_data(run, p, g, x, p.t[i], den)
        down, up = _down_up(p, i, eta, split)

        def mid_uncond(xt_m: torch.Tensor, lam_m: float) -> torch.Tensor:  # D_u at the midpoint
            t_m = p.path.time_at(lam_m)
            den_m = p.denoise_ve(xt_m, lam_m)
            return _uncond_data(run, p, g, p.path.alpha(t_m) * xt_m, t_m, den_m)

        xt = _dpmpp_2s_to(p, i, x, den_u, down, mid_uncond) + (den - den_u)  # the knot's guidance, once
        x = _ancestral_noise(run, p, i, xt, up, s_noise)
        x = run.tick(i, x)
    return x


def gradient_estimation_cfg_pp(run: Run, x: torch.Tensor, *, gamma: float = 2.0) -> torch.Tensor:
    """Gradient estimation with CFG++ (ComfyUI's `gradient_estimation_cfg_pp`), in VE coordinates: the CFG++
    step x̃' = D_w + ρ' d_u, d_u = (x̃ − D_u)/ρ, plus (γ − 1)(d_u − d_u,{i−1})(ρ' − ρ) from the second step on;
    to the data x̃' = D_w. γ = 1 is `euler_cfg_pp`. One evaluation per step."""
    gamma = check_number("gamma", gamma)
    g = guided_model(run.field)  # fs.sample refused unguided fields (`needs_guidance`)
    p = PathGrid(run)
    old = None
    for i in run.steps():
        den = p.denoise(x, i)
        den_u = _uncond_data(run, p, g, x, p.t[i], den)
        rho, rho_next = p.rho(i), p.rho(i + 1)
        xt = p.first_order(i, x, den, rho_next, den_u)
        d = None if math.isinf(rho) else (x / p.a[i] - den_u) / rho
        if old is not None and d is not None and rho_next > 0:
            xt = xt + ((gamma - 1.0) * (rho_next - rho)) * (d - old)
        old = d
        x = p.a[i + 1] * xt
        x = run.tick(i, x)
    return x


SEEDS_UPDATES = ("phi_1", "phi_2")


def _h_phi2(z: float) -> float:
    """z φ₂(z) = (e^z − 1 − z)/z, the second exponential remainder times z."""
    return (math.expm1(z) - z) / z


class _SeedsStep:
    """The stages of one SEEDS step (Gonzalez et al. 2023) in VE coordinates, h = λ_{i+1} − λ_i: the stage at
    share c of the step is x̃_c = (ρ_c/ρ_i) e^{−chη} x̃_i − Σ_k w_k D_k + s_noise ρ_c ξ_c, its noise ξ carried
    from the previous stage c₀ as ξ_c = e^{(c₀−c)hη} ξ_{c₀} + √(−expm1(2(c₀−c)hη)) ε (one draw a stage)."""

    def __init__(self, run: Run, xt: torch.Tensor, rho: float, h: float, eta: float, s_noise: float) -> None:
        self.run, self.xt, self.rho, self.h, self.eta, self.s_noise = run, xt, rho, h, eta, s_noise
        self.c = 0.0
        self.xi: torch.Tensor | None = None

    def to(self, c: float, combo: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(x̃_c, ρ_c), combo = Σ_k w_k D_k."""
        h, eta = self.h, self.eta
        rho_c = self.rho * math.exp(-c * h)
        xt = (rho_c / self.rho) * math.exp(-c * h * eta) * self.xt - combo
        if eta > 0 and self.s_noise > 0:
            seg = (self.c - c) * h * eta
            fresh = math.sqrt(-math.expm1(2.0 * seg)) * self.run.noise()
            self.xi = fresh if self.xi is None else math.exp(seg) * self.xi + fresh
            xt = xt + (self.s_noise * rho_c) * self.xi
        self.c = c
        return xt, rho_c


def _seeds(run: Run, x: torch.Tensor, eta: float, s_noise: float, stages) -> torch.Tensor:
    """The SEEDS loop: `stages(p, step, den, h_eta)` takes one step's stages from knot i's D; a step to the
    data is D, one from pure noise the first-order limit (D + ρ' ε, or ρ' x/σ + D at η = 0)."""
    noisy = eta > 0 and s_noise > 0
    p = PathGrid(run)
    for i in run.steps():
        den = p.denoise(x, i)
        rho_i, rho_next = p.rho(i), p.rho(i + 1)
        if rho_next == 0:
            xt = den
        elif math.isinf(rho_i):
            xt = den + (s_noise * rho_next) * run.noise() if noisy else p.first_order(i, x, den, rho_next)
        else:
            h = math.log(rho_i / rho_next)
            xt = stages(p, _SeedsStep(run, x / p.a[i], rho_i, h, eta, s_noise), den, (1.0 + eta) * h)
        x = p.a[i + 1] * xt
        x = run.tick(i, x)
    return x


def _check_share(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise ArgumentError(f"{name}: expected a stage's share of the step in (0, 1], got {v!r}")
    return float(v)


def seeds_2(
    run: Run,
    x: torch.Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    solver_type: str = "phi_1",
) -> torch.Tensor:
    """SEEDS-2 (Gonzalez et al. 2023; ComfyUI's `seeds_2`): a stochastic exponential two-stage step on
    the data prediction, in VE coordinates (ρ = σ/α, λ = −log ρ, h_η = (1 + η) h), `_SeedsStep`'s stages
        x̃_m: share r, w = expm1(−r h_η) on D_i;   x̃': share 1, expm1(−h_η) on D̄,
    D̄ = D_i + (D_m − D_i)/(2r) ("phi_1"), or the φ₂ weights b₂ = h_ηφ₂(−h_η)/r on D_m ("phi_2"). η = 0 is
    deterministic (η = 0, r = 1, "phi_2": ComfyUI's `exp_heun_2_x0`). Two evaluations per step."""
    eta = _check_eta(eta)
    r = _check_share("r", r)
    if solver_type not in SEEDS_UPDATES:
        raise ArgumentError(f"solver_type: expected one of {', '.join(SEEDS_UPDATES)}, got {solver_type!r}")

    def stages(p: PathGrid, step: _SeedsStep, den: torch.Tensor, h_eta: float) -> torch.Tensor:
        xt_m, rho_m = step.to(r, math.expm1(-r * h_eta) * den)
        den_m = p.denoise_ve(xt_m, -math.log(rho_m))
        if solver_type == "phi_1":
            return step.to(1.0, math.expm1(-h_eta) * (den + (den_m - den) / (2.0 * r)))[0]
        b2 = _h_phi2(-h_eta) / r
        return step.to(1.0, (math.expm1(-h_eta) - b2) * den + b2 * den_m)[0]

    return _seeds(run, x, eta, s_noise, stages)


def seeds_3(
    run: Run, x: torch.Tensor, *, eta: float = 1.0, s_noise: float = 1.0, r_1: float = 1.0 / 3, r_2: float = 2.0 / 3
) -> torch.Tensor:
    """SEEDS-3 (Gonzalez et al. 2023; ComfyUI's `seeds_3`): three stages at shares r₁ < r₂ < 1 of the step,
    x̃₁ with expm1(−r₁h_η) D_i; x̃₂ with a₃₂ = (r₂/r₁) h_ηφ₂(−r₂h_η) on D₁ and expm1(−r₂h_η) − a₃₂ on D_i;
    x̃' with b₃ = h_ηφ₂(−h_η)/r₂ on D₂ and expm1(−h_η) − b₃ on D_i. Three evaluations per step."""
    eta = _check_eta(eta)
    r_1, r_2 = _check_share("r_1", r_1), _check_share("r_2", r_2)
    if not r_1 < r_2:
        raise ArgumentError(f"r_2: expected a share above r_1={r_1}, got {r_2!r}")

    def stages(p: PathGrid, step: _SeedsStep, den: torch.Tensor, h_eta: float) -> torch.Tensor:
        xt_1, rho_1 = step.to(r_1, math.expm1(-r_1 * h_eta) * den)
        den_1 = p.denoise_ve(xt_1, -math.log(rho_1))
        a32 = r_2 / r_1 * _h_phi2(-r_2 * h_eta)
        xt_2, rho_2 = step.to(r_2, (math.expm1(-r_2 * h_eta) - a32) * den + a32 * den_1)
        den_2 = p.denoise_ve(xt_2, -math.log(rho_2))
        b3 = _h_phi2(-h_eta) / r_2
        return step.to(1.0, (math.expm1(-h_eta) - b3) * den + b3 * den_2)[0]

    return _seeds(run, x, eta, s_noise, stages)


# -- ER-SDE ----------------------------------------------------------------------------------------
ER_SDE_SOLVERS = ("er_sde", "reverse_time_sde", "ode")


def _er_tilt(kind: str, eta: float, rho: float) -> float:
    """log(ψ(ρ)/ρ) = η log φ(ρ) for the noise scaler ψ(ρ) = ρ φ(ρ)^η (Cui et al. 2023; ComfyUI's `SamplerER_SDE`):
    φ = e^{ρ^0.3} + 10 ("er_sde", the paper's tuned scaler), φ = ρ ("reverse_time_sde": ψ = ρ^{η+1}, the
    reverse-time SDE at η = 1); η = 0 or "ode": ψ = ρ, the probability-flow ODE. Finite for ρ > 0, +∞ at ρ = ∞
    (η > 0) without overflow."""
    if kind == "ode" or eta == 0:
        return 0.0
    if math.isinf(rho):
        return math.inf
    if kind == "reverse_time_sde":
        return eta * math.log(rho)
    a = rho**0.3
    return eta * (a + math.log1p(10.0 * math.exp(-a)))  # log(e^a + 10)


def _er_integrals(kind: str, eta: float, rho: float, rho_next: float, points: int) -> tuple[float, float]:
    """ψ(ρ') ∫ dλ/ψ(λ) and ψ(ρ') ∫ (λ − ρ) dλ/ψ(λ) over [ρ', ρ], by ComfyUI's left Riemann sum on `points`
    equal pieces (so that the samples are ComfyUI's to round-off)."""
    step = (rho - rho_next) / points
    top = _er_tilt(kind, eta, rho_next)
    s = s_u = 0.0
    for k in range(points):
        lam = rho_next + k * step
        w = step * (rho_next / lam) * math.exp(top - _er_tilt(kind, eta, lam))  # Δλ ψ(ρ')/ψ(λ)
        s += w
        s_u += (lam - rho) * w
    return s, s_u


def er_sde(
    run: Run,
    x: torch.Tensor,
    *,
    solver_type: str = "er_sde",
    eta: float = 1.0,
    s_noise: float = 1.0,
    max_stage: int = 3,
    points: int = 200,
) -> torch.Tensor:
    """ER-SDE-Solver (Cui et al. 2023, "Elucidating the solution space of extended reverse-time SDEs"; ComfyUI's
    `er_sde`): the extended reverse SDE whose noise is set by a scaler ψ (`_er_tilt`), solved in VE coordinates
    (x̃ = x/α, ρ = σ/α) with D's divided differences in ρ, r = ψ(ρ')/ψ(ρ), Δ = ρ' − ρ:

        stage 1:  x̃' = r x̃ + (1 − r) D_i
        stage 2:  + (Δ + ψ(ρ') ∫_{ρ'}^{ρ} dλ/ψ) D'_i,                 D'_i = (D_i − D_{i−1})/(ρ_i − ρ_{i−1})
        stage 3:  + (Δ²/2 + ψ(ρ') ∫_{ρ'}^{ρ} (λ − ρ) dλ/ψ) D''_i,      D''_i = 2 (D'_i − D'_{i−1})/(ρ_i − ρ_{i−2})
        noise:    + s_noise √(ρ'² − ρ² r²) ε   (per sample; none at η = 0 or "ode")

    stage k from the k-th step on (up to `max_stage`), the integrals by a `points`-piece Riemann sum; to the data
    x = D, from pure noise the limit x̃' = D + ρ' ε (η > 0) or ρ' x/σ + D ("ode"). One evaluation per step. The
    divided differences are backward ones, so on the ODE (η = 0) it converges at order 2 (`tests/test_solvers.py`)."""
    solver_type = check_choice("solver_type", solver_type, ER_SDE_SOLVERS)
    eta = _check_eta(eta)
    s_noise = check_number("s_noise", s_noise, 0.0)
    max_stage = check_int("max_stage", max_stage, 1, 3)
    points = check_int("points", points, 1)
    noisy = s_noise > 0 and eta > 0 and solver_type != "ode"
    p = PathGrid(run)
    old = old_d = x.new_zeros(())  # the previous D and D' (set before any stage reads them)
    for i in run.steps():
        den = p.denoise(x, i)
        rho, rho_next = p.rho(i), p.rho(i + 1)
        if rho_next == 0:
            xt = den
        else:
            q = rho_next * math.exp(_er_tilt(solver_type, eta, rho_next) - _er_tilt(solver_type, eta, rho))  # ρ r
            xt = q * (x / p.s[i]) + (1.0 - q / rho) * den  # stage 1: r x̃ = q x/σ (finite from pure noise)
            stage = min(max_stage, i + 1)
            if stage >= 2 and not math.isinf(rho):
                s, s_u = _er_integrals(solver_type, eta, rho, rho_next, points)
                dt = rho_next - rho
                d1 = (den - old) * (1.0 / (rho - p.rho(i - 1)))  # 0 after a step from pure noise
                xt = xt + (dt + s) * d1
                if stage >= 3:
                    d2 = (d1 - old_d) * (2.0 / (rho - p.rho(i - 2)))
                    xt = xt + (0.5 * dt * dt + s_u) * d2
                old_d = d1
            if noisy:
                xt = xt + (s_noise * math.sqrt(max(rho_next**2 - q * q, 0.0))) * run.noise()
        old = den
        x = p.a[i + 1] * xt
        x = run.tick(i, x)
    return x


def dpm_2_ancestral(
    run: Run, x: torch.Tensor, *, eta: float = 1.0, s_noise: float = 1.0, split: str | None = None
) -> torch.Tensor:
    """DPM-Solver-2 with ancestral noise (k-diffusion's `sample_dpm_2_ancestral`): split ρ_{i+1} into
    (ρ_down, ρ_up) by `eta`, take `dpm_2`'s step to ρ_down (midpoint ρ_m = √(ρ_i ρ_down)), then add
    ρ_up ε (per sample); Euler when ρ_down = 0, DDIM from pure noise. Two evaluations per step. `split` as
    `euler_ancestral`'s (ComfyUI's `dpm_2_ancestral_RF` takes its stages in the flow's own coordinates, this
    one in VE coordinates, so the two differ on flows)."""
    eta = _check_eta(eta)
    split = _ancestral_split(run, split)
    p = PathGrid(run)
    for i in run.steps():
        den = p.denoise(x, i)
        rho_i = p.rho(i)
        down, up = _down_up(p, i, eta, split)
        if down == 0 or math.isinf(rho_i):  # first order: Euler to ρ_down (DDIM from pure noise)
            xt = p.first_order(i, x, den, down)
        else:
            xt = x / p.a[i]  # x̃ = x/α (VE coordinates)
            rho_m = math.sqrt(rho_i * down)  # the log-ρ midpoint of [ρ_down, ρ_i]
            xt_m = p.stage_ve(i, xt + (rho_m - rho_i) / rho_i * (xt - den), -math.log(rho_m))  # Euler half step
            with between_knots():  # (at η = 1 ρ_m is ρ_{i+1}; the midpoint is not that knot)
                den_m = p.denoise_ve(xt_m, -math.log(rho_m))
            xt = xt + (down - rho_i) / rho_m * (xt_m - den_m)  # the full step with the midpoint's slope
        x = _ancestral_noise(run, p, i, xt, up, s_noise)
        x = run.tick(i, x)
    return x


def dpmpp_sde(run: Run, x: torch.Tensor, *, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5) -> torch.Tensor:
    """Stochastic DPM-Solver++ (k-diffusion's `sample_dpmpp_sde`): two ancestral first-order stages in
    VE coordinates per step, h = log(ρ_i/ρ_{i+1}),

        stage 1 to ρ_s = ρ_i e^{−rh}:  x̃_s = (d₁/ρ_i) x̃_i + (1 − d₁/ρ_i) D_i + u₁ ε₁,
        stage 2 to ρ_{i+1}:           x̃' = (d₂/ρ_i) x̃_i + (1 − d₂/ρ_i) D̄ + u₂ ε₂,
        D̄ = (1 − 1/(2r)) D_i + D(x_s)/(2r),

    (d, u) the ancestral split of each target by `eta`. As k-diffusion's default Brownian-tree noise,
    ε₁ and ε₂ are increments of one Brownian path in ρ (per sample): ε₁ over [ρ_s, ρ_i], ε₂ over
    [ρ_{i+1}, ρ_i]. eta = 0 is DPM-Solver++(2S). Euler on the last step (to the data)."""
    eta = _check_eta(eta)
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
        raise ArgumentError(f"r: expected the stage's share of the step in (0, 1], got {r!r}")
    p = PathGrid(run)
    for i in run.steps():
        den = p.denoise(x, i)
        rho_i, rho_j = p.rho(i), p.rho(i + 1)
        if rho_j == 0 or math.isinf(rho_i):  # to the data, or from pure noise: one first-order step
            down, up = _ancestral(rho_i, rho_j, eta)
            x = _ancestral_noise(run, p, i, p.first_order(i, x, den, down), up, s_noise)
        else:
            xt = x / p.a[i]
            rho_s = rho_i * math.exp(-r * math.log(rho_i / rho_j))
            d1, u1 = _ancestral(rho_i, rho_s, eta)
            d2, u2 = _ancestral(rho_i, rho_j, eta)
            if eta:  # one Brownian path W(ρ) per sample: ε₁ = ΔW[ρ_s, ρ_i]/√·, ε₂ = ΔW[ρ_{i+1}, ρ_i]/√·
                w1 = math.sqrt(rho_i - rho_s) * run.noise()
                w2 = w1 + math.sqrt(rho_s - rho_j) * run.noise()
            xt_s = (d1 / rho_i) * xt + (1.0 - d1 / rho_i) * den  # stage 1
            if eta:
                xt_s = xt_s + (s_noise * u1 / math.sqrt(rho_i - rho_s)) * w1
            xt_s = p.stage_ve(i, xt_s, -math.log(rho_s))  # (inpainting blends it as DPMSolverSDEScheduler's pipeline)
            den_s = p.denoise_ve(xt_s, -math.log(rho_s))
            fac = 0.5 / r
            xt = (d2 / rho_i) * xt + (1.0 - d2 / rho_i) * ((1.0 - fac) * den + fac * den_s)  # stage 2
            if eta:
                xt = xt + (s_noise * u2 / math.sqrt(rho_i - rho_j)) * w2
            x = p.a[i + 1] * xt
        x = run.tick(i, x)
    return x


def _eps_ve(p: PathGrid, xt: torch.Tensor, rho: float) -> torch.Tensor:
    """The noise prediction ε = (x̃ − D)/ρ at a VE point x̃ of noise level ρ (an off-grid stage)."""
    return (xt - p.denoise_ve(xt, -math.log(rho))) / rho


def _fast_orders(steps: int, budget: int | None, order: int, first_order: list[bool]) -> list[int]:
    """DPM-Solver-fast's orders (Lu et al. 2022a, §3.4; k-diffusion's `dpm_solver_fast`): the budget
    shared out from the first step, `order` evaluations a step while the later steps still get one
    each (nfe = 3k: 3, ..., 3, 2, 1; 3k + 1: 3, ..., 3, 1; 3k + 2: 3, ..., 3, 2). Steps to the data or
    from pure noise are first order. Without a budget every step takes `order`."""
    orders, left = [], budget
    for i in range(steps):
        if first_order[i]:
            k = 1
        elif left is None:
            k = order
        else:
            k = max(1, min(order, left - (steps - i - 1)))  # leave one evaluation for each later step
        orders.append(k)
        left = None if left is None else left - k
    return orders


def dpm_fast(run: Run, x: torch.Tensor, *, order: int = 3, eta: float = 0.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver-fast (Lu et al. 2022a, Alg. 1 with §3.4's orders; k-diffusion's `sample_dpm_fast`):
    singlestep DPM-Solver-k on the noise prediction ε = (x̃ − D)/ρ in VE coordinates, h = λ_{i+1} − λ_i,
    stages at λ_i + r h (r = 1/2 for k = 2; 1/3, 2/3 for k = 3):

        k = 1: x̃' = x̃ − (ρ_i − ρ_{i+1}) ε_i   (DDIM)
        k = 2: x̃' = x̃ − (ρ_i − ρ_{i+1}) ε_i − (ρ_i − ρ_{i+1})/(2r) (ε_r − ε_i)
        k = 3: x̃' = x̃ − (ρ_i − ρ_{i+1}) ε_i − (ρ_{i+1}/r₂)(expm1(h)/h − 1)(ε_{r₂} − ε_i),

    ε_r at the first-order (k = 3: second-order) prediction of the stage. With an NFE budget, the
    solver takes ⌊nfe/3⌋ + 1 steps and shares the evaluations out as k-diffusion does (`_fast_orders`);
    its grid is uniform in λ (`loglinear`). `eta` > 0 adds ancestral noise (k-diffusion's variant)."""
    order = check_int("order", order, 1, 3)
    eta = _check_eta(eta)
    p = PathGrid(run)
    n = len(p.t) - 1
    rho_end = p.rho(n)
    singular = [p.s[i + 1] == 0 or p.a[i] == 0 for i in range(n)]
    orders = _fast_orders(n, run.nfe_budget, order, singular)
    for i in run.steps():
        den = p.denoise(x, i)
        rho_i, rho_j = p.rho(i), p.rho(i + 1)
        down, up = _ancestral(rho_i, rho_j, eta)
        if down < rho_end:  # not past the grid's end (k-diffusion: t_next = min(t_end, t(σ_down)))
            down, up = rho_end, math.sqrt(max(rho_j**2 - rho_end**2, 0.0))
        if orders[i] == 1 or down == 0:
            xt = p.first_order(i, x, den, down)
        else:
            xt = x / p.a[i]
            xt, _ = _dpm_stages(p, xt, (xt - den) / rho_i, rho_i, down, orders[i], 0.5 if orders[i] == 2 else 1 / 3)
        x = _ancestral_noise(run, p, i, xt, up, s_noise)
        x = run.tick(i, x)
    return x


def _dpm_solver_2(
    xt: torch.Tensor, eps: torch.Tensor, e1: torch.Tensor, rho: float, rho_next: float, r1: float
) -> torch.Tensor:
    """DPM-Solver-2's update from ε at ρ and ε₁ at its stage λ + r₁ h: x̃ − (ρ − ρ')(ε + (ε₁ − ε)/(2r₁))."""
    return xt - (rho - rho_next) * eps - (rho - rho_next) / (2 * r1) * (e1 - eps)


def _dpm_stages(
    p: PathGrid, xt: torch.Tensor, eps: torch.Tensor, rho: float, rho_next: float, order: int, r1: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One DPM-Solver-k step (Lu et al. 2022a, Alg. 4-5) in VE coordinates from (x̃, ε at ρ) to ρ_next,
    and the ε of its first stage (at λ + r₁ h) for the embedded lower-order step to share."""
    h = math.log(rho / rho_next)
    if order == 1:
        return xt - (rho - rho_next) * eps, None
    rho_1 = rho * math.exp(-r1 * h)
    e1 = _eps_ve(p, xt - (rho - rho_1) * eps, rho_1)
    if order == 2:
        return _dpm_solver_2(xt, eps, e1, rho, rho_next, r1), e1
    r2 = 2 / 3
    rho_2 = rho * math.exp(-r2 * h)
    u2 = xt - (rho - rho_2) * eps - (r2 / r1) * ((rho - rho_2) / (r2 * h) - rho_2) * (e1 - eps)
    e2 = _eps_ve(p, u2, rho_2)
    return xt - (rho - rho_next) * eps - (rho_next / r2) * (math.expm1(h) / h - 1.0) * (e2 - eps), e1


def dpm_adaptive(
    run: Run,
    x: torch.Tensor,
    *,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta: float = 0.0,
    s_noise: float = 1.0,
    sigma_min: float | None = None,
) -> torch.Tensor:
    """Adaptive DPM-Solver-12 / 23 (Lu et al. 2022a, §4.2 and App. C; k-diffusion's `sample_dpm_adaptive`):
    steps in λ = −log ρ from the grid's start to its end, each an embedded pair (order 3: DPM-Solver-2
    with r₁ = 1/3 inside DPM-Solver-3, sharing two evaluations; order 2: DDIM inside DPM-Solver-2),
    accepted by a PID controller on the error ‖(x_low − x_high)/δ‖/√numel, δ = max(atol, rtol·
    max(|x_low|, |x_prev|)) over the batch (like every adaptive solver here, the batch shares its steps).
    A grid that ends at the data (σ = 0) is integrated to `sigma_min` (default: the field's) and then
    takes one DDIM step to D. The ε at a rejected step's start is reused; `nfe` is a budget, as for
    torchdiffeq's adaptive methods."""
    order = check_int("order", order, 2, 3)
    eta = _check_eta(eta)
    for name, v in (("rtol", rtol), ("atol", atol), ("h_init", h_init), ("accept_safety", accept_safety)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ArgumentError(f"{name}: expected a positive number, got {v!r}")
    p = PathGrid(run, pure_noise=False)  # a zero-SNR model's top knot at its clamped level: λ finite
    rho_start, rho_end = p.rho(0), p.rho(len(p.t) - 1)
    if math.isinf(rho_start):
        raise ArgumentError(
            f"solver: 'dpm_adaptive' needs a finite starting noise level; the grid starts at pure noise "
            f"(t={p.t[0]:g}): pass grid= starting below it"
        )
    to_data = rho_end == 0
    if to_data:
        lo = getattr(run.field, "sigma_min", None) if sigma_min is None else sigma_min
        rho_end = float(lo) if lo is not None else 0.002
        if not 0 < rho_end < rho_start:
            raise ArgumentError(f"sigma_min: expected a level in (0, {rho_start:g}), got {rho_end!r}")
    s, t_end = -math.log(rho_start), -math.log(rho_end)
    xt = x / p.a[0]
    x_prev, eps_s = xt, None
    h, errs = abs(float(h_init)), [0.0, 0.0, 0.0]
    k = 1.5 if eta else order  # the PID exponents (k-diffusion's controller, order 1.5 with noise)
    b1, b2, b3 = (pcoeff + icoeff + dcoeff) / k, -(pcoeff + 2 * dcoeff) / k, dcoeff / k
    first = True
    while s < t_end - 1e-5:
        t = min(t_end, s + h)
        rho_s, rho_t = math.exp(-s), math.exp(-t)
        down, up = _ancestral(rho_s, rho_t, eta)
        down = max(down, rho_end)  # not past the end (t_ = min(t_end, t(σ_down)))
        up = math.sqrt(max(rho_t**2 - down**2, 0.0)) if eta else 0.0
        if eps_s is None:
            eps_s = _eps_ve(p, xt, rho_s)
        if order == 2:
            x_low, _ = _dpm_stages(p, xt, eps_s, rho_s, down, 1, 0.5)
            x_high, _ = _dpm_stages(p, xt, eps_s, rho_s, down, 2, 0.5)
        else:  # DPM-Solver-2 with r₁ = 1/3 shares its stage with DPM-Solver-3
            x_high, e1 = _dpm_stages(p, xt, eps_s, rho_s, down, 3, 1 / 3)
            assert e1 is not None
            x_low = _dpm_solver_2(xt, eps_s, e1, rho_s, down, 1 / 3)
        delta = torch.maximum(torch.full_like(x_low, float(atol)), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = float(((x_low - x_high) / delta).norm()) / math.sqrt(x_low.numel())
        inv = 1.0 / (error + 1e-8)
        if first:
            errs, first = [inv, inv, inv], False
        errs[0] = inv
        factor = 1.0 + math.atan(errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3 - 1.0)
        if factor >= accept_safety:  # accept
            errs[2], errs[1] = errs[1], errs[0]
            x_prev = x_low
            xt = x_high + ((s_noise * up) * run.noise() if up > 0 else 0.0)
            s, eps_s = t, None
        h *= factor
    if to_data:  # the last step, to the data: DDIM from σ_min
        xt = xt - rho_end * _eps_ve(p, xt, rho_end)
    return p.a[-1] * xt


def pc(run: Run, x: torch.Tensor, *, snr: float = 0.15, corrector_steps: int = 1) -> torch.Tensor:
    """Predictor–corrector sampling (Song et al. 2021, Alg. 2 with the Langevin corrector of Alg. 4;
    diffusers' `ScoreSdeVeScheduler` loop) in VE coordinates, with the score s = (D − x̃)/ρ²:

        corrector at ρ_i (Langevin, the NCSN dynamics of Eq. 6):  x̃ ← x̃ + ε s + √(2ε) z,
            ε = 2 (snr ‖z‖ / ‖s‖)²;
        predictor to ρ_{i+1} (reverse diffusion):  x̃ ← x̃ + (ρ_i² − ρ_{i+1}²) s + √(ρ_i² − ρ_{i+1}²) z,

    the last step landing on D without noise (the pipeline's `prev_sample_mean`). As in Song et al.'s
    code and diffusers, ‖z‖ and ‖s‖ are the batch's mean norms: one step size for the batch (a sample's
    own norms make the step explode where its score vanishes, near a mode in low dimension), so unlike
    every other solver a sample here depends on the other samples of its batch. `corrector_steps` 0 is
    the predictor alone (per-sample); 1 (the default) costs two evaluations a step."""
    if isinstance(snr, bool) or not isinstance(snr, (int, float)) or not snr > 0:
        raise ArgumentError(f"snr: expected a positive signal-to-noise ratio for the Langevin step, got {snr!r}")
    steps = check_int("corrector_steps", corrector_steps, 0, 1)
    p = PathGrid(run)
    for i in run.steps():
        rho_i, rho_j = p.rho(i), p.rho(i + 1)
        if math.isinf(rho_i):  # from pure noise: the exact first-order step
            den = p.denoise(x, i)
            x = ddim_step(x, den, p.s[i], p.s[i + 1], p.a[i + 1], p.lam[i + 1] - p.lam[i])
            x = run.tick(i, x)
            continue
        xt = x / p.a[i]
        for _ in range(steps):  # Langevin corrector at ρ_i
            score = (p.denoise(p.a[i] * xt, i) - xt) / rho_i**2
            z = run.noise()
            ratio = float(z.flatten(1).norm(dim=1).mean()) / max(float(score.flatten(1).norm(dim=1).mean()), 1e-30)
            eps = 2.0 * (snr * ratio) ** 2  # the Langevin step for this noise level (batch means)
            xt = xt + eps * score + math.sqrt(2.0 * eps) * z
        score = (p.denoise(p.a[i] * xt, i) - xt) / rho_i**2  # reverse-diffusion predictor to ρ_{i+1}
        xt = xt + (rho_i**2 - rho_j**2) * score
        if rho_j > 0:
            xt = xt + math.sqrt(rho_i**2 - rho_j**2) * run.noise()
        x = p.a[i + 1] * xt
        x = run.tick(i, x)
    return x


def _singlestep_orders(steps: int, order: int, lower_order_final: bool) -> list[int]:
    """The orders of diffusers' DPMSolverSinglestepScheduler: cycles 1, 2, (3), each cycle one
    singlestep update whose stages are grid knots; with `lower_order_final` the cycles fit the steps."""
    cycle = list(range(1, order + 1))
    if not lower_order_final:
        return (cycle * (steps // order + 1))[:steps]
    if order == 3:
        tail = {0: [1, 2, 1], 1: [1], 2: [1, 2]}[steps % 3]
        return cycle * ((steps - len(tail)) // 3) + tail
    if order == 2:
        return cycle * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else cycle * (steps // 2) + [1]
    return [1] * steps


def _singlestep_lowers(run: Run, steps: int, order: int, ends_at_data: bool) -> bool:
    """Whether diffusers' DPMSolverSinglestepScheduler behind the field lowers its final orders: its
    `lower_order_final` (default False), switched on where the steps are not a multiple of the order
    or the schedule ends at σ = 0; True for every other field."""
    model = field_model(
        run.field, lambda m: type(getattr(m, "scheduler", None)).__name__ == "DPMSolverSinglestepScheduler"
    )
    own = True if model is None else bool(dict(model.scheduler.config).get("lower_order_final", False))
    return own or steps % order != 0 or ends_at_data


def dpmpp_singlestep(
    run: Run, x: torch.Tensor, *, order: int = 2, solver_type: str = "midpoint", lower_order_final: bool | None = None
) -> torch.Tensor:
    """Singlestep DPM-Solver++ (Lu et al. 2022b, Alg. 1 with its stages on the grid's own knots;
    diffusers' `DPMSolverSinglestepScheduler`): the orders cycle 1, 2, (3); a k-th order update starts
    from the state k − 1 knots back and uses the data predictions at those knots as its stages,

        k = 2: x_{i+1} = (σ_{i+1}/σ_{i−1}) x_{i−1} − α_{i+1} φ (D_{i−1} + ½ D₁)   (midpoint)
               ("heun": the ½ φ D₁ term becomes −(φ/h + 1) D₁),

    φ = expm1(−h), h = λ_{i+1} − λ_{i−1}, D₁ = (D_i − D_{i−1})/r, r = (λ_i − λ_{i−1})/h; k = 3 in the
    same way over three knots. One evaluation a knot; the step to the data is first order.
    `lower_order_final` (None: as the model's diffusers scheduler does, else True) ends the cycles
    with lower orders so that they fit the steps. Where the scheduler ends with a step from its last
    σ to itself that closes a second- or third-order cycle, that update is taken, with one more
    evaluation at the last knot (its stage there)."""
    order = check_int("order", order, 1, 3)
    if solver_type not in ("midpoint", "heun"):
        raise ArgumentError(f"solver_type: expected 'midpoint' or 'heun', got {solver_type!r}")
    p = PathGrid(run)
    n, steps = len(p.t) - 1, scheduler_steps(run)  # the grid's steps, and the scheduler's count of them
    full = steps + run.skipped  # the schedule's steps, whose end this grid may be (img2img)
    if lower_order_final is None:
        lower_order_final = _singlestep_lowers(run, full, order, p.s[n] == 0)
    orders = _singlestep_orders(full, order, bool(lower_order_final))[run.skipped :]  # the scheduler's
    if p.s[n] == 0:  # diffusers' final_sigmas_type="zero"
        orders[n - 1] = 1
    dens: deque = deque(maxlen=3)  # data predictions at the last knots, newest last
    x_start = x  # the state where the current cycle started

    def update(i: int, k: int, to: int) -> torch.Tensor:
        """The k-th order update that ends step i at knot `to`, from x_start at knot i − k + 1."""
        j = i - k + 1
        h = p.lam[to] - p.lam[j]
        phi = math.expm1(-h)
        base = (p.s[to] / p.s[j]) * x_start - (p.a[to] * phi) * dens[-k]
        if k == 2:
            d1 = (dens[-1] - dens[-2]) / ((p.lam[i] - p.lam[j]) / h)
            if solver_type == "midpoint":
                return base - (0.5 * p.a[to] * phi) * d1
            return base + (p.a[to] * (phi / h + 1.0)) * d1
        r0, r1 = (p.lam[i] - p.lam[j]) / h, (p.lam[i - 1] - p.lam[j]) / h
        d1_0, d1_1 = (dens[-2] - dens[-3]) / r1, (dens[-1] - dens[-3]) / r0
        if solver_type == "midpoint":
            return base + (p.a[to] * (phi / h + 1.0)) * d1_1
        d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
        return base + (p.a[to] * (phi / h + 1.0)) * d1 - (p.a[to] * ((phi + h) / h**2 - 0.5)) * d2

    def order_at(i: int) -> int:
        k = min(orders[i], len(dens))
        while k > 1 and p.lam[i - k + 1] == -math.inf:  # no higher order from pure noise
            k -= 1
        return k

    for i in run.steps():
        dens.append(p.denoise(x, i))
        k = order_at(i)
        if k == 1:  # a cycle starts here: its later, higher-order updates start from this state
            x_start = x
            x = ddim_step(x, dens[-1], p.s[i], p.s[i + 1], p.a[i + 1], p.lam[i + 1] - p.lam[i])
        else:
            x = update(i, k, i + 1)
        x = run.tick(i, x)
    if takes_closing_step(run) and orders[n] > 1:
        # the scheduler's last step, from its last σ to itself, ends a cycle: a stage at the last knot
        dens.append(p.denoise(x, n))
        k = order_at(n)
        if k > 1:
            x = update(n, k, n)
    return x


# schedulers whose step moves along the noise of the unclipped prediction where they clip x̂_0
_DDIM_SCHEDULERS = ("DDIMScheduler", "DDIMParallelScheduler", "DDIMInverseScheduler", "RePaintScheduler")


def _ddim_landing(run: Run):
    """i ↦ the σ where DDIMScheduler's step from knot i lands when that is not knot i + 1 (its
    `prev_timestep` t − T//N between knots: "linspace" spacing, "trailing" where N does not divide T),
    else None; always None on a grid other than the scheduler's own schedule. In VE coordinates the
    step goes there, x' = D + σ'(x − D)/σ, and the scheduler reads the VP sample √ᾱ' x' as the sample
    at knot i + 1: x_{i+1} = x' √((1 + σ_{i+1}²)/(1 + σ'²))."""
    between = lambda m: getattr(m, "steps_between_knots", False)  # noqa: E731  (DDIM-type schedulers)
    if own_schedule(run, between) is None:  # the scheduler's own schedule (or a part of it)
        return lambda i: None
    model = field_model(run.field, between)
    steps = scheduler_steps(run) + run.skipped  # the scheduler's N
    lands = []
    for i in range(len(run.times) - 1):  # (the last step too: t − T//N ≥ 0 is not the end)
        land = model.landing_sigma(run.times[i], steps)
        lands.append(None if land is None or math.isclose(land, run.times[i + 1], rel_tol=1e-12) else land)
    return lands.__getitem__


def _clipping_model(field):
    """The diffusers model under a field whose DDIM-type scheduler (DDIM, DDIMParallel, RePaint) clips or
    thresholds its data prediction and steps along the noise of the unclipped one, or None (DDPM's
    posterior mean, and every other scheduler, use the clipped prediction throughout)."""
    return field_model(
        field,
        lambda m: (
            getattr(m, "scheduler_class", None) in _DDIM_SCHEDULERS
            and bool(getattr(m, "clip_sample", False) or getattr(m, "thresholding", False))
        ),
    )


def _unclipped(model, x: torch.Tensor) -> torch.Tensor | None:
    """The data prediction of `model`'s last call before it clipped it (DDIM's steps move along the
    noise of this one), or None where nothing was clipped."""
    raw = getattr(model, "unclipped_output", None)
    return None if raw is None else raw[: len(x)].to(x.dtype)


def ddim(run: Run, x: torch.Tensor) -> torch.Tensor:
    """DDIM (Song et al. 2021a), the first-order exponential step on any Gaussian path:
        x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1} expm1(−h) D_i,   h = λ_{i+1} − λ_i,
    exact for a constant data prediction D. On EDM and flow-matching fields it is Euler; on TrigFlow,
    its one step from pure noise is sCM's one-step sampler, D = cos(t) x − sin(t) v.
    On a diffusers DDIM model that clips or thresholds D (`clip_sample`, `thresholding`: DDIMScheduler's
    defaults clip), the step is DDIMScheduler's: x_{i+1} = α_{i+1} D_i + σ_{i+1} ε_i with D_i clipped and
    ε_i = (x_i − α_i D_i^raw)/σ_i the noise of the unclipped prediction (where `euler` moves along the
    clipped one: DDIM's `use_clipped_model_output=True`). Where the scheduler ends with a step from its
    last σ to itself (`set_alpha_to_one=False`), that step clips x̂_0 there, with one more evaluation."""
    p = PathGrid(run)
    clipping = _clipping_model(run.field)
    landing = _ddim_landing(run)
    for i in run.steps():
        den = p.denoise(x, i)
        raw = _unclipped(clipping, x)
        land = landing(i)
        if land is not None:  # DDIMScheduler's prev_timestep between knots, read as the next knot's sample
            x = p.first_order(i, x, den, land, raw) * vp_reread(land, p.s[i + 1])
        elif raw is None:
            x = ddim_step(x, den, p.s[i], p.s[i + 1], p.a[i + 1], p.lam[i + 1] - p.lam[i])
        else:  # DDIM's direction term keeps the unclipped noise prediction: x̃' = D + ρ' (x̃ − D^raw)/ρ
            x = p.a[i + 1] * p.first_order(i, x, den, p.rho(i + 1), raw)
        x = run.tick(i, x)
    end = len(p.t) - 1
    if clipping is not None and takes_closing_step(run):
        # the scheduler's last step, from its last σ to itself, moves x only by clipping x̂_0 there
        den = p.denoise(x, end)
        raw = _unclipped(clipping, x)
        if raw is not None:
            x = p.a[end] * den + (x - p.a[end] * raw)
    return x


def ddim_inverse(run: Run, x: torch.Tensor) -> torch.Tensor:
    """DDIM inversion as diffusers' `DDIMInverseScheduler` runs it (null-text inversion, DiffEdit): on
    the step from level σ_i up to σ_{i+1} the network sees the current sample at the target knot's
    timestep, and its output is read at the current level:

        (x̂_0, ε̂) = the network's output at (x_VP, t_{i+1}) read at σ_i,   x_{i+1} = x̂_0 + σ_{i+1} ε̂,

    x̂_0 clipped or thresholded where the model does so (ε̂ stays the unclipped one's). No evaluation
    is at the current level, so the walk may start at the data itself (σ_0 = 0: the scheduler's
    `set_alpha_to_one`). The sample the network sees is the VP one, x/√(1 + σ_i²), read at the next
    level (`vp_reread`); a diffusers model's output is read by its own conversions (`to_native`,
    `from_native`, `noise_at`), any other σ-time field's D gives ε̂ = (x' − D)/σ_{i+1}. First order.
    Only for grids run upwards (`fs.invert`)."""
    t = run.times  # (increasing: `fs.sample` refuses this solver, `Solver.inverts`)
    native = field_model(run.field, lambda m: callable(getattr(m, "noise_at", None)))

    def step(x: torch.Tensor, i: int, j: int) -> torch.Tensor:
        s_i, s_j = float(t[i]), float(t[j])
        x_read = x * vp_reread(s_i, s_j)  # the same (VP) sample at knot j's timestep
        d_j = x_read - s_j * run.f(x_read, j)  # D at (x_read, σ_j), as the field returns it
        if native is None:
            return x + (s_j - s_i) * (x_read - d_j) / s_j  # x̂_0 = x − σ_i ε̂, then x̂_0 + σ_j ε̂
        raw = _unclipped(native, x_read)
        col_j, col_i = (torch.full((len(x),), v, dtype=x.dtype, device=x.device) for v in (s_j, s_i))
        out = native.to_native(x_read, col_j, d_j if raw is None else raw)  # the network's output
        d_i = native.from_native(x, col_i, out)
        if raw is not None:  # the model clips or thresholds x̂_0 (and keeps ε̂ of the raw output)
            d_i = native.finish_denoised(d_i, x, col_i)
        return d_i + s_j * native.noise_at(x, col_i, out)

    # a scheduler that starts on its first knot (`set_alpha_to_one=False`) steps from it to itself
    # first, which moves x only by clipping x̂_0 there: one more evaluation, where the budget allows
    repeats = getattr(native, "repeats_final", None)
    starts_twice = callable(repeats) and repeats(float(t[0])) and _clipping_model(run.field) is not None
    if starts_twice and (run.nfe_budget is None or run.nfe_budget > len(t) - 1):
        x = step(x, 0, 0)
    for i in run.steps():
        x = run.tick(i, step(x, i, i + 1))
    return x


def repaint_walk(steps: int, jump_length: int, jump_n_sample: int) -> list[tuple[int, int]]:
    """RePaint's walk over a grid of `steps` steps (Lugmayr et al. 2022, Alg. 1 with its resampling
    schedule, as RePaintScheduler.set_timesteps lays it out): (from, to) knot pairs, a step down the
    grid (to = from + 1, one evaluation) or back up by one knot (to = from − 1, re-noising). Every
    `jump_length` knots from the end, the walk goes back up `jump_length` knots and down again,
    `jump_n_sample` − 1 times."""
    check_int("jump_length", jump_length, 1)
    check_int("jump_n_sample", jump_n_sample, 1)
    jumps = {j: jump_n_sample - 1 for j in range(0, steps - jump_length, jump_length)}
    order, u = [], steps  # the scheduler's inference indices, from steps − 1 (the first knot) down to 0
    while u >= 1:
        u -= 1
        order.append(u)
        if jumps.get(u, 0) > 0:
            jumps[u] -= 1
            for _ in range(jump_length):
                u += 1
                order.append(u)
    walk, last = [], steps
    for u in order:  # index u is knot steps − 1 − u; after a step down from it, the state is at the next knot
        walk.append((steps - 1 - u, steps - u) if u < last else (steps - last, steps - 1 - last))
        last = u
    return walk


def repaint_evals(jump_length: int = 10, jump_n_sample: int = 10):
    """Evaluations of `repaint` on a grid of `steps` steps: one per step down."""
    return lambda steps, singular_end: sum(b > a for a, b in repaint_walk(steps, jump_length, jump_n_sample))


def repaint(
    run: Run, x: torch.Tensor, *, jump_length: int = 10, jump_n_sample: int = 10, eta: float = 0.0
) -> torch.Tensor:
    """RePaint (Lugmayr et al. 2022) for inpainting with any model: `fs.sample(..., init=x0, mask=m,
    solver="repaint")`. Each step down is DDIM with η (the posterior's noise z, c = η (ρ'/ρ) √(ρ² − ρ'²)
    in VE levels ρ) for the generated part, and the data noised afresh with the same z for the kept
    part, x̃' = m (D + √(ρ'² − c²) ε̂ + c z) + (1 − m)(x0 + ρ' z). The walk (`repaint_walk`) goes back up
    `jump_length` knots every `jump_length` knots, `jump_n_sample` − 1 times, re-noising on the way
    up, x̃ ← x̃ + √(ρ_k² − ρ_{k+1}²) z, so the generated part harmonises with the kept one. On a diffusers
    model loaded with RePaintScheduler and its own schedule, the way up is the scheduler's `undo_step`:
    its T/N one-timestep transitions from the knot's timestep up, in VP coordinates. Where the
    scheduler clips x̂_0 (`clip_sample`), ε̂ is the unclipped prediction's noise, as in its step."""
    if run.known is None:
        raise ArgumentError("solver: 'repaint' inpaints; give init= (the data) and mask= (1 where to generate)")
    eta = check_number("eta", eta, 0.0)
    x0, mask = run.known
    keep = 1 - mask
    p = PathGrid(run)
    steps = len(p.t) - 1
    clipping = _clipping_model(run.field)  # RePaint's step, as DDIM's, keeps the unclipped noise
    table = field_model(run.field, lambda m: callable(getattr(m, "repaint_betas", None)))
    stride = None if table is None else len(table.log_sigmas) // steps  # T/N, the training timesteps per step
    for a, b in repaint_walk(steps, jump_length, jump_n_sample):
        run.step = min(a, b)
        if b > a:  # down: DDIM with η, the kept part noised afresh with the same z
            # in the path's coordinates x = α x̃ (finite from pure noise, α = 0, where ρ'/ρ = 0)
            ratio = 0.0 if math.isinf(p.rho(a)) else p.rho(b) / p.rho(a)
            den = p.denoise(x, a)
            raw = _unclipped(clipping, x)
            eps = (x - p.a[a] * (den if raw is None else raw)) / p.s[a]
            z = run.noise()
            c = eta * p.s[b] * math.sqrt(max(1.0 - ratio**2, 0.0))  # α' times the VE posterior std
            unknown = p.a[b] * den + math.sqrt(max(p.s[b] ** 2 - c**2, 0.0)) * eps + c * z
            x = run.tick(a, mask * unknown + keep * (p.a[b] * x0 + p.s[b] * z))
            continue
        # up one knot: the forward process from knot a to knot b, x̃_b = x̃_a + √(ρ_b² − ρ_a²) z
        betas = table.repaint_betas(p.rho(b), stride) if table is not None else None
        if betas is None:
            x = (p.a[b] / p.a[a]) * x + math.sqrt(max(p.s[b] ** 2 - (p.a[b] * p.rho(a)) ** 2, 0.0)) * run.noise()
            continue
        xv = x / math.sqrt(1 + p.rho(a) ** 2)  # the scheduler's undo_step in VP coordinates (a VE field: x = x̃)
        for beta in betas:
            xv = math.sqrt(1 - beta) * xv + math.sqrt(beta) * run.noise()
        x = xv * math.sqrt(1 + p.rho(b) ** 2)
    return x


def consistency(run: Run, x: torch.Tensor, *, sigma_min: float = 0.0) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; SCMScheduler's, LCMScheduler's and
    CMStochasticIterativeScheduler's step): jump to the data prediction, then noise it afresh to the
    next knot, x̃_{i+1} = D_i + √(ρ_{i+1}² − ε²) z (per-sample z) in VE coordinates, ε = `sigma_min`
    the model's boundary level (Alg. 1's ε; 0.002 for Song et al.'s models, 0 for LCM and sCM).
    For consistency models and few-step students, whose D is good from any knot."""
    if isinstance(sigma_min, bool) or not isinstance(sigma_min, (int, float)) or not sigma_min >= 0:
        raise ArgumentError(f"sigma_min: expected the boundary noise level ε >= 0, got {sigma_min!r}")
    p = PathGrid(run)
    for i in run.steps():
        den = p.denoise(x, i)
        x = p.a[i + 1] * den
        if p.s[i + 1] > 0:
            rho = p.rho(i + 1)
            x = x + p.a[i + 1] * math.sqrt(max(rho**2 - sigma_min**2, 0.0)) * run.noise()
        x = run.tick(i, x)
    return x


# -- stochastic multistep and ancestral -----------------------------------------------------------
ANCESTRAL_SPLITS = ("ve", "rf")


def _rf_down(p: PathGrid, i: int, eta: float) -> float:
    """ρ_down of ComfyUI's `sample_euler_ancestral_RF` (diffusers' `LTXEulerAncestralRFScheduler`): the
    deterministic part ends at the field time t_down = t_{i+1} (1 + η (t_{i+1}/t_i − 1)), linear in η,
    read as the VE level σ(t_down)/α(t_down) of the field's own path."""
    t, t_next = p.t[i], p.t[i + 1]
    if not eta or t_next == 0:
        return p.rho(i + 1)
    t_down = max(t_next * (1.0 + (t_next / t - 1.0) * eta), 0.0)
    a_down = p.path.alpha(t_down)
    return math.inf if a_down <= 0 else p.path.sigma(t_down) / a_down


def _split_of(field) -> str:
    """The ancestral split the model's scheduler uses (`ancestral_split` on the model), else "ve"."""
    return getattr(field_model(field, lambda m: hasattr(m, "ancestral_split")), "ancestral_split", None) or "ve"


def _ancestral_split(run: Run, split: str | None) -> str:
    """The `split` option checked, `None` read from the model's scheduler (`_split_of`)."""
    split = _split_of(run.field) if split is None else split
    if split not in ANCESTRAL_SPLITS:
        raise ArgumentError(f"split: expected one of {', '.join(ANCESTRAL_SPLITS)}, got {split!r}")
    return split


def _down_up(p: PathGrid, i: int, eta: float, split: str) -> tuple[float, float]:
    """(ρ_down, ρ_up) of an ancestral step from knot i to i + 1: "ve" k-diffusion's get_ancestral_step, "rf"
    ComfyUI's RF rule (`_rf_down`), ρ_up = √(ρ_{i+1}² − ρ_down²) in both."""
    if split == "rf":
        down = min(_rf_down(p, i, eta), p.rho(i + 1))
        return down, math.sqrt(max(p.rho(i + 1) ** 2 - down**2, 0.0))
    return _ancestral(p.rho(i), p.rho(i + 1), eta)


def euler_ancestral(
    run: Run, x: torch.Tensor, *, eta: float = 1.0, s_noise: float = 1.0, split: str | None = None
) -> torch.Tensor:
    """Euler ancestral (k-diffusion's `sample_euler_ancestral`): an Euler step on the VE ODE to ρ_down,
    then noise ρ_up ε (per sample), x̃_{i+1} = (ρ_down/ρ_i) x̃_i + (1 − ρ_down/ρ_i) D_i + ρ_up ε,
    ρ_up = √(ρ_{i+1}² − ρ_down²). `split` says how η divides the step: "ve" (k-diffusion's
    get_ancestral_step, η scales ρ_up) or "rf" (ComfyUI's `euler_ancestral_RF`, diffusers'
    `LTXEulerAncestralRFScheduler`: η moves the field time where the deterministic part ends); the two
    agree at η = 0 and, on σ-time fields, at η = 1. `None` takes the model's scheduler's split. Every
    ancestral solver (`dpmpp_2s`, `dpm_2_ancestral`, `euler_ancestral_cfg_pp`) takes the same `split`.
    On a diffusers DDIM model that clips x̂_0 the step to ρ_down moves along the noise of the unclipped
    prediction, as DDIMScheduler with η does (see `ddim`); on DDPM's it is DDPM's clipped posterior mean."""
    eta = _check_eta(eta)
    split = _ancestral_split(run, split)
    p = PathGrid(run)
    clipping = _clipping_model(run.field)  # DDIM with η steps along the noise of the unclipped x̂_0
    for i in run.steps():
        den = p.denoise(x, i)
        down, up = _down_up(p, i, eta, split)
        x = _ancestral_noise(run, p, i, p.first_order(i, x, den, down, _unclipped(clipping, x)), up, s_noise)
        x = run.tick(i, x)
    return x


def res_multistep_ancestral(
    run: Run, x: torch.Tensor, *, eta: float = 1.0, s_noise: float = 1.0, split: str | None = None
) -> torch.Tensor:
    """RES's second-order multistep step (Zhang et al. 2023) with ancestral noise (ComfyUI's
    `res_multistep_ancestral`), in VE coordinates to ρ_down (`split` as `euler_ancestral`'s), h = log(ρ_i/ρ_down):
        x̃_down = e^{−h} x̃_i + h (b₁ D_i + b₂ D_{i−1}),  b₁ = φ₁(−h) − φ₂(−h)/c₂,  b₂ = φ₂(−h)/c₂,
    c₂ = (λ_{i−1} − λ_{down,i−1})/h measured, as ComfyUI does, from where the previous step's deterministic part
    ended; then ρ_up ε. The first step and the last (to the data) are first order. η = 0 is ComfyUI's
    `res_multistep`, which is `dpmpp_2m_heun`. One evaluation per step."""
    eta = _check_eta(eta)
    split = _ancestral_split(run, split)
    p = PathGrid(run)
    old, old_down = None, math.inf
    for i in run.steps():
        den = p.denoise(x, i)
        rho = p.rho(i)
        down, up = _down_up(p, i, eta, split)
        if down == 0 or old is None or math.isinf(rho):
            xt = p.first_order(i, x, den, down)
        else:
            h = math.log(rho / down)
            c2 = (sigma_lambda(p.rho(i - 1)) - sigma_lambda(old_down)) / h  # −∞ after a step to ρ_down = 0: first order
            phi1 = -math.expm1(-h) / h
            phi2 = (phi1 - 1.0) / -h
            xt = math.exp(-h) * (x / p.a[i]) + h * ((phi1 - phi2 / c2) * den + (phi2 / c2) * old)
        old, old_down = den, down
        x = _ancestral_noise(run, p, i, xt, up, s_noise)
        x = run.tick(i, x)
    return x


DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


def _variance_source(field):
    """The model under a field that reports its variance channels."""
    return field_model(field, lambda m: getattr(m, "learned_variance", False))


def _model_variance_type(field) -> str | None:
    return getattr(field_model(field, lambda m: getattr(m, "variance_type", None) is not None), "variance_type", None)


def ddpm(
    run: Run, x: torch.Tensor, *, variance: str | None = None, s_noise: float = 1.0, last_noise: bool | None = None
) -> torch.Tensor:
    """DDPM's ancestral step (Ho et al. 2020, Eq. 11; diffusers' `DDPMScheduler`) on any Gaussian path:
    the posterior mean of x_{i+1} given x_i and x_0 = D_i, in VE levels ρ = σ/α,
    x̃_{i+1} = (ρ_{i+1}²/ρ_i²) x̃_i + (1 − ρ_{i+1}²/ρ_i²) D_i, plus noise whose VP variance is, with
    ᾱ = 1/(1 + ρ²), β = 1 − ᾱ_i/ᾱ_{i+1} and β̃ = β (1 − ᾱ_{i+1})/(1 − ᾱ_i):
    β̃ ("fixed_small": `euler_ancestral`), β ("fixed_large"), or the model's own (Nichol & Dhariwal
    2021, Eq. 15): exp(v) ("learned") or exp(f log β + (1 − f) log β̃), f = (v + 1)/2
    ("learned_range"), v the network's variance channels at (x_i, σ_i). Under CFG v is the
    conditional branch's (as DeepFloyd IF's pipeline takes it). `variance=None` takes the model's
    scheduler's `variance_type` (fixed_small for models that have none). The last step adds no noise
    (Alg. 2), also where the grid ends above σ = 0 (Würstchen's ᾱ = 0.9999), except with `last_noise`:
    its default (None) follows `DDPMScheduler` on a diffusers DDPM-type model, which adds the step's
    noise whenever its timestep is above 0 ("trailing" spacing), ᾱ_{i+1} = 1 (β = 1 − ᾱ_i, β̃ = 0),
    and on a walk cut by `denoising_end`, whose last step is a middle one of the schedule."""
    kind = variance if variance is not None else (_model_variance_type(run.field) or "fixed_small")
    if kind not in DDPM_VARIANCES:
        raise ArgumentError(f"variance: expected one of {', '.join(DDPM_VARIANCES)}, got {kind!r}")
    learned = kind.startswith("learned")
    source = _variance_source(run.field) if learned else None
    if learned and source is None:
        raise ArgumentError(
            f"variance: {kind!r} needs a model that outputs its variance (a diffusers model with "
            f"out_channels = 2 × in_channels, e.g. DeepFloyd IF's UNet); this field's model does not"
        )
    if last_noise is not None and not isinstance(last_noise, bool):
        raise ArgumentError(f"last_noise: expected True, False or None (the model's scheduler), got {last_noise!r}")
    p = PathGrid(run)
    last = len(run.times) - 2
    if last_noise is None:  # DDPMScheduler.step draws noise whenever t > 0, its last step included
        discrete = discrete_model(run.field)
        # (a walk cut before the schedule's end, `denoising_end`, ends on a middle step, which draws it)
        last_noise = run.cut_after > 0 or (
            discrete is not None and p.rho(last + 1) == 0 and model_timestep(discrete, p.t[last]) > 0
        )
    for i in run.steps():
        den = p.denoise(x, i)
        rho, rho_next = p.rho(i), p.rho(i + 1)
        x_mean = p.first_order(i, x, den, 0.0 if math.isinf(rho) else rho_next**2 / rho)
        if i == last and not last_noise:  # Ho et al.'s Alg. 2: z = 0 on the last step (the only one to ρ = 0)
            x = p.a[i + 1] * x_mean
            x = run.tick(i, x)
            continue
        abar, abar_next = (0.0 if math.isinf(rho) else 1.0 / (1.0 + rho**2)), 1.0 / (1.0 + rho_next**2)
        beta = 1.0 - abar / abar_next
        beta_tilde = max(beta * (1.0 - abar_next) / (1.0 - abar), 1e-20)
        to_ve = math.sqrt(1.0 + rho_next**2)  # VP noise of x_t is √ᾱ times the VE noise of x̃
        if learned:
            v = source.variance_output[: len(x)].to(x.dtype)  # type: ignore[union-attr]
            log_var = v if kind == "learned" else (v + 1) / 2 * math.log(beta) + (1 - v) / 2 * math.log(beta_tilde)
            std: torch.Tensor | float = torch.exp(0.5 * log_var) * to_ve
        else:
            std = math.sqrt(beta_tilde if kind.startswith("fixed_small") else beta) * to_ve
        x = p.a[i + 1] * (x_mean + s_noise * std * run.noise())
        x = run.tick(i, x)
    return x


def tcd(run: Run, x: torch.Tensor, *, gamma: float = 0.3) -> torch.Tensor:
    """Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024;
    diffusers' `TCDScheduler`, whose `eta` is this γ). From knot i, a DDIM step to the time
    s = (1 − γ) t_{i+1}, between the next knot and the data, then fresh noise back up to t_{i+1}
    (none on the last step): x̃_{i+1} = x̃_s + √(ρ_{i+1}² − ρ_s²) ε in VE levels ρ. γ = 0 is DDIM; γ = 1
    jumps to the data prediction and re-noises, the consistency sampler. s is measured in the
    field's own time (σ, or t of a flow). On a diffusers DDPM-type model it is the scheduler's integer
    timestep ⌊(1 − γ) t_{i+1}⌋, as TCDScheduler computes it."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
        raise ArgumentError(f"gamma: expected a number in [0, 1] (0: deterministic), got {gamma!r}")
    p = PathGrid(run)
    n = len(p.t) - 1
    discrete = discrete_model(run.field)
    for i in run.steps():
        den = p.denoise(x, i)
        rho_next = p.rho(i + 1)
        if rho_next == 0:
            rho_s = 0.0
        elif discrete is not None:  # TCDScheduler's ⌊(1 − γ) t_{i+1}⌋ on the model's timesteps
            t_next = model_timestep(discrete, p.t[i + 1])
            rho_s = min(float(discrete.sigma(math.floor((1.0 - gamma) * t_next))), rho_next)
        else:
            t_s = (1.0 - gamma) * p.t[i + 1]
            rho_s = min(p.path.sigma(t_s) / p.path.alpha(t_s) if t_s > 0 else 0.0, rho_next)
        xt = p.first_order(i, x, den, rho_s)  # DDIM to s
        if gamma > 0 and i < n - 1 and rho_next > rho_s:
            xt = xt + math.sqrt(rho_next**2 - rho_s**2) * run.noise()
        x = p.a[i + 1] * xt
        x = run.tick(i, x)
    return x


def _sa_tau(run: Run, p: PathGrid, tau) -> Any:
    """τ at knot i (SA-Solver's stochasticity): a number, a callable of the field's time, or (None)
    the scheduler's own rule on a diffusers DDPM-type model's timesteps (SASolverScheduler's
    `tau_func`, by default 1 for timesteps in [200, 800] and 0 elsewhere), else 1."""
    if tau is not None and not callable(tau):
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau < 0:
            raise ArgumentError(f"tau: expected a non-negative number or a callable of the time, got {tau!r}")
        return lambda i: float(tau)
    if callable(tau):
        return lambda i: float(tau(p.t[i]))
    model = discrete_model(run.field)
    flow = None if model is not None else field_model(run.field, lambda m: hasattr(m, "scheduler_timestep"))
    if model is None and flow is None:
        return lambda i: 1.0
    rule = getattr(getattr(model or flow, "scheduler", None), "tau_func", None) or (
        lambda t: 1 if 200 <= t <= 800 else 0
    )

    def timestep(t: float) -> float:  # the scheduler's timestep: a DDPM-type model's, or a flow model's
        if model is not None:
            return model_timestep(model, t)
        return float(flow.scheduler_timestep(torch.full((2,), t, dtype=torch.float64))[0])  # type: ignore[union-attr]

    def at(i: int) -> float:
        return 0.0 if p.t[i] == 0 else float(rule(timestep(p.t[i])))

    return at


def _sa_step(
    p: PathGrid,
    a: int,
    b: int,
    nodes: list,
    values: list,
    tau: float,
    noise: torch.Tensor,
    x: torch.Tensor,
    pred: bool,
    simple_order_2: bool = True,
) -> torch.Tensor:
    """One SA-Solver update from knot a to knot b (Xue et al. 2023, Eq. 15-16, data prediction): the
    Lagrange polynomial through `values` at λ `nodes`, integrated against k e^{k(λ − λ_b)}, k = 1 + τ²,
    x_b = e^{−τ² h} (σ_b/σ_a) x_a + α_b Σ_j W_j D_j + σ_b √(1 − e^{−2τ² h}) ξ, with diffusers' order-2
    adjustment (UniPC-like; `pred`: the predictor's, else the corrector's) unless not `simple_order_2`."""
    k, h = 1.0 + tau * tau, p.lam[b] - p.lam[a]
    w = list(lagrange_weights([k * v for v in nodes], k * p.lam[a], k * p.lam[b], exp_kernel=True))
    if len(nodes) == 2 and simple_order_2:
        rest = (h * k - 1.0 + math.exp(-k * h)) / k**2
        delta = k * (h * h / 2 - rest) / (p.lam[a] - nodes[1]) if pred else k * (h / 2 - rest / h)
        w[0], w[1] = w[0] + delta, w[1] - delta
    out = (math.exp(-tau * tau * h) * p.s[b] / p.s[a]) * x + p.a[b] * combine(w, values)
    if tau > 0:
        out = out + (p.s[b] * math.sqrt(-math.expm1(-2 * tau * tau * h))) * noise
    return out


SA_FORMS = ("diffusers", "comfyui")


def sa_solver(
    run: Run,
    x: torch.Tensor,
    *,
    predictor_order: int | None = None,
    corrector_order: int | None = None,
    tau: Any = None,
    lower_order_final: bool = True,
    final_corrector: bool | None = None,
    form: str = "diffusers",
    pece: bool = False,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """SA-Solver (Xue et al. 2023; diffusers' `SASolverScheduler`, data prediction): a stochastic
    Adams-Bashforth predictor of order `predictor_order` and a stochastic Adams-Moulton corrector of
    order `corrector_order`. The corrector reuses the new D at the predicted point and the
    predictor's noise, so there are no extra evaluations. τ sets the noise: τ = 0 is UniPC-like and
    deterministic; by default τ follows the scheduler's rule on a diffusers model and is 1 otherwise.
    Orders ramp up from 1 and, with `lower_order_final`, fall to the steps left. `final_corrector`
    also corrects the last step, with one more evaluation at the last knot of a grid ending above
    σ = 0; None does so where the model's scheduler does (as `unipc`).

    `form="comfyui"` is ComfyUI's `sample_sa_solver` (its KSampler "sa_solver"; "sa_solver_pece" with
    `pece=True`): orders 3 and 4 by default, without diffusers' order-2 adjustment; the step to t_{i+1}
    takes τ at t_{i+1}, by default 1 between the model's levels at 20% and 80% of its range
    (`comfyui_percent_level`) and 0 elsewhere, and the noise times `s_noise`; the orders fall to the
    steps left before the last; a flow's first step from t = 1 starts at ComfyUI's level for 0.01%
    instead; `pece` evaluates D again at each corrected state (2·steps − 1 evaluations)."""
    form = check_choice("form", form, SA_FORMS)
    comfy = form == "comfyui"
    if not comfy and (pece or s_noise != 1.0):
        raise ArgumentError("pece, s_noise: options of ComfyUI's SA-Solver; give form='comfyui' with them")
    pmax = check_int("predictor_order", predictor_order if predictor_order is not None else (3 if comfy else 2), 1, 4)
    cmax = check_int("corrector_order", corrector_order if corrector_order is not None else (4 if comfy else 2), 1, 4)
    s_noise = check_number("s_noise", s_noise, 0.0)
    p = PathGrid(run)
    first = _comfyui_flow_start(run, p) if comfy else None  # ComfyUI's first level of a flow from t = 1
    tau_at = _comfyui_tau(run, p, tau) if comfy else _sa_tau(run, p, tau)
    n = len(run.times) - 1 if comfy else scheduler_steps(run)  # as the model's scheduler counts them
    to_data = p.s[-1] == 0
    hist: deque = deque(maxlen=max(pmax, cmax))  # (λ_j, D_j), newest last
    last = None  # (x_i, noise_i, τ_i, corrector order) of the previous predictor step
    warm = 0

    def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
        if i == 0 and first is not None:  # ComfyUI evaluates pure noise at its offset level
            return p.path.data_prediction(x, run.f_at(x, first), first)
        return p.denoise(x, i)

    def correct(i: int, den: torch.Tensor) -> torch.Tensor:
        """Step i − 1 → i again from x_{i−1} (the corrector), with D_i at the predicted point."""
        assert last is not None
        x_last, noise_last, tau_last, c = last
        older = list(hist)[::-1][: c - 1]
        return _sa_step(p, i - 1, i, [p.lam[i]] + [v[0] for v in older], [den] + [v[1] for v in older],
                        tau_last, noise_last, x_last, pred=False, simple_order_2=not comfy)  # fmt: skip

    for i in run.steps():
        den = denoise(x, i)
        if last is not None:  # correct step i − 1 → i with D_i at the predicted point
            x = correct(i, den)
            if pece:  # ComfyUI's PECE: D again at the corrected state
                den = p.denoise(x, i)
        if p.lam[i] > -math.inf:
            hist.append((p.lam[i], den))
        noise = run.noise()  # one draw per step, as the scheduler (also where τ = 0)
        tau_i = (tau_at(i + 1) if p.s[i + 1] > 0 else 0.0) if comfy else tau_at(i)
        if p.s[i + 1] == 0:  # to the data: the data prediction
            x, last = p.a[i + 1] * den, None
        elif p.lam[i] == -math.inf:  # from pure noise (h = ∞): e^{−τ² h} = 0 unless τ = 0
            x = p.a[i + 1] * den + (p.s[i + 1] * noise if tau_i > 0 else p.s[i + 1] * (x / p.s[i]))
            last = None
        else:
            if comfy:  # ComfyUI: the orders fall to the steps left before the last one
                order_p = min(pmax, n - 1 - i) if lower_order_final and to_data else pmax
                order_c = min(cmax, n - 1 - i) if lower_order_final and to_data else cmax
            else:
                order_p = min(pmax, n - i) if lower_order_final else pmax
                order_c = min(cmax, n - i + 1) if lower_order_final else cmax
            order_p, order_c = max(min(order_p, warm + 1), 1), max(min(order_c, warm + 2), 1)
            recent = list(hist)[::-1][:order_p]
            last = (x, s_noise * noise, tau_i, order_c)
            x = _sa_step(p, i, i + 1, [v[0] for v in recent], [v[1] for v in recent], tau_i, s_noise * noise, x,
                         pred=True, simple_order_2=not comfy)  # fmt: skip
        warm = min(warm + 1, max(pmax, cmax - 1))
        x = run.tick(i, x)
    end = len(p.t) - 1
    if final_corrector is None:  # the scheduler's own last step from σ_min to itself evaluates there
        final_corrector = takes_closing_step(run)
    if final_corrector and last is not None and p.s[end] > 0:  # one more evaluation, at the last knot
        x = correct(end, p.denoise(x, end))
    return x


def comfyui_percent_level(field: Any, percent: float) -> float:
    """ComfyUI's `model_sampling.percent_to_sigma(percent)` for the field, in its time: on σ-time
    fields the model's table of levels (`sigma_table`) read at timestep (1 − percent)·(len − 1) in
    log σ (its discrete and continuous EDM samplings alike); on flows the time shift of 1 − percent."""
    if percent <= 0.0:
        return math.inf if field.time_is_sigma else 1.0
    if percent >= 1.0:
        return 0.0
    if field.time_is_sigma and callable(getattr(field, "sigma_table", None)):
        logs = field.sigma_table().double().log().tolist()
        return table_sigma(logs, (1.0 - percent) * (len(logs) - 1))
    shift = getattr(field, "time_shift", None)
    return float(shift(1.0 - percent)) if callable(shift) else 1.0 - percent


def _comfyui_tau(run: Run, p: PathGrid, tau: Any) -> Any:
    """τ at knot i for ComfyUI's SA-Solver: a number, a callable of the field's time, or (None) its
    default, 1 for levels between `comfyui_percent_level` at 20% and at 80% (both included), else 0."""
    if tau is not None:
        return _sa_tau(run, p, tau)
    start, stop = comfyui_percent_level(run.field, 0.2), comfyui_percent_level(run.field, 0.8)
    return lambda i: 1.0 if start >= p.t[i] >= stop else 0.0


def _comfyui_flow_start(run: Run, p: PathGrid) -> float | None:
    """ComfyUI's `offset_first_sigma_for_snr`: on a flow whose walk starts at t ≥ 1 (no finite log-SNR)
    the first level is its level at 0.01% (where it evaluates the start); it changes the grid's first
    knot's coordinates in `p`. None elsewhere."""
    if run.field.time_is_sigma or p.t[0] < 1.0 or p.a[0] != 0:
        return None
    t0 = comfyui_percent_level(run.field, 1e-4)
    p.t = [t0, *p.t[1:]]
    p.a[0], p.s[0], p.lam[0] = p.path.alpha(t0), p.path.sigma(t0), p.path.lam(t0)
    return t0


def dpm_multistep(
    run: Run,
    x: torch.Tensor,
    *,
    order: int = 2,
    solver_type: str = "midpoint",
    sde: bool = False,
    lower_order_final: bool = False,
) -> torch.Tensor:
    """Multistep DPM-Solver on the noise prediction ε = (x̃ − D)/ρ (Lu et al. 2022b, App. B;
    diffusers' `algorithm_type="dpmsolver"`, with `sde=True` its `"sde-dpmsolver"`). In VE levels ρ
    with h = log(ρ_i/ρ_{i+1}) and Δ = ρ_i − ρ_{i+1} = ρ_{i+1}(e^h − 1), and D1, D2 the finite differences of
    DPM-Solver++(3M) taken on ε:
        x̃_{i+1} = x̃_i − Δ ε_i − ½Δ D1 ("midpoint") or − ρ_{i+1}((e^h − 1)/h − 1) D1 ("heun"),
    third order also − ρ_{i+1}((e^h − 1 − h)/h² − ½) D2. The SDE form doubles the ε-terms and adds
    ρ_{i+1} √(e^{2h} − 1) ξ. Orders ramp up from 1. `lower_order_final` applies diffusers' rule below
    15 steps. Steps to the data and from pure noise are first order."""
    order = check_int("order", order, 1, 3 if not sde else 2)
    if solver_type not in ("midpoint", "heun"):
        raise ArgumentError(f"solver_type: expected 'midpoint' or 'heun', got {solver_type!r}")
    p = PathGrid(run)
    n = scheduler_steps(run)  # as the model's scheduler counts them
    hist: deque = deque(maxlen=order)  # (λ_j, ε_j), newest last
    c = 2.0 if sde else 1.0
    for i in run.steps():
        den = p.denoise(x, i)
        rho, rho_next = p.rho(i), p.rho(i + 1)
        noise: torch.Tensor | float = run.noise() if sde else 0.0
        if rho_next == 0:  # to the data: the data prediction (DDIM)
            x = p.a[i + 1] * den
            x = run.tick(i, x)
            continue
        if math.isinf(rho):  # from pure noise: DDIM, or the data prediction re-noised for the SDE
            xt = den + rho_next * noise if sde else p.first_order(i, x, den, rho_next)
            x = p.a[i + 1] * xt
            x = run.tick(i, x)
            continue
        xt = x / p.a[i]
        eps = (xt - den) / rho
        hist.append((p.lam[i], eps))
        k = min(lowered_order(order, n, i, lower_order_final, run.skipped), len(hist))
        h, delta = p.lam[i + 1] - p.lam[i], rho - rho_next
        xt = xt - c * delta * eps
        if k >= 2:
            (l1, e1) = hist[-2]
            r0 = (p.lam[i] - l1) / h
            if k == 3:
                (l2, e2) = hist[-3]
                w1, w2 = lu_differences(r0, (l1 - l2) / h)
                d1, d2 = combine(w1, [eps, e1, e2]), combine(w2, [eps, e1, e2])
                xt = xt - rho_next * (math.expm1(h) / h - 1.0) * d1 - rho_next * ((math.expm1(h) - h) / h**2 - 0.5) * d2
            else:
                d1_0 = (eps - e1) / r0
                scale = 0.5 * delta if solver_type == "midpoint" else rho_next * (math.expm1(h) / h - 1.0)
                xt = xt - (c * scale) * d1_0
        if sde:
            xt = xt + (rho_next * math.sqrt(math.expm1(2 * h))) * noise
        x = p.a[i + 1] * xt
        x = run.tick(i, x)
    return x


def _sde_multistep(
    run: Run,
    x: torch.Tensor,
    order: int,
    eta: float,
    s_noise: float,
    solver_type: str = "midpoint",
    lower_order_final: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M/3M) SDE on any path (k-diffusion's forms; Lu et al. 2022b, §5 SDE variant):
    x_{i+1} = (σ_{i+1}/σ_i) e^{−ηh} x_i + α_{i+1}(1 − e^{−(1+η)h}) D_i + α_{i+1} (multistep corrections)
              + σ_{i+1} √(1 − e^{−2ηh}) ε.
    `lower_order_final`: below 15 steps step i has order at most n − i (diffusers' rule, n as its
    scheduler counts the steps); it matters only on a grid ending above σ = 0."""
    eta = _check_eta(eta)
    p = PathGrid(run)
    n = scheduler_steps(run)
    hist: deque = deque(maxlen=2)  # (h, D) of earlier finite steps, newest last
    for i in run.steps():
        den = p.denoise(x, i)
        if p.s[i + 1] == 0:
            x = p.a[i + 1] * den
            x = run.tick(i, x)
            continue
        h = p.lam[i + 1] - p.lam[i]
        he = h * (eta + 1.0)
        x = (p.s[i + 1] / p.s[i]) * math.exp(-eta * h) * x - (p.a[i + 1] * math.expm1(-he)) * den
        k = lowered_order(order, n, i, lower_order_final, run.skipped)
        if math.isfinite(h) and k > 1:
            if k == 3 and len(hist) == 2:
                (h2, d2), (h1, d1) = hist
                r0, r1 = h1 / h, h2 / h
                d1_0, d1_1 = (den - d1) / r0, (d1 - d2) / r1
                dd1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                dd2 = (d1_0 - d1_1) / (r0 + r1)
                phi2 = math.expm1(-he) / he + 1.0
                phi3 = phi2 / he - 0.5
                x = x + p.a[i + 1] * (phi2 * dd1 - phi3 * dd2)
            elif len(hist) >= 1:
                h1, d1 = hist[-1]
                r = h1 / h
                if order == 3 or solver_type == "heun":  # (3M's second-order step: the exact φ₂)
                    x = x + p.a[i + 1] * ((math.expm1(-he) / he + 1.0) / r) * (den - d1)
                else:  # k-diffusion's midpoint form of 2M SDE
                    x = x + p.a[i + 1] * (-0.5 * math.expm1(-he) / r) * (den - d1)
        if eta:
            x = x + (p.s[i + 1] * math.sqrt(-math.expm1(-2.0 * eta * h)) * s_noise) * run.noise()
        if math.isfinite(h):
            hist.append((h, den))
        x = run.tick(i, x)
    return x


def dpmpp_2m_sde(
    run: Run,
    x: torch.Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    lower_order_final: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (k-diffusion's `sample_dpmpp_2m_sde`): see `_sde_multistep`; `solver_type`
    "midpoint" (k-diffusion's default) or "heun" (the exact φ₂ weight), as in k-diffusion;
    `lower_order_final` as diffusers' `algorithm_type="sde-dpmsolver++"` ending at σ_min."""
    if solver_type not in ("midpoint", "heun"):
        raise ArgumentError(f"solver_type: expected 'midpoint' or 'heun', got {solver_type!r}")
    return _sde_multistep(run, x, 2, eta, s_noise, solver_type, bool(lower_order_final))


def dpmpp_3m_sde(run: Run, x: torch.Tensor, *, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion's `sample_dpmpp_3m_sde`): see `_sde_multistep`."""
    return _sde_multistep(run, x, 3, eta, s_noise)
