"""Which grid: every σ spacing of `fs.grids` under the same solvers, at low NFE.

The endpoint error (mean Euclidean distance per sample, as in `benchmarks/low_nfe.py`) against a
converged solve from the same starting points (Heun, 128 steps), for each spacing in
`fs.grids.SIGMA_SPACINGS` with its default parameters (polyexponential left out: at ρ = 1 it is
loglinear) and the workload's σ range, under euler, dpmpp_2m, unipc (order 3) and ipndm, at NFE 5,
8, 10 and 16. Workloads: the exact 2-D and 64-D mixtures, `pretrained/digits-edm` and
`pretrained/digits-flow` (whose spacings are the same noise levels mapped to the flow's time).

    python benchmarks/spacings.py [--workloads gmm2d,gmm64,digits-edm,digits-flow] [--n 1000]

Writes benchmarks/results/spacings.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flowsolve as fs  # noqa: E402
from low_nfe import reference, workloads  # noqa: E402
from flowsolve.sample import resolve_grid  # noqa: E402

NFES = (5, 8, 10, 16)
SOLVERS = {"euler": {}, "dpmpp_2m": {}, "unipc": {"order": 3}, "ipndm": {}}
SPACINGS = ("karras", "loglinear", "vp", "beta", "kl_optimal")  # polyexponential: loglinear at its default ρ = 1


def run(w, n: int, nfes) -> dict:
    """{(solver, spacing): {nfe: endpoint error}} on one workload, starting points from seed 100."""
    z = torch.randn(n, *w.shape, generator=torch.Generator().manual_seed(100))
    if not w.name.startswith("digits"):
        z = z.double()
    out: dict = {}
    for solver, opts in SOLVERS.items():
        for spacing in SPACINGS:
            for nfe in nfes:
                steps = fs.solvers.get(solver).steps_for(nfe, not w.field.finite_at_end)
                kw = {} if w.flow else {"sigma_min": w.sigma_min, "sigma_max": w.sigma_max}
                grid = w.field.grid(steps, spacing, **kw)
                grid, _ = resolve_grid(w.field, fs.solvers.get(solver), nfe, grid)
                start = float(grid[0])
                x0 = w.field.from_normal(z, start)
                with torch.no_grad():
                    x = fs.sample(w.field, solver, nfe=nfe, grid=grid, x_init=x0, **opts)
                err = fs.calibrate.endpoint_error(x, reference(w, x0, start))
                out.setdefault((solver, spacing), {})[nfe] = err
    return out


def table(name: str, rows: dict, nfes) -> str:
    lines = [f"### {name}", "", "| solver | spacing | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
             "|---|---|" + "---:|" * len(nfes)]
    for solver in SOLVERS:
        best = {k: min(rows[(solver, s)][k] for s in SPACINGS) for k in nfes}
        for spacing in SPACINGS:
            cells = []
            for k in nfes:
                v = rows[(solver, spacing)][k]
                cells.append(f"**{v:.4g}**" if v == best[k] else f"{v:.4g}")
            lines.append(f"| {solver} | {spacing} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="gmm2d,gmm64,digits-edm,digits-flow")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "spacings.md"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    parts = []
    for w in workloads(a.workloads.split(",")):
        t0 = time.perf_counter()
        text = table(w.name, run(w, a.n, NFES), NFES)
        print(text, f"\n({time.perf_counter() - t0:.0f} s)\n", flush=True)
        parts.append(text)
    Path(a.out).write_text("# Grid spacings at low NFE (endpoint error; bold: the best spacing per solver and NFE)\n\n"
                           "`python benchmarks/spacings.py`\n\n" + "\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
