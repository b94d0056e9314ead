"""Flow matching (rectified flow / CondOT path) as a PM (Definition 1): particles follow the learned
velocity dx/dt = v(x, t) from pure noise at t = 1 to the data at t = 0 along x_t = (1 − t) x_0 + t ε
(the convention of diffusers' FlowMatch schedulers, SD3, Flux). Its Gaussian path (`paths.FLOW`)
gives every exponential solver its data prediction D = x − t v and λ = log((1 − t)/t); t = 1
(λ = −∞) is handled exactly by the first step, not by clipping.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .. import grids
from ..errors import ArgumentError, ArgumentTypeError
from .base import Field, as_column
from .paths import FLOW, HALF_PI, trigflow
from .guidance import Guided
from .score import declared_shape

__all__ = ["FlowMatching", "TrigFlow", "FLOW_MAP_TARGET"]

FLOW_MAP_TARGET = "r"  # the keyword by which a flow-map model's velocity takes its target time


class FlowMatching(Field):
    """dx/dt = v(x, t, **cond) on t from 1 (prior N(0, I)) to 0 (data).

    velocity: any callable v(x, t) with t a (batch,) tensor in [0, 1] (e.g. a diffusers transformer or
    UNet through `models.from_diffusers(model, FlowMatchEulerDiscreteScheduler(...))`).
    schedule: optional steps ↦ 1-D tensor of times from 1 to 0 (a scheduler's own sigmas); default a
    uniform grid. The field is not evaluated at t = 0 (the last step of Heun is Euler there, as in
    diffusers' FlowMatchHeun), so NFE counts match the schedulers'.
    """

    path = FLOW
    takes_cond = True
    time_is_sigma = False
    finite_at_end = False
    default_grid = "schedule"
    default_nfe = 28
    schedule_for_every_solver = False  # False: the schedule is a FlowMatch scheduler's, for Euler/Heun

    def __init__(
        self,
        velocity: Callable,
        shape: Sequence[int] | None = None,
        schedule: Callable[[int], torch.Tensor] | None = None,
        *,
        default_nfe: int = 28,
        flow_map: bool = False,
    ) -> None:
        if not callable(velocity):
            raise ArgumentTypeError(f"velocity: expected a callable v(x, t), got {type(velocity).__name__}")
        self.velocity, self.schedule, self.flow_map = velocity, schedule, bool(flow_map)
        # the model's time shift t ↦ shift(t) (SD3's, Flux's), read by ComfyUI's table schedulers
        self.time_shift: Callable[[float], float] | None = None
        self.t_start, self.t_end, self.prior_std, self.default_nfe = 1.0, 0.0, 1.0, default_nfe
        self.data_shape = declared_shape(velocity, shape)

    def domain(self) -> tuple[float, float]:
        return 0.0, 1.0

    def grid(self, steps: int, spacing: str | None = None, **kw) -> torch.Tensor:
        spacing = spacing or self.default_grid
        if spacing == "schedule":
            if self.schedule is None:
                return grids.uniform(steps, self.t_start, 0.0)
            return grids.check(self.schedule(steps, **kw) if kw else self.schedule(steps))
        if isinstance(spacing, str) and spacing.startswith(grids.COMFYUI_PREFIX):  # "comfyui:beta", ...
            g = grids.comfyui_spaced(spacing, steps, grids.flow_table(self.time_shift))  # t spaced as σ
            if g is not None:
                return g
            spacing = grids.comfyui_name(spacing)  # a table scheduler, or linear_quadratic
        if spacing in grids.TABLE_SCHEDULERS:  # ComfyUI's schedulers on the flow's table of times
            return grids.from_flow(spacing, steps, self.time_shift)
        if spacing == "linear_quadratic":  # ComfyUI's (Mochi's): σ is t here
            return grids.linear_quadratic(steps, 1.0, **kw)
        if spacing in grids.SIGMA_SPACINGS:  # spaced in the VE level σ/α, mapped back to t by the path
            s = grids.make(
                spacing, steps, sigma_min=kw.pop("sigma_min", 0.002), sigma_max=kw.pop("sigma_max", 80.0), **kw
            )
            inner = [self.path.time_at(math.inf if v == 0 else -math.log(v)) for v in s[1:].tolist()]
            return torch.tensor([self.t_start, *inner], dtype=torch.float64)
        return super().grid(steps, spacing, **kw)

    def bind(self, cond: dict) -> "FlowMatching":
        """`Field.bind`; a guided velocity gets its own copy (APG momentum, last unconditional branch)."""
        bound = super().bind(cond)
        assert isinstance(bound, FlowMatching)
        if isinstance(self.velocity, Guided):
            bound.velocity = self.velocity.fresh()
        return bound

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(len(x))
        return self.call_model(self.velocity, x, tt, "velocity")

    def diffusion(self, t: torch.Tensor | float, alpha: float = 1.0) -> float:
        """α g²(t), the noise rate of the α-interpolated SDE on this field's path (`GaussianPath.diffusion`);
        refused where the path is pure noise (α_t = 0), where it is infinite."""
        return alpha * self._g2(float(torch.as_tensor(t).reshape(-1)[0]))

    def _g2(self, tf: float) -> float:
        g2 = self.path.diffusion(tf) if self.path is not None else math.inf
        if not math.isfinite(g2):
            raise ArgumentError(
                f"grid: the SDE of the {self.path!r} path has infinite diffusion at t={tf:g} (pure noise); "
                f"start the grid below it, or use solver 'sde' (its exact steps start there)"
            )
        return g2

    def sde(self, x: torch.Tensor, t: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor | float]:
        """(drift, g²) of Eq. 21 on the path: drift_α = v − α (g²/2) ∇log p_t with the score
        ∇log p_t = −(x − α_t D)/σ_t² from the data prediction D of v; the same marginals for every α.
        The path's coefficients are read at t once (one time for the batch, as the solvers step)."""
        tf = float(torch.as_tensor(t).reshape(-1)[0])
        g2 = self._g2(tf)
        v = self(x, t)
        assert self.path is not None
        a, s = self.path.alpha(tf), self.path.sigma(tf)
        score = -(x - a * self.path.data_prediction(x, v, tf)) / (s * s)
        return v - (0.5 * alpha * g2) * score, alpha * g2

    def jump(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """x_r = x_t + (r − t) ū(x_t, t, r): a flow-map model's transition from time t to time r in one
        evaluation (the average velocity ū takes r by the keyword `FLOW_MAP_TARGET`, as a per-sample
        input, so guidance batches it with its branches)."""
        if not self.flow_map:
            raise ArgumentTypeError(
                f"{type(self).__name__}: this field's model is not a flow map (it gives dx/dt only); "
                f"build the field with flow_map=True for a model whose velocity takes r="
            )
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(len(x))
        rr = torch.as_tensor(r, dtype=x.dtype, device=x.device).reshape(-1).expand(len(x))
        fn = self.velocity
        out = fn(x, tt, **self.cond, **{FLOW_MAP_TARGET: rr})
        self.network_passes += getattr(fn, "last_passes", 1)
        u = self.check_output(out, x, "average velocity")
        return x + as_column(rr - tt, x) * u

    def grad_h(self, x: torch.Tensor, t) -> torch.Tensor:
        """The direction particles move towards the data, −v (time runs from 1 down to 0)."""
        return -self(x, t)


class TrigFlow(FlowMatching):
    """dx/dt = v(x, t, **cond) on the TrigFlow path x_t = cos(t) x_0 + σ_d sin(t) ε (sCM; Lu & Song
    2024), t from `t_max` (π/2: the prior N(0, σ_d² I)) to 0. Every solver runs on it through its
    Gaussian path (`paths.trigflow`); D = cos(t) x − sin(t) v is the data prediction, so `ddim` is
    sCM's one-step sampler and `consistency` its multistep one.

    velocity: v(x, t) = dx/dt in data coordinates (an sCM network F with v = σ_d F(x/σ_d, t) goes
    through `models.from_diffusers(model, SCMScheduler(...))`).
    schedule: optional steps ↦ times from t_max to 0; default uniform in t (SCMScheduler's).
    """

    default_nfe = 2

    def __init__(
        self,
        velocity: Callable,
        shape: Sequence[int] | None = None,
        schedule: Callable[[int], torch.Tensor] | None = None,
        *,
        sigma_data: float = 1.0,
        t_max: float = HALF_PI,
        default_nfe: int = 2,
    ) -> None:
        super().__init__(velocity, shape, schedule, default_nfe=default_nfe)
        if not 0 < t_max <= HALF_PI + 1e-4:
            raise ArgumentError(f"t_max: expected a time in (0, π/2], got {t_max!r}")
        self.path, self.sigma_data = trigflow(sigma_data), float(sigma_data)
        self.t_start, self.prior_std = float(t_max), float(sigma_data)

    def domain(self) -> tuple[float, float]:
        return 0.0, max(self.t_start, HALF_PI)
