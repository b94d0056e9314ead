"""The Field protocol: particles follow dx/dt = field(x, t) (the paper's ∇h_ρ, Eq. 1).

A field knows its time domain (t_start → t_end), its prior π and its default grid;
it may carry a stochastic form for SDE solvers (`sde`, Eq. 21).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import copy
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from .. import grids
from .._checks import as_column, batch_time, seeded_generator  # noqa: F401  (as_column, batch_time re-exported)
from ..errors import ArgumentError, ArgumentTypeError

if TYPE_CHECKING:
    from .paths import GaussianPath

__all__ = ["Field", "Function", "Sum", "Scale", "DOMAIN_TOLERANCE", "field_model", "solve_position"]


DOMAIN_TOLERANCE = 1e-3  # relative slack for grids at the ends of a field's domain (float rounding)

# (the evaluation's index in its solve, the solve's steps as its scheduler counts them), set by
# `solvers.Run` around every field evaluation
SOLVE_POSITION: ContextVar[tuple[int, int] | None] = ContextVar("flowsolve_solve_position", default=None)


def solve_position() -> tuple[int, int | None]:
    """Where the current field evaluation is in its solve: (the index of the evaluation, counted from
    0 at the solve's first, the solve's number of steps as its diffusers scheduler counts them), as a
    pipeline's loop gives `guider.set_state(step=i, num_inference_steps=N)`. Outside a solve (a field
    called directly), (0, None): the first evaluation of a solve of unknown length. Step-aware
    guidance reads it (`fields.guiders`)."""
    position = SOLVE_POSITION.get()
    return (0, None) if position is None else position


# set while a solver evaluates a stage between knots whose σ may equal a knot's (`between_knots`)
BETWEEN_KNOTS: ContextVar[bool] = ContextVar("flowsolve_between_knots", default=False)


@contextmanager
def between_knots() -> Iterator[None]:
    """Evaluations inside are stages between a scheduler's knots even where their level equals a knot's:
    a diffusers model gives them the timestep of their σ, not the knot's own (rounded) timestep, as
    `KDPM2AncestralDiscreteScheduler` does at its midpoint, which at η = 1 is the next knot's σ."""
    token = BETWEEN_KNOTS.set(True)
    try:
        yield
    finally:
        BETWEEN_KNOTS.reset(token)


class Field:
    """Base class: subclasses implement `__call__(x, t) -> dx/dt`.

    Attributes: t_start, t_end (time runs from one to the other, in either direction),
    data_shape (or None when unknown), prior_std (π = N(0, prior_std² I)), default_grid
    kind and default_nfe, time_is_sigma (t is the noise level σ of an EDM-type ODE, so
    x − t·field(x, t) is a data prediction), finite_at_end (False when the field cannot
    be evaluated at t_end, e.g. σ = 0).
    """

    t_start: float = 0.0
    t_end: float = 1.0
    data_shape: tuple[int, ...] | None = None
    prior_std: float = 1.0
    default_grid: str = "uniform"
    default_nfe: int = 32
    default_steps: int | None = None  # steps when neither nfe nor steps is given (a custom scheduler schedule)
    # how img2img counts its steps: "walked" ⌊N·strength⌋ (SD's pipelines), "skipped" all but
    # ⌊N − N·strength⌋ (SD3's, Flux's: `solvers.names.img2img_steps`)
    strength_rule: str = "walked"
    time_is_sigma: bool = False
    finite_at_end: bool = True
    takes_cond: bool = False  # its model takes per-sample conditioning (`bind`, `call_model`)
    cond: dict = {}  # the conditioning bound to this copy (never mutated, only replaced)
    network_passes: int = 0  # model forward passes counted by `call_model`
    path: GaussianPath | None = None  # set when the field is a Gaussian-path PF-ODE (VE, flow, ...)
    calibrated: dict = {}  # "solver:nfe" -> calibrated grid (a model folder's calibration.json), grid="calibrated"

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def jump(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """x at time r from x at time t in one evaluation: flow-map models only (`FlowMatching(flow_map=True)`)."""
        raise ArgumentTypeError(f"{type(self).__name__} is not a flow map: it gives dx/dt only")

    def grad_h(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """∇h_ρ(x) at time t: the direction of the paper's Eq. 1, the one method every field answers
        with. A PM integrates the field (∇h times the field's time scale: η for Discriminator Flows,
        −σ for σ-time score fields); an Int-PM pushes ∇h through a generator (Eq. 11–13)."""
        raise ArgumentTypeError(f"{type(self).__name__} has no ∇h of its own; it is a velocity dx/dt only")

    def bind(self, cond: dict) -> "Field":
        """This field with per-sample conditioning `cond` (a dict of tensors with one row per particle
        of the chunk being solved), handed to its model as keyword arguments. `fs.sample` binds each
        chunk to its own rows. A field whose model takes conditioning (`takes_cond`) returns a copy with
        its own `cond` and `network_passes`; any other refuses a non-empty dict."""
        if not self.takes_cond:
            if cond:
                raise ArgumentError(f"cond: {type(self).__name__} takes no conditioning; got keys {sorted(cond)}")
            return self
        bound = copy.copy(self)
        bound.cond, bound.network_passes = dict(cond), 0
        return bound

    def model_device(self) -> torch.device | None:
        """The device of the network this field follows (its denoiser, velocity model or
        discriminator, looked for two wrappers deep), None for plain functions: `fs.sample`'s
        default device, so that a model moved to a GPU samples there."""
        return _module_device(vars(self), depth=3)

    def passes(self) -> int | None:
        """Model forward passes since `bind` (None for a field that does not count them)."""
        return self.network_passes if self.takes_cond else None

    def call_model(self, fn: Callable, x: torch.Tensor, t: torch.Tensor, who: str) -> torch.Tensor:
        """fn(x, t, **cond): the field's model with the bound conditioning, counted in `network_passes`
        (a guided model reports its own passes as `last_passes`) and checked against x."""
        out = fn(x, t, **self.cond) if self.cond else fn(x, t)
        self.network_passes += getattr(fn, "last_passes", 1)
        return self.check_output(out, x, who)

    def sde(self, x: torch.Tensor, t: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor | float]:
        """(drift, g2): the SDE dx = drift dt + sqrt(g2 |dt|) ε with the same marginals as the ODE
        for alpha ∈ [0, 1] (Eq. 21). g2 is a float or a (batch,) tensor."""
        raise ArgumentTypeError(
            f"{type(self).__name__} has no stochastic form: use an ODE solver, "
            f"or a field with a diffusion coefficient (e.g. fields.EDM)"
        )

    def diffusion(self, t: torch.Tensor, alpha: float = 1.0) -> torch.Tensor | float:
        """g(t)²: the variance of the Brownian term per unit |dt| at interpolation alpha."""
        raise ArgumentTypeError(f"{type(self).__name__} has no diffusion coefficient")

    # -- time domain, prior and grid ------------------------------------------------------
    def domain(self) -> tuple[float, float]:
        """The times at which the field may be evaluated, (low, high); a user grid must lie inside,
        up to `DOMAIN_TOLERANCE` (relative). Default: between t_start and t_end."""
        return min(self.t_start, self.t_end), max(self.t_start, self.t_end)

    def check_output(self, out, x: torch.Tensor, who: str = "field") -> torch.Tensor:
        """A model's output must have x's shape and dtype (a wrong shape would broadcast silently)."""
        if not isinstance(out, torch.Tensor):
            raise ArgumentTypeError(
                f"{who}: returned a {type(out).__name__}; expected a tensor shaped like x {tuple(x.shape)}"
            )
        if out.shape != x.shape:
            raise ArgumentError(
                f"{who}: returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)}; it must "
                f"return one value per coordinate of x (same shape)"
            )
        if out.dtype != x.dtype:
            raise ArgumentTypeError(
                f"{who}: returned dtype {out.dtype} for x of dtype {x.dtype}; cast inside the "
                f"model or sample with dtype={out.dtype}"
            )
        return out

    def from_normal(self, z: torch.Tensor, t_start: float | None = None) -> torch.Tensor:
        """Map standard normal draws to the prior π (the paper's Eq. 1 start) at the grid's first time
        `t_start` (default: the field's own)."""
        return z * self.prior_std if self.prior_std != 1.0 else z

    def prior(
        self,
        n: int,
        shape: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """n draws from π with an explicit generator (None: a fresh, OS-seeded one)."""
        shape = tuple(shape) if shape is not None else self.data_shape
        if shape is None:
            raise ArgumentError("shape: this field does not know its data shape; pass shape=")
        if generator is None:
            generator = seeded_generator(None, device or "cpu")
        z = torch.randn((n, *shape), generator=generator, dtype=dtype, device=device)
        return self.from_normal(z)

    def grid(self, steps: int, spacing: str | None = None, **kw) -> torch.Tensor:
        """A grid of this field with `steps` intervals (float64): `spacing` 'uniform' or a spacing of
        noise levels ('karras', 'loglinear', 'polyexponential', 'vp', 'beta', 'kl_optimal'; `grids.SPACINGS`), by
        default the field's `default_grid`. 'schedule' is a diffusers model's scheduler's own schedule;
        `kw` then go to its `set_timesteps` (`strength=` for LCM's and TCD's img2img schedules)."""
        spacing = spacing or self.default_grid
        if spacing == "uniform":
            return grids.uniform(steps, kw.pop("t_start", self.t_start), kw.pop("t_end", self.t_end), **kw)
        return grids.make(spacing, steps, **kw)

    # -- algebra -------------------------------------------------------------------------
    def __add__(self, other: "Field") -> "Field":
        return Sum([self, other])

    def __mul__(self, c: float) -> "Field":
        return Scale(self, c)

    __rmul__ = __mul__

    def __neg__(self) -> "Field":
        return Scale(self, -1.0)

    def _copy_domain(self, other: "Field") -> None:
        for a in (
            "t_start",
            "t_end",
            "data_shape",
            "prior_std",
            "default_grid",
            "default_nfe",
            "default_steps",
            "time_is_sigma",
            "finite_at_end",
            "path",
            "calibrated",
        ):
            setattr(self, a, getattr(other, a))


class Function(Field):
    """Any callable fn(x, t) -> dx/dt as a field, with an optional diffusion g²(t) for SDE
    solvers (drift fn, noise variance alpha·g²(t) per unit |dt|)."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        t_start: float = 0.0,
        t_end: float = 1.0,
        shape: Sequence[int] | None = None,
        prior_std: float = 1.0,
        diffusion: Callable[[torch.Tensor], torch.Tensor | float] | None = None,
        default_nfe: int = 32,
    ) -> None:
        if not callable(fn):
            raise ArgumentTypeError(f"fn: expected a callable fn(x, t), got {type(fn).__name__}")
        if t_start == t_end:
            raise ArgumentError(f"t_start, t_end: expected different times, got {t_start} twice")
        self.fn, self.t_start, self.t_end = fn, float(t_start), float(t_end)
        self.data_shape = tuple(shape) if shape is not None else None
        self.prior_std, self._g2, self.default_nfe = float(prior_std), diffusion, default_nfe

    def __call__(self, x, t):
        return self.fn(x, t)

    def diffusion(self, t, alpha=1.0):
        if self._g2 is None:
            raise ArgumentTypeError("Function has no stochastic form: pass diffusion=g2(t) to use SDE solvers")
        return alpha * self._g2(t)

    def sde(self, x, t, alpha):
        return self.fn(x, t), self.diffusion(t, alpha)


class Sum(Field):
    """Σ_k field_k: the sum of flows (e.g. Eq. 19 as data-score field + generated-score field)."""

    def __init__(self, fields: Sequence[Field]) -> None:
        flat: list[Field] = []
        for f in fields:
            if not isinstance(f, Field):
                raise ArgumentTypeError(f"fields: expected Field objects, got {type(f).__name__}")
            flat.extend(f.fields if isinstance(f, Sum) else [f])  # type: ignore[has-type]
        if not flat:
            raise ArgumentError("fields: expected at least one field")
        for f in flat[1:]:
            if (f.t_start, f.t_end) != (flat[0].t_start, flat[0].t_end):
                raise ArgumentError(
                    f"fields: time domains differ: [{flat[0].t_start}, {flat[0].t_end}] and [{f.t_start}, {f.t_end}]"
                )
        self.fields = flat
        self._copy_domain(flat[0])
        self.time_is_sigma = all(f.time_is_sigma for f in flat)
        self.finite_at_end = all(f.finite_at_end for f in flat)
        self.path = flat[0].path if all(f.path is flat[0].path for f in flat) else None

    def bind(self, cond):
        return Sum([f.bind(cond) for f in self.fields])

    def passes(self) -> int | None:
        total = 0
        for f in self.fields:
            count = f.passes()
            if count is None:
                return None
            total += count
        return total

    def __call__(self, x, t):
        out = self.fields[0](x, t)
        for f in self.fields[1:]:
            out = out + f(x, t)
        return out

    def sde(self, x, t, alpha):
        drift, g2 = self.fields[0].sde(x, t, alpha)
        for f in self.fields[1:]:
            d, g = f.sde(x, t, alpha)
            drift, g2 = drift + d, g2 + g
        return drift, g2


class Scale(Field):
    """c · field. For SDEs, c > 0 rescales time: drift and g² both scale by c."""

    def __init__(self, field: Field, c: float) -> None:
        if not isinstance(field, Field):
            raise ArgumentTypeError(f"field: expected a Field, got {type(field).__name__}")
        c = float(c)
        if c != c or c in (float("inf"), float("-inf")):
            raise ArgumentError(f"c: expected a finite number, got {c}")
        self.field, self.c = field, c
        self._copy_domain(field)  # c · (a σ-time field) is still σ-time: x − σ c v is its data prediction

    def bind(self, cond):
        return Scale(self.field.bind(cond), self.c)

    def passes(self) -> int | None:
        return self.field.passes()

    def __call__(self, x, t):
        return self.c * self.field(x, t)

    def sde(self, x, t, alpha):
        if self.c <= 0:
            raise ArgumentError(f"c: a stochastic form needs c > 0, got {self.c}")
        drift, g2 = self.field.sde(x, t, alpha)
        return self.c * drift, self.c * g2


def _module_device(attrs: dict, depth: int) -> torch.device | None:
    """The device of the first parameter of the first nn.Module among `attrs`' values (bound methods
    count as their object; flowsolve wrappers are looked into, `depth` levels)."""
    for v in attrs.values():
        v = getattr(v, "__self__", v)  # a bound method: its object
        if isinstance(v, torch.nn.Module):
            for p in v.parameters():
                return p.device
        elif depth > 1 and type(v).__module__.startswith("flowsolve") and hasattr(v, "__dict__"):
            found = _module_device(vars(v), depth - 1)
            if found is not None:
                return found
    return None


def field_model(field: Any, has: Callable[[Any], bool]) -> Any:
    """The model under a field, through guidance wrappers (`.data` or a flow's `.velocity`, then
    `.denoiser`; a bound method stands for its object), for which has(model) holds, or None: where a
    solver reproduces a diffusers scheduler, that scheduler's settings (variance type, τ rule,
    prediction type, timesteps, ancestral split) live on the model."""
    cand = getattr(field, "data", None)
    if cand is None:
        cand = getattr(field, "velocity", None)
    for _ in range(3):
        cand = getattr(cand, "__self__", cand)  # a model's bound method (`m.velocity`): the model
        if cand is None or has(cand):
            return cand
        cand = getattr(cand, "denoiser", None)
    return None
