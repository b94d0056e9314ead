"""Solver registry: every solver has the signature fn(run, x, **options) -> x.

`available()` lists the names accepted by `flowsolve.sample(solver=...)`; `get(name)` returns the
registered `Solver` (its options, NFE accounting and requirements); `register` adds one.
"""

from __future__ import annotations

import warnings
from typing import Callable

from .base import NFEBudgetExceeded, NonFiniteError, Run, Solver, nearest
from . import backends, fixed, multistep, names, peers, stochastic
from .names import PEER_NAMES, from_scheduler
from ..errors import ArgumentError, ArgumentTypeError

__all__ = [
    "available",
    "get",
    "resolve",
    "from_scheduler",
    "PEER_NAMES",
    "register",
    "Solver",
    "Run",
    "NonFiniteError",
    "NFEBudgetExceeded",
    "describe",
    "REVERSIBLE",
]

_REGISTRY: dict[str, Solver] = {}


def register(solver: Solver, replace: bool = False) -> Solver:
    """Add a solver to the registry (name clashes raise unless replace=True)."""
    if not isinstance(solver, Solver):
        raise ArgumentTypeError(f"solver: expected a flowsolve.solvers.Solver, got {type(solver).__name__}")
    if solver.name in _REGISTRY and not replace:
        raise ArgumentError(f"solver: the name {solver.name!r} is already registered")
    _REGISTRY[solver.name] = solver
    return solver


_BACKENDS = {"loaded": False}


def _ensure_backends() -> None:
    """Register the torchdiffeq and torchsde methods on first need (importing them, scipy included,
    costs ~0.4 s that `import flowsolve` should not pay)."""
    if not _BACKENDS["loaded"]:
        _BACKENDS["loaded"] = True
        _register_backends()


def available() -> list[str]:
    """Names accepted by sample(solver=...)."""
    _ensure_backends()
    return sorted(_REGISTRY)


_RENAMED = {"dpmpp_2m_midpoint": "dpmpp_2m"}  # old name -> new name (0.x), accepted with a FutureWarning


def get(name: str) -> Solver:
    if not isinstance(name, str):
        raise ArgumentTypeError(f"solver: expected a solver name (str), got {type(name).__name__}")
    if name in _RENAMED:
        warnings.warn(
            f"solver: {name!r} is now called {_RENAMED[name]!r}; the old name will be removed",
            FutureWarning,
            stacklevel=3,
        )
        name = _RENAMED[name]
    if name not in _REGISTRY:
        _ensure_backends()
    if name not in _REGISTRY:
        raise ArgumentError(
            f"solver: unknown solver {name!r}{nearest(name, [*_REGISTRY, *PEER_NAMES, *names.WEBUI_NAMES])}; "
            f"valid names are: {', '.join(available())}; k-diffusion's and ComfyUI's sampler names "
            f"({', '.join(sorted(set(PEER_NAMES) - set(_REGISTRY)))}), AUTOMATIC1111's labels with their "
            f"schedule type (e.g. 'DPM++ 2M Karras'; `flowsolve solvers`) and diffusers schedulers are "
            f"accepted too"
        )
    return _REGISTRY[name]


def _model_scheduler(field: object) -> object:
    """The scheduler the field's diffusers model was loaded with (through guidance wrappers)."""
    from .base import model_scheduler

    own = model_scheduler(field)
    if own is None:
        raise ArgumentError(
            f"solver: 'scheduler' means the scheduler a diffusers model was loaded with; "
            f"this {type(field).__name__} field's model has none (name a solver, or pass a scheduler)"
        )
    return own


def _registered(name: str) -> bool:
    if ":" in name:
        _ensure_backends()
    return name in _REGISTRY or name in _RENAMED


def resolve(solver: object, options: dict | None = None, field: object = None) -> tuple[Solver, dict]:
    """The registered solver and options that `solver` means: a flowsolve name (`available()`), a
    k-diffusion or ComfyUI sampler name (`"sample_lms"`, `"lms"`, `"uni_pc_bh2"`: `PEER_NAMES`), or a
    diffusers scheduler (instance, class or class name: `from_scheduler`), or a `Solver` entry itself
    (one made for the call, unregistered). Options given override the
    ones the name implies (k-diffusion's `lms` is `adams` with `order=4`). `fs.sample`, `fs.invert`,
    `fs.calibrate` and `fs.compare` accept all of these. With the `field`, "scheduler" means the
    scheduler its diffusers model was loaded with (a pipeline's own loop)."""
    if isinstance(solver, Solver):  # a Solver entry itself, registered or not
        return solver, dict(options or {})
    if solver == "scheduler" and field is not None:
        solver = _model_scheduler(field)
    name, opts = names.resolve(solver, dict(options or {}), _registered)
    return get(name), opts


def describe() -> str:
    """One line per solver: name, NFE for 10 steps (last step to σ = 0), options, description."""
    rows = []
    for name in available():
        s = _REGISTRY[name]
        opts = ", ".join(f"{k}={v!r}" for k, v in s.options.items())
        rows.append(f"{name:28s} {s.description}" + (f"  [options: {opts}]" if opts else ""))
    rows += ["", "k-diffusion's and ComfyUI's names (diffusers schedulers too: fs.solvers.from_scheduler):"]
    for peer in sorted(set(PEER_NAMES) - set(_REGISTRY)):
        entry = PEER_NAMES[peer]
        target, implied = entry({}) if callable(entry) else entry
        shown = target + (f" ({', '.join(f'{k}={v!r}' for k, v in implied.items())})" if implied else "")
        if callable(entry):
            shown += f"; with s_churn, s_tmin, s_tmax, s_noise: edm(step={target!r})"
        rows.append(f"{peer:28s} = {shown}")
    rows += ["", "AUTOMATIC1111's labels (a k-diffusion sampler on its schedule type's grid; a label may end in one):"]
    for label, (kname, automatic, discard) in names._WEBUI.items():
        grid = (automatic or ("σ range" if label.startswith("DPM ") else "Uniform")) + (
            ", next-to-last level dropped" if discard else ""
        )
        rows.append(f"{label:28s} = {kname} (schedule: {grid})")
    rows.append(f"{'schedule types':28s} = " + ", ".join(f"{k} ({v})" for k, v in names.WEBUI_SCHEDULES.items()))
    return "\n".join(rows)


def _one_per_step(steps: int, singular_end: bool) -> int:
    return steps


def _heun_evals(steps: int, singular_end: bool) -> int:
    return 2 * steps - (1 if singular_end else 0)


register(Solver("euler", fixed.euler, _one_per_step, "first-order Euler (DDIM on the σ-ODE)"))
register(
    Solver(
        "gradient_estimation",
        fixed.gradient_estimation,
        _one_per_step,
        "Euler with the derivative extrapolated from the last step (Permenter & Yuan 2024; ComfyUI's)",
    )
)
register(
    Solver(
        "flow_map",
        fixed.flow_map,
        _one_per_step,
        "a flow-map model's own transitions x_t -> x_r (AnyFlow, MeanFlow), one per step",
        needs_flow_map=True,
    )
)
register(Solver("heun", fixed.heun, _heun_evals, "EDM's 2nd-order Heun (Karras et al. Alg. 1), Euler last step"))
register(
    Solver(
        "edm",
        fixed.edm,
        _heun_evals,
        "EDM's stochastic sampler with S_churn/S_min/S_max/S_noise (Alg. 2); step='heun', 'euler' or 'dpm_2'",
        needs_sigma=True,
        stochastic=True,
        variant=lambda options: {"evals": _one_per_step} if options.get("step") == "euler" else {},
    )
)
register(
    Solver(
        "heunpp2",
        fixed.heunpp2,
        lambda steps, singular_end: max(1, 3 * steps - 3),
        "ComfyUI's Heun++: three slopes per step weighted by t/(3 t_0), Heun's then Euler's on the last two",
    )
)

DEFAULT_RESTARTS = ((0.1, 2.0, 9, 1),)  # AUTOMATIC1111's interval: ρ from 2 to 0.1, 9 Heun steps, once


def _restart_evals(restarts) -> Callable[[int, bool], int]:
    extra = fixed.restart_evals(restarts)
    return lambda steps, singular_end: _heun_evals(steps, singular_end) + extra


register(
    Solver(
        "restart",
        fixed.restart,
        _restart_evals(DEFAULT_RESTARTS),
        "Restart sampling (Xu et al. 2023): Heun's ODE, re-noised over intervals "
        "restarts=((ρ_min, ρ_max, steps, times), ...) and solved down again",
        needs_sigma=True,
        stochastic=True,
        variant=lambda options: {"evals": _restart_evals(options["restarts"])} if "restarts" in options else {},
    )
)
register(
    Solver(
        "sde",
        stochastic.sde,
        _one_per_step,
        "Eq. 21: alpha ∈ [0, 1] interpolates the PF-ODE (0) and the reverse SDE (1)",
        stochastic=True,
    )
)
register(
    Solver(
        "dpmpp_2m",
        multistep.dpmpp_2m,
        _one_per_step,
        "DPM-Solver++(2M), Lu et al.'s Alg. 2 (k-diffusion's sample_dpmpp_2m, diffusers' default midpoint form)",
        needs_sigma=True,
    )
)
register(
    Solver(
        "dpmpp_2m_heun",
        multistep.dpmpp_2m_heun,
        _one_per_step,
        "DPM-Solver++(2M) with exact exponential weights (diffusers' solver_type='heun')",
        needs_sigma=True,
    )
)
register(
    Solver(
        "dpmpp_3m", multistep.dpmpp_3m, _one_per_step, "DPM-Solver++(3M), exact exponential weights", needs_sigma=True
    )
)
register(
    Solver(
        "dpmpp_2m_pc",
        multistep.dpmpp_2m_pc,
        _one_per_step,
        "DPM-Solver++(2M) + UniC-style corrector (3rd order, no extra NFE)",
        needs_sigma=True,
    )
)
register(
    Solver(
        "dpmpp_3m_pc",
        multistep.dpmpp_3m_pc,
        _one_per_step,
        "DPM-Solver++(3M) + UniC-style corrector (4th order, no extra NFE)",
        needs_sigma=True,
    )
)


def _warmup_evals(extra: int, warm_steps: int) -> Callable[[int, bool], int]:
    """Evaluations of PLMS after `warm_steps` warm-up steps of `extra` more evaluations each (a
    warm-up step ending where the field is singular is a plain PLMS step)."""
    return lambda steps, singular_end: steps + extra * min(warm_steps, steps - 1 if singular_end else steps)


register(
    Solver(
        "plms",
        multistep.plms,
        _warmup_evals(1, 1),  # the Heun first step
        "PNDM's PLMS (diffusers' PNDMScheduler): a Heun first step, then Adams–Bashforth 2-4",
    )
)


register(
    Solver(
        "pndm",
        multistep.pndm,
        _warmup_evals(3, 3),  # three Runge-Kutta steps of four evaluations
        "PNDM (diffusers' PNDMScheduler default): three pseudo Runge-Kutta steps, then PLMS",
    )
)
register(Solver("ipndm", multistep.ipndm, _one_per_step, "improved PNDM (Adams–Bashforth, uniform coefficients)"))
register(Solver("adams", multistep.adams, _one_per_step, "variable-step Adams–Bashforth on any grid"))
register(
    Solver(
        "ipndm_v",
        multistep.ipndm_v,
        _one_per_step,
        "iPNDM with variable steps: Adams–Bashforth-4 weights for the grid's own spacing",
    )
)


def _final_corrector(options: dict) -> dict:
    """final_corrector=True (UniPC, SA-Solver): one more evaluation, at the last knot of a grid ending above σ = 0."""
    if options.get("final_corrector") is True:
        return {"evals": lambda steps, singular_end: steps + (0 if singular_end else 1)}
    return {}


def _sa_variant(options: dict) -> dict:
    """SA-Solver: ComfyUI's PECE form evaluates again at every corrected state (2·steps − 1), else as
    `_final_corrector`."""
    if options.get("pece") is True:
        return {"evals": lambda steps, singular_end: 2 * steps - 1}
    return _final_corrector(options)


register(
    Solver(
        "unipc",
        peers.unipc,
        _one_per_step,
        "UniPC (bh2) predictor-corrector, orders 1-3, no extra NFE",
        needs_sigma=True,
        variant=_final_corrector,
    )
)
register(
    Solver(
        "unipc_bh1",
        peers.unipc_bh1,
        _one_per_step,
        "UniPC with B(h) = h (bh1)",
        needs_sigma=True,
        variant=_final_corrector,
    )
)
register(Solver("deis", peers.deis, _one_per_step, "DEIS tAB in log ρ, orders 1-3 (diffusers' DEIS)", needs_sigma=True))
register(
    Solver(
        "dpm_2", peers.dpm_2, _heun_evals, "DPM-Solver-2 (k-diffusion's sample_dpm_2), 2 NFE a step", needs_sigma=True
    )
)
register(
    Solver(
        "dpmpp_2s",
        peers.dpmpp_2s,
        _heun_evals,
        "DPM-Solver++(2S); eta > 0: k-diffusion's ancestral form",
        needs_sigma=True,
        stochastic=True,
    )
)
register(
    Solver(
        "ddim",
        peers.ddim,
        _one_per_step,
        "DDIM: the first-order exponential step on any Gaussian path",
        needs_sigma=True,
    )
)
register(
    Solver(
        "ddim_inverse",
        peers.ddim_inverse,
        _one_per_step,
        "DDIM inversion as DDIMInverseScheduler runs it: each step's network call at the target knot's "
        "timestep (fs.invert only)",
        needs_sigma=True,
        inverts=True,
    )
)
register(
    Solver(
        "repaint",
        peers.repaint,
        peers.repaint_evals(),
        "RePaint inpainting (Lugmayr et al. 2022): DDIM with eta, the kept part noised afresh, and "
        "jump_n_sample resamplings of jump_length knots (needs init= and mask=)",
        needs_sigma=True,
        stochastic=True,
        inpaints=True,
        variant=lambda options: {
            "evals": peers.repaint_evals(options.get("jump_length", 10), options.get("jump_n_sample", 10))
        },
    )
)
register(
    Solver(
        "consistency",
        peers.consistency,
        _one_per_step,
        "multistep consistency sampling: x = α D + σ ε at each knot (sCM, few-step students)",
        needs_sigma=True,
        stochastic=True,
    )
)
register(
    Solver(
        "dpm_multistep",
        peers.dpm_multistep,
        _one_per_step,
        "multistep DPM-Solver on the noise prediction (orders 1-3; sde=True its SDE form)",
        needs_sigma=True,
        stochastic=True,
    )
)
register(
    Solver(
        "sa_solver",
        peers.sa_solver,
        _one_per_step,
        "SA-Solver: stochastic Adams predictor-corrector (Xue et al. 2023), per-sample noise",
        needs_sigma=True,
        stochastic=True,
        variant=_sa_variant,
    )
)
register(
    Solver(
        "tcd",
        peers.tcd,
        _one_per_step,
        "TCD's strategic stochastic sampling (gamma: 0 DDIM, 1 consistency), per-sample noise",
        needs_sigma=True,
        stochastic=True,
    )
)
register(
    Solver(
        "ddpm",
        peers.ddpm,
        _one_per_step,
        "DDPM's ancestral step with fixed or learned variance (Ho et al.; IDDPM), per-sample noise",
        needs_sigma=True,
        stochastic=True,
    )
)
register(
    Solver(
        "euler_ancestral",
        peers.euler_ancestral,
        _one_per_step,
        "Euler ancestral (k-diffusion), per-sample noise",
        needs_sigma=True,
        stochastic=True,
    )
)
register(
    Solver(
        "dpmpp_2m_sde",
        peers.dpmpp_2m_sde,
        _one_per_step,
        "DPM-Solver++(2M) SDE (k-diffusion, midpoint)",
        needs_sigma=True,
        stochastic=True,
    )
)


register(
    Solver(
        "pc",
        peers.pc,
        lambda steps, singular_end: 2 * steps,
        "Song et al.'s predictor-corrector: a Langevin corrector (snr), then reverse diffusion; 2 NFE a step",
        needs_sigma=True,
        stochastic=True,
    )
)


register(
    Solver(
        "dpm_adaptive",
        peers.dpm_adaptive,
        lambda steps, singular_end: 2,
        "adaptive DPM-Solver-12/23 with a PID step-size controller (k-diffusion's sample_dpm_adaptive)",
        needs_sigma=True,
        stochastic=True,
        adaptive=True,
    )
)


def _fast_evals(steps: int, singular_end: bool) -> int:
    return max(1, 3 * steps - 3)  # the most steps for a budget B is ⌊B/3⌋ + 1 (DPM-Solver-fast)


register(
    Solver(
        "dpm_fast",
        peers.dpm_fast,
        _fast_evals,
        "DPM-Solver-fast (Lu et al. 2022a; k-diffusion's sample_dpm_fast): singlestep orders 3, 2, 1 within nfe",
        needs_sigma=True,
        stochastic=True,
    )
)
register(
    Solver(
        "dpmpp_singlestep",
        peers.dpmpp_singlestep,
        _one_per_step,
        "singlestep DPM-Solver++ with stages on the grid's knots (diffusers' DPMSolverSinglestepScheduler)",
        needs_sigma=True,
    )
)
register(
    Solver(
        "euler_cfg_pp",
        peers.euler_cfg_pp,
        _one_per_step,
        "CFG++: DDIM that re-noises with the unconditional prediction (Chung et al. 2024; ComfyUI's)",
        needs_sigma=True,
        needs_guidance=True,
    )
)
register(
    Solver(
        "euler_ancestral_cfg_pp",
        peers.euler_ancestral_cfg_pp,
        _one_per_step,
        "Euler ancestral with CFG++ re-noising (ComfyUI's euler_ancestral_cfg_pp), per-sample noise",
        needs_sigma=True,
        needs_guidance=True,
        stochastic=True,
    )
)
register(
    Solver(
        "dpmpp_2m_cfg_pp",
        peers.dpmpp_2m_cfg_pp,
        _one_per_step,
        "DPM-Solver++(2M) with CFG++ re-noising (ComfyUI's dpmpp_2m_cfg_pp)",
        needs_sigma=True,
        needs_guidance=True,
    )
)
register(
    Solver(
        "seeds_2",
        peers.seeds_2,
        _heun_evals,
        "SEEDS-2, stochastic exponential two-stage steps (Gonzalez et al. 2023; ComfyUI's)",
        needs_sigma=True,
        stochastic=True,
    )
)
register(
    Solver(
        "seeds_3",
        peers.seeds_3,
        lambda steps, singular_end: 3 * steps - (2 if singular_end else 0),
        "SEEDS-3, stochastic exponential three-stage steps (Gonzalez et al. 2023; ComfyUI's)",
        needs_sigma=True,
        stochastic=True,
    )
)
register(
    Solver(
        "er_sde",
        peers.er_sde,
        _one_per_step,
        "ER-SDE-Solver-3, extended reverse-time SDE (Cui et al. 2023; ComfyUI's er_sde), 1 NFE a step",
        needs_sigma=True,
        stochastic=True,
    )
)
register(
    Solver(
        "res_multistep_ancestral",
        peers.res_multistep_ancestral,
        _one_per_step,
        "RES second-order multistep with ancestral noise (ComfyUI's res_multistep_ancestral), 1 NFE a step",
        needs_sigma=True,
        stochastic=True,
    )
)
register(
    Solver(
        "dpmpp_2s_ancestral_cfg_pp",
        peers.dpmpp_2s_ancestral_cfg_pp,
        _heun_evals,
        "DPM-Solver++(2S) ancestral with CFG++ (ComfyUI's dpmpp_2s_ancestral_cfg_pp), 2 NFE a step",
        needs_sigma=True,
        needs_guidance=True,
        stochastic=True,
    )
)
register(
    Solver(
        "gradient_estimation_cfg_pp",
        peers.gradient_estimation_cfg_pp,
        _one_per_step,
        "gradient estimation with CFG++ (ComfyUI's gradient_estimation_cfg_pp)",
        needs_sigma=True,
        needs_guidance=True,
    )
)
register(
    Solver(
        "dpm_2_ancestral",
        peers.dpm_2_ancestral,
        _heun_evals,
        "DPM-Solver-2 with ancestral noise (k-diffusion's sample_dpm_2_ancestral), 2 NFE a step",
        needs_sigma=True,
        stochastic=True,
    )
)
register(
    Solver(
        "dpmpp_sde",
        peers.dpmpp_sde,
        _heun_evals,
        "stochastic DPM-Solver++ (k-diffusion's sample_dpmpp_sde, Brownian noise), 2 NFE a step",
        needs_sigma=True,
        stochastic=True,
    )
)
register(
    Solver(
        "dpmpp_3m_sde",
        peers.dpmpp_3m_sde,
        _one_per_step,
        "DPM-Solver++(3M) SDE (k-diffusion)",
        needs_sigma=True,
        stochastic=True,
    )
)


# The measured best uncalibrated spacing on fields whose default is Karras ρ = 7 (benchmarks/low_nfe.py,
# 2-D and 64-D mixtures, NFE 4–10: log-linear in σ cuts the endpoint error of UniPC 2–10× and of
# DPM-Solver++(3M) and the corrected multistep solvers 1.5–9×; ipndm and deis are mixed, so they keep
# Karras). Flow fields have their own rule (sample._solver_default_grid).
# DPM-Solver-fast walks the λ-uniform grid by construction (Lu et al. 2022a, k-diffusion).
for _name in ("dpmpp_3m", "dpmpp_2m_pc", "dpmpp_3m_pc", "unipc", "unipc_bh1", "dpm_fast"):
    _REGISTRY[_name].default_grid = "loglinear"


def _measured(backend: str, method: str) -> Callable[[int, bool], int]:
    if backend == "torchdiffeq" and method in ("implicit_adams", "fixed_adams"):
        # functional iteration: a data-dependent count, at most an RK4 start plus 1 + max_iters (4) a step
        return lambda steps, singular_end: 4 + 5 * steps

    def evals(steps: int, singular_end: bool) -> int:
        a, b = backends.measured_evals(backend, method)
        return a + b * steps

    return evals


def _register_backends() -> None:
    try:
        methods = backends.torchdiffeq_methods()
    except ImportError:  # pragma: no cover - torchdiffeq is a dependency
        methods = {}
    for m, adaptive in methods.items():

        def fn(run, x, *, rtol=1e-5, atol=1e-5, options=None, _m=m):
            return backends.torchdiffeq_solve(run, x, _m, rtol=rtol, atol=atol, options=options)

        evals = (lambda steps, singular_end: 2) if adaptive else _measured("torchdiffeq", m)
        register(
            Solver(
                f"torchdiffeq:{m}",
                fn,
                evals,
                f"torchdiffeq {'adaptive' if adaptive else 'fixed-grid'} method {m!r}",
                adaptive=adaptive,
                options={"rtol": 1e-5, "atol": 1e-5, "options": None} if adaptive else {"options": None},
            )
        )
    try:
        sde_methods = backends.torchsde_methods()
    except ImportError:  # pragma: no cover
        sde_methods = []
    for m in sde_methods:

        def sfn(run, x, *, alpha=1.0, _m=m):
            stochastic._check_alpha(alpha)
            return backends.torchsde_solve(run, x, _m, alpha=alpha)

        register(
            Solver(
                f"torchsde:{m}",
                sfn,
                _measured("torchsde", m),
                f"torchsde method {m!r} on Eq. 21",
                stochastic=True,
                options={"alpha": 1.0},
            )
        )


# solvers whose steps hold for a grid run backwards (from the data towards the prior): their formulas
# take either sign of step (checked for their order against the closed-form flow map of a Gaussian)
REVERSIBLE = frozenset(
    {
        "euler",
        "heun",
        "ddim",
        "ddim_inverse",
        "dpm_2",
        "dpmpp_2m",
        "dpmpp_2m_heun",
        "dpmpp_2m_pc",
        "dpmpp_3m",
        "dpmpp_3m_pc",
        "dpmpp_singlestep",
        "unipc",
        "unipc_bh1",
        "deis",
        "adams",
        "ipndm",
        "ipndm_v",
        "plms",
    }
)
