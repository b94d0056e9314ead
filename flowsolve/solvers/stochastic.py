"""The stochastic interpolation of Eq. 21: the same marginals for every alpha ∈ [0, 1]."""

from __future__ import annotations

import math

import torch

from .base import PathGrid, Run
from ..errors import ArgumentError


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ArgumentError(
            f"alpha: expected a number in [0, 1] (0 = probability-flow ODE, 1 = reverse SDE), got {alpha!r}"
        )
    return float(alpha)


def sde(run: Run, x: torch.Tensor, *, alpha: float = 1.0, method: str = "auto") -> torch.Tensor:
    """Integrate the α-interpolated SDE of Eq. 21, dx = drift_α dt + sqrt(g²_α |dt|) ε.

    method 'exp' (the default for σ-time fields such as fields.EDM) integrates the linear part
    exactly with the data prediction held over the step: for drift c (x − D)/σ and noise rate
    2κσ, x' = D + (σ'/σ)^c (x − D) + σ' sqrt(κ/(c−1) (1 − (σ'/σ)^{2c−2})) ε, which is DDIM at
    alpha = 0 and the ancestral (DDPM-like) step at alpha = 1, and lands on D at σ' = 0.
    method 'em' is Euler–Maruyama, for any field with a stochastic form.
    On other Gaussian paths (flow matching, TrigFlow) 'exp' takes the same step in VE coordinates
    x̃ = x/α_t, ρ = σ_t/α_t (c = 1 + α, κ = α), exactly from pure noise (ρ = ∞).
    """
    alpha = _check_alpha(alpha)
    field = run.field
    coeffs = getattr(field, "sde_coefficients", None)
    on_path = coeffs is None and field.path is not None and not field.time_is_sigma
    if method == "auto":
        sigma_time = field.time_is_sigma and coeffs is not None and not getattr(field, "weighted", False)
        method = "exp" if (sigma_time or on_path) else "em"
    if method not in ("exp", "em"):
        raise ArgumentError(f"method: expected 'auto', 'exp' or 'em', got {method!r}")
    if method == "exp" and not on_path and (not field.time_is_sigma or coeffs is None):
        raise ArgumentError(
            f"method: 'exp' needs a score field on a Gaussian path (fields.EDM / ScoreDifference, "
            f"FlowMatching, TrigFlow), got {type(field).__name__}; use method='em'"
        )
    t = run.times
    if method == "exp" and on_path:
        return _sde_on_path(run, x, alpha)
    if method == "exp":
        assert coeffs is not None
        c, kappa = coeffs(alpha)
        for i in run.steps():
            s, s_next = t[i], t[i + 1]
            drift, _ = run.sde(x, i, alpha)
            den = x - (s / c) * drift  # data prediction of the α-drift
            r = s_next / s
            x = den + (r**c) * (x - den)
            if kappa > 0 and s_next > 0:
                if abs(c - 1.0) < 1e-12:
                    var = 2.0 * kappa * s_next**2 * math.log(s / s_next)
                else:
                    var = kappa / (c - 1.0) * s_next**2 * (1.0 - r ** (2.0 * c - 2.0))
                x = x + math.sqrt(max(var, 0.0)) * run.noise()
            x = run.tick(i, x)
        return x
    for i in run.steps():
        h = t[i + 1] - t[i]
        drift, g2 = run.sde(x, i, alpha)
        x = x + h * drift
        if alpha > 0 and run.evaluable[i + 1]:
            g2 = g2 if isinstance(g2, torch.Tensor) else torch.as_tensor(g2, dtype=x.dtype, device=x.device)
            std = (g2 * abs(h)).sqrt()
            x = x + (std.reshape(-1, *([1] * (x.dim() - 1))) if std.dim() else std) * run.noise()
        x = run.tick(i, x)
    return x


def _sde_on_path(run: Run, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 21's exact exponential step on any Gaussian path, in VE coordinates (c = 1 + α, κ = α):
    x̃' = D + (ρ'/ρ)^c (x̃ − D) + ρ' √(1 − (ρ'/ρ)^{2α}) ε, then x' = α' x̃'; from pure noise (ρ = ∞)
    the first term is ρ' x/σ at α = 0 (DDIM) and vanishes otherwise."""
    p = PathGrid(run)
    c = 1.0 + alpha
    for i in run.steps():
        den = p.denoise(x, i)
        rho, rho_next = p.rho(i), p.rho(i + 1)
        r = 0.0 if math.isinf(rho) else rho_next / rho
        # D + r^c (x̃ − D) with r x̃ = ρ' x/σ: finite from pure noise (r = 0), where it is DDIM's ρ' x/σ + D at α = 0
        xt = (1.0 - r**c) * den + (r**alpha * rho_next) * (x / p.s[i])
        if alpha > 0 and rho_next > 0:
            xt = xt + rho_next * math.sqrt(max(1.0 - r ** (2.0 * alpha), 0.0)) * run.noise()
        x = p.a[i + 1] * xt
        x = run.tick(i, x)
    return x
