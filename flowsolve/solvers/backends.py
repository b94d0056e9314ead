"""torchdiffeq and torchsde methods behind the flowsolve signature.

`torchdiffeq:<method>`: fixed-grid methods step on the flowsolve grid; adaptive ones integrate
from start to end and stop with NFEBudgetExceeded once the `nfe` budget is spent.
`torchsde:<method>`: one torchsde step per grid interval, in increasing time (τ = −σ for EDM)
on a 2-D (batch, features) state, with a per-sample Brownian motion built from flowsolve's
seeded noise, so sample i is the same for any n and chunking.
"""

from __future__ import annotations

import functools
import math

import torch

from .base import Run

# ----------------------------------------------------------------------------- torchdiffeq


def torchdiffeq_methods() -> dict[str, bool]:
    """{method: adaptive} for every torchdiffeq method."""
    from torchdiffeq._impl.odeint import SOLVERS
    from torchdiffeq._impl.solvers import FixedGridODESolver

    return {m: not issubclass(cls, FixedGridODESolver) for m, cls in SOLVERS.items()}


def torchdiffeq_solve(
    run: Run, x: torch.Tensor, method: str, rtol: float = 1e-5, atol: float = 1e-5, options: dict | None = None
) -> torch.Tensor:
    from torchdiffeq import odeint

    adaptive = torchdiffeq_methods()[method]

    def func(t, y):
        return run.f_at(y, t)

    if adaptive:
        ts = torch.stack([run.tt[0], run.tt[-1]])
    else:
        ts = torch.stack(run.tt)
    ys = odeint(func, x, ts, rtol=rtol, atol=atol, method=method, options=dict(options or {}))
    if not adaptive:
        for i in range(len(run.times) - 1):
            run.tick(i, ys[i + 1])
    return ys[-1]


@functools.lru_cache(maxsize=None)
def measured_evals(backend: str, method: str) -> tuple[int, int]:
    """(a, b) with NFE = a + b·steps, measured once on a scalar linear ODE (no formula)."""
    counts = []
    for steps in (4, 8):
        n = [0]

        def fn(x, t, n=n):  # bind this iteration's counter
            n[0] += 1
            return -x

        from ..fields.base import Function
        from ..grids import uniform

        field = Function(fn, 0.0, 1.0, shape=(1,), diffusion=lambda t: 0.01)
        x = torch.ones(1, 1, dtype=torch.float64)
        run = Run(
            field, uniform(steps), x, solver=f"{backend}:{method}", noise=lambda: torch.zeros(1, 1, dtype=torch.float64)
        )
        if backend == "torchdiffeq":
            torchdiffeq_solve(run, x, method)
        else:
            torchsde_solve(run, x, method, alpha=1.0)
        counts.append(n[0])
    b = -(-(counts[1] - counts[0]) // 4)  # per step, rounded up
    return counts[0] - 4 * b, b


# ----------------------------------------------------------------------------- torchsde

_ITO = ("euler", "milstein", "srk")


def torchsde_methods() -> list[str]:
    from torchsde.settings import METHODS

    return [m for m in METHODS.all() if m not in ("adjoint_reversible_heun", "log_ode")]


def _brownian_class():
    from torchsde import BaseBrownian

    class SampleBrownian(BaseBrownian):
        """Brownian increments over one step from the per-sample noise; space-time Lévy area
        U = h (W/2 + H), H ~ N(0, h/12) independent of W (as in torchsde)."""

        __slots__ = ("_noise", "_shape", "_dtype", "_device")

        def __init__(self, noise, shape, dtype, device):
            self._noise, self._shape, self._dtype, self._device = noise, shape, dtype, device

        def __call__(self, ta, tb=None, return_U=False, return_A=False):
            h = float(tb - ta)
            W = math.sqrt(h) * self._noise().reshape(self._shape)
            if not (return_U or return_A):
                return W
            out = (W,)
            if return_U:
                out += (h * (0.5 * W + math.sqrt(h / 12) * self._noise().reshape(self._shape)),)
            if return_A:
                out += (torch.zeros(*self._shape, self._shape[-1], dtype=self._dtype, device=self._device),)
            return out

        def __repr__(self):
            return f"SampleBrownian(shape={self._shape})"

        dtype = property(lambda self: self._dtype)
        device = property(lambda self: self._device)
        shape = property(lambda self: self._shape)
        levy_area_approximation = property(lambda self: "space-time")

    return SampleBrownian


def torchsde_solve(run: Run, x: torch.Tensor, method: str, alpha: float = 1.0) -> torch.Tensor:
    import torchsde

    shape = x.shape
    flat = (shape[0], int(math.prod(shape[1:])))
    sign = 1.0 if run.times[-1] > run.times[0] else -1.0
    field = run.field

    class _SDE(torch.nn.Module):
        noise_type = "diagonal"
        sde_type = "ito" if method in _ITO else "stratonovich"

        def __init__(self):
            super().__init__()
            self._last = None  # torchsde probes f(t0, y0) before its step: serve it once, uncounted

        def f(self, tau, y):
            t = sign * float(tau)
            if self._last is not None and self._last[0] == t and self._last[1] is y:
                return self._last[2]
            if t == run.t_end and not field.finite_at_end:
                out = torch.zeros_like(y)
            else:
                drift, _ = run.sde_at(y.reshape(shape), t, alpha)
                out = sign * drift.reshape(flat)
            self._last = (t, y, out)
            return out

        def g(self, tau, y):
            g2 = field.diffusion(torch.tensor(sign * float(tau), dtype=y.dtype, device=y.device), alpha)
            g2 = torch.as_tensor(g2, dtype=y.dtype, device=y.device)
            return (
                g2.clamp_min(0).sqrt().expand(flat) if g2.dim() == 0 else g2.clamp_min(0).sqrt()[:, None].expand(flat)
            )

    sde = _SDE()
    bm = _brownian_class()(run.noise, flat, x.dtype, x.device)
    y = x.reshape(flat)
    for i in run.steps():
        ts = torch.tensor([sign * run.times[i], sign * run.times[i + 1]], dtype=x.dtype, device=x.device)
        # dt larger than the interval: exactly one torchsde step, ending on the grid point
        y = torchsde.sdeint(sde, y, ts, method=method, dt=2.0 * float(ts[1] - ts[0]), bm=bm, adaptive=False)[-1]
        sde._last = None
        y = run.tick(i, y.reshape(shape)).reshape(flat)
    return y.reshape(shape)
