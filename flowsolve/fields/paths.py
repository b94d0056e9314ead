"""Gaussian paths x_t = α_t x_0 + σ_t ε: EDM (α = 1, σ = t), flow matching / rectified flow
(α = 1 − t, σ = t), VP and TrigFlow alike. Up to the scaling x/α_t and the time change σ_t/α_t they
share one probability-flow ODE, so one mechanism carries the exponential solvers to all of them:
the data prediction D = (σ'_t x − σ_t v)/(σ'_t α_t − σ_t α'_t) of a velocity v = dx/dt, and the
half log-SNR λ_t = log(α_t/σ_t), −∞ at pure noise (a flow's t = 1) and +∞ at the data (σ_t = 0).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["GaussianPath", "VE", "FLOW", "TRIG", "HALF_PI", "trigflow", "vp_reread"]

HALF_PI = math.pi / 2


class GaussianPath:
    """x_t = α(t) x_0 + σ(t) ε, with the derivatives α'(t), σ'(t) (all on Python floats)."""

    def __init__(
        self,
        name: str,
        alpha: Callable[[float], float],
        sigma: Callable[[float], float],
        d_alpha: Callable[[float], float],
        d_sigma: Callable[[float], float],
        time_at: Callable[[float], float] | None = None,
    ) -> None:
        self.name, self.alpha, self.sigma, self.d_alpha, self.d_sigma = name, alpha, sigma, d_alpha, d_sigma
        self._time_at = time_at

    def time_at(self, lam: float) -> float:
        """The time t with λ_t = lam (the inverse of `lam`; single-step solvers evaluate between knots)."""
        if self._time_at is None:
            raise NotImplementedError(f"{self!r} has no inverse of λ")
        return self._time_at(lam)

    def __repr__(self) -> str:
        return f"GaussianPath({self.name!r})"

    def lam(self, t: float) -> float:
        """λ = log(α/σ): −∞ where α = 0, +∞ where σ = 0."""
        a, s = self.alpha(t), self.sigma(t)
        if s == 0:
            return math.inf
        if a == 0:
            return -math.inf
        return -math.log(s) if a == 1.0 else math.log(a / s)

    def diffusion(self, t: float) -> float:
        """g²(t) = 2σσ' − 2(α'/α)σ² of the forward SDE dx = (α'/α) x dt + g dW whose marginals are the
        path's (2σ on VE, 2t/(1 − t) on the flow path); ∞ where α = 0 (pure noise)."""
        a, s = self.alpha(t), self.sigma(t)
        if a == 0:
            return math.inf
        return 2.0 * s * self.d_sigma(t) - 2.0 * (self.d_alpha(t) / a) * s * s

    def data_prediction(self, x: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
        """D = E[x_0 | x_t] from the velocity v = dx/dt of the probability-flow ODE."""
        a, s, da, ds = self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)
        den = ds * a - s * da
        return (ds * x - s * v) / den if (ds, den) != (1.0, 1.0) else x - s * v


VE = GaussianPath("ve", lambda t: 1.0, lambda t: t, lambda t: 0.0, lambda t: 1.0, lambda lam: math.exp(-lam))
FLOW = GaussianPath(
    "flow", lambda t: 1.0 - t, lambda t: t, lambda t: -1.0, lambda t: 1.0, lambda lam: 1.0 / (1.0 + math.exp(lam))
)


def trigflow(sigma_data: float = 1.0) -> GaussianPath:
    """TrigFlow (sCM; Lu & Song 2024): x_t = cos(t) x_0 + σ_d sin(t) ε, t from π/2 (pure noise, exactly:
    α = 0 there and beyond, as SCMScheduler's 1.57080 is a hair past π/2) to 0."""
    sd = float(sigma_data)
    if not sd > 0:
        raise ValueError(f"sigma_data: expected a positive data standard deviation, got {sigma_data!r}")

    def noise(t: float) -> bool:
        return t >= HALF_PI

    return GaussianPath(
        "trigflow" if sd == 1.0 else f"trigflow(sigma_data={sd:g})",
        lambda t: 0.0 if noise(t) else math.cos(t),
        lambda t: sd if noise(t) else sd * math.sin(t),
        lambda t: -1.0 if noise(t) else -math.sin(t),
        lambda t: 0.0 if noise(t) else sd * math.cos(t),
        lambda lam: math.atan(math.exp(-lam) / sd),
    )


TRIG = trigflow(1.0)


def vp_reread(level: float, read: float) -> float:
    """The factor √((1 + read²)/(1 + level²)) that takes an EDM (VE) state x̃ at noise level `level` to
    the VE state at `read` with the same VP sample x̃/√(1 + σ²). diffusers' VP schedulers hand on
    samples, not levels: a sample moved to one level and read at another (DDIM's and PNDM's steps
    between their knots, SA-Solver's `add_noise`, PNDM's cut list in img2img) is rescaled by it."""
    return math.sqrt((1.0 + read * read) / (1.0 + level * level))
