"""Inpainting with any model by blending (diffusers' StableDiffusionInpaintPipeline with a 4-channel
UNet, ComfyUI's latent noise mask, RePaint's replacement step without its resampling):
`fs.sample(field, solver, steps=N, init=x0, mask=m)` walks the grid and after every step replaces
the kept region (m = 0) by the data noised to the new level with the same noise, the last step by
the data itself. Checked against the pipeline's loop on the same model and noise, and on the exact
mixture: the kept coordinates come back exactly."""
import pytest
import torch

import flowsolve as fs
from flowsolve.noise import SampleNoise
from test_peer_solvers import _in_float64

X0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.5
MASK = torch.zeros(4, 1, 8, 8, dtype=torch.float64)
MASK[:, :, 2:6, 1:5] = 1.0  # the region to generate


def _eps(n=4, shape=(1, 8, 8), seed=7):
    return SampleNoise(seed, 0, n, shape, torch.float64, "cpu", stream=0)()


def _inpaint_loop(unet, sched, steps, strength, x0, mask, noise):
    """StableDiffusionInpaintPipeline's loop for a UNet without mask channels, written out."""
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = sched.timesteps[t_start * sched.order:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    if strength == 1.0:
        x = noise * sched.init_noise_sigma
    else:
        x = sched.add_noise(x0, noise, timesteps[:1])
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
            proper = x0
            if i < len(timesteps) - 1:
                proper = sched.add_noise(x0, noise, timesteps[i + 1:i + 2])
            x = (1 - mask) * proper + mask * x
    return x


@pytest.mark.parametrize("cls,solver", [("EulerDiscreteScheduler", "euler"), ("DDIMScheduler", "ddim"),
                                        ("DPMSolverMultistepScheduler", "dpmpp_2m"),
                                        ("UniPCMultistepScheduler", "unipc"),
                                        ("EulerAncestralDiscreteScheduler", None)])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_inpainting_is_the_inpaint_pipelines_loop(unet64, cls, solver, strength):
    import diffusers
    make = getattr(diffusers, cls)
    steps = 10
    if solver is None:  # an ancestral scheduler draws its own noise: compare the kept region only
        model = fs.models.from_diffusers(unet64, make())
        got = fs.sample(model.field(), "scheduler", steps=steps, init=X0, mask=MASK, strength=strength, seed=7)
        assert torch.equal(got * (1 - MASK), X0 * (1 - MASK))
        return
    ref = _inpaint_loop(unet64, _in_float64(make(), steps), steps, strength, X0, MASK, _eps())
    model = fs.models.from_diffusers(unet64, make())
    got = fs.sample(model.field(), solver, steps=steps, init=X0, mask=MASK, strength=strength, seed=7)
    assert (got - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()
    assert torch.equal(got * (1 - MASK), X0 * (1 - MASK))


def test_inpainting_on_the_exact_mixture_keeps_the_kept_coordinates(gmm64):
    """Half the coordinates kept: they come back exactly; the others are generated (they differ from
    the input, stay finite, and a different seed gives different ones); a mask of ones is plain
    sampling from the prior draw of the same seed."""
    field = fs.fields.EDM(gmm64.denoiser)
    x0 = gmm64.sample(64, generator=torch.Generator().manual_seed(2)).double()
    mask = torch.zeros(1, 64, dtype=torch.float64)
    mask[:, 32:] = 1.0
    for solver in ("heun", "dpmpp_2m", "euler_ancestral", "dpmpp_sde"):
        a = fs.sample(field, solver, steps=12, init=x0, mask=mask, seed=0)
        b = fs.sample(field, solver, steps=12, init=x0, mask=mask, seed=1)
        assert torch.equal(a[:, :32], x0[:, :32]) and torch.isfinite(a).all()
        assert (a[:, 32:] - x0[:, 32:]).abs().mean() > 0.05 and (a[:, 32:] - b[:, 32:]).abs().mean() > 0.01
    full = fs.sample(field, "heun", steps=12, init=x0, mask=torch.ones(1, 64, dtype=torch.float64), seed=0)
    assert torch.allclose(full, fs.sample(field, "heun", steps=12, n=64, seed=0, dtype=torch.float64))


def test_mask_errors_name_the_argument(gmm64):
    field = fs.fields.EDM(gmm64.denoiser)
    x0 = torch.zeros(3, 64, dtype=torch.float64)
    with pytest.raises(fs.errors.ArgumentError, match="mask: needs init="):
        fs.sample(field, "heun", steps=8, n=3, mask=torch.ones(3, 64), seed=0)
    with pytest.raises(fs.errors.ArgumentError, match=r"mask: expected values in \[0, 1\]"):
        fs.sample(field, "heun", steps=8, init=x0, mask=torch.full((3, 64), 2.0), seed=0)
    with pytest.raises(fs.errors.ArgumentError, match="mask: expected a tensor that broadcasts"):
        fs.sample(field, "heun", steps=8, init=x0, mask=torch.ones(3, 7), seed=0)
    with pytest.raises(fs.errors.ArgumentError, match="solver: .*torchdiffeq"):
        fs.sample(field, "torchdiffeq:rk4", steps=8, init=x0, mask=torch.ones(3, 64), seed=0)


def test_the_cli_inpaints_from_files_and_two_processes_agree(tmp_path):
    """`flowsolve sample --init x.npy --mask m.npy`: the kept half of every 2-D point comes back, and
    torchrun with 2 processes gives the same samples (the rows of init split, the mask broadcast)."""
    import numpy as np
    from test_hardening import _one_and_two_processes
    gmm = fs.data.GaussianMixture.paper()
    np.save(tmp_path / "in.npy", gmm.sample(21, generator=torch.Generator().manual_seed(0)).numpy())
    np.save(tmp_path / "mask.npy", np.array([[0.0, 1.0]], dtype=np.float32))
    args = ["sample", "--model", "gmm2d", "--solver", "heun", "--nfe", "15", "--init", str(tmp_path / "in.npy"),
            "--mask", str(tmp_path / "mask.npy"), "--seed", "4", "--quiet"]
    _one_and_two_processes(args, tmp_path / "one.npy", tmp_path / "two.npy")
    one, two, x0 = np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy"), np.load(tmp_path / "in.npy")
    assert one.shape == (21, 2) and np.array_equal(one, two)
    assert np.array_equal(one[:, 0], x0[:, 0]) and np.abs(one[:, 1] - x0[:, 1]).mean() > 0.1
