"""What every solver shares: the registry entry (`Solver`) and the per-run context (`Run`).

A solver is a short function `fn(run, x, **options) -> x` (k-diffusion style) that walks
`run.times` and asks `run.f(x, i)` for the field at grid point i. `Run` counts every field
evaluation (info.nfe is measured, never computed), flags non-finite outputs, draws the
per-sample noise, and serves trajectories, callbacks and progress.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass, field as dc_field
from typing import Any, Callable, Iterator, Sequence

import torch

from ..fields.base import SOLVE_POSITION, Field, field_model
from .._checks import nearest
from ..errors import ArgumentError, ArgumentTypeError, NFEBudgetExceeded, NonFiniteError

__all__ = ["Solver", "Run", "NonFiniteError", "NFEBudgetExceeded", "nearest"]


_K_DIFFUSION_CHURN = {"s_churn": "S_churn", "s_tmin": "S_min", "s_tmax": "S_max"}  # its names for EDM's churn


@dataclass
class Solver:
    """A registered solver: the step function and how its NFE grows with the number of steps.

    evals(steps, singular_end) is the number of field evaluations per sample for a grid with
    `steps` intervals, singular_end telling whether the field cannot be evaluated at the last
    time (EDM's σ = 0). It maps an NFE budget to steps; the count reported is measured.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    evals: Callable[[int, bool], int]
    description: str = ""
    needs_sigma: bool = False  # needs a field whose time is σ (data prediction x − σ·v)
    needs_flow_map: bool = False  # needs a flow-map model (the field's `jump` from t to r)
    needs_guidance: bool = False  # needs a guided field (reads its unconditional branch: CFG++)
    inpaints: bool = False  # blends the kept part of `init` itself (`Run.known`): needs init= and mask=
    inverts: bool = False  # walks from the data up only (`fs.invert`)
    stochastic: bool = False  # draws noise
    adaptive: bool = False  # chooses its own steps between start and end
    min_steps: int = 1
    options: dict[str, Any] = dc_field(default_factory=dict)
    # the spacing this solver walks by default on σ-time fields whose own default is the generic
    # Karras grid (measured best uncalibrated choice, benchmarks/low_nfe.py); None: the field's
    default_grid: str | None = None
    # options that change the entry itself: variant(options) -> the fields that differ (e.g. `edm`'s
    # step="euler" takes one evaluation per step); None: every option leaves the entry as it is
    variant: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if not self.options:
            sig = inspect.signature(self.fn)
            self.options = {
                p.name: p.default for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
            }

    @property
    def min_nfe(self) -> int:
        return max(1, self.evals(self.min_steps, True))

    def steps_for(self, nfe: int, singular_end: bool) -> int:
        """The most steps whose NFE fits the budget (evals grows with steps: doubling, then bisection)."""
        if self.evals(1, singular_end) > nfe:
            return 0
        lo, hi = 1, 2
        while self.evals(hi, singular_end) <= nfe:
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # evals(lo) <= nfe < evals(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.evals(mid, singular_end) <= nfe else (lo, mid)
        return lo

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        for k in options:
            if k not in self.options:
                valid = ", ".join(sorted(self.options)) or "none"
                churn = _K_DIFFUSION_CHURN.get(k.lower()) if isinstance(k, str) else None
                raise ArgumentTypeError(
                    f"solver {self.name!r} got an unknown option {k!r}{nearest(k, self.options)}; "
                    f"its options are: {valid}"
                    + (
                        f" (k-diffusion's {k.lower()} is {churn} of solver 'edm', whose step='euler', 'heun' "
                        f"or 'dpm_2' is its sample_euler, sample_heun or sample_dpm_2)"
                        if churn
                        else ""
                    )
                )
        return options

    def configured(self, options: dict[str, Any]) -> "Solver":
        """This entry as the given options make it (checked first): its NFE accounting, whether it
        draws noise, what it needs of the field. `fs.sample`, `invert` and `calibrate` read this one."""
        self.check_options(options)
        changes = self.variant(options) if self.variant is not None else {}
        return dataclasses.replace(self, **changes) if changes else self

    def check_field(self, field: Field) -> None:
        """Refuse, before any work, a field this solver cannot run on: one without a Gaussian path
        (`needs_sigma`), a model that is not a flow map (`needs_flow_map`), an unguided one (`needs_guidance`)."""
        if self.needs_sigma and field.path is None:
            raise ArgumentError(
                f"solver: {self.name!r} needs a field on a Gaussian path (fields.EDM, ScoreDifference, "
                f"FlowMatching, TrigFlow: its time is a noise level), got {type(field).__name__}"
            )
        if self.needs_flow_map and not getattr(field, "flow_map", False):
            raise ArgumentTypeError(
                f"solver: {self.name!r} needs a flow-map model (a FlowMatching field built with flow_map=True, "
                f"e.g. a diffusers model with FlowMapEulerDiscreteScheduler); {type(field).__name__} gives dx/dt only"
            )
        if self.needs_guidance and guided_model(field) is None:
            raise ArgumentError(
                f"solver: {self.name!r} (CFG++) re-noises with the unconditional prediction; it needs a guided "
                f"field (model.field(guidance=w, uncond=...) or fields.EDM(den, guidance=w, uncond=...))"
            )


class StageStop(Exception):
    """Raised by `Run.stage` on the walk's last step when the walk ends after that step's first stage
    (`Run.first_stage_last`: diffusers' SDXL base cut inside a second-order scheduler's step); carries
    the state the pipeline returns there."""

    def __init__(self, state: torch.Tensor) -> None:
        super().__init__("the walk ends after its last step's first stage")
        self.state = state


class Run:
    """The state of one solve over one chunk of particles."""

    def __init__(
        self,
        field: Field,
        grid: torch.Tensor,
        x: torch.Tensor,
        solver: str = "",
        noise: Callable[[], torch.Tensor] | None = None,
        callback: Callable[[int, float, torch.Tensor], Any] | None = None,
        trajectory_every: int = 0,
        progress: bool = False,
        budget: int | None = None,
        coefficients: Sequence[Sequence[Any]] | None = None,
        nfe_budget: int | None = None,
        reverse: bool = False,
        between: Callable[..., torch.Tensor] | None = None,
        skipped: int = 0,
        known: tuple[torch.Tensor, torch.Tensor] | None = None,
        cut_after: int = 0,
        first_stage_last: bool = False,
    ) -> None:
        self.field, self.solver = field, solver
        # inpainting's (data, mask: 1 where to generate) for solvers that blend the kept part themselves
        self.known = known
        # after step i, the state at times[i + 1] may be replaced (inpainting's blend with the noised data)
        self.between = between
        # steps of the schedule before this grid's first time (img2img walks a schedule's end): the rules
        # that read the schedule's length (diffusers' lower orders below 15 steps) count them
        self.skipped = skipped
        # steps of the schedule after this grid's last time (a walk stopped at `denoising_end`): counted too
        self.cut_after = cut_after
        # the walk ends after the first stage of its last step (a second-order step cut in its middle)
        self.first_stage_last = first_stage_last
        # a calibrated grid's solver coefficients: the k-th evaluation the solver sees is
        # Σ_{j≤k} coefficients[k][j] · f_j (floats, or tensors while `calibrate` fits them)
        self.coefficients = coefficients
        self._raw: list[torch.Tensor] = []  # the field's own outputs, kept only under coefficients
        self.grid = grid
        self.times: list[float] = grid.tolist()
        tt = grid.to(dtype=x.dtype, device=x.device)
        self.tt: list[torch.Tensor] = list(tt.unbind(0))
        # the end where the field may be singular (σ = 0); an inversion (`reverse`) walks away from the
        # data and never reaches it, so every time it visits is evaluated
        self.t_end = math.nan if reverse else float(field.t_end)
        n = len(self.times)
        # can the field be evaluated at grid point j? (EDM cannot at σ = 0)
        self.evaluable = [field.finite_at_end or self.times[j] != self.t_end for j in range(n)]
        self.noise_source = noise
        self.callback, self.every, self.progress = callback, int(trajectory_every), progress
        self.budget = budget  # enforced (adaptive solvers stop at it)
        self.nfe_budget = budget if nfe_budget is None else nfe_budget  # the user's nfe=, for solvers that share it out
        self.nfe = 0
        self.step = 0
        self._checks: list[tuple[int, float, torch.Tensor]] = []
        self.frames: list[torch.Tensor] = [x] if self.every else []
        self.frame_times: list[float] = [self.times[0]] if self.every else []
        self._hooks = bool(callback) or bool(self.every)
        self._counted: int | None = None  # the grid's steps as the field's scheduler counts them

    # -- field evaluations ---------------------------------------------------------------
    def _evaluate(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args), a field evaluation, with its place in the solve published (`solve_position`)."""
        if self._counted is None:
            self._counted = counted_steps(self.field, self.times)
        token = SOLVE_POSITION.set((self.nfe, self._counted))
        try:
            return fn(*args)
        finally:
            SOLVE_POSITION.reset(token)

    def _count(self, out: torch.Tensor, t: float) -> torch.Tensor:
        if self.coefficients is not None and self.nfe < len(self.coefficients):
            self._raw.append(out)
            out = combine(self.coefficients[self.nfe], self._raw)
        self.nfe += 1
        # one cheap reduction per evaluation, checked at the end (no host sync in the loop)
        self._checks.append((self.step, t, out.detach().sum()))
        return out

    def _budget(self) -> None:
        if self.budget is not None and self.nfe >= self.budget:
            raise NFEBudgetExceeded(
                f"solver {self.solver!r} needed more than nfe={self.budget} field evaluations "
                f"per sample; raise nfe, or loosen its rtol/atol"
            )

    def f(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The field at grid point i (its first output is checked against x's shape and dtype)."""
        out = self._evaluate(self.field, x, self.tt[i])
        if self.nfe == 0:
            self.field.check_output(out, x, type(self.field).__name__)
        return self._count(out, self.times[i])

    def jump(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """A flow-map model's state at grid point i + 1 from x at grid point i, in one evaluation."""
        return self._count(self._evaluate(self.field.jump, x, self.tt[i], self.tt[i + 1]), self.times[i])

    def f_at(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """The field at any time t (off-grid stages). At σ = 0 of a σ-time field, where it is singular,
        the velocity is its limit for smooth densities, −σ ∇log p → 0, without counting an
        evaluation; a flow's velocity at t = 0 is finite (ε̂ − x̂₀) and is evaluated."""
        tf = float(t)
        if (tf - self.t_end) * (self.t_end - self.times[0]) > 0:  # stages past the end (adaptive
            tf, t = self.t_end, self.t_end  # step selection): clamp to it
        if tf == self.t_end and not self.field.finite_at_end and self.field.time_is_sigma:
            return torch.zeros_like(x)
        self._budget()
        tt = t if isinstance(t, torch.Tensor) else torch.tensor(tf, dtype=x.dtype, device=x.device)
        return self._count(self._evaluate(self.field, x, tt.to(x.dtype)), tf)

    def sde(self, x: torch.Tensor, i: int, alpha: float):
        """(drift, g2) of the field's stochastic form at grid point i."""
        drift, g2 = self._evaluate(self.field.sde, x, self.tt[i], alpha)
        return self._count(drift, self.times[i]), g2

    def sde_at(self, x: torch.Tensor, t: float, alpha: float):
        tt = torch.tensor(float(t), dtype=x.dtype, device=x.device)
        drift, g2 = self._evaluate(self.field.sde, x, tt, alpha)
        return self._count(drift, float(t)), g2

    def noise(self) -> torch.Tensor:
        if self.noise_source is None:
            raise RuntimeError(f"solver {self.solver!r} asked for noise but was registered as deterministic")
        return self.noise_source()

    # -- loop helpers --------------------------------------------------------------------
    def steps(self) -> Iterator[int]:
        it = range(len(self.times) - 1)
        if self.progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=self.solver, leave=False)
        for i in it:
            self.step = i
            yield i

    def tick(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Call after step i, x being the state at times[i + 1]; returns the state the solver goes on
        from (x, or what `between` makes of it)."""
        if self.between is not None:
            x = self.between(i, x)
        if not self._hooks:
            return x
        if self.every and ((i + 1) % self.every == 0 or i + 2 == len(self.times)):
            self.frames.append(x)
            self.frame_times.append(self.times[i + 1])
        if self.callback is not None:
            self.callback(i, self.times[i + 1], x)
        return x

    def stage(self, i: int, x: torch.Tensor, at: float | None = None) -> torch.Tensor:
        """A stage of step i whose state a diffusers pipeline's loop passes on between two scheduler
        calls (Heun's predictor, DPM-2's midpoint, PLMS's first step), at time `at` (t_{i+1} by
        default, where those schedulers' `add_noise` reads the next knot): what `between` makes of it,
        as the inpaint and differential pipelines blend after every call."""
        if self.between is not None:
            x = self.between(i, x, at=self.times[i + 1] if at is None else at)
        if self.first_stage_last and i == len(self.times) - 2:
            raise StageStop(x)
        return x

    def finish(self) -> None:
        """Raise NonFiniteError naming the first step whose field output was not finite."""
        if not self._checks:
            return
        ok = torch.isfinite(torch.stack([c[2] for c in self._checks]).float())
        if bool(ok.all()):
            return
        k = int((~ok).nonzero()[0])
        step, t = self._checks[k][0], self._checks[k][1]
        raise NonFiniteError(
            f"the field returned non-finite values (NaN or inf) at step {step} (t={t:.6g}), "
            f"evaluation {k + 1}, under solver {self.solver!r}"
        )


@functools.lru_cache(maxsize=4096)
def _lagrange_weights(nodes: tuple[float, ...], a: float, b: float, exp_kernel: bool) -> tuple[float, ...]:
    """Gauss–Legendre (16 nodes): exact to float64 round-off for the step sizes that occur."""
    import numpy as np

    xs, ws = np.polynomial.legendre.leggauss(16)
    u = 0.5 * (b - a) * xs + 0.5 * (b + a)
    w = ws * 0.5 * (b - a)
    if exp_kernel:
        w = w * np.exp(u - b)
    out = []
    for j, nj in enumerate(nodes):
        lj = np.ones_like(u)
        for m, nm in enumerate(nodes):
            if m != j:
                lj = lj * (u - nm) / (nj - nm)
        out.append(float((w * lj).sum()))
    return tuple(out)


def lagrange_weights(nodes, a: float, b: float, exp_kernel: bool) -> tuple[float, ...]:
    """W_j = ∫_a^b w(u) ℓ_j(u) du for the Lagrange basis ℓ_j on `nodes`, with w(u) = e^{u − b}
    (exponential integrators in λ = −log σ) or 1 (Adams methods); cached, since they depend
    on the grid only."""
    return _lagrange_weights(tuple(nodes), float(a), float(b), bool(exp_kernel))


class PathGrid:
    """The Gaussian-path coordinates of a run's grid (`fields.paths`): α, σ and λ = log(α/σ) at every
    knot, and the data prediction D = E[x_0 | x_t] from the field's velocity, at a knot or between
    knots (single-step solvers evaluate at a λ-midpoint)."""

    def __init__(self, run: "Run", pure_noise: bool = True) -> None:
        """`pure_noise=False` reads a zero-terminal-SNR model's top knot at its clamped finite level
        (for the adaptive DPM-Solver, whose steps need a finite λ)."""
        if run.field.path is None:
            raise TypeError("PathGrid: the field has no Gaussian path")
        self.run, self.path, self.t = run, run.field.path, run.times
        self.a = [self.path.alpha(v) for v in self.t]
        self.s = [self.path.sigma(v) for v in self.t]
        self.lam = [self.path.lam(v) for v in self.t]
        # a run that starts at a zero-terminal-SNR model's top knot starts from pure noise: ᾱ = 0 there,
        # x = √(1 + σ²) x_T, λ = −∞ (an inversion, which ends there, keeps the clamped finite level)
        model = discrete_model(run.field) if pure_noise and self.path.name == "ve" and len(self.t) > 1 else None
        if model is not None and self.t[0] > self.t[1] and model.pure_noise_at(self.t[0]):
            self.a[0], self.s[0], self.lam[0] = 0.0, math.sqrt(1.0 + float(self.t[0]) ** 2), -math.inf

    def denoise(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """D at (x, t_i), from one field evaluation."""
        return self.path.data_prediction(x, self.run.f(x, i), self.t[i])

    def denoise_ve(self, xt: torch.Tensor, lam: float) -> torch.Tensor:
        """D where λ = lam, for a point given in VE coordinates x̃ = x/α."""
        t = self.path.time_at(lam)
        x = self.path.alpha(t) * xt
        return self.path.data_prediction(x, self.run.f_at(x, t), t)

    def stage_ve(self, i: int, xt: torch.Tensor, lam: float) -> torch.Tensor:
        """`Run.stage` for a stage of step i given in VE coordinates x̃ = x/α at λ = lam."""
        if self.run.between is None and not self.run.first_stage_last:
            return xt
        a = self.path.alpha(self.path.time_at(lam))
        return self.run.stage(i, a * xt) / a

    def rho(self, i: int) -> float:
        """The VE noise level σ/α at knot i (∞ at pure noise)."""
        return math.inf if self.a[i] == 0 else self.s[i] / self.a[i]

    def first_order(
        self, i: int, x: torch.Tensor, den: torch.Tensor, rho_to: float, renoise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x̃ at level ρ_to by the first-order (DDIM) step from knot i, in VE coordinates:
        x̃' = D_i + (ρ_to/ρ_i)(x̃_i − D'), D' = D_i (or `renoise`, the prediction CFG++ re-noises with),
        written with x̃_i/ρ_i = x/σ_i so that it is finite from pure noise (ρ_i = ∞: x̃' = ρ_to x/σ_i + D_i)."""
        ratio = 0.0 if math.isinf(self.rho(i)) else rho_to / self.rho(i)
        return rho_to * (x / self.s[i]) + ((1.0 - ratio) * den if renoise is None else den - ratio * renoise)


def counted_steps(field: Any, times: Sequence[float]) -> int:
    """The steps of a grid of distinct `times` as the field's diffusers scheduler counts them: one more
    than the grid's when the scheduler ended this schedule with a step from its last σ to itself
    (`final_sigmas_type="sigma_min"` on a schedule that already ends at σ_min), which moves nothing
    and is not taken."""
    n = len(times) - 1
    model = field_model(field, lambda m: callable(getattr(m, "repeats_final", None)))
    return n + 1 if model is not None and model.repeats_final(float(times[-1])) else n


def scheduler_steps(run: "Run") -> int:
    """The number of steps of the run as the field's diffusers scheduler counts them (`counted_steps`),
    for the rules that lower the order of the last steps (`lower_order_final`)."""
    return counted_steps(run.field, run.times) + run.cut_after


def takes_closing_step(run: "Run") -> bool:
    """Whether to take the step the field's diffusers scheduler ends with, from its last σ to itself
    (`scheduler_steps`), where that step does something (UniPC's and SA-Solver's final correction,
    a singlestep cycle's last stage, DDIM's clip): it costs one more evaluation, which the NFE
    budget must allow."""
    end = len(run.times) - 1
    closing = run.cut_after == 0 and scheduler_steps(run) > end  # (a walk cut before the end has none)
    return closing and (run.nfe_budget is None or run.nfe_budget > end)


def lowered_order(order: int, steps: int, i: int, lower_order_final: bool, skipped: int = 0) -> int:
    """diffusers' `lower_order_final` rule of its multistep solvers: below 15 steps of the schedule
    (`skipped` of them before this grid: `Run.skipped`), step i has order at most steps − i (`steps`
    as the scheduler counts this grid's: `scheduler_steps`)."""
    return min(order, steps - i) if lower_order_final and steps + skipped < 15 else order


def own_schedule(run: "Run", has: Callable[[Any], bool]) -> torch.Tensor | None:
    """The whole σ schedule of the field's diffusers scheduler, where its model passes `has` (a
    scheduler class, a quirk the model declares) and the run walks its schedule or a part of it
    (img2img: `run.skipped` knots before the walk; `denoising_end`: `run.cut_after` steps after it),
    else None: a scheduler's quirks are followed on its own grid only."""
    model = field_model(run.field, lambda m: bool(has(m)))
    if model is None or getattr(model, "schedule", None) != "discrete" or not run.field.time_is_sigma:
        return None
    if run.times[0] < run.times[-1]:  # (an inversion walks up)
        return None
    own = model.scheduler_grid(scheduler_steps(run) + run.skipped)
    walked = torch.tensor(run.times, dtype=torch.float64)
    part = own[run.skipped : len(own) - run.cut_after]  # (its middle: denoising_start / denoising_end)
    if len(part) != len(walked) or not torch.allclose(part, walked, rtol=1e-12, atol=0):
        return None
    return own


def guided_model(field: Any) -> Any:
    """The guided model under a field (CFG++ re-noises with its unconditional branch), or None."""
    from ..fields.guidance import Guided

    return field_model(field, lambda m: isinstance(m, Guided))


def model_scheduler(field: Any) -> Any:
    """The diffusers scheduler the field's model was loaded with (through guidance wrappers), or None."""
    return getattr(field_model(field, lambda m: hasattr(m, "scheduler")), "scheduler", None)


def discrete_model(field: Any) -> Any:
    """The diffusers DDPM-type denoiser under the field (σ ↔ integer timesteps), or None."""
    return field_model(field, lambda m: getattr(m, "schedule", None) == "discrete" and hasattr(m, "sigma"))


def model_timestep(model: Any, sigma: float) -> int:
    """The integer timestep of a discrete model at σ: on the scheduler's own knots exactly its
    timestep (a batch of one σ reads the adapter's knot table), elsewhere the nearest in log σ."""
    return round(float(model.timestep(torch.full((2,), float(sigma), dtype=torch.float64))[0]))


def lu_differences(r0: float, r1: float) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Lu et al.'s DPM-Solver(++) third-order finite differences as weights on (v_i, v_{i−1}, v_{i−2}):
    with D1₀ = (v_i − v_{i−1})/r₀, D1₁ = (v_{i−1} − v_{i−2})/r₁, q = r₀/(r₀ + r₁),
    D1 = (1 + q) D1₀ − q D1₁ and D2 = (D1₀ − D1₁)/(r₀ + r₁)."""
    q, s = r0 / (r0 + r1), 1.0 / (r0 + r1)
    d1 = ((1 + q) / r0, -(1 + q) / r0 - q / r1, q / r1)
    d2 = (s / r0, -s / r0 - s / r1, s / r1)
    return d1, d2


def combine(weights: Sequence[Any], values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_j w_j v_j, in order (the multistep solvers' weighted sums of past evaluations)."""
    out = weights[0] * values[0]
    for w, v in zip(weights[1:], values[1:]):
        out = out + w * v
    return out


def ddim_step(x: torch.Tensor, den: torch.Tensor, s_i: float, s_j: float, a_j: float, h: float) -> torch.Tensor:
    """The first-order exponential (DDIM) step x_j = (σ_j/σ_i) x − α_j expm1(−h) D, h = λ_j − λ_i:
    exact for a constant D; from pure noise (λ_i = −∞, σ_i = 1) it is σ_j x + α_j D, to the data
    (σ_j = 0) α_j D."""
    return (s_j / s_i) * x - (a_j * math.expm1(-h)) * den


def sigma_lambda(sigma: float) -> float:
    """λ = −log σ (log signal-to-noise ratio / 2 for VE), +inf at σ = 0."""
    return math.inf if sigma == 0 else -math.log(sigma)
