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
  loop, with the options its configuration implies;
* an AUTOMATIC1111 (and Forge) sampler label, alone or with a schedule type after it ("DPM++ 2M",
  "DPM++ 2M Karras", "Euler a", "k_dpm_2"), is its k-diffusion sampler, and `webui_run` gives
  `fs.sample` the grid A1111 makes for it (`WebUIGrid`: the schedule type on the model's table, the
  next-to-last level dropped for DPM2, DPM2 a and DPM++ 3M SDE) and A1111's way of counting steps.

Each equality is tested against the peer's own code (`tests/test_solver_names.py`,
`tests/test_peer_solvers.py`); docs/guides/pretrained.md has the table.
"""

from __future__ import annotations

from typing import Any, Callable

from .._checks import nearest
from ..errors import ArgumentError, ArgumentTypeError

__all__ = [
    "PEER_NAMES",
    "WEBUI_NAMES",
    "WEBUI_SCHEDULES",
    "WebUIGrid",
    "from_scheduler",
    "img2img_steps",
    "is_scheduler",
    "resolve",
    "webui_grid",
    "webui_run",
]

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
    "lms": ("adams", {"order": 4, "schedule_ramp": False}),
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
    # ComfyUI's "sa_solver" is not diffusers' (flowsolve's "sa_solver"): its own orders, τ window and ramp
    "comfyui:sa_solver": ("sa_solver", {"form": "comfyui"}),
    "sa_solver_pece": ("sa_solver", {"form": "comfyui", "pece": True}),
}
PEER_NAMES: dict[str, _Entry] = {**_K_DIFFUSION, **{f"sample_{k}": v for k, v in _K_DIFFUSION.items()}, **_COMFYUI}

# AUTOMATIC1111's (and Forge's) sampler labels (its sd_samplers_kdiffusion, 1.9+): the k-diffusion sampler, the
# schedule type its "Automatic" picks (None: the model's own, k-diffusion's get_sigmas, "Uniform"), and
# whether it discards the next-to-last σ (it asks for steps + 1 levels and drops the second to last)
_WEBUI: dict[str, tuple[str, str | None, bool]] = {
    "DPM++ 2M": ("dpmpp_2m", "Karras", False),
    "DPM++ SDE": ("dpmpp_sde", "Karras", False),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", "Exponential", False),
    "DPM++ 2M SDE Heun": ("dpmpp_2m_sde_heun", "Exponential", False),
    "DPM++ 2S a": ("dpmpp_2s_ancestral", "Karras", False),
    "DPM++ 3M SDE": ("dpmpp_3m_sde", "Exponential", True),
    "Euler a": ("euler_ancestral", None, False),
    "Euler": ("euler", None, False),
    "LMS": ("lms", None, False),
    "Heun": ("heun", None, False),
    "DPM2": ("dpm_2", "Karras", True),
    "DPM2 a": ("dpm_2_ancestral", "Karras", True),
    "DPM fast": ("dpm_fast", None, False),
    "DPM adaptive": ("dpm_adaptive", None, False),
    "Restart": ("restart", "Karras", False),
}
_WEBUI_ALIASES = {
    "k_dpmpp_2m": "DPM++ 2M",
    "k_dpmpp_sde": "DPM++ SDE",
    "k_dpmpp_2m_sde": "DPM++ 2M SDE",
    "k_dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun",
    "k_dpmpp_2s_a": "DPM++ 2S a",
    "k_dpmpp_3m_sde": "DPM++ 3M SDE",
    "k_euler_a": "Euler a",
    "k_euler_ancestral": "Euler a",
    "k_euler": "Euler",
    "k_lms": "LMS",
    "k_heun": "Heun",
    "k_dpm_2": "DPM2",
    "k_dpm_2_a": "DPM2 a",
    "k_dpm_fast": "DPM fast",
    "k_dpm_ad": "DPM adaptive",
}
# its samplers that are not k-diffusion's: what to use instead
_WEBUI_OTHERS = {
    "DDIM": "solver='ddim' with grid='ddim_uniform' (A1111 ends at the first timestep's level, not at σ = 0)",
    "DDIM CFG++": "solver='ddim' with guidance (CFG++ renoises with the unguided prediction)",
    "PLMS": "solver='plms' with grid='ddim_uniform'",
    "UniPC": "solver='unipc_bh1' with order=3 (A1111 steps on its own time-uniform grid)",
    "LCM": "solver='consistency' (A1111's LCM reads a 50-level table of its own)",
}
_WEBUI_OWN_RANGE = ("DPM fast", "DPM adaptive")
_SIGMA_RANGE = "σ range"  # their grid: from the table's σ_max to its σ_min
# its schedule types (sd_schedulers): label -> flowsolve spacing ("Uniform" is k-diffusion's get_sigmas of the
# model's table, ComfyUI's "normal"; A1111's KL Optimal ends at σ_min, without a last step to 0)
WEBUI_SCHEDULES: dict[str, str] = {
    "Uniform": "normal",
    "Karras": "karras",
    "Exponential": "loglinear",
    "Polyexponential": "polyexponential",
    "SGM Uniform": "sgm_uniform",
    "SGMUniform": "sgm_uniform",
    "KL Optimal": "kl_optimal",
    "Simple": "simple",
    "Normal": "normal",
    "DDIM": "ddim_uniform",
    "Beta": "beta",
}
WEBUI_NAMES = frozenset(
    [*_WEBUI, *_WEBUI_ALIASES, *(f"{s} {t}" for s in _WEBUI for t in [*WEBUI_SCHEDULES, "Automatic"])]
)


def _webui_split(name: str) -> tuple[str, str] | None:
    """An AUTOMATIC1111 sampler label, with a schedule type after it or not ("DPM++ 2M Karras"), as
    (sampler, schedule type); None when `name` is not one."""
    name = _WEBUI_ALIASES.get(name, name)
    if name in _WEBUI:
        return name, "Automatic"
    for label in sorted([*WEBUI_SCHEDULES, "Automatic"], key=len, reverse=True):
        if name.endswith(" " + label) and name[: -len(label) - 1] in _WEBUI:
            return name[: -len(label) - 1], label
    return None


class WebUIGrid:
    """AUTOMATIC1111's grid for `steps` steps: the schedule type's levels on the field's noise range
    (σ_min, σ_max of the model's table), with the next-to-last level dropped where the sampler does so
    (it asks for steps + 1 levels). A grid rule: `fs.sample` calls it as rule(field, steps)."""

    def __init__(self, schedule: str, discard_penultimate: bool = False) -> None:
        if schedule not in WEBUI_SCHEDULES and schedule != _SIGMA_RANGE:
            raise ArgumentError(
                f"grid: expected an AUTOMATIC1111 schedule type ({', '.join(map(repr, WEBUI_SCHEDULES))}), "
                f"got {schedule!r}{nearest(schedule, WEBUI_SCHEDULES)}"
            )
        self.schedule, self.discard_penultimate = schedule, discard_penultimate

    def __call__(self, field: Any, steps: int):
        import torch

        if self.schedule == _SIGMA_RANGE:  # DPM fast / adaptive: log-linear from σ_max to σ_min, no σ = 0
            return field.grid(steps, "loglinear", final_zero=False)
        n = steps + 1 if self.discard_penultimate else steps
        spacing = WEBUI_SCHEDULES[self.schedule]
        # A1111's KL Optimal is n + 1 levels from σ_max to σ_min, without the final σ = 0
        g = field.grid(n, spacing, final_zero=False) if spacing == "kl_optimal" else field.grid(n, spacing)
        return torch.cat([g[:-2], g[-1:]]) if self.discard_penultimate else g

    def __repr__(self) -> str:
        return f"WebUIGrid({self.schedule!r}{', discard_penultimate=True' if self.discard_penultimate else ''})"


def webui_grid(solver: Any, grid: Any) -> Any:
    """The grid an AUTOMATIC1111 sampler label implies: with no `grid`, its schedule type ("DPM++ 2M
    Karras", or the one "Automatic" picks); `grid` given as a schedule type ("Karras") is that one, with
    the sampler's discarded next-to-last level. Any other grid is returned as given."""
    split = _webui_split(solver) if isinstance(solver, str) else None
    if isinstance(grid, str) and grid in WEBUI_SCHEDULES:
        return WebUIGrid(grid, split is not None and _WEBUI[split[0]][2])
    if grid is not None or split is None:
        return grid
    sampler, schedule = split
    _, automatic, discard = _WEBUI[sampler]
    if sampler in _WEBUI_OWN_RANGE:  # k-diffusion's n steps between the table's σ_min and σ_max, no schedule
        return WebUIGrid(_SIGMA_RANGE)
    return WebUIGrid((automatic or "Uniform") if schedule == "Automatic" else schedule, discard)


def img2img_steps(solver: Any, steps: int, strength: float, rule: str = "walked") -> int:
    """The steps image-to-image walks of a grid of `steps`, as diffusers' `get_timesteps` counts them:
    ⌊N·strength⌋ (`rule` "walked": SD's pipelines), or all but the int(N − min(N·strength, N)) it
    skips ("skipped": SD3's, Flux's, Qwen-Image's; one more where N·strength is not whole), in the
    pipelines' own float arithmetic; for an AUTOMATIC1111 label, ⌊min(strength, 0.999)·N⌋ + 1 as its
    img2img does (it walks sigmas[N − t_enc − 1:], t_enc = ⌊min(strength, 0.999)·N⌋)."""
    if isinstance(solver, str) and _webui_split(solver) is not None:
        return min(int(min(strength, 0.999) * steps) + 1, steps)
    if rule == "skipped":
        return steps - int(max(steps - min(steps * strength, steps), 0))
    return min(int(steps * strength), steps)


def default_inpaint(solver: Any) -> str:
    """How inpainting keeps the data (`fs.sample(inpaint=)`) when not given: AUTOMATIC1111's way for its
    labels (the data prediction blended), diffusers' inpaint pipeline's otherwise (the state blended)."""
    return "a1111" if isinstance(solver, str) and _webui_split(solver) is not None else "diffusers"


def webui_run(
    solver: Any, grid: Any, steps: int | None, nfe: int | None, options: dict[str, Any]
) -> tuple[Any, int | None, int | None, dict[str, Any]]:
    """(grid, steps, nfe, options) as an AUTOMATIC1111 label reads `fs.sample`'s: its grid
    (`webui_grid`); its step count is k-diffusion's `n` for "DPM fast" (evaluations, not steps) and is
    not read by "DPM adaptive", which chooses its own; "Restart" with N steps spends them as A1111's
    restart_sampler does: from 20 steps on, 9 restart steps once (from 36, N // 4 steps twice) from
    ρ = 2 to 0.1 and the rest on a Karras grid of the table's range, whatever the schedule type;
    below 20, no restart. Anything else is returned as given."""
    grid = webui_grid(solver, grid)
    split = _webui_split(solver) if isinstance(solver, str) else None
    if split is None or steps is None:
        return grid, steps, nfe, options
    if split[0] in _WEBUI_OWN_RANGE:
        return grid, None, (steps if split[0] == "DPM fast" else nfe), options
    if split[0] == "Restart" and "restarts" not in options:
        k, times = (steps // 4, 2) if steps >= 36 else (9, 1) if steps >= 20 else (0, 0)
        restarts = ((0.1, 2.0, k, times),) if times else ()
        if times and isinstance(grid, WebUIGrid):  # A1111 re-spaces its grid as Karras
            grid = WebUIGrid("Karras")
        return grid, steps - k * times, nfe, {**options, "restarts": restarts}
    return grid, steps, nfe, options


def is_scheduler(obj: Any) -> bool:
    """Whether `obj` looks like a diffusers scheduler (instance or class): it has a `config` (or
    `from_config`) and a `set_timesteps`."""
    return hasattr(obj, "set_timesteps") and (hasattr(obj, "config") or hasattr(obj, "from_config"))


def resolve(solver: Any, options: dict[str, Any], registered: Callable[[str], bool]) -> tuple[str, dict[str, Any]]:
    """The registered solver name and the options that `solver` (a flowsolve name, a peer's name or a
    diffusers scheduler) means; options given override those the name implies."""
    if isinstance(solver, str) and registered(solver):
        return solver, options
    split = _webui_split(solver) if isinstance(solver, str) else None
    if split is not None:  # an AUTOMATIC1111 label: its k-diffusion sampler (its grid: `webui_grid`)
        solver = _WEBUI[split[0]][0]
    if isinstance(solver, str) and solver in _WEBUI_OTHERS:
        raise ArgumentError(
            f"solver: AUTOMATIC1111's {solver!r} is not one of its k-diffusion samplers and is not reproduced "
            f"step for step; the nearest: {_WEBUI_OTHERS[solver]}"
        )
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


def _flow_lcm(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """FlowMatchLCMScheduler: x̂_0 = x − σ v, then (1 − σ') x̂_0 + σ' z, the consistency step on the flow's
    path; its scale-wise regime changes the resolution between steps, which a solver cannot."""
    if config.get("scale_factors"):
        raise ArgumentError(
            "scheduler: FlowMatchLCMScheduler with scale_factors upsamples x̂_0 to another size at every step "
            "(scale-wise generation); flowsolve's solvers keep the data's shape"
        )
    return "consistency", {}


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
    "MiniMaxH3Scheduler": (_fixed("euler"), ()),
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
    "DDIMInverseScheduler": (_fixed("ddim_inverse"), ()),
    "CogVideoXDPMScheduler": (_fixed("dpmpp_2m_sde"), ()),
    "CosineDPMSolverMultistepScheduler": (_cosine_dpm, ()),
    "DPMSolverSinglestepScheduler": (_singlestep, ()),
    "DPMSolverSDEScheduler": (_fixed("dpmpp_sde"), ()),
    "UniPCMultistepScheduler": (_unipc, ()),
    "DEISMultistepScheduler": (_deis, ()),
    "SASolverScheduler": (_sa_solver, ()),
    "DDPMScheduler": (_fixed("ddpm"), ()),
    # RePaint's jumps are arguments of its set_timesteps (the pipeline's call), given as step keywords
    "RePaintScheduler": (
        lambda cls, c, kw: (
            "repaint",
            {"eta": float(c.get("eta", 0.0)), **{k: int(kw[k]) for k in ("jump_length", "jump_n_sample") if k in kw}},
        ),
        ("jump_length", "jump_n_sample"),
    ),
    "DDPMParallelScheduler": (_fixed("ddpm"), ()),
    "DDPMWuerstchenScheduler": (_fixed("ddpm"), ()),
    "UnCLIPScheduler": (_fixed("ddpm"), ()),
    "TCDScheduler": (lambda cls, c, kw: ("tcd", {"gamma": float(kw.get("eta", 0.3))}), ("eta",)),
    "LCMScheduler": (_fixed("consistency"), ()),
    "FlowMatchLCMScheduler": (lambda cls, c, kw: _flow_lcm(c), ()),
    "CMStochasticIterativeScheduler": (_consistency_model, ()),
    "SCMScheduler": (_fixed("consistency"), ()),
    "ScoreSdeVeScheduler": (_score_sde_ve, ()),
    "FlowMapEulerDiscreteScheduler": (_fixed("flow_map"), ()),
    "IPNDMScheduler": (_fixed("ipndm"), ()),
}
