"""flowsolve's diffusers adapter against diffusers' own DDIM and Euler-discrete loops on the
shipped Hub-layout model (pretrained/digits-ddpm): the same samples (max abs difference) and the
wall-time ratio flowsolve / diffusers at equal NFE.

    python benchmarks/diffusers_adapter.py [--n 512] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, UNet2DModel

import flowsolve as fs

ROOT = Path(__file__).resolve().parents[1]


def diffusers_ddim(unet, sched, z):
    x = z
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    return x


def diffusers_euler(unet, sched, z):
    sched.set_timesteps(len(sched.timesteps))     # the scheduler keeps a step index: reset it
    x = z * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    root = str(ROOT / "pretrained" / "digits-ddpm")
    unet = UNet2DModel.from_pretrained(root, subfolder="unet").eval()
    z = torch.randn(args.n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    rows = []
    with torch.no_grad():
        for nfe in (10, 25, 50):
            ddim = DDIMScheduler.from_pretrained(root, subfolder="scheduler")
            ddim.set_timesteps(nfe)
            den = fs.models.from_diffusers(unet, ddim)
            field = fs.fields.EDM(den)
            grid = den.ddim_grid(ddim.timesteps)
            x0 = z * (1 + grid[0] ** 2).sqrt().float()
            eul = EulerDiscreteScheduler.from_config(ddim.config, timestep_spacing="trailing")
            eul.set_timesteps(nfe)
            den_e = fs.models.from_diffusers(unet, eul)
            field_e = fs.fields.EDM(den_e)
            cases = {
                "ddim": (lambda: diffusers_ddim(unet, ddim, z), lambda: fs.sample(field, "euler", grid=grid, x_init=x0)),
                "euler-discrete": (lambda: diffusers_euler(unet, eul, z),
                                   lambda: fs.sample(field_e, "euler", grid=eul.sigmas.double(),
                                                     x_init=z * eul.init_noise_sigma)),
            }
            for name, (ref_fn, ours_fn) in cases.items():
                t_ref, t_ours = [], []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    a = ref_fn()
                    t_ref.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    b = ours_fn()
                    t_ours.append(time.perf_counter() - t0)
                diff = (a - b).abs().max().item()
                ratio = statistics.median(t_ours) / statistics.median(t_ref)
                rows.append((name, nfe, diff, statistics.median(t_ref), statistics.median(t_ours), ratio))
    print(f"n = {args.n}, medians of {args.repeats} interleaved repeats, {torch.get_num_threads()} threads\n")
    print("| diffusers loop | NFE | max abs diff | diffusers s | flowsolve s | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, nfe, diff, a, b, r in rows:
        print(f"| {name} | {nfe} | {diff:.1e} | {a:.3f} | {b:.3f} | {r:.2f} |")


if __name__ == "__main__":
    main()
