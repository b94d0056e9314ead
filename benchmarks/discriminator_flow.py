"""Discriminator Flow training speed with Table 4's mixture settings (MLP 512×4, batch 128,
N = 56, η = 20): flowsolve's trainer (float32, and with the particles simulated by a bfloat16 copy
of the discriminator, `compute_dtype="bfloat16"`) against a plain implementation of Alg. 3 (every
particle simulated over all N steps with autograd, as the paper's code does), and against the paper's
own implementation's figure measured on this machine (4.4 it/s on 2 CPU cores, from the issue).

    python benchmarks/discriminator_flow.py [--iters 100]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import flowsolve as fs
from flowsolve.models.gan import Discriminator, GANLoss

PAPER_CODE_IT_S = 4.4


def plain_alg3(iters: int, N: int = 56, eta: float = 20.0, batch: int = 128) -> float:
    """Alg. 3 written directly: full trajectories, autograd for ∇(c∘f), one discriminator step."""
    torch.manual_seed(0)
    d = Discriminator(2)
    opt = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    loss = GANLoss("vanilla")
    gmm = fs.data.GaussianMixture.paper()
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(iters):
        x = torch.randn(batch, 2, generator=g)
        traj = [x]
        for i in range(N):
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(F.softplus(-d(xg, torch.full((batch,), i / N))).sum(), xg)
            x = x - eta / N * grad
            traj.append(x)
        idx = torch.randint(N, (batch,), generator=g)
        fake = torch.stack(traj)[idx, torch.arange(batch)].detach()
        t = idx.float() / N
        real = gmm.sample(batch, g)
        obj = loss.discriminator_objective(d(fake, t), d(real, t))
        opt.zero_grad()
        (-obj).backward()
        opt.step()
    return iters / (time.perf_counter() - t0)


def flowsolve_df(iters: int, compute_dtype: str | None = None) -> float:
    t0 = time.perf_counter()
    fs.train.discriminator_flow("gmm2d", steps=iters, progress=False, compute_dtype=compute_dtype)
    return iters / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ours, low, plain = [], [], []
    for _ in range(args.repeats):                 # interleaved
        ours.append(flowsolve_df(args.iters))
        low.append(flowsolve_df(args.iters, "bfloat16"))
        plain.append(plain_alg3(args.iters))
    o, b, p = (sorted(v)[len(v) // 2] for v in (ours, low, plain))
    print(f"{torch.get_num_threads()} threads, {args.iters} iterations, median of {args.repeats}\n")
    print("| implementation | it/s | vs plain Alg. 3 | vs paper's code (4.4 it/s) |")
    print("|---|---:|---:|---:|")
    print(f"| flowsolve `train.discriminator_flow` (float32) | {o:.2f} | {o / p:.2f} | {o / PAPER_CODE_IT_S:.2f} |")
    print(f"| flowsolve, `compute_dtype=\"bfloat16\"` (particles simulated in bf16) | {b:.2f} | {b / p:.2f} | "
          f"{b / PAPER_CODE_IT_S:.2f} |")
    print(f"| plain Alg. 3 (full trajectories, autograd) | {p:.2f} | 1.00 | {p / PAPER_CODE_IT_S:.2f} |")


if __name__ == "__main__":
    main()
