"""Solver accuracy and speed, flowsolve beside k-diffusion, diffusers and torchdiffeq.

For the exact 2-D paper mixture and a 64-D mixture (10 modes, std 0.3), at NFE 8, 16, 32, 64:
RMSE of the endpoints against a reference solve (torchdiffeq dopri5, rtol = atol = 1e-10,
float64) from the same start, and wall time as a ratio to a bare hand-written Euler loop with
the same NFE (interleaved repeats, medians). RMSE = sqrt(mean over samples of ||x − x_ref||²).

    python benchmarks/solvers.py [--n 4096] [--repeats 5] [--out benchmarks/results/solvers.md]

Needs: pip install -e .[bench]  (k-diffusion is loaded without its training dependencies).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flowsolve as fs  # noqa: E402
from peers import k_diffusion_sampling  # noqa: E402

NFES = (8, 16, 32, 64)


def reference(den, z: torch.Tensor) -> torch.Tensor:
    """dopri5 at rtol = atol = 1e-10 in float64 from σ = 80 to 0, through flowsolve's torchdiffeq backend."""
    field = fs.fields.EDM(den, shape=tuple(z.shape[1:]))
    return fs.sample(field, "torchdiffeq:dopri5", x_init=z.double(), nfe=1_000_000, rtol=1e-10, atol=1e-10)


def bare_euler(den, z, sigmas):
    """The baseline: a hand-written Euler loop on the σ-ODE."""
    x, s = z, sigmas.tolist()
    n = len(z)
    for i in range(len(s) - 1):
        d = (x - den(x, torch.full((n,), s[i], dtype=x.dtype))) / s[i]
        x = x + (s[i + 1] - s[i]) * d
    return x


def methods(den, dim):
    """name -> (nfe budget -> callable(z) returning endpoints, nfe used)."""
    K = k_diffusion_sampling()
    field = fs.fields.EDM(den, shape=(dim,))

    class KModel:
        def __call__(self, x, sigma, **kw):
            return den(x, sigma)
    km = KModel()

    def kd(fn, per_step):
        def make(nfe):
            steps = nfe // per_step if per_step == 1 else (nfe + 1) // 2
            sig = K.get_sigmas_karras(steps, 0.002, 80.0)
            return lambda z: fn(km, z, sig, disable=True), (steps if per_step == 1 else 2 * steps - 1)
        return make

    def flow(solver, grid=None, sigma_min=None, **opt):
        def make(nfe):
            spec = fs.solvers.get(solver)
            steps = spec.steps_for(nfe, True)
            kw = {} if sigma_min is None else {"sigma_min": sigma_min}
            g = field.grid(steps, grid, **kw) if (grid or kw) else None
            return (lambda z: fs.sample(field, solver, nfe=nfe if g is None else None, grid=g, x_init=z, **opt)), \
                spec.evals(steps, True)
        return make

    def diffusers_edm_euler(nfe):
        from diffusers import EDMEulerScheduler
        sch = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)

        def run(z):
            sch.set_timesteps(nfe)
            x = z
            for t in sch.timesteps:
                sch.scale_model_input(x, t)
                sigma = sch.sigmas[sch.step_index]
                c_skip = 0.25 / (sigma ** 2 + 0.25)
                c_out = sigma * 0.5 / (sigma ** 2 + 0.25) ** 0.5
                F = (den(x, sigma.expand(len(x)).to(x.dtype)) - c_skip * x) / c_out
                x = sch.step(F, t, x).prev_sample
            return x
        return run, nfe

    def tde(method, per_step):
        def make(nfe):
            from torchdiffeq import odeint
            steps = nfe // per_step
            sig = fs.grids.karras(steps).float()

            def f(t, x):
                s = float(t)
                return torch.zeros_like(x) if s == 0 else (x - den(x, t.expand(len(x)))) / t
            n_used = steps * per_step - (1 if method == "rk4" else 0)  # rk4's last stage sits at σ = 0
            return (lambda z: odeint(f, z, sig, method=method)[-1]), n_used
        return make

    return {
        "flowsolve euler": flow("euler"),
        "flowsolve heun": flow("heun"),
        "flowsolve dpmpp_2m": flow("dpmpp_2m"),
        "flowsolve dpmpp_3m": flow("dpmpp_3m"),
        "flowsolve dpmpp_2m_pc": flow("dpmpp_2m_pc"),
        "flowsolve dpmpp_3m_pc": flow("dpmpp_3m_pc"),
        "flowsolve dpmpp_2m_pc (karras σ_min=0.08)": flow("dpmpp_2m_pc", "karras", 0.08),
        "flowsolve ipndm (loglinear σ_min=0.08)": flow("ipndm", "loglinear", 0.08),
        "flowsolve ipndm": flow("ipndm"),
        "flowsolve adams": flow("adams"),
        "k-diffusion euler": kd(K.sample_euler, 1),
        "k-diffusion heun": kd(K.sample_heun, 2),
        "k-diffusion dpmpp_2m": kd(K.sample_dpmpp_2m, 1),
        "k-diffusion lms": kd(K.sample_lms, 1),
        "diffusers EDMEulerScheduler": diffusers_edm_euler,
        "torchdiffeq euler": tde("euler", 1),
        "torchdiffeq rk4": tde("rk4", 4),
    }


def timed(fn, z):
    t0 = time.perf_counter()
    out = fn(z)
    return out, time.perf_counter() - t0


def bench(name: str, gmm, n: int, repeats: int, nfes=NFES):
    den = gmm.denoiser
    z = torch.randn(n, gmm.dim, generator=torch.Generator().manual_seed(0)) * 80.0
    t0 = time.perf_counter()
    ref = reference(den, z)
    print(f"[{name}] reference solve: {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    table = methods(den, gmm.dim)
    for nfe in nfes:
        sig = fs.grids.karras(nfe).float()
        for label, make in table.items():
            fn, used = make(nfe)
            fn(z)  # warm-up
            ratios, times = [], []
            for _ in range(repeats):
                _, tb = timed(lambda zz: bare_euler(den, zz, sig), z)
                out, tm = timed(fn, z)
                ratios.append(tm / tb)
                times.append(tm)
            rmse = float(((out.double() - ref) ** 2).sum(1).mean().sqrt())
            rows.append((name, nfe, label, used, rmse, statistics.median(ratios), statistics.median(times)))
            print(f"[{name}] nfe {nfe:3d} {label:36s} used {used:3d} rmse {rmse:9.4g} "
                  f"time/bare {statistics.median(ratios):5.2f}", flush=True)
    return rows


def to_markdown(rows, n, repeats) -> str:
    out = ["# Solver benchmark", "",
           f"Generated by `python benchmarks/solvers.py` (n = {n} particles, {repeats} interleaved repeats, "
           f"float32 solves, reference dopri5 at 1e-10 in float64; time is the median ratio to a bare Euler loop "
           f"with the same NFE on the same machine).", ""]
    for data in dict.fromkeys(r[0] for r in rows):
        out += [f"## {data}", "", "| NFE budget | method | NFE used | RMSE | time / bare Euler |", "|---:|---|---:|---:|---:|"]
        for r in rows:
            if r[0] == data:
                out.append(f"| {r[1]} | {r[2]} | {r[3]} | {r[4]:.4g} | {r[5]:.2f} |")
        out.append("")
        out.append("Best RMSE per NFE budget:")
        out.append("")
        for nfe in dict.fromkeys(r[1] for r in rows if r[0] == data):
            sub = [r for r in rows if r[0] == data and r[1] == nfe]
            ours = min((r for r in sub if r[2].startswith("flowsolve")), key=lambda r: r[4])
            peer = min((r for r in sub if not r[2].startswith("flowsolve")), key=lambda r: r[4])
            out.append(f"- NFE {nfe}: flowsolve {ours[2].split(' ', 1)[1]} {ours[4]:.4g} vs best peer {peer[2]} "
                       f"{peer[4]:.4g} (ratio {ours[4] / peer[4]:.3f})")
        out.append("")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--nfe", default=",".join(map(str, NFES)))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "solvers.md"))
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    nfes = tuple(int(v) for v in a.nfe.split(","))
    rows = bench("2-D paper mixture (5 modes, radius 5, std 0.5)", fs.data.GaussianMixture.paper(), a.n, a.repeats, nfes)
    rows += bench("64-D mixture (10 modes, means N(0, I), std 0.3)", fs.data.GaussianMixture.random(64, 10, 0.3, seed=0),
                  a.n, a.repeats, nfes)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(to_markdown(rows, a.n, a.repeats))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
