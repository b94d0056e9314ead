"""`sample()`: the one entry point for particle models (Definition 1): draw x_0 ~ π, follow the field."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field as dc_field
from typing import Any, Callable, Sequence

import torch

from . import grids, solvers
from .fields.base import DOMAIN_TOLERANCE, Field, field_model
from .noise import SampleNoise, fresh_seed
from ._checks import check_device, check_dtype, check_int, check_memory
from ._cond import RowList, map_leaves
from .distributed import gather_ranges, shard_range, world
from .solvers.base import counted_steps
from .inpainting import (
    INPAINT_MODES,
    blended_field,
    check_mask,
    comfyui_thresholds,
    differential_blend,
    noised_data,
    state_blend,
    strength_map_top,
    walk_start,
)
from .errors import ArgumentError, ArgumentTypeError

__all__ = [
    "sample",
    "invert",
    "sample_sharded",
    "initial_noise",
    "noised_data",
    "check_cond",
    "cond_rows",
    "SampleInfo",
    "resolve_grid",
]


@dataclass
class SampleInfo:
    """What a sampling run did. nfe: field evaluations per sample, counted; grid: the times used."""

    nfe: int
    grid: torch.Tensor
    seconds: float
    solver: str
    steps: int
    seed: int
    nfe_budget: int | None = None
    trajectory: torch.Tensor | None = None
    trajectory_times: list[float] = dc_field(default_factory=list)
    network_passes: int | None = None  # model forward passes per sample (guided CFG: one batched pass per NFE)


def initial_noise(
    field: Field,
    seed: int,
    start: int,
    count: int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    t_start: float | None = None,
) -> torch.Tensor:
    """The starting particles x_0 ~ π of samples start .. start + count − 1 for `seed`: the draws
    `sample(seed=)` makes (stream 0 of the per-sample noise), so that sample i is the same wherever
    it is drawn (`sample`, `compare`, sharded sampling, chunks)."""
    z = SampleNoise(seed, start, count, tuple(shape), dtype, device, stream=0)()
    return field.from_normal(z, t_start)


def check_cond(cond, n: int) -> dict:
    """Per-sample conditioning: a dict of tensors (or numbers), each with leading size n or 1 (or a
    number, broadcast), checked before any work and named by key."""
    if cond is None:
        return {}
    if not isinstance(cond, dict):
        raise ArgumentTypeError(f"cond: expected a dict such as {{'class_labels': labels}}, got {type(cond).__name__}")
    return _check_cond_level(cond, n, "")


def _check_cond_level(cond: dict, n: int, prefix: str) -> dict:
    """One level of `check_cond`; nested dicts (a dict-valued model input such as SDXL's
    added_cond_kwargs) are checked leaf by leaf, named "outer.inner"."""
    out: dict = {}
    for k, v in cond.items():
        if not isinstance(k, str):
            raise ArgumentTypeError(f"cond: keys must be names (str), got {k!r}")
        name = prefix + k
        if isinstance(v, dict):
            out[k] = _check_cond_level(v, n, name + ".")
            continue
        if isinstance(v, list) and v and all(isinstance(e, torch.Tensor) for e in v):
            # a list input of per-sample tensors (T2I-Adapter's residuals, IP-Adapter's image embeddings)
            out[k] = RowList(_check_cond_leaf(e, n, f"{name}.{i}") for i, e in enumerate(v))
            continue
        out[k] = _check_cond_leaf(v, n, name)
    return out


def _check_cond_leaf(v, n: int, name: str) -> torch.Tensor:
    """One conditioning value as a tensor with leading size n or 1, finite, named by its path."""
    if not isinstance(v, torch.Tensor):
        try:
            v = torch.as_tensor(v)
        except (TypeError, ValueError, RuntimeError):
            raise ArgumentTypeError(f"cond: key {name!r} must be a tensor, got {type(v).__name__}") from None
    if v.dim() == 0:
        v = v.reshape(1)
    if v.shape[0] not in (1, n):
        raise ArgumentError(
            f"cond: key {name!r} has leading size {v.shape[0]}; expected {n} (one row per sample) "
            f"or 1 (the same for all)"
        )
    if v.is_floating_point() and not torch.isfinite(v).all():
        raise ArgumentError(f"cond: key {name!r} holds NaN or inf")
    return v


def cond_rows(cond: dict, start: int, count: int, n: int) -> dict:
    """The rows start .. start + count − 1 of every conditioning tensor (size-1 ones expanded)."""
    return map_leaves(
        lambda _, v: v[start : start + count] if v.shape[0] == n and n != 1 else v.expand(count, *v.shape[1:]), cond
    )


def _particles(field: Field, n, shape, x_init, device, dtype) -> tuple[int, tuple[int, ...], torch.device, torch.dtype]:
    """(n, shape, device, dtype) from x_init or from n / shape, each checked and named."""
    if x_init is not None:
        if not isinstance(x_init, torch.Tensor):
            raise ArgumentTypeError(f"x_init: expected a tensor of shape (n, *data_shape), got {type(x_init).__name__}")
        if x_init.dim() < 2:
            raise ArgumentError(
                f"x_init: expected shape (n, *data_shape) with at least 2 dimensions, got {tuple(x_init.shape)}"
            )
        if not x_init.is_floating_point():
            raise ArgumentTypeError(f"x_init: expected a floating-point tensor, got dtype {x_init.dtype}")
        if not torch.isfinite(x_init).all():
            bad = int((~torch.isfinite(x_init)).reshape(len(x_init), -1).any(1).nonzero()[0])
            raise ArgumentError(f"x_init: expected finite values, but row {bad} holds NaN or inf")
        if n is not None and n != x_init.shape[0]:
            raise ArgumentError(f"n: x_init holds {x_init.shape[0]} particles but n={n}")
        if shape is not None and tuple(shape) != tuple(x_init.shape[1:]):
            raise ArgumentError(f"shape: x_init has data shape {tuple(x_init.shape[1:])} but shape={tuple(shape)}")
        n, shape = x_init.shape[0], tuple(x_init.shape[1:])
        device = x_init.device if device is None else check_device("device", device)
        dtype = x_init.dtype if dtype is None else check_dtype("dtype", dtype)
    else:
        if n is None:
            raise ArgumentError("n: expected the number of particles (or pass x_init=)")
        check_int("n", n, 1)
        shape = tuple(shape) if shape is not None else field.data_shape
        if shape is None:
            raise ArgumentError(
                f"shape: {type(field).__name__} does not know its data shape; say it once where the "
                f"field is made (e.g. fields.EDM(fn, shape=(2,))), or pass shape=(...) or x_init= here"
            )
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
            raise ArgumentError(f"shape: expected positive integers, got {shape}")
        if device is None:  # the device of the field's network (a model moved to a GPU samples there)
            device = field.model_device() or torch.device("cpu")
        else:
            device = check_device("device", device)
        dtype = torch.float32 if dtype is None else check_dtype("dtype", dtype)
    return n, shape, device, dtype


def calibrated_grid(entry) -> torch.Tensor:
    """A calibration.json entry (a list of times, or {"grid": times, "coefficients": rows}) as a
    float64 grid tensor carrying its `coefficients` (None when absent)."""
    times, rows = (entry["grid"], entry.get("coefficients")) if isinstance(entry, dict) else (entry, None)
    g = torch.tensor(times, dtype=torch.float64)
    g.coefficients = rows  # type: ignore[attr-defined]  # checked by resolve_grid
    return g


def evaluation_coefficients(grid) -> list[list[float]] | None:
    """The solver coefficients a calibrated grid carries (`grid.coefficients`), checked: row k holds
    k + 1 finite numbers, and the solver's k-th field evaluation becomes Σ_{j≤k} row_k[j] · f_j
    (learned multistep coefficients, `calibrate.calibrate`; identity rows change nothing)."""
    rows = getattr(grid, "coefficients", None)
    if rows is None:
        return None
    try:
        rows = [[float(c) for c in r] for r in rows]
    except (TypeError, ValueError):
        raise ArgumentError(f"grid: its coefficients must be rows of numbers, got {rows!r}") from None
    for k, r in enumerate(rows):
        if len(r) != k + 1 or not all(math.isfinite(c) for c in r):
            raise ArgumentError(
                f"grid: coefficient row {k} must hold {k + 1} finite numbers (evaluations 0..{k}), got {r}"
            )
    return rows


# the solvers that are a FlowMatch/SCM/LTX-RF scheduler's own loop: they keep the scheduler's schedule
_SCHEDULE_LOOPS = ("euler", "heun", "ddim", "consistency", "euler_ancestral", "flow_map")


def _solver_default_grid(field: Field, spec: solvers.Solver) -> str | None:
    """The spacing a solver walks when the user gives no grid (None: the field's default).
    On Karras σ-time fields, the solver's own measured best (`Solver.default_grid`). On flow fields
    whose default is a FlowMatch scheduler's schedule (made for Euler and Heun: its last step is a
    sliver from 1/N·10⁻³ to 0), every other solver walks a uniform grid in t from 1 to 0: on
    digits-flow at NFE 8 the endpoint error of UniPC-3 falls from 1.05 to 0.29, of iPNDM from 0.48
    to 0.29 (as diffusers' own flow-sigma schedulers do). A diffusers DDPM-type model, or a flow model
    with a multistep scheduler in flow mode, keeps its scheduler's schedule, so that e.g. `unipc`
    reproduces a UniPC scheduler's loop."""
    from .fields import FlowMatching

    kind = getattr(field, "default_grid", None)
    if kind == "karras":
        return spec.default_grid
    if kind == "schedule" and isinstance(field, FlowMatching) and spec.name not in _SCHEDULE_LOOPS:
        # a multistep scheduler in flow mode (DPM-Solver, UniPC: Wan, Sana) made its schedule for all
        return None if getattr(field, "schedule_for_every_solver", False) else "uniform"
    return None


def _check_scheduler_solver(solver: Any, field: Field, grid: Any) -> None:
    """A diffusers scheduler as the solver (instance, class or name) gives the solver and its options;
    the schedule and the model's conversions (prediction type, clipping, β's) come from the scheduler
    the model was loaded with. Refuse by name an instance that would make another schedule (the
    model's own class, no grid given: diffusers' `pipe.scheduler = X.from_config(..., use_karras_sigmas=
    True)`, a custom `set_timesteps(timesteps=...)`) or conversion (any class), rather than sample the
    model's own silently; say so when another class walks the model's grid. The model loaded with the
    scheduler (`m.with_scheduler(s)`) samples it."""
    if isinstance(solver, solvers.Solver) or (isinstance(solver, str) and "Scheduler" not in solver):
        return
    own = solvers.base.model_scheduler(field)
    if own is None:
        return
    if not isinstance(solver, (str, type)) and hasattr(solver, "set_timesteps"):
        model = solvers.base.field_model(field, lambda m: callable(getattr(m, "scheduler_differences", None)))
        diff = "" if model is None else model.scheduler_differences(solver, grid is None and type(solver) is type(own))
        if diff:
            raise ArgumentError(
                f"solver: this {type(solver).__name__} differs from the scheduler the model was loaded with "
                f"({type(own).__name__}) in {diff}, which flowsolve takes from the model, not from the solver; "
                f"load the model with it, m.with_scheduler(scheduler) (diffusers' pipe.scheduler = ...), and "
                f"sample that model's field, or pass grid="
            )
    given = solver if isinstance(solver, str) else (solver if isinstance(solver, type) else type(solver)).__name__
    if grid is None and type(own).__name__ != given:
        warnings.warn(
            f"solver: {given}'s loop runs on this field's default grid, the timesteps of {type(own).__name__} "
            f"(the scheduler its model was loaded with); a pipeline with {given} walks {given}'s own timesteps: "
            f"load the model with it (m.with_scheduler(scheduler), or fs.models.from_diffusers(net, scheduler)) "
            f"to reproduce that pipeline",
            UserWarning,
            stacklevel=3,
        )


def resolve_grid(
    field: Field, spec: solvers.Solver, nfe: int | None, grid, reverse: bool = False, steps: int | None = None
) -> tuple[torch.Tensor, int | None]:
    """The float64 grid a solver will walk, and the NFE budget (None when the user gave a grid only).
    `reverse`: the grid runs from the data towards the prior (`invert`); it never ends where the
    field is singular. `steps`: the grid's number of steps, instead of the most that `nfe` affords."""
    singular = not field.finite_at_end and not reverse
    if steps is None and nfe is None and grid is None and not spec.adaptive:
        steps = field.default_steps  # a diffusers model set to a custom schedule: all of its steps
    if steps is not None:
        check_int("steps", steps, 1)
        if nfe is not None or (grid is not None and not _named(grid)) or grid == "calibrated":
            given = "nfe" if nfe is not None else "grid"
            raise ArgumentError(f"steps: give steps or {given}, not both (steps={steps}, {given}={nfe or grid!r})")
        if spec.adaptive:
            raise ArgumentError(f"steps: solver {spec.name!r} chooses its own steps; give it an nfe budget")
        if steps > grids.MAX_STEPS:
            raise ArgumentError(f"steps: at most {grids.MAX_STEPS} steps are supported, got {steps}")
        if steps < spec.min_steps:
            raise ArgumentError(f"steps: solver {spec.name!r} needs at least {spec.min_steps} steps, got {steps}")
        if callable(grid):  # a grid rule: its grid for this many steps, checked as a given grid is
            g, _ = _checked_grid(field, spec, grid(field, steps), None, reverse, singular)
            return g, _evals(field, spec, g, singular)
        kind = _solver_default_grid(field, spec) if grid is None else grid
        return field.grid(steps, kind), spec.evals(steps, singular)
    if nfe is not None:
        if isinstance(nfe, float) and float(nfe).is_integer():
            raise ArgumentTypeError(f"nfe: expected an integer, got float {nfe!r}")
        check_int("nfe", nfe, 1)
        if nfe < spec.min_nfe:
            raise ArgumentError(
                f"nfe: solver {spec.name!r} needs at least {spec.min_nfe} field evaluations, got nfe={nfe}"
            )
    if spec.adaptive:
        if callable(grid):
            grid = grid(field, 1)  # a grid rule: its endpoints
        if grid is not None and not isinstance(grid, str):
            g = grids.check(grid)
            return torch.stack([g[0], g[-1]]), nfe if nfe is not None else 10 * field.default_nfe
        return (
            torch.tensor([field.t_start, field.t_end], dtype=torch.float64),
            nfe if nfe is not None else 10 * field.default_nfe,
        )
    if grid == "calibrated":
        budget = field.default_nfe if nfe is None else nfe
        key = f"{spec.name}:{budget}"
        if key not in field.calibrated:
            have = ", ".join(sorted(field.calibrated)) or "none"
            raise ArgumentError(
                f"grid: no calibrated grid for solver {spec.name!r} at nfe={budget}; calibrated: {have} "
                f"(make one with fs.grids.calibrate or `flowsolve calibrate`)"
            )
        grid, nfe = calibrated_grid(field.calibrated[key]), budget
    elif _named(grid):
        budget = field.default_nfe if nfe is None else nfe
        steps = spec.steps_for(budget, singular)
        if steps > grids.MAX_STEPS:
            raise ArgumentError(
                f"nfe: {budget} evaluations would need a grid of {steps} steps under {spec.name!r}; "
                f"at most {grids.MAX_STEPS} steps are supported"
            )
        if steps < spec.min_steps:
            raise ArgumentError(
                f"nfe: solver {spec.name!r} needs at least {spec.min_nfe} field evaluations, got nfe={budget}"
            )
        if callable(grid):  # a grid rule: the most steps whose grid fits the budget
            rule = grid
            grid = rule(field, steps)
            while steps > spec.min_steps and _evals(field, spec, grid, singular) > budget:
                steps -= 1
                grid = rule(field, steps)
            return _checked_grid(field, spec, grid, budget, reverse, singular)
        if grid is None:
            grid = _solver_default_grid(field, spec)  # the solver's measured best uncalibrated spacing
        return field.grid(steps, grid), budget
    return _checked_grid(field, spec, grid, nfe, reverse, singular)


def _named(grid) -> bool:
    """Whether `grid` names a grid to be made for a number of steps: None (the default), a spacing
    name, or a grid rule (a callable rule(field, steps) -> times, e.g. `solvers.names.WebUIGrid`)."""
    return grid is None or isinstance(grid, str) or (callable(grid) and not isinstance(grid, torch.Tensor))


def _evals(field: Field, spec: solvers.Solver, grid, singular: bool) -> int:
    """The evaluations `spec` spends on `grid`: its last step is cheaper where it ends where the field is
    singular."""
    g = torch.as_tensor(grid)
    return spec.evals(len(g) - 1, singular and float(g[-1]) == field.t_end)


def _checked_grid(
    field: Field, spec: solvers.Solver, grid, nfe: int | None, reverse: bool, singular: bool
) -> tuple[torch.Tensor, int | None]:
    """A grid of times given (or made by a rule), checked against the field and the solver: in the
    field's domain, running the right way, long enough, within the NFE budget."""
    rows = evaluation_coefficients(grid)
    g = grids.check(grid)
    if rows is not None:
        g = g.clone()
        g.coefficients = rows  # type: ignore[attr-defined]
    lo, hi = field.domain()
    slack = DOMAIN_TOLERANCE * max(1.0, abs(lo), abs(hi) if math.isfinite(hi) else 1.0)
    if float(g.min()) < lo - slack or float(g.max()) > hi + slack:
        raise ArgumentError(
            f"grid: times from {float(g.min()):g} to {float(g.max()):g} leave the domain "
            f"[{lo:g}, {hi:g}] of {type(field).__name__}"
            + (" (σ above the range its denoiser was trained on)" if field.time_is_sigma else "")
        )
    direction = (1.0 if field.t_end > field.t_start else -1.0) * (-1.0 if reverse else 1.0)
    if float(g[1] - g[0]) * direction < 0:
        if reverse:
            raise ArgumentError(
                f"grid: inversion runs from the data towards the prior (t_end={field.t_end} towards "
                f"t_start={field.t_start}), got a grid from {g[0].item():g} to {g[-1].item():g}"
            )
        raise ArgumentError(
            f"grid: expected times running from t_start={field.t_start} towards t_end={field.t_end}, "
            f"got a grid from {g[0].item():g} to {g[-1].item():g}"
        )
    if spec.needs_sigma and float(g[-1]) < 0:
        raise ArgumentError(
            f"grid: solver {spec.name!r} needs noise levels σ >= 0, got a last time of {g[-1].item():g}"
        )
    steps = len(g) - 1
    if steps < spec.min_steps:
        raise ArgumentError(f"grid: solver {spec.name!r} needs at least {spec.min_steps + 1} times, got {len(g)}")
    if nfe is not None:
        need = _evals(field, spec, g, singular)
        if need > nfe:
            raise ArgumentError(
                f"nfe: the grid of {steps} steps needs {need} evaluations under {spec.name!r}, "
                f"more than the budget nfe={nfe}"
            )
    return g, nfe


def _img2img_grid(
    field: Field, spec: solvers.Solver, g64: torch.Tensor, strength: Any, coefficients: Any, solver: Any = None
) -> tuple[torch.Tensor, int, int]:
    """The steps image-to-image walks, as diffusers' `get_timesteps`: of the grid's N steps, the last
    ⌊N·strength⌋ (or, by the field's `strength_rule`, all but ⌊N − N·strength⌋, as SD3's and Flux's
    pipelines count; an AUTOMATIC1111 label's: ⌊min(strength, 0.999)·N⌋ + 1, its img2img's;
    `solvers.names.img2img_steps`); the evaluations they cost; and the steps before them. N counts the
    steps as the field's diffusers scheduler does: with a last step from σ_min to itself where its
    schedule ends so (the grid holds distinct times; the solvers take that step where it acts)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ArgumentError(f"strength: expected a number in (0, 1] (the share of the steps walked), got {strength!r}")
    if spec.adaptive:
        raise ArgumentError(
            f"solver: img2img walks the last steps of a fixed grid; {spec.name!r} is adaptive "
            f"(give a fixed-step solver)"
        )
    if coefficients is not None:
        raise ArgumentError(
            "grid: a calibrated grid's coefficients are fitted to its whole walk; img2img walks its end"
        )
    total = counted_steps(field, g64.tolist())  # the scheduler's count
    rule = getattr(field, "strength_rule", "walked")
    walk = solvers.names.img2img_steps(solver, total, strength, rule)
    if walk < 1 or total - walk >= len(g64) - 1:
        counted = "⌊N·strength⌋" if rule == "walked" else "N − ⌊N − N·strength⌋"
        raise ArgumentError(
            f"strength: {strength:g} of {total} steps leaves no step to take ({counted}, as diffusers counts); "
            f"raise strength or the steps"
        )
    tail = g64[total - walk :].clone()
    singular = not field.finite_at_end and float(tail[-1]) == field.t_end
    return tail, spec.evals(walk, singular), total - walk


def _expert_part(
    field: Field, spec: solvers.Solver, g64: torch.Tensor, fraction: Any, coefficients: Any, name: str
) -> tuple[torch.Tensor, int, int, bool]:
    """SDXL's ensemble of experts (diffusers' `denoising_end` / `denoising_start`): the cut is the
    diffusers timestep round(T − fraction·T); "denoising_end" keeps the steps from knots at or above it
    (the grid up to the first knot below it), "denoising_start" the steps from the first knot below
    it. A second-order scheduler's own solver cuts its list of calls as the pipelines do
    (`_second_order_calls`). Returns (grid, the evaluations it costs, the schedule's steps left out:
    after it for denoising_end, before it for denoising_start, whether the walk ends after its last
    step's first stage)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ArgumentError(f"{name}: expected a fraction of the schedule in (0, 1), got {fraction!r}")
    if spec.adaptive or coefficients is not None:
        raise ArgumentError(f"{name}: cuts a fixed grid at a knot; {spec.name!r} chooses its own steps or coefficients")
    from .solvers.base import discrete_model

    times = g64.tolist()
    model = discrete_model(field)
    flow = None if model is not None else field_model(field, lambda m: callable(getattr(m, "scheduler_timestep", None)))
    if model is not None:
        total = len(model.log_sigmas)  # (a knot's timestep as its scheduler lists it, fractional or not)
        stamps = [float(model.timestep(torch.full((2,), t, dtype=torch.float64))[0]) for t in times[:-1]]
    elif flow is not None:
        total = int(flow.num_train_timesteps)
        stamps = [float(flow.scheduler_timestep(torch.full((2,), t, dtype=torch.float64))[0]) for t in times[:-1]]
    else:
        raise ArgumentError(
            f"{name}: the cut is at a diffusers timestep; this {type(field).__name__}'s model has none "
            f"(load it with fs.models.from_diffusers, or pass a grid of the part to walk)"
        )
    cutoff = int(round(total - fraction * total))
    above = sum(1 for stamp in stamps if stamp >= cutoff)  # the knots before the cut
    half = False  # the base's walk ends after its last step's first stage
    calls = _second_order_calls(field, spec, counted_steps(field, times))
    if calls is not None and 0 < above < len(stamps):
        if name == "denoising_end":  # the pipeline walks the calls at or above the cut: call 2k is step k's first
            walked = sum(1 for c in calls if c >= cutoff)
            above, half = (walked + 1) // 2, walked % 2 == 1
        else:  # get_timesteps: the calls below the cut, one more where that count is even
            below = sum(1 for c in calls if c < cutoff)
            above = (len(calls) - below - (1 if below % 2 == 0 else 0)) // 2
    if above == 0 or above == len(stamps):
        raise ArgumentError(
            f"{name}: {fraction:g} cuts the {len(stamps)} steps at timestep {cutoff}, which leaves "
            f"{'no step before' if above == 0 else 'no step after'} it; take more steps or another fraction"
        )
    if name == "denoising_end":
        part = g64[: above + 1].clone()
        return part, spec.evals(above, False), counted_steps(field, times) - above, half
    part = g64[above:].clone()
    singular = not field.finite_at_end and float(part[-1]) == field.t_end
    return part, spec.evals(len(part) - 1, singular), above, False


def _second_order_calls(field: Field, spec: solvers.Solver, steps: int) -> list[float] | None:
    """The timesteps a second-order diffusers scheduler (Heun, KDPM2, KDPM2 ancestral, DPM-Solver SDE:
    `order` 2) is called with over `steps` steps, where `spec` is the solver it names: step 0's first
    call, then two per step (call 2k is step k's first stage, 2k + 1 its second). SDXL's pipelines cut
    this list, not the knots: the base's walk may end after a step's first stage (its predictor, or its
    midpoint), and the refiner then starts that step again from the base's output. None otherwise."""
    import copy

    scheduler = _named_scheduler(field, spec)
    if scheduler is None or getattr(scheduler, "order", 1) != 2 or not hasattr(scheduler, "set_timesteps"):
        return None
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps)
    calls = [float(t) for t in sched.timesteps]
    return calls if len(calls) == 2 * steps - 1 else None


def _scheduler_start(field: Field, spec: solvers.Solver, g64: torch.Tensor, begin: int) -> tuple[float, float] | None:
    """Where the img2img pipeline of the field's diffusers scheduler starts the walk of the end of the
    grid `g64` from knot `begin` when that is not the knot itself (a x0 + b ε, PNDM's PLMS list:
    `img2img_start_coefficients`); only for the solver that scheduler names, whose loop follows it."""
    model = field_model(field, lambda m: callable(getattr(m, "img2img_start_coefficients", None)))
    if model is None or begin == 0 or _named_scheduler(field, spec) is None:
        return None
    return model.img2img_start_coefficients(g64, begin)


def _named_scheduler(field: Field, spec: solvers.Solver) -> Any:
    """The diffusers scheduler the field's model was loaded with, where `spec` is the solver it names
    (`solvers.from_scheduler`), else None: only that solver follows the scheduler's own loop."""
    from .solvers.base import model_scheduler

    scheduler = model_scheduler(field)
    if scheduler is None:
        return None
    try:
        own = solvers.from_scheduler(scheduler)[0]
    except ArgumentError:
        return None
    return scheduler if own == spec.name else None


def _img2img_data(field: Field, init: Any, n: int | None) -> torch.Tensor:
    """init checked as data for the field: a finite float tensor (n, *data_shape), or one row for n."""
    if not isinstance(init, torch.Tensor) or not init.is_floating_point():
        raise ArgumentTypeError(f"init: expected a floating-point tensor of data (n, *data_shape), got {init!r:.60}")
    if field.path is None:
        raise ArgumentError(
            f"init: image-to-image noises the data on the field's Gaussian path; a {type(field).__name__} has none"
        )
    shape = field.data_shape
    if init.dim() < 2 or (shape is not None and tuple(init.shape[1:]) != tuple(shape)):
        raise ArgumentError(
            f"init: expected data of shape (n, *{tuple(shape) if shape else 'data_shape'}) (the data shape of the "
            f"field), got {tuple(init.shape)}"
        )
    if not torch.isfinite(init).all():
        raise ArgumentError("init: expected finite values, got NaN or inf")
    if n is not None and len(init) != n:
        if len(init) != 1:
            raise ArgumentError(f"n: init holds {len(init)} rows but n={n} (give one row to use it for all)")
        init = init.expand(n, *init.shape[1:])
    return init


@torch.no_grad()
def sample(
    field: Field,
    solver: str | object = "heun",
    nfe: int | None = None,
    *,
    steps: int | None = None,
    n: int | None = None,
    shape: Sequence[int] | None = None,
    x_init: torch.Tensor | None = None,
    grid: torch.Tensor | Sequence[float] | str | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    return_info: bool = False,
    trajectory_every: int = 0,
    index_offset: int = 0,
    cond: dict | None = None,
    init: torch.Tensor | None = None,
    strength: float | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    inpaint: str | None = None,
    callback: Callable[[int, float, torch.Tensor], Any] | None = None,
    progress: bool = False,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
    _reverse: bool = False,
    **options: Any,
):
    """Draw particles x_0 ~ π and integrate the field with a solver (the paper's PM, Eq. 1).

    field: a `flowsolve.fields.Field`. solver: a name from `flowsolve.solvers.available()`, a
        k-diffusion or ComfyUI sampler name ("sample_lms", "dpmpp_2s_ancestral", "uni_pc_bh2"), or a
        diffusers scheduler (instance, class or name: its own loop; `fs.solvers.resolve`); "scheduler"
        is the one the field's diffusers model was loaded with (the pipeline's own loop); an
        AUTOMATIC1111 label ("DPM++ 2M Karras", "Euler a": its k-diffusion sampler on the grid A1111
        makes, `fs.solvers.names.webui_run`).
    nfe: a budget of field evaluations per sample; the solver takes the most steps that fit
        (Heun with a last Euler step to σ = 0: 2·steps − 1). Default: the field's default_nfe.
    steps: instead of nfe, the number of steps (the grid's intervals), as diffusers'
        `num_inference_steps` and k-diffusion count them; the budget is then what they cost.
    grid: a 1-D tensor of times from start to end (for EDM: decreasing σ, last 0), or a grid kind
        ('karras', 'loglinear', 'polyexponential', 'vp', 'beta', 'kl_optimal', 'uniform', 'calibrated',
        ComfyUI's 'normal', 'simple', ..., an AUTOMATIC1111 schedule type 'Karras', 'KL Optimal', ...) sized
        by nfe or steps, or a grid rule: a callable rule(field, steps) -> times.
        A grid from `fs.grids.calibrate` may carry solver coefficients (`grid.coefficients`), which
        mix the field's outputs in order.
    n / shape or x_init: how many particles of which shape, or given starting particles.
    seed: per-sample noise, so sample i is identical for any n and batch_size (None: OS entropy).
    batch_size: integrate at most this many particles at a time (bounded memory).
    device, dtype: default to x_init's, else the field's network's device (CPU for plain functions)
        and float32.
    return_info: also return a SampleInfo (nfe counted, grid, seconds, trajectory).
    trajectory_every: keep x every k steps (and the last) in info.trajectory.
    callback: called as callback(step, t, x) after every step. progress: a tqdm bar.
    index_offset: the global index of the first sample (sharded sampling: rank r draws samples
    index_offset .. index_offset + n − 1 exactly as one process drawing all of them would).
    cond: per-sample conditioning, a dict of tensors with leading size n (or 1: the same for all),
        e.g. {"class_labels": y}; every chunk hands its own rows to the model (`Field.bind`).
    init, strength: image-to-image (SDEdit; Meng et al. 2022) from data `init` (n, *data_shape) (or
        one row for all n): of the grid's N steps the last ⌊N·strength⌋ are walked, from init noised to
        the first of them on the field's Gaussian path, α_t init + σ_t ε with the per-sample noise of
        `seed`, as diffusers' img2img pipelines do (strength default 0.8, theirs; 1: from pure noise
        levels, the data forgotten). Latent models take latents (`model.encode(images)`).
        A tensor of strengths in [0, 1] broadcast to init is differential diffusion (Levin & Fried
        2024): the walk is the last ⌊N·max⌋ steps, and an element of strength s joins it for its last
        s·N steps only (before step j it is init noised to that step's level while 1 − s > j/N,
        counting j over the whole schedule), as the differential img2img pipelines do.
    mask: inpainting with init (any model; diffusers' inpaint pipeline with a UNet without mask
        channels): 1 where to generate, 0 where to keep init, broadcast to (n, *data_shape); after
        every step the kept part is set to init noised to the new level with the same noise (the
        last step: init itself). strength then defaults to 1, which starts from the prior's draw.
    inpaint: how the kept part is kept: "diffusers" (the state, above), "comfyui" (ComfyUI's
        KSamplerX0Inpaint: the model's input and its data prediction, each evaluation) or "a1111"
        (AUTOMATIC1111's: the data prediction, and the samples after the last step); `fs.inpainting`.
        Default: "a1111" with an AUTOMATIC1111 label as the solver, else "diffusers".
    denoising_end, denoising_start: SDXL's ensemble of expert denoisers (a fraction f in (0, 1)): with
        `denoising_end` the walk stops at the first knot whose diffusers timestep is below
        round(T − f·T) and returns that noisy state (the base model's part); with `denoising_start`
        it starts at that knot from `x_init`, the state there, not noised again (the refiner's part),
        as diffusers' SDXL pipelines cut their timesteps. Needs a diffusers model (its timesteps).
    options: solver options (e.g. alpha= for 'sde', S_churn= for 'edm'); unknown ones are rejected.
    """
    t0 = time.perf_counter()
    if not isinstance(field, Field):
        raise ArgumentTypeError(
            f"field: expected a flowsolve.fields.Field (e.g. fields.EDM(denoiser)), got {type(field).__name__}"
        )
    # an AUTOMATIC1111 label ("DPM++ 2M Karras"): its schedule type's grid, its way of counting steps
    grid, steps, nfe, options = solvers.names.webui_run(solver, grid, steps, nfe, options)
    base, options = solvers.resolve(solver, options, field)  # a peer's name or a diffusers scheduler too
    _check_scheduler_solver(solver, field, grid)
    spec = base.configured(options)
    spec.check_field(field)
    if spec.inverts and not _reverse:
        raise ArgumentError(
            f"solver: {spec.name!r} walks from the data up to the noise; use it with fs.invert (flowsolve invert)"
        )
    inverting = None if _reverse else field_model(field, lambda m: getattr(m, "inverts", False) is True)
    if inverting is not None:
        raise ArgumentError(
            f"field: its model's {type(inverting.scheduler).__name__} has invert_sigmas=True, whose loop walks "
            f"from the data to the noise: that loop is fs.invert(field, x, 'euler'); to sample, load the model "
            f"with invert_sigmas=False"
        )
    g64, budget = resolve_grid(field, spec, nfe, grid, reverse=_reverse, steps=steps)
    coefficients = getattr(g64, "coefficients", None)  # a calibrated grid's solver coefficients (checked)
    skipped = 0  # steps of the grid before the first one walked (img2img)
    cut_after = 0  # steps of the grid after the last one walked (denoising_end)
    first_stage_last = False  # the walk ends after its last step's first stage (denoising_end, 2nd order)
    if denoising_start is not None:  # the refiner's part: from the first knot below the cut, from x_init
        if x_init is None or init is not None:
            raise ArgumentError(
                "denoising_start: starts from x_init, the state at the cut (the base model's output with "
                "denoising_end), not from init"
            )
        g64, budget, skipped, _ = _expert_part(field, spec, g64, denoising_start, coefficients, "denoising_start")
    start_at = None  # where a scheduler's img2img pipeline starts instead of the walk's first knot
    if mask is not None and init is None:
        raise ArgumentError("mask: needs init= (the data whose unmasked part is kept)")
    if inpaint is None:  # an AUTOMATIC1111 label inpaints as A1111 does
        inpaint = solvers.names.default_inpaint(solver) if mask is not None else "diffusers"
    if inpaint not in INPAINT_MODES:
        raise ArgumentError(f"inpaint: expected one of {', '.join(INPAINT_MODES)}, got {inpaint!r}")
    comfyui_map = inpaint == "comfyui" and isinstance(strength, torch.Tensor)  # its DifferentialDiffusion
    if inpaint != "diffusers" and ((mask is None and not comfyui_map) or spec.inpaints):
        raise ArgumentError(
            f"inpaint: {inpaint!r} blends the kept part of init= where mask= is 0; it needs mask= (comfyui: or a "
            f"tensor strength=) and a solver that does not inpaint itself (got mask="
            f"{'None' if mask is None else 'given'}, solver {spec.name!r})"
        )
    if spec.inpaints and mask is None:
        raise ArgumentError(
            f"solver: {spec.name!r} inpaints; give init= (the data) and mask= (1 where to generate, 0 where to keep)"
        )
    if init is not None:  # image-to-image: the grid's last steps, from the data noised to their start
        if x_init is not None:
            raise ArgumentError("init: give init= (data to noise and denoise) or x_init= (the start itself), not both")
        if strength is None:  # diffusers' defaults: its img2img pipelines' 0.8, its inpaint pipeline's 1
            strength = 1.0 if mask is not None else 0.8
        strengths = strength if isinstance(strength, torch.Tensor) else None  # differential diffusion
        if strengths is not None and mask is not None:
            raise ArgumentError(
                "strength: a tensor of strengths is differential diffusion (0 keeps an element); give it or mask=, "
                "not both"
            )
        if (mask is not None or strengths is not None) and spec.name.startswith("torchdiffeq:"):
            raise ArgumentError(
                f"solver: inpainting and differential diffusion replace the kept part between steps; {spec.name!r} "
                f"integrates the whole grid in one torchdiffeq call (use a flowsolve fixed-step solver)"
            )
        init = _img2img_data(field, init, n)
        if strengths is not None:  # checked against init, then the walk is the largest strength's
            strengths = check_mask(strengths, init, "strength")
        whole = g64
        g64, budget, skipped = _img2img_grid(
            field, spec, g64, strength_map_top(strengths) if strengths is not None else strength, coefficients, solver
        )
        start_at = _scheduler_start(field, spec, whole, skipped)
        if strengths is not None:
            schedule_steps = skipped + counted_steps(field, g64.tolist())  # the whole schedule's N
        n, shape = len(init), tuple(init.shape[1:]) if shape is None else shape
        dtype = init.dtype if dtype is None else dtype
        device = init.device if device is None else device
        if mask is not None:
            mask = check_mask(mask, init)
    elif strength is not None:
        raise ArgumentError("strength: needs init= (the data that image-to-image starts from)")
    if denoising_end is not None:  # the base model's part: up to the first knot below the cut
        g64, budget, cut_after, first_stage_last = _expert_part(
            field, spec, g64, denoising_end, coefficients, "denoising_end"
        )
    check_int("trajectory_every", trajectory_every, 0)
    if callback is not None and not callable(callback):
        raise ArgumentTypeError(f"callback: expected a callable callback(step, t, x), got {type(callback).__name__}")

    n, shape, device, dtype = _particles(field, n, shape, x_init, device, dtype)
    cond = check_cond(cond, n)
    if seed is None:
        seed = fresh_seed()
    check_int("seed", seed, 0, 2**63 - 1)
    batch_size = n if batch_size is None else check_int("batch_size", batch_size, 1)
    per = math.prod(shape) * torch.finfo(dtype).bits // 8  # bytes of one particle
    check_memory(
        "n",
        n * per + min(batch_size, n) * per * 12,  # the result + a chunk's solver state
        "draw fewer samples at a time (index_offset= continues sample i exactly), or let the CLI "
        "stream them to a .npy file",
    )
    check_int("index_offset", index_offset, 0)

    # ComfyUI's DifferentialDiffusion thresholds, read from the walk's levels once
    thresholds = comfyui_thresholds(field, g64) if init is not None and comfyui_map else None

    # -- chunks -----------------------------------------------------------------------------
    outs, frames, nfe_used, frame_times, passes = [], [], 0, [], None
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        between, known, blended = None, None, None
        if init is not None:  # the data noised to the first level: α_t x0 + σ_t ε, ε the sample's own noise
            eps = SampleNoise(seed, index_offset + start, count, shape, dtype, device, stream=0)()
            x0 = init[start : start + count].to(device=device, dtype=dtype)
            x = walk_start(field, x0, eps, float(g64[0]), inpaint, mask is not None or comfyui_map, strength, start_at)
            if strengths is not None:
                rows = strengths[start : start + count].to(device=device, dtype=dtype)
                if comfyui_map:  # ComfyUI's DifferentialDiffusion: the mask thresholded at each evaluation
                    blended = (x0, eps, rows)
                else:
                    between = differential_blend(field, g64, x0, eps, rows, schedule_steps, skipped)
            if mask is not None:
                rows = mask[start : start + count].to(device=device, dtype=dtype)
                if spec.inpaints:  # the solver blends the kept part itself (RePaint)
                    known = (x0, rows)
                elif inpaint == "diffusers":
                    between = state_blend(field, g64, x0, eps, rows)
                else:  # the model's data prediction keeps init (and A1111's samples, after the last step)
                    blended = (x0, eps, rows)
                    between = state_blend(field, g64, x0, eps, rows, last_only=True) if inpaint == "a1111" else None
        elif x_init is None:
            x = initial_noise(field, seed, index_offset + start, count, shape, dtype, device, float(g64[0]))
        else:
            x = x_init[start : start + count].to(device=device, dtype=dtype)
        noise = (
            SampleNoise(seed, index_offset + start, count, shape, dtype, device, stream=1) if spec.stochastic else None
        )
        bound = field.bind(map_leaves(lambda _, v: v.to(device), cond_rows(cond, start, count, n)))
        if blended is not None:
            bound = blended_field(bound, *blended, mode=inpaint, threshold=thresholds)
        run = solvers.Run(
            bound,
            g64,
            x,
            solver=spec.name,
            noise=noise,
            callback=callback,
            trajectory_every=trajectory_every,
            progress=progress,
            budget=budget if spec.adaptive else None,
            coefficients=coefficients,
            nfe_budget=budget,
            reverse=_reverse,
            between=between,
            skipped=skipped,
            known=known,
            cut_after=cut_after,
            first_stage_last=first_stage_last,
        )
        try:
            x = spec.fn(run, x, **options)
        except solvers.base.StageStop as stop:  # the base's part ends inside a second-order step
            x = stop.state
        else:
            if first_stage_last:
                raise RuntimeError(f"solver {spec.name!r} finished its last step without taking its first stage apart")
        if between is not None:  # the kept part is the data itself, whatever the solver returned
            x = between(len(g64) - 2, x, final=True)
        run.finish()
        nfe_used = max(nfe_used, run.nfe)
        counted = bound.passes()
        if counted is not None:  # a field whose model counts its passes
            passes = max(passes or 0, counted)
        outs.append(x)
        if trajectory_every:
            frames.append(torch.stack(run.frames))
            frame_times = run.frame_times
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if not return_info:
        return out
    if budget is not None and nfe_used > budget:  # a solver that broke its own accounting is a bug
        raise RuntimeError(f"solver {spec.name!r} used {nfe_used} evaluations, over the budget {budget}")
    info = SampleInfo(
        nfe=nfe_used,
        grid=g64,
        seconds=time.perf_counter() - t0,
        solver=spec.name,
        steps=len(g64) - 1,
        seed=seed,
        nfe_budget=budget,
        trajectory=(frames[0] if len(frames) == 1 else torch.cat(frames, 1)) if frames else None,
        trajectory_times=frame_times,
        network_passes=passes if passes is not None else nfe_used,
    )
    return out, info


@torch.no_grad()
def invert(
    field: Field,
    x: torch.Tensor,
    solver: str | object = "dpmpp_2m",
    nfe: int | None = None,
    *,
    grid: torch.Tensor | Sequence[float] | str | None = None,
    cond: dict | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    return_info: bool = False,
    **options: Any,
):
    """The latent of data x under the field's probability-flow ODE: the sampling grid walked
    backwards, from the data up to the grid's first time (DDIM inversion; diffusers'
    `DPMSolverMultistepInverseScheduler` is `invert(..., "dpmpp_2m", grid=its σ's)`).
    `fs.sample(field, solver, x_init=latent, grid=g)` with the same grid brings it back, up to the two
    solves' errors.

    grid: the sampling grid (from the prior to the data), a spacing name sized by nfe, or None for
    the solver's default. On σ-time fields (EDM, diffusers denoisers) the walk starts at the grid's
    last σ above 0, where x is taken to lie (as DDIM inversion takes it at its first timestep; with
    `ddim_inverse`, DDIMInverseScheduler's step, which evaluates only at the level it moves to, at the
    data itself where the grid ends at σ = 0); the
    result is x̃ at σ_max, z = x̃ / prior_std. Flow fields are walked from t = 0 (x itself) to t = 1
    with the solvers that step on the velocity (euler, heun, adams, ipndm, ipndm_v, plms, fixed-step
    torchdiffeq methods): the exponential ones cannot step into λ = −∞. solver: a name in
    `fs.solvers.REVERSIBLE` or a fixed-step torchdiffeq method.
    """
    base, options = solvers.resolve(solver, options, field)  # a peer's name or a diffusers scheduler too
    spec = base.configured(options)
    if (
        spec.stochastic
        or spec.adaptive
        or not (spec.name in solvers.REVERSIBLE or spec.name.startswith("torchdiffeq:"))
    ):
        usable = ", ".join(sorted(solvers.REVERSIBLE))
        why = "draws noise" if spec.stochastic else "is adaptive" if spec.adaptive else "assumes a decreasing grid"
        raise ArgumentError(
            f"solver: inversion follows the probability-flow ODE backwards with {usable} or a fixed-step "
            f"torchdiffeq method; {spec.name!r} {why}"
        )
    if not field.time_is_sigma and spec.needs_sigma:
        why = (
            "is DDIMInverseScheduler's step on σ-time (VP) models"
            if spec.inverts
            else "steps in log-SNR, which cannot reach the pure noise at the end of a "
            f"{type(field).__name__} field's inversion"
        )
        raise ArgumentError(
            f"solver: {spec.name!r} {why}; use euler, heun, adams, ipndm, ipndm_v, plms or torchdiffeq:rk4"
        )
    if not isinstance(x, torch.Tensor):
        raise ArgumentTypeError(f"x: expected a tensor of data (n, *data_shape), got {type(x).__name__}")
    forward, _ = resolve_grid(field, spec, nfe, solvers.names.webui_grid(solver, grid))
    keep = forward
    if field.time_is_sigma and float(forward[-1]) == 0.0 and not spec.inverts:
        keep = forward[:-1]  # σ-time fields are singular at σ = 0: the data are taken at the last level
        # (`ddim_inverse` evaluates each step at its target level only: it starts at the data, σ = 0)
    if len(keep) < 2:
        raise ArgumentError(f"grid: inversion needs two times above the data, got {forward.tolist()}")
    return sample(
        field,
        spec.name,
        None,
        x_init=x,
        grid=keep.flip(0).clone(),
        cond=cond,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        return_info=return_info,
        seed=0,
        _reverse=True,
        **options,
    )


def sample_sharded(
    field: Field,
    solver: str | object = "heun",
    nfe: int | None = None,
    *,
    n: int | None = None,
    seed: int,
    x_init: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """`sample` split over the launched processes (torchrun / accelerate launch); every process
    returns all n samples, identical to one process's (with `x_init`, each integrates its rows)."""
    if seed is None:
        raise ArgumentError("seed: sharded sampling needs an explicit seed shared by every process")
    init = kwargs.pop("init", None)  # image-to-image data: its rows are split like x_init's
    if x_init is not None:
        n = len(x_init)
    elif init is not None and n is None:
        n = len(init)
    if n is None:
        raise ArgumentError("n: expected the number of particles (or pass x_init=)")
    rank, size = world()
    if size == 1:
        return sample(
            field, solver, nfe, n=None if x_init is not None else n, seed=seed, x_init=x_init, init=init, **kwargs
        )
    if getattr(field, "interacting", False):
        raise ArgumentError(
            f"field: {type(field).__name__} couples all particles, so splitting them over processes "
            f"would change the flow; sample it in one process"
        )
    start, end = shard_range(n, rank, size)
    cond = check_cond(kwargs.pop("cond", None), n)
    part = None
    if end > start:
        rows: dict[str, Any] = dict(x_init=x_init[start:end]) if x_init is not None else dict(n=end - start)
        if init is not None:
            rows["init"] = init[start:end] if len(init) == n and len(init) > 1 else init
        for key in ("mask", "strength"):  # per-row masks and strength maps are split with the rows
            value = kwargs.pop(key, None)
            if isinstance(value, torch.Tensor):
                per_row = init is not None and value.dim() == init.dim() and len(value) == n > 1
                rows[key] = value[start:end] if per_row else value
            elif value is not None:
                rows[key] = value
        part = sample(
            field,
            solver,
            nfe,
            seed=seed,
            index_offset=start,
            cond=cond_rows(cond, start, end - start, n),
            **rows,
            **kwargs,
        )
    shape = (
        tuple(part.shape[1:])
        if part is not None
        else tuple(x_init.shape[1:])
        if x_init is not None
        else tuple(kwargs.get("shape") or field.data_shape or ())
    )
    dtype = kwargs.get("dtype") or (x_init.dtype if x_init is not None else torch.float32)  # sample's default
    return gather_ranges(part, n, shape, check_dtype("dtype", dtype))
