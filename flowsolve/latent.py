"""Latent interpolations for generator models (App. C.3; Leśniak et al. 2018): linear, spherical,
Cauchy-linear and spherical Cauchy-linear. The Cauchy variants keep every intermediate point
distributed as the N(0, I) prior: a standard Cauchy variable stays standard Cauchy under
c(t) = (1 − t) c₁ + t c₂, so coordinates (or radii) are mapped to Cauchy, interpolated, mapped back."""

from __future__ import annotations

import math

import torch
from ._checks import check_int
from .errors import ArgumentError

__all__ = ["interpolate", "METHODS"]

METHODS = ("linear", "spherical", "cauchy_linear", "spherical_cauchy_linear")
_N = torch.distributions.Normal(0.0, 1.0)


def _to_cauchy(u: torch.Tensor) -> torch.Tensor:
    return torch.tan(math.pi * (u.clamp(1e-12, 1 - 1e-12) - 0.5))


def _from_cauchy(c: torch.Tensor) -> torch.Tensor:
    return 0.5 + torch.atan(c) / math.pi


def _slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    an, bn = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    omega = torch.acos((an * bn).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


def _chi_cdf(r: torch.Tensor, d: int) -> torch.Tensor:
    return torch.special.gammainc(torch.tensor(d / 2, dtype=r.dtype), r * r / 2)


def _chi_icdf(u: torch.Tensor, d: int, iters: int = 60) -> torch.Tensor:
    lo, hi = torch.zeros_like(u), torch.full_like(u, math.sqrt(d) + 20.0)
    for _ in range(iters):  # bisection on the χ_d CDF
        mid = (lo + hi) / 2
        below = _chi_cdf(mid, d) < u
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


def interpolate(
    a: torch.Tensor, b: torch.Tensor, steps: int = 8, method: str = "spherical_cauchy_linear"
) -> torch.Tensor:
    """Points from latent a to latent b ((d,) or (n, d)) at `steps` evenly spaced t ∈ [0, 1]:
    returns (steps, d) or (steps, n, d)."""
    if method not in METHODS:
        raise ArgumentError(f"method: expected one of {METHODS}, got {method!r}")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        raise ArgumentError(
            f"a, b: expected two latents of the same shape, got {getattr(a, 'shape', a)} and {getattr(b, 'shape', b)}"
        )
    check_int("steps", steps, 2)
    a64, b64 = a.double(), b.double()
    t = torch.linspace(0, 1, steps, dtype=torch.float64).view(-1, *([1] * a.dim()))
    if method == "linear":
        out = (1 - t) * a64 + t * b64
    elif method == "spherical":
        out = _slerp(a64, b64, t)
    elif method == "cauchy_linear":
        ca, cb = _to_cauchy(_N.cdf(a64)), _to_cauchy(_N.cdf(b64))
        out = _N.icdf(_from_cauchy((1 - t) * ca + t * cb).clamp(1e-15, 1 - 1e-15))
    else:
        d = a.shape[-1]
        direction = _slerp(a64, b64, t)
        direction = direction / direction.norm(dim=-1, keepdim=True)
        ra, rb = a64.norm(dim=-1, keepdim=True), b64.norm(dim=-1, keepdim=True)
        ca, cb = _to_cauchy(_chi_cdf(ra, d)), _to_cauchy(_chi_cdf(rb, d))
        r = _chi_icdf(_from_cauchy((1 - t) * ca + t * cb).clamp(1e-15, 1 - 1e-15), d)
        out = direction * r
    return out.to(a.dtype)
