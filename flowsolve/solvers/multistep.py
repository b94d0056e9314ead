"""Multistep solvers for low NFE: one evaluation per step, earlier evaluations reused.

* `dpmpp_2m`: DPM-Solver++(2M) as Lu et al. write it (Alg. 2; k-diffusion's, diffusers' default).
* `dpmpp_2m_heun`, `dpmpp_3m`: DPM-Solver++ multistep (Lu et al. 2022) for σ-time fields, written as an
  exponential Adams–Bashforth method in λ = −log σ on the data prediction D = x − σ·v:
  x_{i+1} = (σ_{i+1}/σ_i) x_i + Σ_j W_j D_j, W_j = ∫ e^{λ − λ_{i+1}} ℓ_j(λ) dλ exactly, for the
  Lagrange polynomial through the last k data predictions (k = 2 or 3; any grid spacing).
* `dpmpp_2m_pc`, `dpmpp_3m_pc`: the same predictor with a UniC-style corrector (Zhao et al. 2023):
  once D_{i+1} is evaluated for the next step, x_{i+1} is recomputed with the polynomial that
  includes it (exponential Adams–Moulton), raising the order by one at no extra evaluation.
* `ipndm`: improved PNDM (Zhang & Chen 2023), fixed-coefficient Adams–Bashforth up to order 4 on
  the velocity itself; any field.
* `plms`: PNDM's pseudo linear multistep (a Heun first step, then `ipndm`'s Adams–Bashforth).
* `adams`: variable-step Adams–Bashforth of order k on the velocity; any field, any grid.
* `ipndm_v`: iPNDM with variable steps (Zhang & Chen 2023; zju-pi/diff-sampler's `ipndm_v`): the
  order-4 ramp of `ipndm` with the Adams–Bashforth weights of the grid's actual spacing.
"""

from __future__ import annotations

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
    lagrange_weights,
    lowered_order,
    lu_differences,
    model_timestep,
    own_schedule,
    scheduler_steps,
)
from .._checks import check_int
from ..fields.paths import vp_reread
from ..errors import ArgumentError


def _order(order, lo: int = 1, hi: int = 4) -> int:
    return check_int("order", order, lo, hi)


def exponential_multistep(
    run: Run,
    x: torch.Tensor,
    order: int,
    corrector: bool,
    midpoint: bool = False,
    lower_order_final: bool = False,
    lu_third: bool = False,
) -> torch.Tensor:
    """The exponential Adams family on σ-time fields, in λ = −log σ with data predictions D = x − σ v.

    One step from σ_i to σ_{i+1} (h = λ_{i+1} − λ_i) integrates dx/dλ = D − x exactly for D held at the
    Lagrange polynomial P through the last k data predictions:

        x_{i+1} = (σ_{i+1}/σ_i) x_i + α_{i+1} Σ_j W_j D_j,   W_j = ∫_{λ_i}^{λ_{i+1}} e^{λ − λ_{i+1}} ℓ_j(λ) dλ,

    on any Gaussian path x_t = α_t x_0 + σ_t ε of the field (`fields.paths`: α = 1, σ = t for EDM,
    α = 1 − t, σ = t for flow matching), with λ = log(α/σ). A step from pure noise (λ_i = −∞, a
    flow's t = 1) is the exact first-order step x_{i+1} = σ_{i+1} x_i + α_{i+1} D_i.

    For k = 2 with r = h_{i−1}/h, φ₁ = expm1(−h) and φ₂ = (φ₁ + h)/h, the weights are in closed form

        x_{i+1} = (σ_{i+1}/σ_i) x_i − φ₁ D_i + (φ₂/r) (D_i − D_{i−1}),

    i.e. W_i = −φ₁ + φ₂/r, W_{i−1} = −φ₂/r (diffusers' `solver_type="heun"`); `midpoint=True` takes
    Lu et al.'s own DPM-Solver++(2M) (their Alg. 2), which replaces φ₂ by −φ₁/2 in every two-point
    step (diffusers' default `solver_type="midpoint"`, also the warm-up step of its third order).
    The first step (k = 1) is DDIM: x_{i+1} = (σ_{i+1}/σ_i) x_i − φ₁ D_i.
    `tests/test_solvers.py` checks that the numeric weights equal these closed forms.
    With `lower_order_final` and fewer than 15 steps, step i has order at most n − i (diffusers'
    DPM-Solver rule; it matters only for a grid ending above σ = 0, whose last step is otherwise of
    full order as in k-diffusion). n counts the steps as the model's scheduler does
    (`scheduler_steps`): a `final_sigmas_type="sigma_min"` schedule that already ends at σ_min ends
    with a step from σ_min to itself, which flowsolve does not take, so its last real step has order
    at most 2 there.

    `lu_third=True` takes Lu et al.'s third-order step instead of the exact quadratic (their
    DPM-Solver++(3M); diffusers' `solver_order=3`): with r₀ = h_{i−1}/h, r₁ = h_{i−2}/h,
    D1₀ = (D_i − D_{i−1})/r₀, D1₁ = (D_{i−1} − D_{i−2})/r₁, D1 = D1₀ + r₀(D1₀ − D1₁)/(r₀ + r₁),
    D2 = (D1₀ − D1₁)/(r₀ + r₁):
        x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1} [φ₁ D_i − (φ₁/h + 1) D1 + ((φ₁ + h)/h² − 1/2) D2].
    """
    p = PathGrid(run)  # VE for EDM fields: α = 1, σ = t, λ = −log σ
    alpha, sig, lam = p.a, p.s, p.lam
    n = scheduler_steps(run)  # diffusers' step count (a σ_min → σ_min step it ends with included)
    hist: deque = deque(maxlen=order + 1)  # (λ_j, D_j), newest last; finite λ only
    x_prev = None  # x_i before the step, for the corrector
    for i in run.steps():
        den = p.denoise(x, i)  # data prediction D_i (x − σ v on the VE path) from the field at (x_i, t_i)
        if corrector and x_prev is not None and len(hist) >= 1 and lam[i - 1] > -math.inf:
            # UniC-style: redo step i−1 → i with D_i included (order min(k+1, history))
            nodes = [lam[i]] + [h[0] for h in reversed(hist)][:order]
            wc = lagrange_weights(nodes, lam[i - 1], lam[i], exp_kernel=True)
            vals = [den] + [h[1] for h in reversed(hist)][:order]
            x = (sig[i] / sig[i - 1]) * x_prev + alpha[i] * combine(wc, vals)
        if lam[i] > -math.inf:
            hist.append((lam[i], den))
        if sig[i + 1] == 0 or lam[i] == -math.inf:  # to the data (lands on α D) or from pure noise: exact
            x_next = ddim_step(x, den, sig[i], sig[i + 1], alpha[i + 1], lam[i + 1] - lam[i])
        else:
            k = min(lowered_order(order, n, i, lower_order_final, run.skipped), len(hist))
            recent = list(hist)[-k:][::-1]  # newest first: D_i, D_{i−1}, ...
            if midpoint and k == 2:  # Lu et al.'s form: φ₂ ≈ −φ₁/2
                h, r = lam[i + 1] - lam[i], (lam[i] - recent[1][0]) / (lam[i + 1] - lam[i])
                e = -math.expm1(-h)
                w: Sequence[float] = (e * (1 + 0.5 / r), -e * 0.5 / r)
            elif lu_third and k == 3:  # Lu et al.'s DPM-Solver++(3M) (docstring), as weights on D_i, D_{i−1}, D_{i−2}
                h = lam[i + 1] - lam[i]
                r0, r1 = (lam[i] - recent[1][0]) / h, (recent[1][0] - recent[2][0]) / h
                phi1 = math.expm1(-h)
                c0, c1, c2 = -phi1, phi1 / h + 1.0, -((phi1 + h) / h**2 - 0.5)  # on D_i, D1, D2
                # D1₀ = (D_i − D_{i−1})/r₀, D1₁ = (D_{i−1} − D_{i−2})/r₁; D1 = (1 + q) D1₀ − q D1₁, q = r₀/(r₀ + r₁);
                # D2 = (D1₀ − D1₁)/(r₀ + r₁): collect the coefficients of D_i, D_{i−1}, D_{i−2}
                d1, d2 = lu_differences(r0, r1)
                w = tuple(c0 * (j == 0) + c1 * d1[j] + c2 * d2[j] for j in range(3))
            else:
                w = lagrange_weights(
                    [h[0] for h in recent], lam[i], lam[i + 1], exp_kernel=True
                )  # W_j (closed form above)
            x_next = (sig[i + 1] / sig[i]) * x + alpha[i + 1] * combine(w, [h[1] for h in recent])  # x_{i+1}
        x_prev, x = x, x_next
        x = run.tick(i, x)
    return x


def dpmpp_2m(run: Run, x: torch.Tensor, *, lower_order_final: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) as Lu et al. write it (their Alg. 2; k-diffusion's `sample_dpmpp_2m`,
    diffusers' default `solver_type="midpoint"`): with h = λ_{i+1} − λ_i, r = h_{i−1}/h,
    x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1} φ₁ (D_i + (D_i − D_{i−1})/(2r)), φ₁ = expm1(−h);
    first and last (to σ = 0) steps are DDIM (see `exponential_multistep`; `lower_order_final=True`
    makes the last step DDIM on a grid ending above 0 too, as diffusers does below 15 steps)."""
    return exponential_multistep(run, x, 2, False, midpoint=True, lower_order_final=lower_order_final)


def dpmpp_2m_heun(run: Run, x: torch.Tensor, *, lower_order_final: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) with exact exponential weights on any σ-grid (diffusers' `solver_type="heun"`):
    x_{i+1} = (σ_{i+1}/σ_i) x_i − φ₁ D_i + (φ₂/r)(D_i − D_{i−1}), h = λ_{i+1} − λ_i, r = h_{i−1}/h,
    φ₁ = expm1(−h), φ₂ = (φ₁ + h)/h (see `exponential_multistep`)."""
    return exponential_multistep(run, x, 2, False, lower_order_final=lower_order_final)


def dpmpp_3m(
    run: Run, x: torch.Tensor, *, lower_order_final: bool = False, form: str = "exact", solver_type: str = "midpoint"
) -> torch.Tensor:
    """DPM-Solver++(3M): third-order exponential Adams–Bashforth. `form="exact"` integrates the
    quadratic through the last three data predictions exactly; `form="lu"` is Lu et al.'s own step,
    diffusers' `DPMSolverMultistepScheduler(solver_order=3)` (with `lower_order_final=True`, its
    default), whose second-order steps take `solver_type` ("midpoint" or "heun", as diffusers'). See
    `exponential_multistep`."""
    if form not in ("exact", "lu"):
        raise ArgumentError(f"form: expected 'exact' or 'lu' (diffusers' third order), got {form!r}")
    if solver_type not in ("midpoint", "heun"):
        raise ArgumentError(f"solver_type: expected 'midpoint' or 'heun', got {solver_type!r}")
    lu = form == "lu"
    midpoint = lu and solver_type == "midpoint"
    return exponential_multistep(run, x, 3, False, midpoint=midpoint, lower_order_final=lower_order_final, lu_third=lu)


def dpmpp_2m_pc(run: Run, x: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M) with a UniC-style corrector (third order, no extra evaluations)."""
    return exponential_multistep(run, x, 2, True)


def dpmpp_3m_pc(run: Run, x: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(3M) with a UniC-style corrector (fourth order, no extra evaluations)."""
    return exponential_multistep(run, x, 3, True)


_IPNDM = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def ipndm(run: Run, x: torch.Tensor, *, order: int = 4) -> torch.Tensor:
    """Improved PNDM: Adams–Bashforth with uniform-step coefficients, order ramping up to `order`."""
    order = _order(order)
    t = run.times
    hist: deque = deque(maxlen=order)
    for i in run.steps():
        hist.appendleft(run.f(x, i))
        x = x + (t[i + 1] - t[i]) * combine(_IPNDM[len(hist)], list(hist))
        x = run.tick(i, x)
    return x


def adams(run: Run, x: torch.Tensor, *, order: int = 3, schedule_ramp: bool = True) -> torch.Tensor:
    """Variable-step Adams–Bashforth: the exact integral of the Lagrange polynomial through the
    last `order` velocities, for any grid (k-diffusion's `lms` is this method, with
    `schedule_ramp=False`). With `schedule_ramp`, on a model loaded with diffusers'
    `LMSDiscreteScheduler` in image-to-image, the first steps are that scheduler's: its order ramps
    up with the step index in the whole schedule, so they integrate the Lagrange basis on the knots
    before the walk too and keep only the terms of the velocities they have."""
    order = _order(order)
    t = run.times
    # LMSDiscreteScheduler after `set_begin_index`: order min(step index + 1, order), and a zip of
    # its coefficients with the derivatives it has
    lms = lambda m: getattr(m, "scheduler_class", None) == "LMSDiscreteScheduler"  # noqa: E731
    own = own_schedule(run, lms) if run.skipped and schedule_ramp else None
    hist: deque = deque(maxlen=order)
    for i in run.steps():
        hist.appendleft((t[i], run.f(x, i)))
        nodes = [h[0] for h in hist]
        if own is not None and len(hist) < order:
            j = run.skipped + i  # the knot's index in the whole schedule
            nodes = own[max(j + 1 - order, 0) : j + 1].flip(0).tolist()
        w = lagrange_weights(nodes, t[i], t[i + 1], exp_kernel=False)[: len(hist)]
        x = x + combine(w, [h[1] for h in hist])
        x = run.tick(i, x)
    return x


def plms(run: Run, x: torch.Tensor, *, blend: str | None = None) -> torch.Tensor:
    """PNDM's pseudo linear multistep (Liu et al. 2022, PLMS; diffusers' `PNDMScheduler` with
    `skip_prk_steps`, Stable Diffusion 1.x's default): a Heun first step, then Adams–Bashforth of
    orders 2, 3, 4 with uniform coefficients on the velocity. On a VP model's σ-ODE the velocity is
    PNDM's ε and the Euler step is its DDIM transfer, so this is the scheduler's loop; steps + 1
    evaluations (the Heun step's second one is not kept in the history, as in PNDM).

    `blend="v"` combines the VP v-predictions v = ε/α − σα x̃ (α = 1/√(1 + σ²)) instead, and turns
    the blend into ε with the current step's α and x̃ (ε = α v + σα² x̃), as `PNDMScheduler` does for
    v-prediction models. The default (None) is "v" for a diffusers v-prediction model loaded with a
    PNDMScheduler, else "epsilon"."""
    return _pndm_family(run, x, blend, warm_steps=1, runge_kutta=False)


def pndm(run: Run, x: torch.Tensor, *, blend: str | None = None) -> torch.Tensor:
    """PNDM (Liu et al. 2022; diffusers' `PNDMScheduler` default): three pseudo Runge-Kutta steps,
    then PLMS. Each warm-up step is classical RK4 whose stages are DDIM transfers from the step's
    start: to the midpoint with ε₁, to the midpoint with ε₂, to the next knot with ε₃, then with
    (ε₁ + 2ε₂ + 2ε₃ + ε₄)/6. Its first ε joins PLMS's history. On a σ-time field the transfer is the
    Euler step, so RK4 in σ. The midpoint is PNDMScheduler's timestep on a diffusers model, else the
    mean of the two times. `blend` is as for `plms`; the v-blend converts every stage with the step's
    start, as PNDMScheduler does. A warm-up step that would end at σ = 0 is a PLMS step."""
    return _pndm_family(run, x, blend, warm_steps=3, runge_kutta=True)


def _pndm_family(run: Run, x: torch.Tensor, blend: str | None, warm_steps: int, runge_kutta: bool) -> torch.Tensor:
    """PLMS after `warm_steps` warm-up steps (Heun, or PNDM's pseudo Runge-Kutta), each of whose first
    velocity joins the history; a warm-up step ending where the field is singular is a PLMS step."""
    mode = blend if blend is not None else _pndm_blend(run.field)
    if mode not in ("epsilon", "v"):
        raise ArgumentError(f"blend: expected 'epsilon' or 'v', got {mode!r}")
    if mode == "v" and not getattr(run.field, "time_is_sigma", False):
        raise ArgumentError("blend: 'v' combines VP v-predictions; it needs a σ-time field (a diffusers VP model)")
    t = run.times
    n = len(t) - 1
    warm = min(warm_steps, n if run.evaluable[n] else n - 1)
    levels = _pndm_levels(run)  # PNDMScheduler's own levels on its own schedule, else None
    hist: deque = deque(maxlen=4)  # ε (or v) at the last knots, newest first
    begun = 0
    if levels is not None and run.skipped and not runge_kutta and levels.lists_twice:
        x, first = _plms_cut_start(run, levels, x, mode)  # the img2img pipelines' cut of PLMS's list
        hist.appendleft(first)
        begun = 1
    if levels is not None and run.skipped and runge_kutta and not levels.lists_twice:
        return _prk_cut_walk(run, levels, x, mode)  # the img2img pipelines' cut of the Runge–Kutta list
    for i in run.steps():
        if i < begun:
            continue
        d = run.f(x, i)
        xi, ti, tn, h = x, t[i], t[i + 1], t[i + 1] - t[i]
        hist.appendleft(d if mode == "epsilon" else _vp_v(d, xi, ti))
        if i >= warm:  # PLMS: Adams-Bashforth with uniform coefficients
            blended = combine(_IPNDM[len(hist)], list(hist))
            land = levels.land(i) if levels else tn  # where the transfer from knot i goes
            x = _read_at(xi + (land - ti) * (blended if mode == "epsilon" else _vp_eps(blended, xi, ti)), land, tn)
        elif runge_kutta:  # RK4 with DDIM transfers from x_i, the midpoint PNDMScheduler's
            go, at = levels.midpoints(i) if levels else (_prk_midpoint(run, i),) * 2
            x2 = run.stage(i, _read_at(xi + (go - ti) * d, go, at), at)  # (the sample at `go`, read at `at`)
            d2 = _stage_eps(mode, run.f_at(x2, at), x2, at, xi, ti)
            x3 = run.stage(i, xi + (at - ti) * d2, at)
            d3 = _stage_eps(mode, run.f_at(x3, at), x3, at, xi, ti)
            x4 = run.stage(i, xi + h * d3)
            d4 = _stage_eps(mode, run.f(x4, i + 1), x4, tn, xi, ti)
            x = xi + h * (d + 2 * d2 + 2 * d3 + d4) / 6
        else:  # Heun: the trapezoid of the velocities at t_i and at the Euler prediction at t_{i+1}
            land = levels.land(i) if levels else tn
            x1 = run.stage(i, _read_at(xi + (land - ti) * d, land, tn))
            src = levels.back(i) if levels else ti  # the level the scheduler reads x_i at for the second stage
            xs = _read_at(xi, ti, src)
            d2 = run.f(x1, i + 1)
            if mode == "epsilon":
                slope = 0.5 * (d + d2)
            else:  # the mean of the raw v's, converted with (α, x) at `src`
                slope = _vp_eps(0.5 * (hist[0] + _vp_v(d2, x1, tn)), xs, src)
            x = xs + (tn - src) * slope
        x = run.tick(i, x)
    return x


def _plms_cut_start(run: Run, levels: "_PNDMLevels", x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PNDMScheduler's PLMS list (its second timestep twice) cut by img2img's `t_start` = `run.skipped`:
    the list walked is a_0, a_1, then the knots from the walk's second, with a_1 the walk's first knot
    and a_0 the knot before it (t_start ≥ 2; the data was noised there: `img2img_start_coefficients`)
    or that knot again (t_start = 1). Its Heun pair goes from a_0 to a_1, and the next step reads
    that sample at the walk's second knot (no evaluation). Returns the state at knot 1, after step 0,
    and the first step's ε (or v) for PLMS's history."""
    t = run.times
    a0, a1 = (levels.before if run.skipped >= 2 else t[0]), t[0]
    run.step = 0
    xs = _read_at(x, t[0], a0)  # the state as the sample at a_0
    e0 = run.f_at(xs, a0)
    first = e0 if mode == "epsilon" else _vp_v(e0, xs, a0)
    land = levels.level(levels.timestep(a0) - levels.delta)
    x1 = run.stage(0, _read_at(xs + (land - a0) * e0, land, a1), a1)
    e1 = run.f_at(x1, a1)
    src = levels.level(levels.timestep(a1) + levels.delta)  # the Heun step's start as the scheduler reads it
    xc = _read_at(xs, a0, src)
    if mode == "epsilon":
        slope = 0.5 * (e0 + e1)
    else:
        slope = _vp_eps(0.5 * (first + _vp_v(e1, x1, a1)), xc, src)
    x = _read_at(xc + (a1 - src) * slope, a1, t[1])  # at a_1, read at the next knot
    return run.tick(0, x), first


def _prk_cut_walk(run: Run, levels: "_PNDMLevels", x: torch.Tensor, mode: str) -> torch.Tensor:
    """PNDMScheduler in its Runge–Kutta mode walked as the img2img pipelines walk it: its list L (12
    Runge–Kutta entries for its first three steps, then one per step) from index t_start = `run.skipped`,
    while the scheduler counts its calls c from 0. Call c < 12 is stage c mod 4 of a Runge–Kutta step
    that starts from the sample of its stage 0 read at the *uncut* list's entry 4⌊c/4⌋ and goes to the
    timestep passed, L[t_start + c] (less ⌊δ/2⌋ for even c), with ε, ε, ε and the mean (ε₁ + 2ε₂ + 2ε₃
    + ε₄)/6; later calls are PLMS's fourth-order steps from the timestep passed to δ below it. The
    model sees the sample at the timestep passed (the data was noised at L[t_start]:
    `img2img_start_coefficients`). Followed call by call on the field, with VE states x̃ tagged by the
    level their VP sample belongs to; the inpaint pipelines' blend after each call is at the next
    entry's level."""
    t = run.times
    listed = levels.model.pndm_timesteps(levels.own)
    if listed is None:  # (levels exist only on the scheduler's own schedule, whose list this is)
        raise RuntimeError("pndm: the model's PNDMScheduler lists no timesteps for its own schedule")
    walk, full = listed[run.skipped :], listed[:12]  # full: the Runge–Kutta steps' starts, entries 0, 4, 8
    half = levels.delta // 2
    xt, at = x, t[0]  # the state and the level of its VP sample
    hist: list[torch.Tensor] = []  # the scheduler's `ets`: raw outputs of each step's first call
    acc: torch.Tensor | float = 0.0
    start = (xt, at)  # the sample of the current Runge–Kutta step's stage 0
    n, last = len(t) - 1, len(walk) - 1
    for c, k in enumerate(walk):
        run.step = min(c * n // len(walk), n - 1)
        lam = levels.level(k)
        xin = _read_at(xt, at, lam)
        d = run.f_at(xin, lam)
        out = d if mode == "epsilon" else _vp_v(d, xin, lam)  # the model's raw output
        if c < 12:  # step_prk: stage c mod 4 of the step from the uncut list's entry 4⌊c/4⌋
            stage = c % 4
            if stage == 0:
                acc, start = out / 6, (xt, at)
                hist.append(out)
                used = out
            elif stage < 3:
                acc, used = acc + out / 3, out
            else:
                used, acc = acc + out / 6, 0.0
            base, to = levels.level(full[c // 4 * 4]), levels.level(k - (0 if c % 2 else half))
            xs = _read_at(*start, base)
        else:  # step_plms: fourth order on the last four first outputs
            hist = hist[-3:] + [out]
            used = combine(_IPNDM[4], hist[::-1])
            base, to, xs = lam, levels.level(k - levels.delta), xin
        xt, at = xs + (to - base) * (used if mode == "epsilon" else _vp_eps(used, xs, base)), to
        if c < last:  # the inpaint pipelines' blend, at the next entry's level
            nxt = levels.level(walk[c + 1])
            xt, at = run.stage(run.step, _read_at(xt, at, nxt), nxt), nxt
    return run.tick(n - 1, _read_at(xt, at, t[-1]))


def _read_at(xt: torch.Tensor, level: float, read: float) -> torch.Tensor:
    """A VE state x̃ at `level` as a diffusers VP scheduler passes it on: its VP sample x̃/√(1 + level²)
    read as the sample at `read`, x̃ √((1 + read²)/(1 + level²)) (the identity where they agree)."""
    return xt if level == read else xt * vp_reread(level, read)


class _PNDMLevels:
    """PNDMScheduler's own levels on its own schedule (N steps, δ = T//N, h = δ//2; timesteps k_i):
    its transfer from knot i goes to k_i − δ (`land`), read at knot i + 1; a Runge–Kutta step's first
    stage goes to k_i − h and is evaluated, as the second, at k_{i+1} + h (`midpoints`); PLMS's Heun
    step reads x_i at k_{i+1} + δ for its second stage (`back`). With "leading" or "trailing" spacing
    and δ even these are the knots and the mean of two; with "linspace" or δ odd they are not."""

    def __init__(self, model: Any, own: torch.Tensor, steps: int, skipped: int, times: Sequence[float]) -> None:
        self.model, self.own, self.final, self.times = model, own, float(own[-1]), times
        self.delta = len(model.log_sigmas) // steps
        self.knots = [model_timestep(model, t) for t in times[:-1]]  # the walked knots' timesteps
        self.before = float(own[skipped - 1]) if skipped else math.nan  # the knot before the walk
        # PLMS mode lists the second timestep twice (img2img's cut then starts a knot higher)
        self.lists_twice = bool(getattr(getattr(model.scheduler, "config", None), "skip_prk_steps", False))

    def timestep(self, level: float) -> int:
        return model_timestep(self.model, level)

    def level(self, k: int) -> float:
        return float(self.model.sigma(k)) if k >= 0 else self.final

    def _k(self, i: int) -> int:
        return self.knots[i] if i < len(self.knots) else self.timestep(self.times[i])

    def _near(self, value: float, knot: float) -> float:
        return knot if math.isclose(value, knot, rel_tol=1e-12) else value

    def land(self, i: int) -> float:
        return self._near(self.level(self._k(i) - self.delta), self.times[i + 1])

    def midpoints(self, i: int) -> tuple[float, float]:
        half = self.delta // 2
        go, at = self.level(self._k(i) - half), self.level(self._k(i + 1) + half)
        return self._near(go, at), at

    def back(self, i: int) -> float:
        return self._near(self.level(self._k(i + 1) + self.delta), self.times[i])


def _pndm_levels(run: Run) -> _PNDMLevels | None:
    """PNDMScheduler's levels where the run walks its own schedule on a model loaded with it, else None."""
    own = own_schedule(run, lambda m: getattr(m, "scheduler_class", None) == "PNDMScheduler")
    if own is None:
        return None
    model = discrete_model(run.field)
    return _PNDMLevels(model, own, scheduler_steps(run) + run.skipped, run.skipped, run.times)


def _vp_v(eps: torch.Tensor, xt: torch.Tensor, s: float) -> torch.Tensor:
    """The VP v-prediction at VE level s from the σ-ODE velocity ε at x̃: v = ε/α − sα x̃, α = 1/√(1 + s²)."""
    a = 1.0 / math.sqrt(1.0 + s * s)
    return eps / a - (s * a) * xt


def _vp_eps(v: torch.Tensor, xt: torch.Tensor, s: float) -> torch.Tensor:
    """ε from a VP v-prediction at VE level s and x̃: ε = α v + sα² x̃."""
    a2 = 1.0 / (1.0 + s * s)
    return math.sqrt(a2) * v + (s * a2) * xt


def _stage_eps(
    mode: str, out: torch.Tensor, at: torch.Tensor, when: float, xi: torch.Tensor, ti: float
) -> torch.Tensor:
    """A warm-up stage's ε: the velocity itself, or with the v-blend its v converted with the step's
    start (α_i, x_i), as PNDMScheduler converts every stage."""
    return out if mode == "epsilon" else _vp_eps(_vp_v(out, at, when), xi, ti)


def _prk_midpoint(run: Run, i: int) -> float:
    """The time of PNDM's Runge-Kutta midpoint between knots i and i + 1: on a diffusers DDPM-type
    model the timestep t_i − ⌊(t_i − t_{i+1})/2⌋ (PNDMScheduler's t_i − ⌊⌊T/N⌋/2⌋ on its own grid), else
    the mean of the two times."""
    t = run.times
    model = discrete_model(run.field)
    if model is None:
        return 0.5 * (t[i] + t[i + 1])
    here, there = model_timestep(model, t[i]), model_timestep(model, t[i + 1])
    return float(model.sigma(here - (here - there) // 2))


def _pndm_blend(field) -> str:
    """ "v" where the field's model is a diffusers v-prediction model with a PNDMScheduler."""
    model = field_model(field, lambda m: getattr(m, "scheduler_class", None) == "PNDMScheduler")
    return "v" if getattr(model, "prediction_type", None) == "v_prediction" else "epsilon"


def ipndm_v(run: Run, x: torch.Tensor, *, order: int = 4) -> torch.Tensor:
    """iPNDM with variable steps: order ramping up to `order` like `ipndm`, each step's weights the
    exact integral of the Lagrange polynomial through the last velocities at their own times
    (on a uniform grid it is `ipndm`)."""
    return adams(run, x, order=order)
