"""The names users bring: k-diffusion's and ComfyUI's sampler names and diffusers' schedulers.

`resolve(solver, options)` turns what `fs.sample(solver=...)` was given into a registered solver and
its options:

* a flowsolve name (`fs.solvers.available()`) is itself;
* a k-diffusion sampler (`"sample_lms"`, or `"lms"` without the prefix) or a ComfyUI KSampler name
  (`"uni_pc_bh2"`, `"dpmpp_2m_sde_gpu"`, ...) is the flowsolve solver that runs the same method, with
  the peer's defaults (k-diffusion's `lms` is `adams` with `order=4`) and its keyword names
  (`sample_heun(s_churn=...)` is `edm(step="heun", S_churn=...)`); options given override the defaults;
* a diffusers scheduler (an instance, its class, or the class name) is `from_scheduler`: the solver
  whose loop on a model loaded with that scheduler (`fs.models.from_diffusers`) is the scheduler's own
  loop, with the options its configuration implies.

Each equality is tested against the peer's own code (`tests/test_solver_names.py`,
`tests/test_peer_solvers.py`); docs/guides/pretrained.md has the table.
"""

from __future__ import annotations

from typing import Any, Callable

from .._checks import nearest
from ..errors import ArgumentError, ArgumentTypeError

__all__ = ["PEER_NAMES", "from_scheduler", "resolve", "is_scheduler"]

# k-diffusion's keyword names for EDM's churn (sample_euler / sample_heun / sample_dpm_2) -> edm's
_CHURN = {"s_churn": "S_churn", "s_tmin": "S_min", "s_tmax": "S_max", "s_noise": "S_noise"}


def _churned(step: str) -> Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]:
    """k-diffusion's sample_<step>: plain `step` without churn options, `edm(step=...)` with them."""

    def translate(options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if not any(k in _CHURN for k in options):
            return step, options
        return "edm", {"step": step, **{_CHURN.get(k, k): v for k, v in options.items()}}

    return translate


# peer name -> (flowsolve solver, the peer's defaults) or a function of the options given
_Entry = tuple[str, dict[str, Any]] | Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]
_K_DIFFUSION: dict[str, _Entry] = {
    "euler": _churned("euler"),
    "heun": _churned("heun"),
    "dpm_2": _churned("dpm_2"),
    "euler_ancestral": ("euler_ancestral", {}),
    "dpm_2_ancestral": ("dpm_2_ancestral", {}),
    "lms": ("adams", {"order": 4}),
    "dpm_fast": ("dpm_fast", {}),
    "dpm_adaptive": ("dpm_adaptive", {}),
    "dpmpp_2s_ancestral": ("dpmpp_2s", {"eta": 1.0}),
    "dpmpp_sde": ("dpmpp_sde", {}),
    "dpmpp_2m": ("dpmpp_2m", {}),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}),
    "dpmpp_3m_sde": ("dpmpp_3m_sde", {}),
}
# ComfyUI's KSampler names that are not k-diffusion's or flowsolve's own (its "_gpu" samplers differ
# only in where their Brownian tree lives; "uni_pc" is UniPC-bh1 and "uni_pc_bh2" bh2, both order 3)
_COMFYUI: dict[str, _Entry] = {
    "dpmpp_sde_gpu": ("dpmpp_sde", {}),
    "dpmpp_2m_sde_gpu": ("dpmpp_2m_sde", {}),
    "dpmpp_3m_sde_gpu": ("dpmpp_3m_sde", {}),
    "dpmpp_2m_sde_heun": ("dpmpp_2m_sde", {"solver_type": "heun"}),
    "dpmpp_2m_sde_heun_gpu": ("dpmpp_2m_sde", {"solver_type": "heun"}),
    "uni_pc": ("unipc_bh1", {"order": 3}),
    "uni_pc_bh2": ("unipc", {"order": 3}),
    "lcm": ("consistency", {}),
    "res_multistep": ("dpmpp_2m_heun", {}),
    "exp_heun_2_x0": ("seeds_2", {"eta": 0.0, "r": 1.0, "solver_type": "phi_2"}),
    "exp_heun_2_x0_sde": ("seeds_2", {"r": 1.0, "solver_type": "phi_2"}),
}
PEER_NAMES: dict[str, _Entry] = {**_K_DIFFUSION, **{f"sample_{k}": v for k, v in _K_DIFFUSION.items()}, **_COMFYUI}


def is_scheduler(obj: Any) -> bool:
    """Whether `obj` looks like a diffusers scheduler (instance or class): it has a `config` (or
    `from_config`) and a `set_timesteps`."""
    return hasattr(obj, "set_timesteps") and (hasattr(obj, "config") or hasattr(obj, "from_config"))


def resolve(solver: Any, options: dict[str, Any], registered: Callable[[str], bool]) -> tuple[str, dict[str, Any]]:
    """The registered solver name and the options that `solver` (a flowsolve name, a peer's name or a
    diffusers scheduler) means; options given override those the name implies."""
    if isinstance(solver, str) and registered(solver):
        return solver, options
    if isinstance(solver, str) and solver in PEER_NAMES:
        entry = PEER_NAMES[solver]
        if callable(entry):
            return entry(dict(options))
        name, defaults = entry
        return name, {**defaults, **options}
    if isinstance(solver, str) and "Scheduler" in solver:
        try:
            import diffusers  # noqa: F401  (an optional dependency)
        except ImportError as e:  # pragma: no cover - diffusers is a dependency of the project
            raise ArgumentError(f"solver: {solver!r} names a diffusers scheduler; diffusers is not installed") from e
        cls = getattr(diffusers, solver, None)
        if cls is None:
            raise ArgumentError(f"solver: diffusers has no scheduler {solver!r}{nearest(solver, _SCHEDULERS)}")
        solver = cls
    if is_scheduler(solver):  # options that its `step` takes (DDIM's eta, ...) are read as the pipeline's
        cls = solver.__name__ if isinstance(solver, type) else type(solver).__name__
        step_keys = _SCHEDULERS[cls][1] if cls in _SCHEDULERS else ()
        name, implied = from_scheduler(solver, **{k: v for k, v in options.items() if k in step_keys})
        return name, {**implied, **{k: v for k, v in options.items() if k not in step_keys}}
    if not isinstance(solver, str):
        raise ArgumentTypeError(
            f"solver: expected a solver name (str), a diffusers scheduler or a flowsolve.solvers.Solver, "
            f"got {type(solver).__name__}"
        )
    return solver, options  # unknown: the registry's error lists the valid names


def _cfg(scheduler: Any) -> dict[str, Any]:
    """The scheduler's configuration: an instance's `config`, or a class's constructor defaults."""
    if isinstance(scheduler, type):
        import inspect

        return {
            k: p.default
            for k, p in inspect.signature(scheduler.__init__).parameters.items()  # type: ignore[misc]
            if p.default is not inspect.Parameter.empty
        }
    return dict(scheduler.config)


def _not_reproduced(cls: str, setting: str, why: str) -> ArgumentError:
    return ArgumentError(f"solver: {cls} with {setting} is not reproduced by a flowsolve solver ({why})")


def _check_step_kwargs(cls: str, step_kwargs: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for k in step_kwargs:
        if k not in allowed:
            valid = ", ".join(allowed) or "none"
            raise ArgumentTypeError(
                f"step_kwargs: {cls}.step has no option {k!r} that changes its loop{nearest(k, allowed)}; "
                f"those it has: {valid}"
            )


def _dpm_solver_multistep(cls: str, c: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """DPMSolverMultistepScheduler and EDMDPMSolverMultistepScheduler by algorithm type and order."""
    algorithm = c.get("algorithm_type", "dpmsolver++")
    order = int(c.get("solver_order", 2))
    solver_type = c.get("solver_type", "midpoint")
    lower = bool(c.get("lower_order_final", True))
    if c.get("euler_at_final", False) and c.get("final_sigmas_type", "zero") != "zero":
        raise _not_reproduced(
            cls,
            "euler_at_final=True ending at σ_min",
            "flowsolve lowers the last order only below 15 steps (lower_order_final)",
        )
    if c.get("variance_type") is not None:
        raise _not_reproduced(cls, f"variance_type={c['variance_type']!r}", "a learned variance is not read by it")
    if algorithm == "dpmsolver++":
        if order == 1:
            return "ddim", {}
        if order == 2:
            return ("dpmpp_2m_heun" if solver_type == "heun" else "dpmpp_2m"), {"lower_order_final": lower}
        return "dpmpp_3m", {"form": "lu", "lower_order_final": lower, "solver_type": solver_type}
    if algorithm == "sde-dpmsolver++":
        if order != 2:
            raise _not_reproduced(
                cls,
                f"algorithm_type='sde-dpmsolver++' and solver_order={order}",
                "dpmpp_2m_sde is its second order; dpmpp_3m_sde is k-diffusion's third order",
            )
        return "dpmpp_2m_sde", {"solver_type": solver_type, "lower_order_final": lower}
    if algorithm in ("dpmsolver", "sde-dpmsolver"):
        opts = {"order": order, "solver_type": solver_type, "sde": algorithm == "sde-dpmsolver"}
        return "dpm_multistep", {**opts, "lower_order_final": lower}
    raise _not_reproduced(
        cls, f"algorithm_type={algorithm!r}", "expected dpmsolver++, sde-dpmsolver++, dpmsolver or sde-dpmsolver"
    )


def from_scheduler(scheduler: Any, **step_kwargs: Any) -> tuple[str, dict[str, Any]]:
    """The flowsolve solver, and its options, whose loop is this diffusers scheduler's.

    scheduler: an instance (its `config` is read) or a scheduler class (its defaults).
    step_kwargs: the arguments the pipeline passes to `scheduler.step` that change the loop: DDIM's
        `eta` and `use_clipped_model_output`, TCD's `eta` (its γ, default 0.3), Euler's `s_churn`,
        `s_tmin`, `s_tmax`, `s_noise`, LMS's `order`.

    Run the result on a model loaded with the same scheduler (`fs.models.from_diffusers(net, scheduler)`),
    whose default grid is the scheduler's own timesteps: `name, opts = from_scheduler(s);
    fs.sample(model.field(), name, nfe=..., **opts)`, or pass the scheduler as `solver=` directly.
    A configuration that no flowsolve solver reproduces raises an error naming the setting.
    """
    cls = scheduler.__name__ if isinstance(scheduler, type) else type(scheduler).__name__
    if cls not in _SCHEDULERS:
        raise ArgumentError(
            f"solver: no flowsolve solver is registered for the diffusers scheduler {cls}{nearest(cls, _SCHEDULERS)}; "
            f"known ones: {', '.join(sorted(_SCHEDULERS))}"
        )
    rule, allowed = _SCHEDULERS[cls]
    _check_step_kwargs(cls, step_kwargs, allowed)
    return rule(cls, _cfg(scheduler), step_kwargs)


def _ddim(cls: str, c: dict[str, Any], kw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    eta = float(kw.get("eta", 0.0))
    if eta > 0:
        return "euler_ancestral", {"eta": eta}
    # η = 0: `ddim` keeps DDIM's step along the unclipped prediction's ε where the model clips x̂₀
    return ("euler" if kw.get("use_clipped_model_output") else "ddim"), {}


def _euler(cls: str, c: dict[str, Any], kw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if cls == "FlowMatchEulerDiscreteScheduler" and c.get("stochastic_sampling", False):
        return "consistency", {}
    if float(kw.get("s_churn", 0.0)) > 0:
        return _churned("euler")(dict(kw))
    return "euler", {}


def _fixed(name: str, **options: Any) -> Callable[[str, dict[str, Any], dict[str, Any]], tuple[str, dict[str, Any]]]:
    return lambda cls, c, kw: (name, dict(options))


def _singlestep(cls: str, c: dict[str, Any], kw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if c.get("algorithm_type", "dpmsolver++") != "dpmsolver++":
        raise _not_reproduced(cls, f"algorithm_type={c['algorithm_type']!r}", "dpmpp_singlestep is DPM-Solver++")
    return "dpmpp_singlestep", {"order": int(c.get("solver_order", 2)), "solver_type": c.get("solver_type", "midpoint")}


def _unipc(cls: str, c: dict[str, Any], kw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if c.get("solver_p") is not None:
        raise _not_reproduced(cls, "solver_p", "a second scheduler as its predictor")
    opts = {
        "order": int(c.get("solver_order", 2)),
        "lower_order_final": bool(c.get("lower_order_final", True)),
        "disable_corrector": tuple(c.get("disable_corrector") or ()),
        "predict_x0": bool(c.get("predict_x0", True)),
    }
    return ("unipc_bh1" if c.get("solver_type", "bh2") == "bh1" else "unipc"), opts


def _deis(cls: str, c: dict[str, Any], kw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "deis", {"order": int(c.get("solver_order", 2)), "lower_order_final": bool(c.get("lower_order_final", True))}


def _sa_solver(cls: str, c: dict[str, Any], kw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if c.get("algorithm_type", "data_prediction") != "data_prediction":
        raise _not_reproduced(cls, f"algorithm_type={c['algorithm_type']!r}", "sa_solver predicts data")
    return "sa_solver", {
        "predictor_order": int(c.get("predictor_order", 2)),
        "corrector_order": int(c.get("corrector_order", 2)),
        "lower_order_final": bool(c.get("lower_order_final", True)),
    }


def _rf_ancestral(cls: str, c: dict[str, Any], kw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "euler_ancestral", {"eta": float(c.get("eta", 1.0)), "s_noise": float(c.get("s_noise", 1.0))}


def _cosine_dpm(cls: str, c: dict[str, Any], kw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "dpmpp_2m_sde", {"solver_type": c.get("solver_type", "midpoint")}


def _score_sde_ve(cls: str, c: dict[str, Any], kw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "pc", {"snr": float(c.get("snr", 0.15)), "corrector_steps": int(c.get("correct_steps", 1))}


def _consistency_model(cls: str, c: dict[str, Any], kw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if float(c.get("s_noise", 1.0)) != 1.0:
        raise _not_reproduced(cls, f"s_noise={c['s_noise']}", "consistency re-noises with unit-variance noise")
    return "consistency", {"sigma_min": float(c.get("sigma_min", 0.002))}


_Rule = Callable[[str, dict[str, Any], dict[str, Any]], tuple[str, dict[str, Any]]]
_EULER_STEP = ("s_churn", "s_tmin", "s_tmax", "s_noise")
# scheduler class -> (its rule, the `step` keyword arguments that change its loop)
_SCHEDULERS: dict[str, tuple[_Rule, tuple[str, ...]]] = {
    "DDIMScheduler": (_ddim, ("eta", "use_clipped_model_output")),
    "DDIMParallelScheduler": (_ddim, ("eta", "use_clipped_model_output")),
    "CogVideoXDDIMScheduler": (_ddim, ("eta", "use_clipped_model_output")),
    "EulerDiscreteScheduler": (_euler, _EULER_STEP),
    "EDMEulerScheduler": (_euler, _EULER_STEP),
    "FlowMatchEulerDiscreteScheduler": (_euler, _EULER_STEP),
    "EulerAncestralDiscreteScheduler": (_fixed("euler_ancestral"), ()),
    "LTXEulerAncestralRFScheduler": (_rf_ancestral, ()),
    "HeunDiscreteScheduler": (_fixed("heun"), ()),
    "FlowMatchHeunDiscreteScheduler": (_fixed("heun"), ()),
    "KDPM2DiscreteScheduler": (_fixed("dpm_2"), ()),
    "KDPM2AncestralDiscreteScheduler": (_fixed("dpm_2_ancestral"), ()),
    "LMSDiscreteScheduler": (lambda cls, c, kw: ("adams", {"order": int(kw.get("order", 4))}), ("order",)),
    "PNDMScheduler": (lambda cls, c, kw: ("plms" if c.get("skip_prk_steps", False) else "pndm", {}), ()),
    "DPMSolverMultistepScheduler": (lambda cls, c, kw: _dpm_solver_multistep(cls, c), ()),
    "EDMDPMSolverMultistepScheduler": (lambda cls, c, kw: _dpm_solver_multistep(cls, c), ()),
    # inverse schedulers (from the data up): the solver `fs.invert` walks their σ's with
    "DPMSolverMultistepInverseScheduler": (lambda cls, c, kw: _dpm_solver_multistep(cls, c), ()),
    "DDIMInverseScheduler": (_fixed("ddim"), ()),
    "CogVideoXDPMScheduler": (_fixed("dpmpp_2m_sde"), ()),
    "CosineDPMSolverMultistepScheduler": (_cosine_dpm, ()),
    "DPMSolverSinglestepScheduler": (_singlestep, ()),
    "DPMSolverSDEScheduler": (_fixed("dpmpp_sde"), ()),
    "UniPCMultistepScheduler": (_unipc, ()),
    "DEISMultistepScheduler": (_deis, ()),
    "SASolverScheduler": (_sa_solver, ()),
    "DDPMScheduler": (_fixed("ddpm"), ()),
    "DDPMParallelScheduler": (_fixed("ddpm"), ()),
    "DDPMWuerstchenScheduler": (_fixed("ddpm"), ()),
    "UnCLIPScheduler": (_fixed("ddpm"), ()),
    "TCDScheduler": (lambda cls, c, kw: ("tcd", {"gamma": float(kw.get("eta", 0.3))}), ("eta",)),
    "LCMScheduler": (_fixed("consistency"), ()),
    "CMStochasticIterativeScheduler": (_consistency_model, ()),
    "SCMScheduler": (_fixed("consistency"), ()),
    "ScoreSdeVeScheduler": (_score_sde_ve, ()),
    "FlowMapEulerDiscreteScheduler": (_fixed("flow_map"), ()),
    "IPNDMScheduler": (_fixed("ipndm"), ()),
}
