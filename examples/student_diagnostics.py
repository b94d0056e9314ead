"""Where a one-step digits student loses to its teacher: the FD split into its terms, distances to
the data manifold, and the student's input-noise temperature.

For seeds 0–2 (n = 1000) on the shipped digits features, against the 400 held-out digits:
- the FD's mean term ‖μ − μ_test‖², its covariance term, and the trace of the samples' covariance
  (their spread);
- quantiles of each sample's distance to its nearest training digit (the held-out digits' own
  distances are the reference: closer is sharper, or memorised);
- the student with its noise z scaled by τ, held-out and training-digit FD over seeds 0–4.

    python examples/student_diagnostics.py --student pretrained/digits-scoregan --teacher pretrained/digits-edm
"""

from __future__ import annotations

import argparse
import statistics

import torch

import flowsolve as fs
from flowsolve import data as fsdata
from flowsolve.metrics import frechet_distance_features, gaussian_frechet

QUANTILES = torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)


def fd_terms(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(mean term, covariance term, trace of a's covariance) of the Fréchet distance of features a to b."""
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    covariance_term = gaussian_frechet(mu_a, cov_a, mu_a, cov_b)  # equal means leave only the trace term
    return float((mu_a - mu_b).square().sum()), covariance_term, float(cov_a.trace())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default="pretrained/digits-scoregan")
    ap.add_argument("--teacher", default="pretrained/digits-edm")
    ap.add_argument("--solver", default="unipc", help="the teacher's solver (its best on digits)")
    ap.add_argument("--nfe", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    feats = fs.from_pretrained("pretrained/digits-features")
    embed = getattr(feats, "features", feats)  # the penultimate features the FD uses

    def features(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return embed(x.float().clamp(-1, 1)).double()

    test, train = fsdata.digits("test").x, fsdata.digits("train").x
    f_test, f_train = features(test), features(train)

    def nearest(f: torch.Tensor) -> list[float]:
        return [round(float(q), 1) for q in torch.cdist(f, f_train).min(1).values.quantile(QUANTILES)]

    teacher, student = fs.from_pretrained(args.teacher), fs.from_pretrained(args.student)
    print(
        f"held-out digits: covariance trace {float(torch.cov(f_test.T).trace()):.0f}, "
        f"nearest training digit (quantiles {QUANTILES.tolist()}) {nearest(f_test)}"
    )
    print("| model | seed | mean term | covariance term | covariance trace | nearest training digit |")
    print("|---|---:|---:|---:|---:|---|")
    for seed in range(3):
        draws = {
            f"teacher, {args.solver} {args.nfe}": fs.sample(
                teacher.field(), args.solver, nfe=args.nfe, n=1000, seed=seed
            ),
            "student": student.sample(1000, seed=seed),
        }
        for name, x in draws.items():
            f = features(x)
            m, c, tr = fd_terms(f, f_test)
            print(f"| {name} | {seed} | {m:.1f} | {c:.1f} | {tr:.0f} | {nearest(f)} |", flush=True)

    print("\n| τ (student noise scale) | held-out FD | training-digit FD |\n|---:|---:|---:|")
    for tau in (0.9, 1.0, 1.1, 1.2, 1.3):
        held, seen = [], []
        for seed in range(5):
            f = features(student.generate(student.latents(1000, seed=seed) * tau))
            held.append(frechet_distance_features(f, f_test))  # the features of test and train, computed once
            seen.append(frechet_distance_features(f, f_train))
        print(
            f"| {tau} | {statistics.mean(held):.1f} ± {statistics.stdev(held):.1f} "
            f"| {statistics.mean(seen):.1f} ± {statistics.stdev(seen):.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
