"""Which solver, how many NFE: the README's comparison tables and figures.

    python examples/compare_solvers.py [--out examples/figures] [--seeds 3]

- the exact 2-D mixture: endpoint RMSE against a dopri5 solve (the exact ranking) and energy
  distance to exact samples (what a user can measure without a reference solve);
- the shipped digits model: Fréchet distance on the digits features against the held-out digits;
- animations of the generation (the paper's Figure 1) for both.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import flowsolve as fs

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "examples" / "figures"))
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    gmm = fs.data.GaussianMixture.paper()
    field = fs.fields.EDM(gmm.denoiser)
    solvers = ["euler", "heun", "dpmpp_2m", "dpmpp_2m_pc", "ipndm", "sde", "torchdiffeq:rk4"]
    for metric, n in (("rmse", 1000), ("energy", 2000)):
        t = fs.compare(field, solvers, [4, 8, 16, 32, 64], metric, n=n, seeds=args.seeds, reference=gmm,
                       model_name="gmm2d (exact mixture)")
        files = t.save(out / f"compare-gmm2d-{metric}")
        print(t.to_markdown())
        print("wrote", *files.values())
    den = fs.from_pretrained(ROOT / "pretrained" / "digits-edm")
    t = fs.compare(fs.fields.EDM(den), ["euler", "heun", "dpmpp_2m", "ipndm"], [4, 8, 16, 32], "fd", n=1000,
                   seeds=max(1, args.seeds - 1), features=ROOT / "pretrained" / "digits-features",
                   model_name="pretrained/digits-edm")
    files = t.save(out / "compare-digits-fd")
    print(t.to_markdown())
    print("wrote", *files.values())
    fs.viz.animate(fs.fields.EDM(den), out / "digits-heun32.gif", solver="heun", nfe=32, n=16, seed=0)
    fs.viz.animate(field, out / "gmm2d-heun32.gif", solver="heun", nfe=32, n=300, seed=0, reference=gmm)


if __name__ == "__main__":
    main()
