"""What limits Discriminator Flows on digits (issue 16, deliverable 3): train variants of Alg. 3
for the same wall-clock budget each and report FD (project features and pixel space, against the
400 held-out digits) of the flow at its own N Euler steps, and of the early-stopped flow (App. C.5).

    OMP_NUM_THREADS=1 python benchmarks/df_digits_study.py [--minutes 6] [--only table4,d4] [--out runs/df-study]

Each variant is a `fs.train.discriminator_flow("digits", minutes=..., **settings)` run from seed 0.
Results go to benchmarks/results/df_digits_study.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


import flowsolve as fs

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "table4": {},  # Table 4, MNIST column: ipm loss, R = 0.04, η = 2, N = 64, one update per simulation
    "d4": {"d_steps": 4},  # four discriminator updates per simulation
    "d4-bf16": {"d_steps": 4, "compute_dtype": "bfloat16"},
    "d4-N16": {"d_steps": 4, "N": 16},
    "d4-lr1e-3": {"d_steps": 4, "lr": 1e-3},
    "d4-vanilla": {"d_steps": 4, "loss": "vanilla", "eta": 2.0},
    "d8-N16": {"d_steps": 8, "N": 16},
    "d8": {"d_steps": 8},
    "d8-lazy4": {"d_steps": 8, "gp_every": 4},
    "d16-lazy8": {"d_steps": 16, "gp_every": 8},
    "d4-silu": {"d_steps": 4, "activation": "silu"},  # a smooth f: the flow can contract pixel noise
    "d4-eta4": {"d_steps": 4, "eta": 4.0},
    "d4-silu-eta4": {"d_steps": 4, "activation": "silu", "eta": 4.0},
}


def evaluate(model, features, n: int, t_ends=(1.0, 0.75, 0.5)) -> dict:
    """FD at the flow's own N Euler steps, at t_end = 1 and early-stopped."""
    out = {}
    for t_end in t_ends:
        field = model.field(t_end=t_end)
        report = fs.evaluate.evaluate_digits(field, features, solver="euler", nfe=max(1, round(model.N * t_end)), n=n)
        out[f"t_end={t_end}"] = {"fd": round(report.fd, 1), "pixel_fd": round(report.pixel_fd, 2), "nfe": report.nfe}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--out", default="runs/df-study")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "df_digits_study"))
    args = ap.parse_args()
    features = fs.from_pretrained("digits-features")
    names = args.only.split(",") if args.only else list(VARIANTS)
    results_path = Path(args.results + ".json")
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in names:
        t0 = time.perf_counter()
        model = fs.train.discriminator_flow(
            "digits", out=Path(args.out) / name, minutes=args.minutes, steps=10**6, progress=False,
            checkpoint_every=250, **VARIANTS[name]
        )
        steps = model.metadata["training"]["steps_done"]
        row = {"settings": VARIANTS[name], "minutes": args.minutes, "steps": steps,
               "train_seconds": round(time.perf_counter() - t0, 1), **evaluate(model, features, args.n)}
        results[name] = row
        print(name, json.dumps(row), flush=True)
        results_path.write_text(json.dumps(results, indent=1))
    lines = ["| variant | settings | steps | FD (t=1) | pixel FD | FD (t_end 0.75) | FD (t_end 0.5) |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['settings']} | {r['steps']} | {r['t_end=1.0']['fd']} | {r['t_end=1.0']['pixel_fd']} | "
            f"{r['t_end=0.75']['fd']} | {r['t_end=0.5']['fd']} |"
        )
    Path(args.results + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
