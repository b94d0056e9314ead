"""Grid calibration for low NFE: fit a solver's time grid to a converged solve of the field itself.

What the literature offers and what is used here:
- LD3 (Tong et al. 2024) learns the grid from ~100 teacher samples by matching the student's endpoint
  to the teacher's from the same noise. Used: that objective (mean endpoint distance to a converged
  solve from the same starting points, on a few hundred points of the field's own prior: no data),
  and the parametrization by free per-interval widths (a softmax of logits, so the grid stays
  monotone and keeps its ends).
- GITS (Chen et al. 2024) searches the grid without gradients. Used: a derivative-free search, so any
  field and any registered solver (multistep ones included, whose error is not a sum of local costs)
  can be calibrated through `fs.sample` itself, within a wall-clock budget; and its observation that
  the grid's overall shape matters most at low NFE: the search starts from the best of a few shapes
  (Karras ρ = 3 … 12, log-linear; power laws in t).
- S4S (Frankel et al. 2025), AMED (Zhou et al. 2024) and DPM-Solver-v3 learn solver coefficients
  as well as (or instead of) the grid. Used: S4S's idea of learning the multistep coefficients
  themselves, in a form that needs no knowledge of the solver: the k-th evaluation the solver sees
  becomes Σ_{j≤k} W_kj f_j (W lower-triangular, W = I is the solver itself; a diagonal W is learned
  ε-scaling, Ning et al. 2024). For a linear multistep solver this spans corrections of all its
  weights, for every registered solver alike, with NFE(NFE+1)/2 numbers. Unlike the grid, W enters
  the solve differentiably, so it is fitted by L-BFGS with gradients through the solver and the
  field (LD3's backpropagation) in the second half of the budget, from the calibrated grid, and kept
  only where it lowers the error on fresh points. On digits-edm (deis, NFE 5) the grid search alone
  stalls at 0.90; the coefficients bring it to about 0.62 within the same minute.
The fit is measured on fresh seeds the calibration never saw.

The search runs in log σ for σ-time fields (σ_max … σ_min, then 0) and in t otherwise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from . import grids
from ._checks import check_int, check_number
from ._cond import map_leaves
from .errors import ArgumentError
from .fields.base import Field

__all__ = ["calibrate", "Calibration", "endpoint_error", "reference_solve"]


@dataclass
class Calibration:
    """The result of `calibrate`: the grid, its endpoint error on the fitting points and on fresh
    ones, the default grid's errors, the number of candidate grids tried and the seconds spent."""

    grid: torch.Tensor
    solver: str
    nfe: int
    fit_error: float
    default_fit_error: float
    trials: int
    seconds: float


def reference_solve(field: Field, x0: torch.Tensor, cond: dict | None = None, steps: int = 64) -> torch.Tensor:
    """A converged solve from x0: Heun on the field's default grid with `steps` steps (127 NFE; its
    error is far below the NFE-5 errors being fitted)."""
    from .sample import sample

    return sample(field, "heun", grid=field.grid(steps), x_init=x0, cond=cond)


def endpoint_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean Euclidean distance between endpoints (the RMSE of the benchmarks, per sample)."""
    return float((x.double() - ref.double()).reshape(len(x), -1).norm(dim=1).mean())


class _Parametrization:
    """Grid ↔ logits θ: interval widths softmax(θ) in u = log σ (σ-time: σ_max … σ_min then 0) or t."""

    def __init__(self, field: Field, default: torch.Tensor) -> None:
        self.log_sigma = bool(field.time_is_sigma) and float(default[-1]) == 0.0
        body = default[:-1] if self.log_sigma else default
        u = body.log() if self.log_sigma else body
        self.u0, self.u1 = float(u[0]), float(u[-1])
        self.theta0 = self._theta(u)

    def _theta(self, u: torch.Tensor) -> torch.Tensor:
        """The logits of a grid given in u (its knots from u0 to u1)."""
        return ((u[1:] - u[:-1]) / (self.u1 - self.u0)).clamp(min=1e-9).log()

    def starts(self) -> list[torch.Tensor]:
        """Starting points beside the solver's default grid, with the same ends and knot count: in
        log σ, Karras grids of ρ = 3, 5, 7, 12 and the log-linear grid (ρ → ∞); in t, power-law
        spacings (t_i − t_0 ∝ (i/m)^p, p = 0.7, 1, 1.5, 2). Low-NFE error depends on the grid's
        shape far more than on small moves of one knot (GITS' observation), so the search starts
        from the best of these."""
        m = len(self.theta0)
        if self.log_sigma:
            lo, hi = math.exp(self.u1), math.exp(self.u0)
            sigmas = [grids.karras(m, lo, hi, rho, final_zero=False) for rho in (3.0, 5.0, 7.0, 12.0)]
            shapes = [s.log() for s in [*sigmas, grids.loglinear(m, lo, hi, final_zero=False)]]
        else:
            ramp = torch.linspace(0, 1, m + 1, dtype=torch.float64)
            shapes = [self.u0 + ramp**p * (self.u1 - self.u0) for p in (0.7, 1.0, 1.5, 2.0)]
        thetas = [self._theta(u) for u in shapes]
        return [t for t in thetas if not torch.allclose(t, self.theta0)]  # the default is tried already

    def grid(self, theta: torch.Tensor) -> torch.Tensor:
        c = torch.cat([torch.zeros(1, dtype=torch.float64), torch.softmax(theta, 0).cumsum(0)])
        u = self.u0 + c * (self.u1 - self.u0)
        u[-1] = self.u1
        if self.log_sigma:
            return torch.cat([u.exp(), torch.zeros(1, dtype=torch.float64)])
        return u


def _coordinate_search(
    loss, x: torch.Tensor, unit: torch.Tensor, best: float, deadline: float, max_trials: float, rng: torch.Generator
) -> tuple[torch.Tensor, float, int]:
    """GITS-style derivative-free search: try ±step·unit_k on each coordinate in random order, keep
    any improvement, halve the step after a sweep without one."""
    trials, step = 0, 0.5
    while time.perf_counter() < deadline and trials < max_trials and step > 1e-3:
        improved = False
        for k in torch.randperm(len(x), generator=rng).tolist():
            for sign in (1.0, -1.0):
                cand = x.clone()
                cand[k] += sign * step * unit[k]
                e = loss(cand)
                trials += 1
                if e < best:
                    x, best, improved = cand, e, True
                    break
            if time.perf_counter() >= deadline or trials >= max_trials:
                break
        if not improved:
            step *= 0.5
    return x, best, trials


class _OutOfTime(Exception):
    """Raised inside the coefficient fit when the budget is spent."""


def _fit_coefficients(
    solve, ref: torch.Tensor, n_evals: int, deadline: float, start: list | None = None
) -> tuple[list | None, float]:
    """S4S/LD3-style learned solver coefficients: a lower-triangular matrix W (diagonal exp(d),
    below it free) so that the solver's k-th evaluation is Σ_{j≤k} W_kj f_j, fitted by L-BFGS with
    gradients through the solver and the field to the reference endpoints, from `start` (default
    W = I, the solver itself). Returns the best rows found (None if the field cannot be
    differentiated) and their fitting error."""
    d = torch.zeros(n_evals, dtype=torch.float64)
    low = torch.zeros(n_evals, n_evals, dtype=torch.float64)
    for k, row in enumerate(start or []):
        d[k] = math.log(row[k])
        low[k, :k] = torch.tensor(row[:k], dtype=torch.float64)
    d.requires_grad_(True)
    low.requires_grad_(True)

    def rows(dd: torch.Tensor, ll: torch.Tensor) -> list[list[torch.Tensor]]:
        return [[*ll[k, :k].unbind(0), dd[k].exp()] for k in range(n_evals)]

    best: dict = {"e": math.inf, "rows": None}
    opt = torch.optim.LBFGS([d, low], lr=1.0, max_iter=5, history_size=20, line_search_fn="strong_wolfe")

    last = [0.0]  # the duration of the last evaluation: none is started that would end past the deadline

    def closure() -> torch.Tensor:
        began = time.perf_counter()
        if began + last[0] >= deadline:
            raise _OutOfTime
        opt.zero_grad()
        x = solve(rows(d, low))
        e = (x.double() - ref.double()).reshape(len(x), -1).norm(dim=1).mean()
        if not torch.isfinite(e):
            return torch.tensor(math.inf, dtype=torch.float64)
        e.backward()
        last[0] = time.perf_counter() - began
        if low.grad is not None:
            low.grad.tril_(-1)  # only the strictly lower part is free
        if e.item() < best["e"]:
            best["e"], best["rows"] = e.item(), [[float(c) for c in r] for r in rows(d.detach(), low.detach())]
        return e

    try:
        while time.perf_counter() < deadline:
            before = best["e"]
            opt.step(closure)
            if math.isfinite(before) and not best["e"] < before * (1 - 1e-6):  # converged
                break
    except _OutOfTime:
        pass
    except RuntimeError:  # a field that cannot be differentiated (or ran out of memory): no coefficients
        return None, math.inf
    return best["rows"], best["e"]


def calibrate(
    field: Field,
    solver: str | object,
    nfe: int,
    *,
    n: int = 256,
    seed: int = 0,
    seconds: float = 60.0,
    cond: dict | None = None,
    max_trials: int | None = None,
    coefficients: bool = True,
    return_result: bool = False,
    **options,
):
    """A 1-D grid for `fs.sample(field, solver, nfe=nfe, grid=...)` fitted to a converged solve of
    `field` from n starting points of its prior (seed `seed`), within `seconds` of wall time (the
    reference solves included). Returns the grid (float64), or a `Calibration` with `return_result=True`.

    The grid search runs until its share of the budget is spent or `max_trials` candidate grids (no
    limit by default) were tried: from the best of a few grid shapes, one knot at a time, halving its
    step after a sweep without improvement; once the step is below 10⁻³ it hops (random moves of the
    logits from the best grid, each followed by the same search) and keeps any better grid it finds.

    With `coefficients=True` (the default) the second half of the budget fits the solver's
    coefficients on that grid (`_fit_coefficients`: the k-th evaluation becomes Σ_{j≤k} W_kj f_j, by
    L-BFGS through the solver and the field), kept only where they lower the endpoint error on n/2
    fresh starting points the fit never saw. The grid then carries them (`grid.coefficients`), and
    `fs.sample(..., grid=grid)` and `save_calibration` use them. digits-edm, deis NFE 5, 60 s: fresh
    endpoint error 0.90 with the grid alone, 0.62 with the coefficients."""
    from . import solvers as registry
    from .sample import check_cond, cond_rows, initial_noise, resolve_grid, sample

    t0 = time.perf_counter()
    base, options = registry.resolve(solver, options, field)  # a peer's name or a diffusers scheduler too
    spec, solver = base.configured(options), base.name
    check_int("nfe", nfe, 1)
    check_int("n", n, 2)
    check_number("seconds", seconds, 0.0, lo_open=True)
    if spec.adaptive or spec.stochastic:
        raise ArgumentError(
            f"solver: calibration fits deterministic fixed-grid solvers; {solver!r} is "
            f"{'adaptive' if spec.adaptive else 'stochastic'}"
        )
    if field.data_shape is None:
        raise ArgumentError("field: calibration needs the field's data shape (make it with shape=)")
    default, _ = resolve_grid(field, spec, nfe, None)
    if len(default) < 3:
        raise ArgumentError(
            f"nfe: {nfe} evaluations give {len(default) - 1} step under {solver!r}; nothing to calibrate"
        )
    x0 = initial_noise(field, seed, 0, n, field.data_shape, t_start=float(default[0]))
    t_ref = time.perf_counter()
    ref = reference_solve(field, x0, cond)
    t_ref = time.perf_counter() - t_ref
    par = _Parametrization(field, default)
    _, info = sample(
        field, solver, grid=default, x_init=x0[:2], nfe=nfe, return_info=True, cond=_rows(cond, 2), **options
    )
    n_theta, n_evals = len(par.theta0), info.nfe

    def error(g: torch.Tensor, start: torch.Tensor, target: torch.Tensor, c: dict | None) -> float:
        try:
            x = sample(field, solver, grid=g, x_init=start, nfe=nfe, cond=c, **options)
        except (ArgumentError, FloatingPointError):
            return math.inf
        e = endpoint_error(x, target)
        return e if math.isfinite(e) else math.inf

    def candidate(theta: torch.Tensor, rows: list | None = None) -> torch.Tensor:
        """The grid of logits θ, carrying solver coefficients `rows` (None: the solver's own)."""
        g = par.grid(theta)
        g.coefficients = rows  # type: ignore[attr-defined]
        return g

    def loss(theta: torch.Tensor, rows: list | None = None) -> float:
        return error(candidate(theta, rows), x0, ref, cond)

    limit = math.inf if max_trials is None else check_int("max_trials", max_trials, 1)
    rng = torch.Generator().manual_seed(seed + 1)
    theta = par.theta0.clone()
    best = default_err = loss(theta)
    starts = 0
    for start in par.starts():  # the search starts from the best-shaped grid (default included)
        e = loss(start)
        starts += 1
        if e < best:
            theta, best = start, e
    deadline = t0 + (0.4 * seconds if coefficients else seconds)  # the grid search's share
    theta, best, trials = _coordinate_search(loss, theta, torch.ones(n_theta), best, deadline, limit, rng)
    while time.perf_counter() < deadline and trials < limit:  # converged early: basin hopping from the best
        hop = theta + 0.3 * torch.randn(n_theta, generator=rng, dtype=theta.dtype)
        e_hop = loss(hop)
        hop, e_hop, more = _coordinate_search(loss, hop, torch.ones(n_theta), e_hop, deadline, limit - trials - 1, rng)
        trials += more + 1
        if e_hop < best:
            theta, best = hop, e_hop
    grid, fit = par.grid(theta), best
    if not fit < default_err:  # never worse than the default on the fitting points
        grid, fit = default, default_err
    if coefficients:  # block coordinate descent: the coefficients on the grid, the grid under them, …
        bound = field.bind(cond_rows(check_cond(cond, n), 0, n, n))
        end = t0 + seconds - 0.8 * t_ref  # leave time for the fresh points' reference solve and two solves
        rows, cur, kept = None, fit, None  # kept: the best (θ, rows) so far
        while time.perf_counter() < end:
            on = par.grid(theta)  # (θ is the default's logits where the search kept the default)

            def solve(w: list, g: torch.Tensor = on) -> torch.Tensor:
                run = registry.Run(bound, g, x0, solver=spec.name, coefficients=w)
                with torch.enable_grad():
                    return spec.fn(run, x0, **options)

            rows, e_rows = _fit_coefficients(solve, ref, n_evals, end, rows)
            if rows is None or not e_rows < cur * (1 - 1e-4):
                break
            cur, kept = e_rows, (theta, rows)
            theta, e_grid, more = _coordinate_search(
                lambda t, w=rows: loss(t, w), theta, torch.ones(n_theta), cur, end, math.inf, rng
            )
            trials += more
            if not e_grid < cur * (1 - 1e-4):
                break
            cur, kept = e_grid, (theta, rows)
        if kept is not None:  # keep the coefficients only if they also win on fresh points
            mixed = candidate(*kept)
            fresh = initial_noise(field, seed + 7919, 0, max(2, n // 2), field.data_shape, t_start=float(grid[0]))
            fresh_cond = _rows(cond, len(fresh))
            fresh_ref = reference_solve(field, fresh, fresh_cond)
            if error(mixed, fresh, fresh_ref, fresh_cond) < error(grid, fresh, fresh_ref, fresh_cond):
                grid, fit = mixed, cur
    if not return_result:
        return grid
    return Calibration(grid, spec.name, nfe, fit, default_err, trials + 1 + starts, time.perf_counter() - t0)


def _rows(cond: dict | None, n: int) -> dict | None:
    """The first n rows of each conditioning tensor (rows of size 1 are kept)."""
    if not cond:
        return cond
    return map_leaves(lambda _, v: v[:n] if isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) > 1 else v, cond)
