"""Low-NFE digits with calibrated grids: FD and endpoint error of the shipped digits-edm at NFE 5 and 8,
default against calibrated grids (`flowsolve calibrate --model pretrained/digits-edm --solver deis|ipndm
--nfe 5,8 --seconds 60` wrote them into the folder), on seeds the calibration never saw.

    python examples/calibrated_digits.py [--n 1000] [--seed 1]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import flowsolve as fs
from flowsolve.calibrate import endpoint_error, reference_solve
from flowsolve.evaluate import digits_quality
from flowsolve.sample import initial_noise

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    m = fs.from_pretrained(ROOT / "pretrained" / "digits-edm")
    feats = fs.from_pretrained(ROOT / "pretrained" / "digits-features")
    field = m.field()
    z = initial_noise(field, args.seed, 0, args.n, field.data_shape, t_start=field.sigma_max)
    ref = reference_solve(field, z)
    print(f"digits-edm, n = {args.n}, seed {args.seed} (the calibration used seed 0); FD on the shipped features "
          f"against the 400 held-out digits; endpoint error against Heun at 127 NFE from the same noise\n")
    print("| solver | NFE | grid | FD | endpoint error |")
    print("|---|---:|---|---:|---:|")
    for solver in ("deis", "ipndm", "dpmpp_2m"):
        for nfe in (5, 8):
            grids = [("default", None)]
            if f"{solver}:{nfe}" in field.calibrated:
                grids.append(("calibrated", "calibrated"))
            for name, grid in grids:
                x = fs.sample(field, solver, nfe=nfe, grid=grid, x_init=z)
                r = digits_quality(x, feats, seed=args.seed)
                print(f"| {solver} | {nfe} | {name} | {r.fd:.1f} | {endpoint_error(x, ref):.3f} |")


if __name__ == "__main__":
    main()
