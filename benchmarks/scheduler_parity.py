"""Every diffusers scheduler configuration against flowsolve: a sweep of each scheduler's loop.

For random combinations of a scheduler's settings (timestep spacing, σ spacing, final σ type, order,
solver type, prediction type, β schedule, zero terminal SNR, flow shift, algorithm type; LCM's and TCD's original steps
and clipping; the ancestral and SDE schedulers too), the scheduler's own loop on a
tiny random UNet (float64 where the scheduler allows) against `fs.sample` with the solver of the
scheduler's name on the model's default grid, from the same start and, for stochastic schedulers, the
same per-sample noise. A configuration passes when the largest difference is below `--tol` of the
sample's scale (ten times it for flow-mode schedulers, whose σ's stay float32).

    python benchmarks/scheduler_parity.py [--per-scheduler 24] [--seed 1] [--tol 1e-5] [--img2img | --inpaint]

With `--img2img`, each configuration runs as diffusers' img2img pipelines run it (a random strength
in [0.2, 0.9] and 8–20 steps: `get_timesteps`, `set_begin_index`, the data noised by the scheduler's
`add_noise` or `scale_noise`) against `fs.sample(..., init=x0, strength=s)`, and the result goes to
benchmarks/results/scheduler_parity_img2img.md. With `--inpaint`, as diffusers' inpaint pipelines run it
with a UNet without mask channels (half the data kept; strength 1 half the time, from the prior's draw,
else as img2img; the kept part blended after every scheduler call) against `fs.sample(..., init=x0,
mask=m, strength=s)`, into benchmarks/results/scheduler_parity_inpaint.md.

Writes benchmarks/results/scheduler_parity.md: the count per scheduler and every configuration that
differs, with its relative difference. The documented differences are listed in
docs/guides/pretrained.md ("More known differences").
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import math
import random
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import diffusers  # noqa: E402

import flowsolve as fs  # noqa: E402
from flowsolve.noise import SampleNoise  # noqa: E402

# loops whose result is not the VP-scaled x at a last σ > 0: VE schedulers, and LCM (its last step returns x̂_0)
VE_LOOPS = ("CMStochasticIterativeScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "LMSDiscreteScheduler",
            "EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "LCMScheduler")


def tiny_unet(dtype: torch.dtype):
    from conftest import tiny_unet64
    return tiny_unet64().to(dtype)


def scheduler_loop(unet, sched, z: torch.Tensor, noisy: bool, img2img=None, mask=None) -> torch.Tensor:
    """The scheduler's loop; with `noisy`, its module's randn_tensor hands out flowsolve's stream (seed 5).
    TCD steps with η = 0.3. `img2img`: (x0, ε, strength), the img2img pipelines' loop instead; with
    `mask` too, the inpaint pipelines' (a UNet without mask channels: the kept part, mask 0, set to x0
    noised to the next timestep after every scheduler call, to x0 after the last; strength 1 starts
    from ε · init_noise_sigma)."""
    step_kw = {"eta": 0.3} if type(sched).__name__ == "TCDScheduler" else {}
    module = importlib.import_module(type(sched).__module__)
    src = SampleNoise(5, 0, len(z), tuple(z.shape[1:]), z.dtype, "cpu", stream=1)
    original = getattr(module, "randn_tensor", None)
    tree = getattr(module, "BrownianTreeNoiseSampler", None)
    if noisy:
        module.randn_tensor = lambda shape, **k: src()
        if tree is not None:  # DPMSolverSDEScheduler: the Brownian increments `dpmpp_sde` draws (tests' helper)
            from test_peer_solvers import BrownianIncrements

            module.BrownianTreeNoiseSampler = lambda *a, **k: BrownianIncrements(len(z), tuple(z.shape[1:]))
    try:
        timesteps = sched.timesteps
        if img2img is not None:  # diffusers' img2img: the schedule's last ⌊N·s⌋ steps from the data noised
            x0, eps, strength = img2img
            steps = sched.num_inference_steps
            t_start = steps - min(int(steps * strength), steps)
            timesteps = sched.timesteps[t_start * sched.order :]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(t_start * sched.order)
            noised = (lambda t: sched.scale_noise(x0, t, eps)) if hasattr(sched, "scale_noise") else (
                lambda t: sched.add_noise(x0, eps, t))
            x = noised(timesteps[:1])
            if mask is not None and strength == 1.0:
                x = eps * getattr(sched, "init_noise_sigma", 1.0)
        else:
            x = z * getattr(sched, "init_noise_sigma", 1.0)  # (flow-match schedulers start from z itself)
        with torch.no_grad():
            for i, t in enumerate(timesteps):
                inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
                x = sched.step(unet(inp, t).sample, t, x, **step_kw).prev_sample
                if mask is not None:
                    kept = noised(timesteps[i + 1:i + 2]) if i < len(timesteps) - 1 else x0
                    x = (1 - mask) * kept + mask * x
        return x
    finally:
        if noisy:
            module.randn_tensor = original
            if tree is not None:
                module.BrownianTreeNoiseSampler = tree


def discrete_configs(rng: random.Random, name: str, params) -> dict:
    kw: dict = {}
    for key, values in (("timestep_spacing", ["linspace", "leading", "trailing"]),
                        ("prediction_type", ["epsilon", "v_prediction"]),
                        ("beta_schedule", ["linear", "scaled_linear"]),
                        ("final_sigmas_type", [None, "zero", "sigma_min"])):
        v = rng.choice(values)
        if v is not None and key in params:
            kw[key] = v
    spacing = rng.choice([None, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
    if spacing and spacing in params:
        kw[spacing] = True
    if "rescale_betas_zero_snr" in params and rng.random() < 0.3:  # zero terminal SNR, with v-prediction
        kw.update(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    if "solver_order" in params and name != "DPMSolverSinglestepScheduler" and rng.random() < 0.5:
        kw["solver_order"] = rng.choice([1, 3])
    if name == "DPMSolverMultistepScheduler" and rng.random() < 0.3 and "solver_order" not in kw:
        kw["algorithm_type"] = "sde-dpmsolver++"  # the second-order SDE solver (its third order is documented apart)
    elif name == "DPMSolverMultistepScheduler" and rng.random() < 0.5:
        kw["solver_type"] = "heun"
    if name == "SASolverScheduler":
        kw["tau_func"] = lambda t: 0
    if name == "PNDMScheduler":
        kw["skip_prk_steps"] = rng.choice([False, True])
        kw["set_alpha_to_one"] = rng.choice([False, True])
    if name == "DDPMScheduler":
        kw["variance_type"] = rng.choice(["fixed_small", "fixed_small_log", "fixed_large"])
        kw["clip_sample"] = rng.choice([False, True])
    return kw


def flow_configs(rng: random.Random, name: str, params) -> dict:
    if name.startswith("FlowMatch"):
        kw: dict = {"shift": rng.choice([1.0, 3.0])}
        spacing = rng.choice([None, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
        if spacing and spacing in params:
            kw[spacing] = True
        return kw
    kw = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": rng.choice([1.0, 3.0])}
    if "final_sigmas_type" in params:
        kw["final_sigmas_type"] = rng.choice(["zero", "sigma_min"])
    if "solver_order" in params and rng.random() < 0.4:
        kw["solver_order"] = 3
    if name == "SASolverScheduler":
        kw["tau_func"] = lambda t: 0
    return kw


def solver_for(name: str, kw: dict) -> tuple[str, dict, bool]:
    """The solver the library names for this scheduler configuration (`fs.solvers.from_scheduler`), its
    options, and whether it draws noise. TCD steps with η = 0.3 (`scheduler_loop`)."""
    step_kw = {"eta": 0.3} if name == "TCDScheduler" else {}
    solver, opts = fs.solvers.from_scheduler(getattr(diffusers, name)(**kw), **step_kw)
    return solver, opts, fs.solvers.get(solver).configured(opts).stochastic


DISCRETE = ["EulerDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "LMSDiscreteScheduler",
            "DDIMScheduler", "PNDMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
            "DEISMultistepScheduler", "SASolverScheduler", "EulerAncestralDiscreteScheduler",
            "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler"]
FLOW = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler", "DEISMultistepScheduler", "SASolverScheduler"]


def run_one(unet, name: str, kw: dict, steps: int, flow: bool, tol: float, strength: float | None = None,
            inpaint: bool = False):
    cls = getattr(diffusers, name)
    solver, opts, noisy = solver_for(name, kw)
    dtype = torch.float32 if flow else torch.float64
    sched = cls(**kw)
    sched.set_timesteps(steps)
    if not flow:
        for key in ("sigmas", "alphas_cumprod"):
            if isinstance(getattr(sched, key, None), torch.Tensor):
                setattr(sched, key, getattr(sched, key).double())
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    start: dict = {"x_init": z}
    img2img = None
    if strength is not None:  # the data (z scaled down) noised with flowsolve's stream 0 of seed 5
        x0, eps = 0.5 * z, SampleNoise(5, 0, 2, (1, 8, 8), dtype, "cpu", stream=0)()
        img2img, start = (x0, eps, strength), {"init": x0, "strength": strength}
    mask = None
    if inpaint:  # the right half generated, the left half kept
        mask = torch.zeros(1, 1, 8, 8, dtype=dtype)
        mask[..., 4:] = 1.0
        start["mask"] = mask
    ref = scheduler_loop(unet, sched, z, noisy, img2img, mask)
    m = fs.models.from_diffusers(unet, cls(**kw))
    field = m.field()
    if flow:
        per = 2 if solver == "heun" else 1
        x = fs.sample(field, solver, nfe=per * steps - (per - 1), seed=5, **start, **opts)
        scale = 1.0
    else:
        grid = field.grid(steps, "schedule")
        if strength is None:
            start = {"x_init": z * m.prior_std_at(float(grid[0]))}
        x = fs.sample(field, solver, grid=grid, dtype=dtype, seed=5, **start, **opts)
        vp = getattr(m, "schedule", None) == "discrete" and name not in VE_LOOPS
        scale = 1.0 / math.sqrt(1.0 + float(grid[-1]) ** 2) if vp else 1.0
    if not torch.isfinite(ref).all():  # the scheduler's own loop fails (third-order DPM-Solver over a zero step)
        return math.nan, solver, opts
    if mask is not None:  # the kept part is x0 itself on both sides
        x = mask * x * scale + (1 - mask) * x
        scale = 1.0
    return (x * scale - ref).abs().max().item() / ref.abs().max().item(), solver, opts


def tolerance(tol: float, flow: bool) -> float:
    """Flow-mode schedulers keep their σ's in float32 (DEIS's flow mode differs from flowsolve by 5e-5
    in float32 and by 1e-13 in float64): ten times the tolerance there."""
    return 10 * tol if flow else tol


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-scheduler", type=int, default=24)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--img2img", action="store_true", help="run each configuration as the img2img pipelines do")
    ap.add_argument("--inpaint", action="store_true", help="run each configuration as the inpaint pipelines do")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/scheduler_parity[_img2img|_inpaint].md")
    a = ap.parse_args()
    results = Path(__file__).resolve().parent / "results"
    mode = "_inpaint" if a.inpaint else "_img2img" if a.img2img else ""
    a.out = a.out or str(results / f"scheduler_parity{mode}.md")
    a.img2img = a.img2img or a.inpaint  # inpainting walks the img2img cut too
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rng = random.Random(a.seed)
    rows, diffs = [], []
    extra = ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler", "LCMScheduler", "TCDScheduler",
             "CMStochasticIterativeScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler", "CogVideoXDDIMScheduler"]
    if a.img2img:  # the consistency schedulers' img2img spaces its timesteps within the strength (not swept)
        extra = [e for e in extra if e not in ("LCMScheduler", "TCDScheduler", "CMStochasticIterativeScheduler")]
    for flow, names in ((False, DISCRETE + extra), (True, FLOW)):
        unet = tiny_unet(torch.float32 if flow else torch.float64)
        for name in names:
            params = inspect.signature(getattr(diffusers, name).__init__).parameters
            seen, passed = set(), 0
            for _ in range(a.per_scheduler):
                if flow:
                    kw = flow_configs(rng, name, params)
                elif name in ("LCMScheduler", "TCDScheduler"):
                    kw = {k: rng.choice(v) for k, v in (("timestep_spacing", ["leading", "trailing", "linspace"]),
                                                         ("prediction_type", ["epsilon", "v_prediction"]),
                                                         ("original_inference_steps", [50, 25]),
                                                         ("clip_sample", [False, True]))}
                elif name == "CMStochasticIterativeScheduler":
                    kw = {k: rng.choice(v) for k, v in (("sigma_max", [80.0, 40.0]), ("rho", [7.0, 5.0]),
                                                         ("sigma_min", [0.002, 0.01]))}
                elif name.endswith("ParallelScheduler"):
                    kw = {k: rng.choice(v) for k, v in (("timestep_spacing", ["leading", "trailing"]),
                                                         ("prediction_type", ["epsilon", "v_prediction"]),
                                                         ("clip_sample", [False, True]))}
                elif name.startswith("EDM"):
                    kw = {k: rng.choice(v) for k, v in (("sigma_schedule", ["karras", "exponential"]),
                                                         ("prediction_type", ["epsilon", "v_prediction"]))}
                    if name == "EDMDPMSolverMultistepScheduler":
                        kw.update(solver_order=rng.choice([1, 2, 3]), solver_type=rng.choice(["midpoint", "heun"]),
                                  final_sigmas_type=rng.choice(["zero", "sigma_min"]))
                else:
                    kw = discrete_configs(rng, name, params)
                key = str(sorted((k, "λ" if callable(v) else str(v)) for k, v in kw.items()))  # (no addresses)
                if key in seen:
                    continue
                seen.add(key)
                steps = rng.choice([8, 12, 16, 20]) if a.img2img else rng.choice([5, 8, 10])
                strength = round(rng.uniform(0.2, 0.9), 2) if a.img2img else None
                if a.inpaint and rng.random() < 0.5:
                    strength = 1.0  # the inpaint pipelines' default: from the prior's draw
                try:
                    err, solver, opts = run_one(unet, name, kw, steps, flow, a.tol, strength, a.inpaint)
                except Exception as e:  # a configuration the scheduler refuses is not counted
                    if "flowsolve" in type(e).__module__:
                        diffs.append((name, kw, steps, "-", {}, f"{type(e).__name__}: {e}"[:120]))
                    else:
                        seen.discard(key)
                    continue
                if err <= tolerance(a.tol, flow):
                    passed += 1
                elif math.isnan(err):
                    diffs.append((name, {**kw, **({"strength": strength} if a.img2img else {})}, steps, solver, opts,
                                  "the scheduler's own loop gives NaN"))
                else:
                    diffs.append((name, {**kw, **({"strength": strength} if a.img2img else {})}, steps, solver, opts,
                                  f"{err:.2e}"))
            rows.append((name + (" (flow)" if flow else ""), len(seen), passed))
            print(f"{rows[-1][0]}: {passed}/{len(seen)}", flush=True)
    shown = lambda kw: ", ".join(f"{k}={v if not callable(v) else 'λ'}" for k, v in kw.items())  # noqa: E731
    command = f"python benchmarks/scheduler_parity.py --per-scheduler {a.per_scheduler} --seed {a.seed} --tol {a.tol:g}"
    command += " --inpaint" if a.inpaint else " --img2img" if a.img2img else ""
    title = ("inpainting: diffusers' pipelines' loops" if a.inpaint else "img2img: diffusers' pipelines' loops"
             if a.img2img else "diffusers schedulers")
    lines = [f"# {title} against flowsolve's solvers", "", f"`{command}`", "",
             "| scheduler | configurations | equal within tol |", "|---|---:|---:|"]
    lines += [f"| {n} | {k} | {p} |" for n, k, p in rows]
    total, ok = sum(r[1] for r in rows), sum(r[2] for r in rows)
    lines += [f"| **all** | **{total}** | **{ok}** |", "", "Configurations that differ:", "",
              "| scheduler | configuration | steps | solver | relative difference |", "|---|---|---:|---|---:|"]
    lines += [f"| {n} | {shown(kw)} | {s} | {sol} {shown(o)} | {e} |" for n, kw, s, sol, o, e in diffs]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"{ok}/{total} equal; written to {a.out}")


if __name__ == "__main__":
    main()
