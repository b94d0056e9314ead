"""flowsolve's diffusers adapter against diffusers' own scheduler loops: the same samples (max abs
difference) and the wall-time ratio flowsolve / diffusers at equal NFE, on
  - the shipped DDPM pipeline (pretrained/digits-ddpm): DDIM and Euler-discrete, and the inversion of
    DPMSolverMultistepInverseScheduler against `fs.invert`;
  - the shipped flow-matching pipeline (pretrained/digits-flow): FlowMatchEuler and FlowMatchHeun, and
    LTX's LTXEulerAncestralRFScheduler (η = 0.5) against `euler_ancestral` (the max abs difference
    from a run handed flowsolve's noise; the timed diffusers loop draws its own);
  - a latent pipeline (LDMPipeline: AutoencoderKL + UNet + DDIM, random weights, built here, no
    download): the decoded images, sampling and decoding timed together.

    python benchmarks/diffusers_adapter.py [--n 512] [--repeats 9] [--threads T] [--only NAME]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from scipy.stats import t as student_t  # scipy comes with scikit-learn
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepInverseScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    LTXEulerAncestralRFScheduler,
    UNet2DModel,
)

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


def diffusers_flow(unet, sched, z, nfe):
    sched.set_timesteps(nfe)  # FlowMatch schedulers keep a step index: reset it
    x = z
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x


def diffusers_ltx_rf(unet, sched, z, nfe, generator=None):
    sched.set_timesteps(nfe)  # the scheduler keeps a step index: reset it
    x = z
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x, generator=generator).prev_sample
    return x


def with_noise_of(seed: int, z: torch.Tensor, fn):
    """fn() with the LTX scheduler's noise replaced by flowsolve's per-sample stream for `seed` (the
    draws `fs.sample(..., seed=seed)` makes), for the max abs difference only."""
    from unittest import mock

    from flowsolve.noise import SampleNoise
    import diffusers.schedulers.scheduling_ltx_euler_ancestral_rf as ltx

    src = SampleNoise(seed, 0, len(z), tuple(z.shape[1:]), z.dtype, "cpu", stream=1)
    with mock.patch.object(ltx, "randn_tensor", lambda shape, **k: src()):
        return fn()


def diffusers_inversion(unet, sched, x, nfe):
    sched.set_timesteps(nfe)  # the scheduler keeps its history and step index: reset them
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x


def latent_pipeline():
    """An LDM-style pipeline with random weights: 32×32 images, 4×8×8 latents (no download)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        latent_channels=4,
        norm_num_groups=8,
    ).eval()
    unet = UNet2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    ).eval()
    return vae, unet, DDIMScheduler(num_train_timesteps=1000, clip_sample=False, timestep_spacing="trailing")


def bare_calls(unet, timesteps, x):
    """The network calls of a loop and nothing else: what any sampler must pay."""
    for t in timesteps:
        unet(x, t)
    return x


def paired_ratio(t_ours: list[float], t_ref: list[float]) -> tuple[float, float, float]:
    """Geometric mean of the per-repeat ratios t_ours/t_ref (each pair timed back to back) with a 95%
    Student-t interval: an interval that contains 1 means no cost difference the timing can resolve."""
    logs = [math.log(a / b) for a, b in zip(t_ours, t_ref)]
    mean = statistics.fmean(logs)
    half = float(student_t.ppf(0.975, len(logs) - 1)) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def timed(cases: dict, repeats: int, rows: list, nfe: int, only: str | None = None) -> None:
    """Interleaved repeats of (diffusers, flowsolve, bare network calls) after one untimed warm-up of
    each, the order rotating between repeats (so drift and cache effects fall on all alike). Per cell:
    the fastest times, the ratio flowsolve / diffusers of the fastest (as timeit reports it), the
    paired ratio with its 95% interval, and each loop's overhead over the bare network calls."""
    for name, fns in cases.items():
        if only and only not in name:
            continue
        a, b = (fns[3], fns[1]) if len(fns) > 3 else (fns[0], fns[1])  # fns[3]: the loop given our noise
        a, b = a(), b()
        fns[2]()
        times: list[list[float]] = [[], [], []]
        for r in range(repeats):
            for which in (r % 3, (r + 1) % 3, (r + 2) % 3):
                t0 = time.perf_counter()
                fns[which]()
                times[which].append(time.perf_counter() - t0)
        t_ref, t_ours, t_bare = times
        diff = (a - b).abs().max().item()
        gm, lo, hi = paired_ratio(t_ours, t_ref)
        rows.append((name, nfe, diff, min(t_ref), min(t_ours), min(t_ours) / min(t_ref), gm, lo, hi,
                     min(t_ref) / min(t_bare) - 1, min(t_ours) / min(t_bare) - 1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default=None, help="time only the rows whose name contains this")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
            inv = DPMSolverMultistepInverseScheduler.from_config(ddim.config)
            inv.set_timesteps(nfe)
            field_i = fs.models.from_diffusers(unet, DPMSolverMultistepScheduler.from_config(ddim.config)).field()
            sig = inv.sigmas.double()
            a0, a_end = float(1 / (1 + sig[0] ** 2).sqrt()), float(1 / (1 + sig[-1] ** 2).sqrt())
            data = z.clamp(-1, 1)  # stand-in data in the model's range
            cases = {
                "ddim": (lambda: diffusers_ddim(unet, ddim, z), lambda: fs.sample(field, "euler", grid=grid, x_init=x0),
                         lambda: bare_calls(unet, ddim.timesteps, z)),
                "dpm-solver++ inversion": (
                    lambda: diffusers_inversion(unet, inv, data, nfe),
                    lambda: fs.invert(field_i, data / a0, "dpmpp_2m", grid=sig.flip(0), lower_order_final=True) * a_end,
                    lambda: bare_calls(unet, inv.timesteps, data),
                ),
                "euler-discrete": (lambda: diffusers_euler(unet, eul, z),
                                   lambda: fs.sample(field_e, "euler", grid=eul.sigmas.double(),
                                                     x_init=z * eul.init_noise_sigma),
                                   lambda: bare_calls(unet, eul.timesteps, z)),
            }
            timed(cases, args.repeats, rows, nfe, args.only)
        flow_root = str(ROOT / "pretrained" / "digits-flow")
        flow_unet = UNet2DModel.from_pretrained(flow_root, subfolder="unet").eval()
        fm = fs.models.from_diffusers(flow_root)
        for nfe in (10, 25, 50):
            fme = FlowMatchEulerDiscreteScheduler.from_pretrained(flow_root, subfolder="scheduler")
            fmh = FlowMatchHeunDiscreteScheduler.from_config(fme.config)
            fm_heun = fs.models.from_diffusers(flow_unet, FlowMatchHeunDiscreteScheduler.from_config(fme.config))
            steps_heun = (nfe + 1) // 2  # FlowMatchHeun: two evaluations a step, one on the last
            ltx = LTXEulerAncestralRFScheduler.from_config(fme.config, eta=0.5)
            ltx.set_timesteps(nfe)
            fm_ltx = fs.models.from_diffusers(flow_unet, LTXEulerAncestralRFScheduler.from_config(fme.config, eta=0.5))
            cases = {
                "flow-match-euler": (
                    lambda: diffusers_flow(flow_unet, fme, z, nfe),
                    lambda: fs.sample(fm.field(), "euler", nfe=nfe, x_init=z),
                    lambda: bare_calls(flow_unet, fme.timesteps, z),
                ),
                "flow-match-heun": (
                    lambda: diffusers_flow(flow_unet, fmh, z, steps_heun),
                    lambda: fs.sample(fm_heun.field(), "heun", nfe=2 * steps_heun - 1, x_init=z),
                    lambda: bare_calls(flow_unet, fmh.timesteps, z),
                ),
                "ltx-euler-ancestral-rf": (
                    lambda: diffusers_ltx_rf(flow_unet, ltx, z, nfe, torch.Generator().manual_seed(5)),
                    lambda: fs.sample(fm_ltx.field(), "euler_ancestral", nfe=nfe, x_init=z, seed=5, eta=0.5),
                    lambda: bare_calls(flow_unet, ltx.timesteps, z),
                    lambda: with_noise_of(5, z, lambda: diffusers_ltx_rf(flow_unet, ltx, z, nfe)),
                ),
            }
            timed(cases, args.repeats, rows, nfe, args.only)
        vae, lat_unet, lat_sched = latent_pipeline()
        lm = fs.models.from_diffusers(lat_unet, lat_sched, vae=vae)
        zl = torch.randn(args.n // 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        lf = lm.field()
        for nfe in (10, 25):
            xl = lf.from_normal(zl, float(lf.grid(nfe)[0]))  # the pipeline's latents, in the field's coordinates
            ls = DDIMScheduler.from_config(lat_sched.config)
            ls.set_timesteps(nfe)

            def ref_latent():
                lat = diffusers_ddim(lat_unet, ls, zl)
                return vae.decode(lat / vae.config.scaling_factor).sample

            cases = {
                "latent ddim + decode": (
                    ref_latent,
                    lambda: lm.decode(fs.sample(lf, "euler", nfe=nfe, x_init=xl)),
                    lambda: vae.decode(bare_calls(lat_unet, ls.timesteps, zl) / vae.config.scaling_factor).sample,
                )
            }
            timed(cases, args.repeats, rows, nfe, args.only)
    print(f"n = {args.n}, {args.repeats} interleaved repeats in rotating order after a warm-up, "
          f"{torch.get_num_threads()} threads; times are the fastest repeat; paired ratio: geometric mean "
          "of the back-to-back ratios with its 95% interval; overhead: a loop's fastest time over the "
          "fastest bare network calls (the same NFE calls, no solver), minus 1\n")
    print("| diffusers loop | NFE | max abs diff | diffusers s | flowsolve s | ratio (min) | paired ratio [95%] "
          "| diffusers overhead | flowsolve overhead |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for name, nfe, diff, a, b, r, gm, lo, hi, oa, ob in rows:
        print(f"| {name} | {nfe} | {diff:.1e} | {a:.3f} | {b:.3f} | {r:.3f} | {gm:.3f} [{lo:.3f}, {hi:.3f}] "
              f"| {oa:+.1%} | {ob:+.1%} |")
    above = [row[0] + f" {row[1]}" for row in rows if row[7] > 1.0]
    print(f"\nworst cell (min ratio): {max(row[5] for row in rows):.3f}; cells whose paired interval lies above 1: "
          f"{', '.join(above) if above else 'none'}")


if __name__ == "__main__":
    main()
