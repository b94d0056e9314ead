"""Which stochastic sampler, how many NFE: flowsolve's stochastic samplers beside k-diffusion's own.

On the exact 2-D paper mixture and a 64-D mixture (10 modes, std 0.3), at NFE 8, 12, 16, 32: the
energy distance (unbiased) between n samples and n exact ones, mean over seeds, with the floor
(two exact samples of the same sizes). Stochastic samplers are judged by the distribution they
reach, not by endpoints, so every row is a distance to the data. Karras grid σ ∈ [0.002, 80] for
every sampler, the last step to σ = 0; k-diffusion's samplers run with their own noise (Brownian
tree for the SDE solvers), flowsolve's with its per-sample noise.

    python benchmarks/stochastic.py [--n 4000] [--seeds 3] [--out benchmarks/results/stochastic.md]

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

NFES = (8, 12, 16, 32)
# flowsolve name -> (options, evaluations per step); one per step unless said
FLOWSOLVE = {
    "euler_ancestral": ({}, 1),
    "dpmpp_2m_sde": ({}, 1),
    "dpmpp_3m_sde": ({}, 1),
    "res_multistep_ancestral": ({}, 1),
    "er_sde": ({}, 1),
    "sa_solver": ({}, 1),
    "sa_solver (orders 3 / 4, the authors' advice)": ({"predictor_order": 3, "corrector_order": 4}, 1),
    "edm (Euler step, S_churn 10)": ({"step": "euler", "S_churn": 10.0}, 1),
    "seeds_2": ({}, 2),
    "seeds_3": ({}, 3),
    "dpmpp_sde": ({}, 2),
    "sde (Eq. 21, alpha 1)": ({"alpha": 1.0}, 1),
}
KDIFF = {  # k-diffusion row -> (function, evaluations per step, options)
    "euler_ancestral": ("sample_euler_ancestral", 1, {}),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", 1, {}),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", 1, {}),
    "dpmpp_sde": ("sample_dpmpp_sde", 2, {}),
    "euler (s_churn 10)": ("sample_euler", 1, {"s_churn": 10.0}),
}


def steps_for(nfe: int, per_step: int) -> int:
    """Steps whose evaluations fit the budget, the last step to σ = 0 costing one."""
    return max(1, (nfe - 1) // per_step + 1) if per_step > 1 else nfe


def run(gmm, n: int, seeds: int, nfes) -> list[dict]:
    K = k_diffusion_sampling()
    field = fs.fields.EDM(gmm.denoiser)
    dim = gmm.means.shape[1]
    rows = []

    def truth(seed: int) -> torch.Tensor:
        return gmm.sample(n, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)

    floor = [
        fs.metrics.energy_distance(
            truth(s), gmm.sample(n, generator=torch.Generator().manual_seed(2000 + s), dtype=torch.float64)
        )
        for s in range(seeds)
    ]
    rows.append({"sampler": "exact samples (floor)", "dim": dim, "nfe": 0, "ed": floor, "s": 0.0})
    for nfe in nfes:
        for name, (opts, per) in FLOWSOLVE.items():
            solver = name.split(" ")[0]
            steps = steps_for(nfe, per)
            grid = fs.grids.karras(steps, 0.002, 80.0).double()
            eds, t0 = [], time.perf_counter()
            for s in range(seeds):
                x = fs.sample(field, solver, grid=grid, n=n, seed=s, dtype=torch.float64, **opts)
                eds.append(fs.metrics.energy_distance(x, truth(s)))
            rows.append({"sampler": f"flowsolve {name}", "dim": dim, "nfe": nfe, "ed": eds,
                         "s": (time.perf_counter() - t0) / seeds})
        for label, (fn, per, kw) in KDIFF.items():
            steps = steps_for(nfe, per)
            sig = K.get_sigmas_karras(steps, 0.002, 80.0).double()
            eds, t0 = [], time.perf_counter()
            for s in range(seeds):
                torch.manual_seed(s)
                z = torch.randn(n, dim, dtype=torch.float64) * 80.0
                x = getattr(K, fn)(lambda v, sg, **_: gmm.denoiser(v, sg), z, sig, disable=True, **kw)
                eds.append(fs.metrics.energy_distance(x, truth(s)))
            rows.append({"sampler": f"k-diffusion {label}", "dim": dim, "nfe": nfe, "ed": eds,
                         "s": (time.perf_counter() - t0) / seeds})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| data | NFE | sampler | energy distance (mean ± std over seeds) | s per run |", "|---|---:|---|---:|---:|"]
    for r in rows:
        ed = r["ed"]
        sd = statistics.stdev(ed) if len(ed) > 1 else 0.0
        out.append(f"| {r['dim']}-D | {r['nfe'] or '–'} | {r['sampler']} | {statistics.mean(ed):.4f} ± {sd:.4f} | "
                   f"{r['s']:.2f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--nfe", type=int, nargs="*", default=list(NFES))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    parts = []
    for gmm in (fs.data.GaussianMixture.paper(), fs.data.GaussianMixture.random(64, 10, 0.3, seed=0)):
        text = table(run(gmm, a.n, a.seeds, a.nfe))
        print(text, flush=True)
        parts.append(text)
    if a.out:
        Path(a.out).write_text("# Stochastic samplers on the exact mixtures\n\n`python benchmarks/stochastic.py`\n\n"
                               + "\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
