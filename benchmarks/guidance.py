"""The cost of guidance: wall time per NFE of classifier-free guidance (both branches in one batched
network call) against an unguided evaluation at twice the batch, and against diffusers' own CFG loop
(a DDIM pipeline loop written as diffusers' pipelines write it), on a class-conditional UNet.

    python benchmarks/guidance.py [--n 64] [--nfe 16] [--repeats 3]

Writes benchmarks/results/guidance.md. Target (issue 13): CFG ≤ 1.1× the unguided evaluation at 2n.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DModel

import flowsolve as fs


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--nfe", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, num_class_embeds=11,
                       **fs.models.UNET_PRESETS["tiny"]).eval()
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, timestep_spacing="trailing")
    sched.set_timesteps(args.nfe)
    den = fs.models.from_diffusers(unet, sched)
    grid = den.ddim_grid(sched.timesteps, 0.0)
    n, w = args.n, 3.0
    y = torch.arange(n) % 10
    z = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x0 = z * (1 + grid[0] ** 2).sqrt().float()
    guided = fs.fields.EDM(den, guidance=w, uncond={"class_labels": 10})
    plain = fs.fields.EDM(den)
    x2 = torch.cat([x0, x0])

    def flowsolve_cfg():
        fs.sample(guided, "euler", grid=grid, x_init=x0, cond={"class_labels": y})

    def flowsolve_plain_2n():
        fs.sample(plain, "euler", grid=grid, x_init=x2, cond={"class_labels": torch.cat([y, y])})

    def diffusers_cfg():
        x = z.clone()
        with torch.no_grad():
            for t in sched.timesteps:
                out = unet(torch.cat([x, x]), t, class_labels=torch.cat([y, torch.full_like(y, 10)])).sample
                e_c, e_u = out.chunk(2)
                x = sched.step(e_u + w * (e_c - e_u), t, x, eta=0.0).prev_sample

    with torch.no_grad():
        for f in (flowsolve_cfg, flowsolve_plain_2n, diffusers_cfg):      # warm-up
            f()
        t_cfg, t_plain, t_diff = (best_of(f, args.repeats) for f in (flowsolve_cfg, flowsolve_plain_2n, diffusers_cfg))
    rows = [("flowsolve CFG (one batched call of 2n per NFE)", t_cfg),
            ("flowsolve unguided at batch 2n", t_plain),
            ("diffusers DDIM loop with CFG", t_diff)]
    lines = [f"# Guidance cost: {args.n} samples, {args.nfe} NFE, tiny class-conditional UNet, CPU "
             f"({torch.get_num_threads()} threads), best of {args.repeats}", "",
             "| run | seconds | ms per NFE | ratio to unguided 2n |", "|---|---:|---:|---:|"]
    for name, t in rows:
        lines.append(f"| {name} | {t:.3f} | {1000 * t / args.nfe:.1f} | {t / t_plain:.3f} |")
    lines.append("")
    lines.append(f"CFG / unguided at 2n: {t_cfg / t_plain:.3f} (target ≤ 1.1); flowsolve CFG / diffusers CFG: "
                 f"{t_cfg / t_diff:.3f}")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / "guidance.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
