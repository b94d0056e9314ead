"""Sample the shipped digits models with several solvers and measure them.

`pretrained/digits-edm` is a flowsolve EDM denoiser; `pretrained/digits-ddpm` is an ε-prediction
UNet2DModel with a DDPMScheduler laid out as a Hugging Face Hub repository, loaded here exactly as a
Hub model would be (swap the folder for a Hub id when online). Fréchet distance is computed on the
shipped digits feature network against the 400 held-out digits, beside the real-vs-real floor.

    python examples/pretrained_digits.py [--n 1000] [--out digits-grid.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from diffusers import DDPMScheduler, UNet2DModel

import flowsolve as fs
from flowsolve.evaluate import evaluate_digits

ROOT = Path(__file__).resolve().parents[1] / "pretrained"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", default=None, help="also write a grid of 64 heun-32 digits from each model")
    args = ap.parse_args()
    features = fs.from_pretrained(ROOT / "digits-features")
    edm = fs.from_pretrained(ROOT / "digits-edm")
    unet = UNet2DModel.from_pretrained(str(ROOT / "digits-ddpm"), subfolder="unet")
    ddpm = fs.models.from_diffusers(unet, DDPMScheduler.from_pretrained(str(ROOT / "digits-ddpm"),
                                                                        subfolder="scheduler"))
    print(f"n = {args.n}, seed 0; FD on pretrained/digits-features against the 400 held-out digits\n")
    print("| model | solver | NFE used | FD | real floor | FD / floor | classes | sampling s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, den in (("digits-edm", edm), ("digits-ddpm", ddpm)):
        for solver, nfe in (("euler", 4), ("euler", 8), ("euler", 16), ("heun", 16), ("heun", 32),
                            ("dpmpp_2m", 8), ("dpmpp_2m", 16), ("sde", 64)):
            r = evaluate_digits(den, features, solver=solver, nfe=nfe, n=args.n, seed=0)
            print(f"| {name} | {solver} | {r.nfe} | {r.fd:.2f} | {r.floor:.2f} | {r.ratio:.2f} | "
                  f"{r.classes_present}/10 | {r.seconds:.1f} |")
        if args.out:
            x = fs.sample(fs.fields.EDM(den), "heun", nfe=32, n=64, seed=0)
            out = Path(args.out)
            fs.viz.save_png(x, out.with_name(f"{out.stem}-{name}{out.suffix}"))


if __name__ == "__main__":
    main()
