"""Time grids (computed in float64, cast by the caller).

Conventions (DESIGN.md): EDM time is σ, decreasing from σ_max to a final 0; other
fields use their own [t_start, t_end] domain, e.g. Discriminator Flows t ∈ [0, 1].
A grid is a 1-D tensor of times from start to end, strictly monotone.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ._checks import check_int, deprecated, nearest
from .errors import ArgumentError

__all__ = ["karras", "uniform", "loglinear", "make", "check", "SPACINGS", "KINDS", "MAX_STEPS"]


MAX_STEPS = 1_000_000  # a grid longer than this is a mistake (nfe=10**12), refused before it is built


def _steps_ok(steps: int) -> int:
    return check_int("steps", steps, 1, MAX_STEPS)


def karras(
    steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho_grid: float = 7.0,
    final_zero: bool = True,
    *,
    rho: float | None = None,
) -> torch.Tensor:
    """EDM's grid σ_i = (σ_max^{1/ρ} + i/(N-1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ (Karras et al. 2022,
    Eq. 5; the same interpolation as the paper's Eq. 28), followed by σ = 0. The exponent is
    `rho_grid` (ρ alone is the generated distribution in flowsolve)."""
    if rho is not None:  # the name before 0.2
        deprecated("rho", "rho_grid", "karras")
        rho_grid = rho
    rho = rho_grid
    steps = _steps_ok(steps)
    if not 0 < sigma_min < sigma_max:
        raise ArgumentError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if not rho > 0:
        raise ArgumentError(f"rho_grid: expected a positive number, got {rho}")
    n = steps if final_zero else steps + 1
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([s, s.new_zeros(1)]) if final_zero else s


def loglinear(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, final_zero: bool = True) -> torch.Tensor:
    """σ uniform in log σ from σ_max to σ_min (the DPM-Solver 'logSNR' grid), then σ = 0."""
    steps = _steps_ok(steps)
    if not 0 < sigma_min < sigma_max:
        raise ArgumentError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    n = steps if final_zero else steps + 1
    s = (
        torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64))
        if n > 1
        else torch.tensor([sigma_max], dtype=torch.float64)
    )
    return torch.cat([s, s.new_zeros(1)]) if final_zero else s


def uniform(steps: int, t_start: float = 0.0, t_end: float = 1.0) -> torch.Tensor:
    """`steps` equal intervals from t_start to t_end (Discriminator Flows, Alg. 3)."""
    steps = _steps_ok(steps)
    if t_start == t_end:
        raise ArgumentError(f"t_start, t_end: expected different times, got {t_start} twice")
    return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)


SPACINGS: dict[str, Callable[..., torch.Tensor]] = {"karras": karras, "loglinear": loglinear, "uniform": uniform}
KINDS = SPACINGS  # the name before 0.2


def make(spacing: str, steps: int, **kw) -> torch.Tensor:
    """A grid by spacing name: 'karras', 'loglinear' or 'uniform'."""
    if spacing not in SPACINGS:
        raise ArgumentError(
            f"grid: unknown spacing {spacing!r}{nearest(str(spacing), SPACINGS)}; expected one of "
            f"{sorted(SPACINGS)} or a 1-D tensor of times"
        )
    return SPACINGS[spacing](steps, **kw)


def check(grid: torch.Tensor | Sequence[float], name: str = "grid") -> torch.Tensor:
    """Validate a user grid: 1-D, finite, at least two times, strictly monotone. Returns float64 on CPU."""
    g = torch.as_tensor(grid).detach()
    if g.dim() != 1:
        raise ArgumentError(f"{name}: expected a 1-D tensor of times, got shape {tuple(g.shape)}")
    g = g.to(device="cpu", dtype=torch.float64)
    if g.numel() < 2:
        raise ArgumentError(f"{name}: expected at least 2 times (start and end), got {g.numel()}")
    if not torch.isfinite(g).all():
        raise ArgumentError(f"{name}: expected finite times, got {g.tolist()}")
    d = g[1:] - g[:-1]
    if not ((d > 0).all() or (d < 0).all()):
        bad = int(torch.nonzero(d * torch.sign(d[0]) <= 0)[0]) if d[0] != 0 else 0
        raise ArgumentError(
            f"{name}: expected strictly monotone times, but {name}[{bad}]={g[bad].item():g} "
            f"and {name}[{bad + 1}]={g[bad + 1].item():g}"
        )
    return g
