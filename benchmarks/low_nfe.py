"""The low-NFE frontier: flowsolve's solvers and grids beside the peers, same denoisers, same noise.

Workloads: the exact 2-D paper mixture, a 64-D mixture (10 modes, std 0.3), `pretrained/digits-edm`
and `pretrained/digits-flow`. For each NFE in 4, 5, 6, 8, 10 it measures the endpoint error (mean
Euclidean distance per sample) against a converged solve (Heun, 255 NFE) from the same starting
points, and for digits the FD against the 400 held-out digits (`pretrained/digits-features`).

Peers, run in this process:
- k-diffusion's samplers (euler, heun, dpm_2, lms, dpmpp_2m) on its Karras grid (ρ = 7);
- iPNDM-4 on Karras ρ = 7 (flowsolve's `ipndm`, equal to the reference iPNDM to round-off);
- diffusers' UniPC (bh2, order 3), DPM-Solver++(2M) and DEIS (order 3) schedulers with
  `use_karras_sigmas=True` on a 1000-step discrete schedule spanning the model's σ range (the
  denoiser wrapped as the ε-model those schedulers call); for the flow model, the same schedulers
  with `use_flow_sigmas=True` on the velocity.
flowsolve: ipndm, ipndm_v, unipc (order 3 and the default order 2), deis (order 3), dpmpp_3m, dpmpp_2m_pc on the field's
default grid, a log-linear grid, and the calibrated grid (`fs.grids.calibrate`, fitted on seed 0,
measured on seed 100, which the calibration never sees).

    python benchmarks/low_nfe.py [--workloads gmm2d,gmm64,digits-edm,digits-flow] [--seconds 30]

Writes benchmarks/results/low_nfe.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flowsolve as fs  # noqa: E402
from peers import k_diffusion_sampling  # noqa: E402
from flowsolve.sample import resolve_grid  # noqa: E402

NFES = (4, 5, 6, 8, 10)
# row label -> (solver, options); "unipc-2" is the library's default UniPC (bh2, order 2)
FLOWSOLVE = {"ipndm": ("ipndm", {}), "ipndm_v": ("ipndm_v", {}), "unipc": ("unipc", {"order": 3}),
             "unipc-2": ("unipc", {"order": 2}), "deis": ("deis", {"order": 3}), "dpmpp_3m": ("dpmpp_3m", {}),
             "dpmpp_2m_pc": ("dpmpp_2m_pc", {})}
CALIBRATED = ["ipndm", "unipc", "unipc-2", "deis"]
RESULTS = Path(__file__).resolve().parent / "results"


# -- workloads ---------------------------------------------------------------------------------------
class Workload:
    """A field, its denoiser D(x, σ) (VE) or velocity, its shape and σ range."""

    def __init__(self, name: str, field, den=None, velocity=None, sigma_min=0.002, sigma_max=80.0) -> None:
        self.name, self.field, self.den, self.velocity = name, field, den, velocity
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.shape = tuple(field.data_shape)
        self.flow = velocity is not None


def workloads(names):
    out = []
    for name in names:
        if name in ("gmm2d", "gmm64"):
            g = fs.data.GaussianMixture.paper() if name == "gmm2d" else fs.data.GaussianMixture.random(64, 10, 0.3, seed=0)
            out.append(Workload(name, fs.fields.EDM(g.denoiser, shape=(g.dim,)), den=g.denoiser))
        elif name == "digits-edm":
            m = fs.from_pretrained("pretrained/digits-edm")
            out.append(Workload(name, m.field(), den=m, sigma_min=m.sigma_min, sigma_max=m.sigma_max))
        elif name == "digits-flow":
            m = fs.from_pretrained("pretrained/digits-flow")
            out.append(Workload(name, m.field(), velocity=m.velocity))
        else:
            raise SystemExit(f"--workloads: unknown workload {name!r}")
    return out


# -- the converged reference ----------------------------------------------------------------------------
_REFS: dict = {}


def reference(w: Workload, x0: torch.Tensor, start: float) -> torch.Tensor:
    """Heun with 128 steps from the same start (VE σ = start, or flow t = start) to the data."""
    key = (w.name, round(start, 9), round(float(x0.double().sum()), 6))     # same start point, same reference
    if key not in _REFS:
        if w.flow:
            grid = w.field.grid(128, "karras", sigma_max=start / (1 - start) if start < 1 else 1e4)
        else:
            grid = fs.grids.karras(128, w.sigma_min, start)
        with torch.no_grad():
            _REFS[key] = fs.sample(w.field, "heun", grid=grid, x_init=x0)
    return _REFS[key]


# -- peers -------------------------------------------------------------------------------------------------
def k_diffusion_runs(w: Workload, z: torch.Tensor, nfe: int):
    """k-diffusion's samplers on its Karras grid with as many steps as the NFE allows."""
    if w.flow:
        return {}
    K = k_diffusion_sampling()

    def model(x, s, **kw):
        return w.den(x, s)
    runs = {}
    for name, fn, per in (("k-diffusion euler", K.sample_euler, 1), ("k-diffusion heun", K.sample_heun, 2),
                          ("k-diffusion dpm_2", K.sample_dpm_2, 2), ("k-diffusion lms", K.sample_lms, 1),
                          ("k-diffusion dpmpp_2m", K.sample_dpmpp_2m, 1)):
        steps = nfe if per == 1 else (nfe + 1) // 2
        sig = K.get_sigmas_karras(steps, w.sigma_min, w.sigma_max, rho=7.0).to(z.dtype)
        x0 = z * w.sigma_max
        with torch.no_grad():
            runs[name] = (fn(model, x0, sig, disable=True), x0, w.sigma_max)
    sig = fs.grids.karras(nfe, w.sigma_min, w.sigma_max, rho_grid=7.0)    # iPNDM-4 as its authors run it
    with torch.no_grad():
        runs["iPNDM-4 (Karras ρ=7)"] = (fs.sample(w.field, "ipndm", grid=sig, x_init=z * w.sigma_max),
                                        z * w.sigma_max, w.sigma_max)
    return runs


def _vp_betas(sigma_min: float, sigma_max: float, n: int = 1000) -> list[float]:
    """betas of a discrete VP schedule whose σ_t = √((1 − ᾱ)/ᾱ) runs log-uniformly over [σ_min, σ_max]."""
    sig = torch.logspace(math.log10(sigma_min), math.log10(sigma_max), n, dtype=torch.float64)
    abar = 1 / (1 + sig ** 2)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return (1 - abar / prev).tolist()


def diffusers_runs(w: Workload, z: torch.Tensor, nfe: int):
    from diffusers import DEISMultistepScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
    runs = {}
    for label, cls, kw in (("diffusers UniPC-3", UniPCMultistepScheduler, dict(solver_order=3)),
                           ("diffusers DPM-Solver++(2M)", DPMSolverMultistepScheduler, dict(solver_order=2)),
                           ("diffusers DEIS-3", DEISMultistepScheduler, dict(solver_order=3))):
        if w.flow:
            sched = cls(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0, **kw)
        else:
            sched = cls(num_train_timesteps=1000, trained_betas=_vp_betas(w.sigma_min, w.sigma_max),
                        use_karras_sigmas=True, **kw)
        sched.set_timesteps(nfe)
        sig = sched.sigmas.double()
        x = z.clone() * (1.0 if w.flow else float(sched.init_noise_sigma))
        with torch.no_grad():
            for k, t in enumerate(sched.timesteps):
                s = float(sig[k])
                if w.flow:
                    out = w.velocity(x, torch.full((len(x),), s, dtype=x.dtype))
                else:                                   # ε-model of the VP scheduler from the VE denoiser
                    xt = x * math.sqrt(1 + s * s)
                    out = (xt - w.den(xt, torch.full((len(x),), s, dtype=x.dtype))) / s
                x = sched.step(out, t, x).prev_sample
        start = float(sig[0])
        x0 = z * (1.0 if w.flow else math.sqrt(1 + start * start))
        end = float(sig[-1])
        if not w.flow and end > 0:                      # diffusers returns α x at a last σ_min > 0
            x = x * math.sqrt(1 + end * end)
        runs[label] = (x, x0, start)
    return runs


# -- flowsolve -----------------------------------------------------------------------------------------------
def flowsolve_runs(w: Workload, z: torch.Tensor, nfe: int, calibrated: dict):
    runs = {}
    for name, (solver, opts) in FLOWSOLVE.items():
        grids = {"default": None, "log-linear": "loglinear"}
        if (name, nfe) in calibrated:
            grids["calibrated"] = calibrated[(name, nfe)]
        for label, grid in grids.items():
            grid, _ = resolve_grid(w.field, fs.solvers.get(solver), nfe, grid)   # the grid fs.sample walks
            start = float(grid[0])
            x0 = w.field.from_normal(z, start)
            with torch.no_grad():
                x = fs.sample(w.field, solver, nfe=nfe, grid=grid, x_init=x0, **opts)
            runs[f"flowsolve {name} ({label})"] = (x, x0, start)
    return runs


def calibrate_all(w: Workload, seconds: float, nfes) -> dict:
    """Calibrated grids of the CALIBRATED solvers at each NFE, fitted on seed 0 within `seconds` each."""
    out = {}
    for name in CALIBRATED:
        solver, opts = FLOWSOLVE[name]
        for nfe in nfes:
            t0 = time.perf_counter()
            out[(name, nfe)] = fs.grids.calibrate(w.field, solver, nfe=nfe, n=128 if w.name.startswith("digits")
                                                  else 256, seed=0, seconds=seconds, **opts)
            print(f"  calibrated {w.name} {name} NFE {nfe}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def fd_digits(x: torch.Tensor) -> float:
    from flowsolve.metrics import frechet_distance
    feats = _features()
    return frechet_distance(x.float().clamp(-1, 1), fs.data.digits("test").x, feats)


_FEATS: list = []


def _features():
    if not _FEATS:
        _FEATS.append(fs.from_pretrained("pretrained/digits-features"))
    return _FEATS[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="gmm2d,gmm64,digits-edm,digits-flow")
    p.add_argument("--nfe", default=",".join(map(str, NFES)))
    p.add_argument("--n", type=int, default=1000, help="evaluation samples (fresh seed 100)")
    p.add_argument("--seconds", type=float, default=30.0, help="calibration budget per (solver, NFE)")
    p.add_argument("--calibrate", default=",".join(CALIBRATED), help="solvers whose grids are calibrated")
    p.add_argument("--out", default=str(RESULTS / "low_nfe"))
    args = p.parse_args()
    CALIBRATED[:] = [s for s in args.calibrate.split(",") if s]
    nfes = [int(v) for v in args.nfe.split(",")]
    table: dict = {}
    for w in workloads(args.workloads.split(",")):
        print(f"{w.name}: calibrating", flush=True)
        calibrated = calibrate_all(w, args.seconds, nfes)
        z = torch.randn(args.n, *w.shape, generator=torch.Generator().manual_seed(100))
        if not w.name.startswith("digits"):
            z = z.double()
        for nfe in nfes:
            runs = {**k_diffusion_runs(w, z, nfe), **diffusers_runs(w, z, nfe), **flowsolve_runs(w, z, nfe, calibrated)}
            for label, (x, x0, start) in runs.items():
                err = fs.calibrate.endpoint_error(x, reference(w, x0, start))
                row = table.setdefault(w.name, {}).setdefault(label, {})
                row[nfe] = {"error": err}
                if w.name.startswith("digits"):
                    row[nfe]["fd"] = fd_digits(x)
            print(f"  NFE {nfe}: done", flush=True)
    write(table, nfes, Path(args.out))


def _best(rows: dict, nfe: int, prefix: str, key: str = "error"):
    cands = [(v[nfe][key], k) for k, v in rows.items() if k.startswith(prefix) and nfe in v and key in v[nfe]]
    return min(cands) if cands else (math.nan, "-")


def write(table: dict, nfes, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Low-NFE frontier (benchmarks/low_nfe.py)", "",
             "Endpoint error: mean Euclidean distance per sample to a converged solve from the same start "
             "(fresh seed 100; calibration fitted on seed 0). Lower is better.", ""]
    for wname, rows in table.items():
        lines += [f"## {wname}", "", "| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                  "|---|" + "---:|" * len(nfes)]
        for label in sorted(rows):
            cells = []
            for n in nfes:
                v = rows[label].get(n)
                cells.append("" if v is None else f"{v['error']:.4g}" + (f" (FD {v['fd']:.1f})" if "fd" in v else ""))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "| NFE | best flowsolve | error | best peer | error | ratio |", "|---:|---|---:|---|---:|---:|"]
        for n in nfes:
            fe, fl = _best(rows, n, "flowsolve")
            peers = [_best(rows, n, p) for p in ("k-diffusion", "diffusers", "iPNDM")]
            pe = min([b for b in peers if not math.isnan(b[0])] or [(math.nan, "-")])
            ratio = fe / pe[0] if pe[0] and not math.isnan(pe[0]) else math.nan
            lines.append(f"| {n} | {fl} | {fe:.4g} | {pe[1]} | {pe[0]:.4g} | {ratio:.2f} |")
        lines.append("")
    (out.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    (out.with_suffix(".json")).write_text(json.dumps({w: {k: {str(n): v for n, v in r.items()} for k, r in rows.items()}
                                                     for w, rows in table.items()}, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(table), figsize=(4.5 * len(table), 4), squeeze=False)
        for ax, (wname, rows) in zip(axes[0], table.items()):
            for label, r in sorted(rows.items()):
                xs = [n for n in nfes if n in r]
                style = "-" if label.startswith("flowsolve") else "--"
                ax.semilogy(xs, [r[n]["error"] for n in xs], style, marker="o", ms=3, label=label, lw=1)
            ax.set_title(wname)
            ax.set_xlabel("NFE")
            ax.set_ylabel("endpoint error")
        axes[0][-1].legend(fontsize=5, loc="upper right")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:  # pragma: no cover
        pass
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
