"""Classifier-free guidance on the shipped class-conditional digits model.

For guidance scales w (0: unconditional, 1: conditional, > 1: guided) at a fixed solver and NFE, it
reports FD against the 400 held-out digits on the project's feature network, beside two judges the
project did not train: pixel-space FD, and the class accuracy of a scikit-learn logistic regression
fitted on the training digits; plus the accuracy by the shipped feature classifier. It draws a
figure with one row per class and one column per scale.

    python examples/guided_digits.py [--n 1000] [--solver dpmpp_2m] [--nfe 16] [--seeds 0,1,2]

With `--guiders W`, it compares instead, at scale W, flowsolve's CFG and APG with diffusers' modular
guiders (CFG, CFG-Zero*, APG, tangential CFG) run through `guidance=` on the same model.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import flowsolve as fs

ROOT = Path(__file__).resolve().parents[1]


def sklearn_judge():
    """A logistic regression on the training digits' pixels (held-out accuracy printed)."""
    from sklearn.linear_model import LogisticRegression
    train, test = fs.data.digits("train"), fs.data.digits("test")
    clf = LogisticRegression(max_iter=2000).fit(train.x.reshape(len(train.x), -1).numpy(), train.labels.numpy())
    held = clf.score(test.x.reshape(len(test.x), -1).numpy(), test.labels.numpy())
    return clf, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "pretrained" / "digits-cond-edm"))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--solver", default="dpmpp_2m")
    ap.add_argument("--nfe", type=int, default=16)
    ap.add_argument("--guidance", default="0,1,2,4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--figure", default=str(ROOT / "examples" / "figures" / "guided-digits.png"))
    ap.add_argument("--guiders", type=float, default=None, help="compare guidance methods at this scale")
    args = ap.parse_args()
    model = fs.from_pretrained(args.model)
    features = fs.from_pretrained(ROOT / "pretrained" / "digits-features")
    held = fs.data.digits("test").x
    clf, clf_held = sklearn_judge()
    y = torch.arange(args.n) % 10
    scales = [float(g) for g in args.guidance.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{args.model}: {args.solver} at NFE {args.nfe}, n = {args.n}, labels i mod 10, seeds {seeds}; "
          f"sklearn judge held-out accuracy on real digits {clf_held:.3f}\n")
    methods = [(f"{w:g}", model.field() if w == 1.0 else model.field(guidance=w)) for w in scales]
    if args.guiders is not None:
        methods = guidance_methods(model, args.guiders)
        args.figure = None
    print("| guidance | FD (features) | pixel FD | accuracy (features) | accuracy (sklearn) | network passes |")
    print("|---|---:|---:|---:|---:|---:|")
    grid_rows = []
    for w, field in methods:
        stats: dict[str, list[float]] = {"fd": [], "pix": [], "acc": [], "skl": []}
        passes = 0
        for seed in seeds:
            x, info = fs.sample(field, args.solver, nfe=args.nfe, n=args.n, seed=seed, cond={"class_labels": y},
                                return_info=True)
            passes = info.network_passes
            x = x.clamp(-1, 1)
            stats["fd"].append(fs.metrics.frechet_distance(x, held, features))
            stats["pix"].append(fs.metrics.frechet_distance_features(x.reshape(len(x), -1).double(),
                                                                     held.reshape(len(held), -1).double()))
            with torch.no_grad():
                stats["acc"].append(float((features(x).argmax(1) == y).float().mean()))
            stats["skl"].append(float((torch.as_tensor(clf.predict(x.reshape(len(x), -1).numpy())) == y)
                                      .float().mean()))
        fmt = {k: f"{statistics.fmean(v):.3g} ± {statistics.pstdev(v):.2g}" for k, v in stats.items()}
        print(f"| {w} | {fmt['fd']} | {fmt['pix']} | {fmt['acc']} | {fmt['skl']} | {passes} |")
        x = fs.sample(field, args.solver, nfe=args.nfe, n=80, seed=0, cond={"class_labels": torch.arange(80) // 8})
        grid_rows.append(x.clamp(-1, 1))
    if args.figure:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(scales), figsize=(2.2 * len(scales), 2.6), dpi=120)
        for ax, w, x in zip(axes, scales, grid_rows):
            img = x.reshape(10, 8, 8, 8).permute(0, 2, 1, 3).reshape(80, 64)   # rows = classes, 8 samples each
            ax.imshow(img.numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_title(f"w = {w:g}", fontsize=8)
            ax.axis("off")
        fig.suptitle(f"digits-cond-edm, {args.solver} NFE {args.nfe}: rows = classes 0-9", fontsize=8)
        fig.tight_layout()
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.figure)
        print(f"\nwrote {args.figure}")


def guidance_methods(model, w: float) -> list:
    """(name, field) for flowsolve's CFG and APG and diffusers' modular guiders at scale w."""
    from diffusers.guiders import (AdaptiveProjectedGuidance, ClassifierFreeGuidance,
                                   ClassifierFreeZeroStarGuidance, TangentialClassifierFreeGuidance)
    from diffusers.utils import logging
    logging.set_verbosity_error()
    return [
        ("CFG (flowsolve)", model.field(guidance=w)),
        ("APG (flowsolve, η = 0)", model.field(guidance=w, apg=True)),
        ("ClassifierFreeGuidance", model.field(guidance=ClassifierFreeGuidance(guidance_scale=w))),
        ("ClassifierFreeZeroStarGuidance", model.field(guidance=ClassifierFreeZeroStarGuidance(guidance_scale=w))),
        ("AdaptiveProjectedGuidance (η = 0)", model.field(guidance=AdaptiveProjectedGuidance(guidance_scale=w, eta=0.0))),
        ("TangentialClassifierFreeGuidance", model.field(guidance=TangentialClassifierFreeGuidance(guidance_scale=w))),
    ]


if __name__ == "__main__":
    main()
