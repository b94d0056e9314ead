"""Restart sampling against the probability-flow ODE and EDM's churn, at equal NFE, on the learned
digits models (where the paper's argument applies: the noise of a restart contracts the errors the
ODE accumulated, including the network's own) and on the exact 64-D mixture (where there is no
network error to contract).

Digits: FD on the shipped digits features against the 400 held-out digits and pixel FD (a judge the
project did not train), n samples per seed, mean ± std over seeds. Mixture: energy distance to exact
samples (unbiased; its floor is two exact samples). Every sampler walks its default grid (Karras for
EDM's σ, the flow's own for digits-flow) at the NFE given; `restart` spends 18 of them on its default
interval (ρ 2 → 0.1, 9 Heun steps, once: AUTOMATIC1111's), the rest on the ODE.

    python benchmarks/restart.py [--n 2000] [--seeds 3] [--nfe 39 59 99] [--out benchmarks/results/restart.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import flowsolve as fs
from flowsolve.evaluate import digits_quality

SAMPLERS = {  # label -> (solver, options)
    "heun (PF-ODE)": ("heun", {}),
    "edm (Heun, S_churn 10)": ("edm", {"S_churn": 10.0}),
    "edm (Heun, S_churn 40, S_min 0.05, S_max 50, S_noise 1.003: EDM's ImageNet)": (
        "edm", {"S_churn": 40.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}),
    "restart (ρ 2 → 0.1, 9 steps, once)": ("restart", {}),
    "restart (ρ 2 → 0.1, 4 steps, twice)": ("restart", {"restarts": ((0.1, 2.0, 4, 2),)}),
}


def digits_rows(folder: str, n: int, seeds: int, nfes, features) -> list[str]:
    model = fs.from_pretrained(folder)
    field = model.field()
    rows = []
    for nfe in nfes:
        for label, (solver, opts) in SAMPLERS.items():
            fd, px, used, t0 = [], [], 0, time.perf_counter()
            for s in range(seeds):
                x, info = fs.sample(field, solver, nfe=nfe, n=n, seed=s, return_info=True, **opts)
                rep = digits_quality(x, features, seed=s)
                fd.append(rep.fd)
                px.append(rep.pixel_fd)
                used = info.nfe
            sec = (time.perf_counter() - t0) / seeds
            rows.append(f"| {Path(folder).name} | {nfe} ({used}) | {label} | {_ms(fd, 1)} | {_ms(px, 3)} | {sec:.1f} |")
            print(rows[-1], flush=True)
    return rows


def mixture_rows(n: int, seeds: int, nfes) -> list[str]:
    gmm = fs.data.GaussianMixture.random(64, 10, 0.3, seed=0)
    field = fs.fields.EDM(gmm.denoiser)
    truth = [gmm.sample(n, generator=torch.Generator().manual_seed(1000 + s), dtype=torch.float64) for s in range(seeds)]
    floor = [fs.metrics.energy_distance(gmm.sample(n, generator=torch.Generator().manual_seed(2000 + s),
                                                   dtype=torch.float64), truth[s]) for s in range(seeds)]
    rows = [f"| 64-D mixture | – | exact samples (floor) | {_ms(floor, 4)} | | |"]
    for nfe in nfes:
        for label, (solver, opts) in SAMPLERS.items():
            eds, t0 = [], time.perf_counter()
            for s in range(seeds):
                x = fs.sample(field, solver, nfe=nfe, n=n, seed=s, dtype=torch.float64, **opts)
                eds.append(fs.metrics.energy_distance(x, truth[s]))
            rows.append(f"| 64-D mixture | {nfe} | {label} | {_ms(eds, 4)} | | {(time.perf_counter() - t0) / seeds:.1f} |")
            print(rows[-1], flush=True)
    return rows


def _ms(v: list[float], digits: int) -> str:
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.{digits}f} ± {sd:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--nfe", type=int, nargs="*", default=[39, 59, 99])
    ap.add_argument("--models", nargs="*", default=["pretrained/digits-edm", "pretrained/digits-flow"])
    ap.add_argument("--samplers", nargs="*", default=None, help="labels' first words to keep (default: all)")
    ap.add_argument("--no-mixture", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "restart.md"))
    a = ap.parse_args()
    if a.samplers:
        for label in list(SAMPLERS):
            if not any(label == k or label.startswith(k + " ") for k in a.samplers):
                del SAMPLERS[label]
    features = fs.from_pretrained("pretrained/digits-features")
    rows = []
    for folder in a.models:
        rows += digits_rows(folder, a.n, a.seeds, a.nfe, features)
    if not a.no_mixture:
        rows += mixture_rows(a.n, a.seeds, a.nfe)
    command = f"python benchmarks/restart.py --n {a.n} --seeds {a.seeds} --nfe {' '.join(map(str, a.nfe))}"
    if a.samplers:
        command += f" --samplers {' '.join(a.samplers)} --models {' '.join(a.models)}"
    if a.no_mixture:
        command += " --no-mixture"
    head = ["# Restart sampling against the ODE and EDM's churn", "", f"`{command}`", "",
            "| model | NFE (used) | sampler | FD (features) or energy distance | pixel FD | s per run |",
            "|---|---:|---|---:|---:|---:|"]
    Path(a.out).write_text("\n".join(head + rows) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
