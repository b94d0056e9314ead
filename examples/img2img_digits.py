"""Image-to-image and inpainting on the shipped digits model, judged by a classifier the project did not
train: a scikit-learn SVC fitted on the training digits (`fs.evaluate.svc_predict`).

For each strength, the 400 held-out digits are noised to the grid's level after N − ⌊N·s⌋ of N = 20
steps and denoised with Heun (`fs.sample(..., init=x0, strength=s)`); the table gives the share of
outputs the SVC still reads as the input's digit (chance: 0.1), the mean squared pixel change, and
the number of digits the SVC finds in more than 2% of the outputs. Inpainting keeps the left half of
each digit and generates the right half (`mask=`); the left half comes back exactly. The inpainting
table sets the blend (diffusers' inpaint pipeline) beside RePaint's resampling (`solver="repaint"`).

    python examples/img2img_digits.py [--seeds 3] [--inpaint-only]
"""
from __future__ import annotations

import argparse
import statistics

import torch

import flowsolve as fs
from flowsolve.data.datasets import digits
from flowsolve.evaluate import svc_predict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--inpaint-only", action="store_true", help="only the inpainting table")
    a = ap.parse_args()
    torch.set_num_threads(1)
    test = digits("test")
    x0, labels = test.x, test.labels
    field = fs.from_pretrained("digits-edm").field()
    if not a.inpaint_only:
        strengths(field, x0, labels, a)
    inpainting(field, x0, labels, a)


def strengths(field, x0: torch.Tensor, labels: torch.Tensor, a) -> None:
    print("| strength | SVC reads the input's digit | mean squared pixel change | SVC classes > 2% |")
    print("|---:|---:|---:|---:|")
    for strength in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        kept, moved, cover = [], [], []
        for seed in range(a.seeds):
            x = fs.sample(field, "heun", steps=a.steps, init=x0, strength=strength, seed=seed).clamp(-1, 1)
            pred = torch.as_tensor(svc_predict(x))
            kept.append(float((pred == labels).float().mean()))
            moved.append(float((x - x0).pow(2).mean()))
            cover.append(int(sum(float((pred == k).float().mean()) > 0.02 for k in range(10))))
        print(f"| {strength:.1f} | {statistics.mean(kept):.3f} ± {statistics.pstdev(kept):.3f} "
              f"| {statistics.mean(moved):.3f} | {min(cover)} |")


def inpainting(field, x0: torch.Tensor, labels: torch.Tensor, a) -> None:
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1.0  # generate the right half
    runs = [
        ("blend, heun", "heun", a.steps, {}),
        ("blend, euler", "euler", 50, {}),
        ("repaint, no resampling", "repaint", 50, {"jump_length": 5, "jump_n_sample": 1}),
        ("repaint, 5 × 5", "repaint", 50, {"jump_length": 5, "jump_n_sample": 5}),
        ("repaint, 10 × 10", "repaint", 50, {"jump_length": 10, "jump_n_sample": 10}),
    ]
    print("\ninpainting the right half of the 400 held-out digits from their left half:\n")
    print("| method | steps | NFE | SVC reads the input's digit | left half exact |")
    print("|---|---:|---:|---:|---|")
    for name, solver, steps, opts in runs:
        kept, exact, nfe = [], [], 0
        for seed in range(a.seeds):
            x, info = fs.sample(field, solver, steps=steps, init=x0, mask=mask, seed=seed, return_info=True, **opts)
            nfe = info.nfe
            exact.append(bool(torch.equal(x[..., :4], x0[..., :4])))
            kept.append(float((torch.as_tensor(svc_predict(x.clamp(-1, 1))) == labels).float().mean()))
        print(f"| {name} | {steps} | {nfe} | {statistics.mean(kept):.3f} ± {statistics.pstdev(kept):.3f} | {all(exact)} |")


if __name__ == "__main__":
    main()
