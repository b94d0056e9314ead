"""Image-to-image (SDEdit; Meng et al. 2022): `fs.sample(field, solver, steps=N, init=x0, strength=s)`
noises the given data to the grid's level after N − ⌊N·s⌋ steps, x = α_t x0 + σ_t ε, and walks the
⌊N·s⌋ steps left, as diffusers' img2img pipelines do (`get_timesteps`, the scheduler's `add_noise` or
`scale_noise`, `set_begin_index`): checked against that loop on the same model and noise, on the
exact mixture (strength 1 from the data reaches the data distribution; small strengths stay near
the input), and its errors."""
from types import SimpleNamespace

import pytest
import torch

import flowsolve as fs
from conftest import peer_function
from flowsolve.noise import SampleNoise
from test_peer_solvers import _in_float64

X0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.5


def _eps(n=4, shape=(1, 8, 8), seed=7):
    """The noise `fs.sample(seed=seed)` adds to sample i: its per-sample stream 0."""
    return SampleNoise(seed, 0, n, shape, torch.float64, "cpu", stream=0)()


def _img2img_loop(unet, sched, steps, strength, x0, eps, noising="add_noise"):
    """diffusers' StableDiffusionImg2ImgPipeline / StableDiffusion3Img2ImgPipeline loop, written out."""
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = sched.timesteps[t_start * sched.order:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    t0 = timesteps[:1]
    x = sched.add_noise(x0, eps, t0) if noising == "add_noise" else sched.scale_noise(x0, t0, eps)
    with torch.no_grad():
        for t in timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t) if noising == "add_noise" else x, t).sample,
                           t, x).prev_sample
    return x


@pytest.mark.parametrize("cls,solver", [("EulerDiscreteScheduler", "euler"), ("DDIMScheduler", "ddim"),
                                        ("DPMSolverMultistepScheduler", "dpmpp_2m"), ("HeunDiscreteScheduler", "heun"),
                                        ("UniPCMultistepScheduler", "unipc")])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_img2img_is_diffusers_img2img_loop(unet64, cls, solver, strength):
    import diffusers
    make = getattr(diffusers, cls)
    steps = 10
    ref = _img2img_loop(unet64, _in_float64(make(), steps), steps, strength, X0, _eps())
    model = fs.models.from_diffusers(unet64, make())
    got, info = fs.sample(model.field(), solver, steps=steps, init=X0, strength=strength, seed=7, return_info=True)
    assert info.steps == int(steps * strength)
    assert (got - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()
    # the scheduler itself as the solver is the same loop
    same = fs.sample(model.field(), "scheduler", steps=steps, init=X0, strength=strength, seed=7)
    assert torch.allclose(same, got, rtol=0, atol=1e-12)


@pytest.mark.parametrize("strength", [0.4, 1.0])
def test_img2img_on_a_flow_model_is_sd3s_img2img_loop(unet64, strength):
    """A flow UNet's img2img: the data noised by `scale_noise`, σ ε + (1 − σ) x0, as SD3's pipeline does,
    with SD's count of the steps (a UNet's img2img pipelines walk ⌊N·s⌋)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    steps = 8
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    sched.sigmas = sched.sigmas.double()
    ref = _img2img_loop(unet64, sched, steps, strength, X0, _eps(), noising="scale_noise")
    model = fs.models.from_diffusers(unet64, FlowMatchEulerDiscreteScheduler(shift=3.0))
    got = fs.sample(model.field(), "euler", steps=steps, init=X0, strength=strength, seed=7)
    assert (got - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


def test_img2img_on_the_exact_mixture_keeps_or_forgets_the_input(gmm64):
    """On the exact mixture's EDM field and its flow field: from data of the mixture, strength 1 draws
    the mixture again (energy distance to fresh samples at the floor); a small strength keeps each
    sample near its input (mean squared change ≈ what the σ of the first level allows), a large one
    moves them further; per-sample noise makes sample i the same in any batch."""
    ref = gmm64.sample(2000, generator=torch.Generator().manual_seed(1)).double()
    x0 = gmm64.sample(2000, generator=torch.Generator().manual_seed(2)).double()
    def velocity(x, t):  # the mixture's exact velocity on the flow path x_t = (1 − t) x0 + t ε
        tt = t.reshape(-1, 1).clamp(max=1 - 1e-7)
        return (x - gmm64.denoiser(x / (1 - tt), (tt / (1 - tt)).reshape(-1))) / tt

    for field in (fs.fields.EDM(gmm64.denoiser), fs.fields.FlowMatching(velocity, (64,))):
        full = fs.sample(field, "heun", steps=16, init=x0, strength=1.0, seed=0)
        assert fs.metrics.energy_distance(full, ref) < 0.02
        moved = [(fs.sample(field, "heun", steps=16, init=x0, strength=s, seed=0) - x0).pow(2).mean().item()
                 for s in (0.2, 0.5, 0.9)]
        assert moved[0] < moved[1] < moved[2]
        part = fs.sample(field, "heun", steps=16, init=x0[5:9], strength=0.5, seed=0, index_offset=5)
        assert torch.allclose(part, fs.sample(field, "heun", steps=16, init=x0[:9], strength=0.5, seed=0)[5:9])


def test_img2img_errors_name_the_argument(gmm64):
    field = fs.fields.EDM(gmm64.denoiser)
    x0 = torch.zeros(3, 64, dtype=torch.float64)
    with pytest.raises(fs.errors.ArgumentError, match=r"strength: expected a number in \(0, 1\]"):
        fs.sample(field, "heun", steps=8, init=x0, strength=1.5, seed=0)
    with pytest.raises(fs.errors.ArgumentError, match="strength: 0.1 of 8 steps leaves no step"):
        fs.sample(field, "heun", steps=8, init=x0, strength=0.1, seed=0)
    with pytest.raises(fs.errors.ArgumentError, match="strength: needs init="):
        fs.sample(field, "heun", steps=8, n=3, strength=0.5, seed=0)
    with pytest.raises(fs.errors.ArgumentError, match="init: give init= .* or x_init="):
        fs.sample(field, "heun", steps=8, init=x0, x_init=x0, seed=0)
    with pytest.raises(fs.errors.ArgumentError, match="init: .* data shape"):
        fs.sample(field, "heun", steps=8, init=torch.zeros(3, 5), seed=0)
    with pytest.raises(fs.errors.ArgumentError, match="solver: img2img .* adaptive"):
        fs.sample(field, "dpm_adaptive", nfe=100, init=x0, seed=0)
    kernel = fs.fields.Function(lambda x, t: -x, shape=(64,))
    with pytest.raises(fs.errors.ArgumentError, match="init: .* Gaussian path"):
        fs.sample(kernel, "euler", steps=8, init=x0, seed=0)


@pytest.mark.parametrize("stats", [{"scaling_factor": 0.3611, "shift_factor": 0.1159},
                                   {"scaling_factor": 0.5, "latents_mean": [0.1, -0.2], "latents_std": [0.9, 1.3]}])
def test_encode_normalises_as_the_img2img_pipelines_and_inverts_decode(stats):
    """`model.encode(images)`: the VAE posterior's mean (or a draw) normalised as SD3 / Flux img2img
    ((z − shift)·scale) or SDXL img2img ((z − mean)·scale/std) do; `decode` undoes it."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel
    torch.manual_seed(0)
    kw = {k: v for k, v in stats.items() if k in ("scaling_factor", "shift_factor")}
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8,), latent_channels=2, norm_num_groups=8,
                        **kw).eval()
    if "latents_mean" in stats:
        vae.register_to_config(latents_mean=stats["latents_mean"], latents_std=stats["latents_std"])
    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4).eval()
    m = fs.models.from_diffusers(unet, DDIMScheduler(), vae=vae)
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mode()
        raw_decoded = vae.decode(z).sample
    if "latents_mean" in stats:
        mean, std = torch.tensor(stats["latents_mean"]).view(1, -1, 1, 1), torch.tensor(stats["latents_std"]).view(1, -1, 1, 1)
        expected = (z - mean) * stats["scaling_factor"] / std
    else:
        expected = (z - stats["shift_factor"]) * stats["scaling_factor"]
    latents = m.encode(images)
    assert torch.allclose(latents, expected, atol=1e-6)
    assert torch.allclose(m.decode(latents), raw_decoded, atol=1e-5)
    a = m.encode(images, mode="sample", generator=torch.Generator().manual_seed(0))
    b = m.encode(images, mode="sample", generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.allclose(a, latents)
    x = fs.sample(m.field(), "ddim", steps=6, init=latents, strength=0.5, seed=0)
    assert x.shape == latents.shape and torch.isfinite(x).all()
    with pytest.raises(fs.errors.ArgumentError, match="mode: expected 'mean' or 'sample'"):
        m.encode(images, mode="argmax")


def test_the_cli_runs_img2img_from_a_file(tmp_path, capsys):
    """`flowsolve sample --init digits.npy --strength 0.5`: the shipped digits model walks half its
    steps from the given digits noised; a small strength keeps them closer than a large one."""
    import numpy as np
    from flowsolve.cli import main
    digits = fs.data.datasets.digits("test").x[:6]
    np.save(tmp_path / "in.npy", digits.numpy())
    moved = []
    for s in ("0.3", "0.9"):
        out = tmp_path / f"out{s}.npy"
        assert main(["sample", "--model", "pretrained/digits-edm", "--solver", "heun", "--steps", "10",
                     "--init", str(tmp_path / "in.npy"), "--strength", s, "--out", str(out), "--quiet"]) == 0
        assert f"{int(10 * float(s))} steps" in capsys.readouterr().out
        moved.append(float(((torch.from_numpy(np.load(out)) - digits) ** 2).mean()))
    assert moved[0] < moved[1]


def test_two_process_img2img_matches_one_process(tmp_path):
    """torchrun with 2 processes splits init's rows as it splits the particles: the same samples."""
    import numpy as np
    from test_hardening import _one_and_two_processes
    gmm = fs.data.GaussianMixture.paper()
    np.save(tmp_path / "in.npy", gmm.sample(37, generator=torch.Generator().manual_seed(0)).numpy())
    args = ["sample", "--model", "gmm2d", "--solver", "sde", "--nfe", "16", "--init", str(tmp_path / "in.npy"),
            "--strength", "0.6", "--seed", "4", "--quiet"]
    _, r2 = _one_and_two_processes(args, tmp_path / "one.npy", tmp_path / "two.npy")
    assert "from 2 processes" in r2.stdout
    one, two = np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy")
    assert one.shape == (37, 2) and np.array_equal(one, two)


@pytest.mark.parametrize("denoise", [0.35, 0.6, 1.0])
def test_comfyuis_denoise_is_the_tail_of_a_longer_grid_from_the_data_noised(gmm64, denoise):
    """ComfyUI's KSampler(steps, denoise): the last steps + 1 levels of the scheduler's grid for
    ⌊steps/denoise⌋ steps, from the latent plus σ_0 ε, every step walked (img2img at strength 1)."""
    field = fs.fields.EDM(gmm64.denoiser)
    x0 = gmm64.sample(8, generator=torch.Generator().manual_seed(2)).double()
    steps = 10
    tail = field.grid(int(steps / denoise), "karras")[-(steps + 1):]
    eps = SampleNoise(3, 0, 8, (64,), torch.float64, "cpu", stream=0)()
    ref = fs.sample(field, "euler", grid=tail, x_init=x0 + float(tail[0]) * eps)
    rule = fs.grids.ComfyUIDenoise("karras", denoise)
    got, info = fs.sample(field, "euler", steps=steps, grid=rule, init=x0, strength=1.0, seed=3, return_info=True)
    assert torch.equal(info.grid, tail) and torch.allclose(got, ref, rtol=0, atol=1e-12)
    with pytest.raises(fs.errors.ArgumentError, match=r"denoise: expected a number in \(0, 1\]"):
        fs.grids.ComfyUIDenoise("karras", 0.0)


@pytest.mark.parametrize("cls,kw", [("DPMSolverMultistepScheduler", {"solver_order": 3}),
                                    ("DPMSolverSinglestepScheduler", {}),
                                    ("DPMSolverSinglestepScheduler", {"solver_order": 3}),
                                    ("UniPCMultistepScheduler", {"solver_order": 3}),
                                    ("LMSDiscreteScheduler", {}),
                                    ("LMSDiscreteScheduler", {"use_karras_sigmas": True})])
@pytest.mark.parametrize("steps,strength", [(20, 0.5), (16, 0.3), (25, 0.8), (30, 0.37), (12, 0.2)])
def test_img2img_keeps_the_schedules_order_rules(unet64, cls, kw, steps, strength):
    """The rules that read the schedule's length read the whole schedule's, not the part walked:
    DPM-Solver's lower orders below 15 steps, the singlestep solver's cycle of orders (the walk starts
    inside it), LMS's order ramp (its first steps' Lagrange basis takes the knots before the walk), as
    the scheduler does from `set_begin_index`."""
    import diffusers
    make = lambda: getattr(diffusers, cls)(**kw)  # noqa: E731
    ref = _img2img_loop(unet64, _in_float64(make(), steps), steps, strength, X0, _eps())
    model = fs.models.from_diffusers(unet64, make())
    got = fs.sample(model.field(), "scheduler", steps=steps, init=X0, strength=strength, seed=7)
    assert (got - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


@pytest.mark.parametrize("masked", [False, True])
def test_guided_img2img_and_inpainting_are_the_pipelines_cfg_loops(masked):
    """A text-conditioned UNet with classifier-free guidance (scale 5): StableDiffusionImg2ImgPipeline's
    loop (the unconditional and conditional branches in one batch, ε_u + w (ε_c − ε_u)), and with a mask
    its inpaint pipeline's, equal to the guided field's img2img / inpainting."""
    from conftest import tiny_unet64
    from diffusers import EulerDiscreteScheduler
    unet = tiny_unet64(text_dim=8)
    emb = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    neg = torch.zeros(1, 3, 8, dtype=torch.float64)
    steps, strength, w = 10, 0.7, 5.0
    sched = _in_float64(EulerDiscreteScheduler(), steps)
    init_timestep = min(int(steps * strength), steps)
    t_start = steps - init_timestep
    timesteps = sched.timesteps[t_start:]
    sched.set_begin_index(t_start)
    eps = _eps()
    mask = torch.zeros_like(X0)
    mask[..., :4] = 1.0
    x = sched.add_noise(X0, eps, timesteps[:1])
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            pred = unet(inp, t, encoder_hidden_states=torch.cat([neg.expand(4, -1, -1), emb])).sample
            u, c = pred.chunk(2)
            x = sched.step(u + w * (c - u), t, x).prev_sample
            if masked:
                proper = X0 if i == len(timesteps) - 1 else sched.add_noise(X0, eps, timesteps[i + 1:i + 2])
                x = (1 - mask) * proper + mask * x
    model = fs.models.from_diffusers(unet, EulerDiscreteScheduler())
    field = model.field(guidance=w, uncond={"encoder_hidden_states": neg})
    got = fs.sample(field, "euler", steps=steps, init=X0, strength=strength, seed=7,
                    cond={"encoder_hidden_states": emb}, **({"mask": mask} if masked else {}))
    assert (got - x).abs().max().item() <= 1e-6 * x.abs().max().item()


def test_k_diffusions_lms_in_img2img_ramps_over_the_walk_only(unet64):
    """k-diffusion's `sample_lms` on the walk's σ's (AUTOMATIC1111's and ComfyUI's img2img) ramps its
    order from the walk's first step, where diffusers' LMS ramps from the schedule's: on a model loaded
    with LMSDiscreteScheduler, "lms" is the former and "adams" the latter."""
    import diffusers
    K = pytest.importorskip("peers").k_diffusion_sampling()
    model = fs.models.from_diffusers(unet64, diffusers.LMSDiscreteScheduler())
    field = model.field()
    sig = field.grid(12, "schedule")[12 - 6:]
    z = X0 + sig[0] * _eps()
    den = lambda x, s: model(x, s.reshape(-1).expand(len(x)))  # noqa: E731
    with torch.no_grad():
        ref = K.sample_lms(den, z.clone(), sig.to(torch.float64), disable=True)
    got = fs.sample(field, "lms", steps=12, init=X0, strength=0.5, seed=7, dtype=torch.float64)
    assert (got - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()
    ramped = fs.sample(field, "adams", steps=12, init=X0, strength=0.5, seed=7, dtype=torch.float64, order=4)
    assert (ramped - ref).abs().max().item() > 1e-3 * ref.abs().max().item()


@pytest.mark.parametrize("cls", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                 "DPMSolverSinglestepScheduler", "DEISMultistepScheduler"])
@pytest.mark.parametrize("steps,strength", [(10, 0.5), (16, 0.3), (12, 0.8)])
def test_img2img_counts_the_steps_as_a_schedule_ending_on_sigma_min_twice(unet64, cls, steps, strength):
    """Karras σ's with a final σ_min end a scheduler's schedule with a step from σ_min to itself, which
    the grid (distinct times) leaves out and the solvers take where it acts: ⌊N·strength⌋ counts it, as
    `get_timesteps` does (the result is the VP-scaled x at σ_min there: α_end)."""
    import diffusers
    kw = {"use_karras_sigmas": True, **({} if cls == "DEISMultistepScheduler" else {"final_sigmas_type": "sigma_min"})}
    make = lambda: getattr(diffusers, cls)(**kw)  # noqa: E731
    ref = _img2img_loop(unet64, _in_float64(make(), steps), steps, strength, X0, _eps())
    model = fs.models.from_diffusers(unet64, make())
    got, info = fs.sample(model.field(), "scheduler", steps=steps, init=X0, strength=strength, seed=7, return_info=True)
    alpha_end = 1.0 / (1.0 + float(info.grid[-1]) ** 2) ** 0.5
    assert info.steps == int(steps * strength) - 1  # the closing step is not in the grid
    assert (got * alpha_end - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


# -- differential diffusion: a strength per element ---------------------------------------------
def _differential_loop(unet, sched, steps, x0, eps, change):
    """The differential img2img pipeline's loop (diffusers' community
    `pipeline_stable_diffusion_xl_differential_img2img.py` at strength 1) written out: the data noised
    to every timestep with one noise; thresholds arange(N)/N; before step i ≥ 1 the elements whose map
    (1 − change) is above i/N are set to the data noised to timesteps[i]; step 0 starts from it."""
    timesteps = sched.timesteps
    with_noise = [sched.add_noise(x0, eps, t.reshape(1)) for t in timesteps]
    masks = [(1 - change) > i / steps for i in range(steps)]
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            if i == 0:
                x = with_noise[0]
            else:
                m = masks[i].to(x.dtype)
                x = with_noise[i] * m + x * (1 - m)
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


CHANGE = torch.linspace(0, 1, 8, dtype=torch.float64).reshape(1, 1, 1, 8).expand(1, 1, 8, 8)  # a left-right ramp


@pytest.mark.parametrize("cls,solver", [("EulerDiscreteScheduler", "euler"), ("DDIMScheduler", "ddim"),
                                        ("DPMSolverMultistepScheduler", "dpmpp_2m")])
def test_a_strength_per_element_is_differential_diffusion(unet64, cls, solver):
    """`strength=` a tensor: each element joins the walk for its share of the last steps, equal to the
    differential img2img loop with the same noise; elements of strength 0 are held at the data noised
    until the last step, so they stay close to it, and more strength changes more."""
    import diffusers
    make = getattr(diffusers, cls)
    steps = 10
    ref = _differential_loop(unet64, _in_float64(make(), steps), steps, X0, _eps(), CHANGE)
    model = fs.models.from_diffusers(unet64, make())
    for batch in (None, 3):
        got = fs.sample(model.field(), solver, steps=steps, init=X0, strength=CHANGE, seed=7, batch_size=batch)
        assert (got - ref).abs().max().item() <= 1e-6 * ref.abs().max().item(), batch
    change = (got - X0).abs().mean(dim=(0, 1, 2))          # per column, from strength 0 to 1
    assert change[0] < change[-1] and change[0] < 0.5 * change[4:].mean()


def test_differential_diffusion_on_the_exact_mixture_and_its_errors(gmm64):
    """On the exact mixture an element of strength 0 ends where one step from the data noised to the
    last knot takes it, near the data; a map at the top everywhere is plain img2img at strength 1."""
    field = fs.fields.EDM(gmm64.denoiser, shape=(64,))
    x0 = gmm64.sample(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ones = torch.ones(64, dtype=torch.float64)
    a = fs.sample(field, "dpmpp_2m", steps=12, init=x0, strength=ones, seed=3)
    b = fs.sample(field, "dpmpp_2m", steps=12, init=x0, strength=1.0, seed=3)
    assert torch.equal(a, b)
    half = torch.cat([torch.zeros(32), torch.ones(32)]).double()
    c = fs.sample(field, "dpmpp_2m", steps=12, init=x0, strength=half, seed=3)
    assert (c[:, :32] - x0[:, :32]).abs().max() < 0.05 < (c[:, 32:] - x0[:, 32:]).abs().max()
    with pytest.raises(ValueError, match="strength.*mask"):
        fs.sample(field, "euler", steps=4, init=x0, strength=half, mask=half)
    with pytest.raises(ValueError, match=r"strength.*\[0, 1\]"):
        fs.sample(field, "euler", steps=4, init=x0, strength=half * 2)
    with pytest.raises(ValueError, match="strength.*broadcasts"):
        fs.sample(field, "euler", steps=4, init=x0, strength=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="strength.*above 0"):
        fs.sample(field, "euler", steps=4, init=x0, strength=torch.zeros(64, dtype=torch.float64))
    with pytest.raises(ValueError, match="torchdiffeq"):
        fs.sample(field, "torchdiffeq:rk4", steps=4, init=x0, strength=half)


def test_the_cli_takes_a_file_of_strengths(tmp_path):
    """`flowsolve sample --init x.npy --strength s.npy`: per-row strength maps, as `fs.sample` gives."""
    import numpy as np
    from flowsolve.cli import main
    gmm = fs.data.GaussianMixture.paper()
    x0 = gmm.sample(6, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([[0.0, 1.0]]).repeat(6, 1)
    s[::2] = torch.tensor([1.0, 0.3])
    np.save(tmp_path / "in.npy", x0.numpy())
    np.save(tmp_path / "s.npy", s.numpy())
    assert main(["sample", "--model", "gmm2d", "--solver", "euler", "--steps", "12", "--init", str(tmp_path / "in.npy"),
                 "--strength", str(tmp_path / "s.npy"), "--seed", "4", "--quiet", "--out", str(tmp_path / "y.npy")]) == 0
    ref = fs.sample(fs.fields.EDM(gmm.denoiser), "euler", steps=12, init=x0, strength=s, seed=4)
    assert np.allclose(np.load(tmp_path / "y.npy"), ref.numpy(), atol=1e-6)


@pytest.mark.parametrize("kw", [{"use_karras_sigmas": True}, {"use_exponential_sigmas": True},
                                {"use_beta_sigmas": True}, {}])
@pytest.mark.parametrize("strength", [0.4, 0.75])
def test_sa_solvers_add_noise_coefficients_are_followed(unet64, kw, strength, monkeypatch):
    """SASolverScheduler's add_noise reads ᾱ at the knot's integer timestep: with Karras / exponential /
    beta σ's that level is not the knot's, and the pipeline steps on from the knot. img2img noises the
    data there too (`add_noise_coefficients`), equal to the loop with the same noise (SA-Solver's own
    noise: flowsolve's stream 1)."""
    import diffusers.schedulers.scheduling_sasolver as sa_module
    from diffusers import SASolverScheduler
    steps = 12
    src = SampleNoise(7, 0, len(X0), tuple(X0.shape[1:]), torch.float64, "cpu", stream=1)
    monkeypatch.setattr(sa_module, "randn_tensor", lambda shape, **k: src())
    ref = _img2img_loop(unet64, _in_float64(SASolverScheduler(**kw), steps), steps, strength, X0, _eps())
    model = fs.models.from_diffusers(unet64, SASolverScheduler(**kw))
    got, info = fs.sample(model.field(), "scheduler", steps=steps, init=X0, strength=strength, seed=7,
                          return_info=True)
    got = got / (1 + float(info.grid[-1]) ** 2) ** 0.5      # its last σ is σ_min: diffusers returns α x there
    assert (got - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


@pytest.mark.parametrize("shift,strength", [(1.0, 0.3), (3.0, 0.6)])
def test_sa_solver_in_flow_mode_noises_img2img_data_on_its_beta_schedule(unet64, shift, strength, monkeypatch):
    """SASolverScheduler in flow mode keeps its VP add_noise (√ᾱ x0 + √(1 − ᾱ) ε at the knot's integer
    timestep, ᾱ of its β schedule) and reads the result as the flow's sample at the knot; img2img on a
    model loaded with it starts there too, equal to the pipeline's loop with the same noise, and differs
    from the path's own (1 − t) x0 + t ε start by far more than round-off."""
    import diffusers.schedulers.scheduling_sasolver as sa_module
    from diffusers import SASolverScheduler
    kw = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift, tau_func=lambda t: 0)
    steps = 8
    x0, eps = X0, _eps()
    src = SampleNoise(7, 0, len(X0), tuple(X0.shape[1:]), torch.float64, "cpu", stream=1)
    monkeypatch.setattr(sa_module, "randn_tensor", lambda shape, **k: src())
    ref = _img2img_loop(unet64, _in_float64(SASolverScheduler(**kw), steps), steps, strength, x0, eps)
    model = fs.models.from_diffusers(unet64, SASolverScheduler(**kw))
    field = model.field()
    got = fs.sample(field, "scheduler", steps=steps, init=x0, strength=strength, seed=7)
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    t0 = float(fs.sample(field, "scheduler", steps=steps, init=x0, strength=strength, seed=7,
                         return_info=True)[1].grid[0])
    own = (1 - t0) * x0 + t0 * eps
    assert (fs.inpainting.noised_data(field, x0, t0, eps) - own).abs().max().item() > 1e-2


@pytest.mark.parametrize("steps,strength", [(4, 0.5), (2, 0.3), (6, 0.8)])
def test_lcm_img2img_pipelines_schedule_is_the_schedule_grid_with_strength(unet64, steps, strength, monkeypatch):
    """LatentConsistencyModelImg2ImgPipeline passes `strength` to LCMScheduler.set_timesteps, which spaces
    all N timesteps within the strength's share of its training timesteps, and walks them all from the
    data noised at the first. `field.grid(N, "schedule", strength=s)` is that schedule, and `consistency`
    from init on it (strength=1: every step walked) is the pipeline's loop with the same noise; the
    standard img2img pipelines' cut of the full schedule (strength=s) is another walk."""
    import diffusers.schedulers.scheduling_lcm as lcm_module
    from diffusers import LCMScheduler
    src = SampleNoise(7, 0, len(X0), tuple(X0.shape[1:]), torch.float64, "cpu", stream=1)
    monkeypatch.setattr(lcm_module, "randn_tensor", lambda shape, **k: src())
    sched = LCMScheduler()
    sched.set_timesteps(steps, strength=strength)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    x = sched.add_noise(X0, _eps(), sched.timesteps[:1])
    with torch.no_grad():
        for t in sched.timesteps:
            x, denoised = sched.step(unet64(x, t).sample, t, x, return_dict=False)
    model = fs.models.from_diffusers(unet64, LCMScheduler())
    field = model.field()
    grid = field.grid(steps, "schedule", strength=strength)
    assert len(grid) == steps + 1
    got = fs.sample(field, "consistency", grid=grid, init=X0, strength=1.0, seed=7)
    assert (got - denoised).abs().max().item() <= 1e-6 * denoised.abs().max().item()
    rule = fs.sample(field, "consistency", grid=lambda f, n: f.grid(n, "schedule", strength=strength), steps=steps,
                     init=X0, strength=1.0, seed=7)
    assert torch.equal(rule, got)
    if int(steps * strength) >= 1:
        cut = fs.sample(field, "consistency", steps=steps, init=X0, strength=strength, seed=7)
        assert (cut - got).abs().max().item() > 1e-3 * got.abs().max().item()
    with pytest.raises(fs.errors.ArgumentError, match="strength=0.1"):
        field.grid(8, "schedule", strength=0.1)  # LCM's own refusal: 50 · 0.1 training steps hold fewer than 8


@pytest.mark.parametrize("kw", [{}, {"timestep_spacing": "linspace", "prediction_type": "v_prediction"},
                                {"timestep_spacing": "trailing", "steps_offset": 1, "set_alpha_to_one": False}])
@pytest.mark.parametrize("steps,strength", [(10, 0.3), (10, 0.6), (10, 0.9), (8, 0.95), (10, 1.0), (20, 0.75)])
def test_plms_img2img_is_the_pipelines_cut_of_pndms_list(unet64, kw, steps, strength):
    """PNDMScheduler in PLMS mode (Stable Diffusion 1.x's default) lists its second timestep twice, so
    the img2img pipelines' cut at t_start = N − ⌊N·s⌋ ≥ 2 noises the data one knot above the walk,
    takes its Heun pair down to the walk's first knot and reads that sample at the next knot; at
    t_start = 1 the Heun pair starts and ends on the first knot. `plms` (the solver the scheduler
    names) follows the cut, equal to the pipeline's loop with the same noise; other solvers on the
    same model walk the plain cut from its first knot."""
    from diffusers import PNDMScheduler
    make = lambda: PNDMScheduler(skip_prk_steps=True, **kw)  # noqa: E731
    ref = _img2img_loop(unet64, _in_float64(make(), steps), steps, strength, X0, _eps())
    model = fs.models.from_diffusers(unet64, make())
    got, info = fs.sample(model.field(), "scheduler", steps=steps, init=X0, strength=strength, seed=7,
                          return_info=True)
    noop = len(model.field().grid(steps, "schedule")) - 1 < steps            # a last step that moves nothing
    assert info.nfe == min(int(steps * strength), steps) + 1 - noop           # the pipeline's evaluations
    got = got / (1 + float(info.grid[-1]) ** 2) ** 0.5                         # diffusers returns α x at the end
    assert (got - ref).abs().max().item() <= 1e-9 * ref.abs().max().item()
    euler = fs.sample(model.field(), "euler", steps=steps, init=X0, strength=strength, seed=7, return_info=True)[1]
    assert torch.equal(euler.grid, info.grid)
    start = fs.inpainting.walk_start(model.field(), X0, _eps(), float(info.grid[0]), "diffusers", False, strength)
    assert torch.allclose(start, X0 + float(info.grid[0]) * _eps(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kw", [{}, {"timestep_spacing": "linspace", "prediction_type": "v_prediction"},
                                {"timestep_spacing": "trailing", "steps_offset": 1, "set_alpha_to_one": False}])
@pytest.mark.parametrize("steps,strength", [(10, 0.3), (10, 0.6), (8, 0.95), (10, 1.0), (20, 0.75), (20, 0.3), (16, 0.2)])
def test_pndm_img2img_is_the_pipelines_cut_of_its_runge_kutta_list(unet64, kw, steps, strength):
    """PNDMScheduler's default Runge–Kutta mode lists 12 entries for its first three steps; the img2img
    pipelines cut that list at t_start = N − ⌊N·s⌋ while the scheduler counts its calls from 0, so the
    walk's first 12 calls are Runge–Kutta stages whose steps start at the uncut list's entries. `pndm`
    (the solver the scheduler names) follows that cut, equal to the pipeline's loop with the same
    noise, with its number of evaluations; other solvers walk the plain cut of the same knots."""
    from diffusers import PNDMScheduler
    make = lambda: PNDMScheduler(**kw)  # noqa: E731
    ref = _img2img_loop(unet64, _in_float64(make(), steps), steps, strength, X0, _eps())
    model = fs.models.from_diffusers(unet64, make())
    got, info = fs.sample(model.field(), "scheduler", steps=steps, init=X0, strength=strength, seed=7,
                          return_info=True)
    assert info.solver == "pndm"
    listed = _in_float64(make(), steps).timesteps
    if strength < 1:                                                                # the pipeline's calls
        assert info.nfe == len(listed) - (steps - int(steps * strength))
    got = got / (1 + float(info.grid[-1]) ** 2) ** 0.5                              # diffusers returns α x
    assert (got - ref).abs().max().item() <= 1e-9 * ref.abs().max().item()
    euler = fs.sample(model.field(), "euler", steps=steps, init=X0, strength=strength, seed=7, return_info=True)[1]
    assert torch.equal(euler.grid, info.grid)                                       # the same walk's knots


def _expert_loops(base_net, refiner_net, make, steps, fraction, z, restart=lambda: None):
    """SDXL's ensemble of experts written out from diffusers' pipelines: the base's loop over the
    timesteps at or above round(T − f·T) (StableDiffusionXLPipeline's `denoising_end`), then the
    refiner's over those below it, from the base's latents without new noise (the SDXL img2img
    pipeline's `get_timesteps` with `denoising_start`, `set_begin_index`); `restart()` between them."""
    sched = _in_float64(make(), steps)
    cutoff = int(round(sched.config.num_train_timesteps * (1 - fraction)))
    x = z * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps[: sum(int(t >= cutoff) for t in sched.timesteps)]:
            x = sched.step(base_net(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
        base = x
        restart()
        sched = _in_float64(make(), steps)
        below = int((sched.timesteps < cutoff).sum())
        if sched.order == 2 and below % 2 == 0:  # the pipeline's +1: a second-order step starts there
            below += 1
        t_start = len(sched.timesteps) - below
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start)
        for t in sched.timesteps[t_start:]:
            x = sched.step(refiner_net(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    return base, x


def _noisy_expert_loops(base_net, refiner_net, make, steps, fraction, z):
    """`_expert_loops` with the scheduler drawing flowsolve's per-sample stream (seed 5, stream 1), from
    its start in each of the two loops, as each of the two `fs.sample(..., seed=5)` calls draws it."""
    import importlib
    module = importlib.import_module(type(make()).__module__)
    stream = {}

    def restart():
        stream["noise"] = SampleNoise(5, 0, len(z), tuple(z.shape[1:]), z.dtype, "cpu", stream=1)

    restart()
    original, module.randn_tensor = module.randn_tensor, lambda shape, **k: stream["noise"]()
    try:
        return _expert_loops(base_net, refiner_net, make, steps, fraction, z, restart)
    finally:
        module.randn_tensor = original


def _experts(base_net, make, steps, fraction, loops, **sample_kw):
    """Diffusers' SDXL base + refiner loops (`loops`, `_expert_loops` or a noisy form) beside
    flowsolve's two parts on the same models and start: (ref_base, ref, (x_base, info), (x, rinfo))."""
    from conftest import tiny_unet64
    refiner = tiny_unet64(seed=1).to(torch.float64)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref_base, ref = loops(base_net, refiner, make, steps, fraction, z)
    base_model, refiner_model = fs.models.from_diffusers(base_net, make()), fs.models.from_diffusers(refiner, make())
    top = float(base_model.field().grid(steps, "schedule")[0])
    base = fs.sample(base_model.field(), "scheduler", steps=steps, x_init=z * base_model.prior_std_at(top),
                     denoising_end=fraction, return_info=True, dtype=torch.float64, **sample_kw)
    rest = fs.sample(refiner_model.field(), "scheduler", steps=steps, x_init=base[0], denoising_start=fraction,
                     return_info=True, dtype=torch.float64, **sample_kw)
    return ref_base, ref, base, rest


@pytest.mark.parametrize("cls,kw", [("DDPMScheduler", {"clip_sample": False}),
                                    ("DDPMScheduler", {"clip_sample": False, "variance_type": "fixed_large",
                                                       "timestep_spacing": "trailing"}),
                                    ("EulerAncestralDiscreteScheduler", {}),
                                    ("KDPM2AncestralDiscreteScheduler", {}),
                                    ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
                                    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"})])
@pytest.mark.parametrize("steps,fraction", [(12, 0.8), (7, 0.5)])
def test_stochastic_experts_draw_the_schedulers_noise(unet64, cls, kw, steps, fraction):
    """The SDXL base + refiner cut with ancestral and SDE schedulers, handed the same noise: each part is
    diffusers' loop. The base's last step is a middle step of the schedule, so DDPM draws its noise
    there too (where a whole walk's last step to σ = 0 draws none)."""
    import diffusers
    make = lambda: getattr(diffusers, cls)(**kw)  # noqa: E731
    ref_base, ref, (x_base, info), (x, rinfo) = _experts(unet64, make, steps, fraction, _noisy_expert_loops, seed=5)
    vp = cls in ("DDPMScheduler", "DPMSolverMultistepScheduler")       # VP loops: x_VP = α x̃
    for got, want, level in ((x_base, ref_base, info.grid[-1]), (x, ref, rinfo.grid[-1])):
        alpha = 1 / (1 + float(level) ** 2) ** 0.5 if vp else 1.0
        assert (got * alpha - want).abs().max().item() <= 1e-6 * want.abs().max().item()


@pytest.mark.parametrize("kw", [{}, {"use_karras_sigmas": True}])
@pytest.mark.parametrize("steps,fraction", [(12, 0.8), (9, 0.7)])
def test_dpm_sde_experts_draw_the_schedulers_brownian_increments(unet64, kw, steps, fraction):
    """The SDXL cut with DPMSolverSDEScheduler (DPM++ SDE, a second-order scheduler with a Brownian
    tree): handed flowsolve's Brownian increments, each of its two loops is `dpmpp_sde`'s part."""
    import importlib
    from diffusers import DPMSolverSDEScheduler
    from test_peer_solvers import BrownianIncrements
    module = importlib.import_module(DPMSolverSDEScheduler.__module__)
    make = lambda: DPMSolverSDEScheduler(**kw)  # noqa: E731
    original = module.BrownianTreeNoiseSampler
    module.BrownianTreeNoiseSampler = lambda *a, **k: BrownianIncrements(2, (1, 8, 8))  # one per loop
    try:
        ref_base, ref, (x_base, _), (x, _) = _experts(unet64, make, steps, fraction, _expert_loops, seed=5)
    finally:
        module.BrownianTreeNoiseSampler = original
    assert (x_base - ref_base).abs().max().item() <= 1e-6 * ref_base.abs().max().item()
    assert (x - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


@pytest.mark.parametrize("cls,kw", [("EulerDiscreteScheduler", {}), ("DPMSolverMultistepScheduler", {}),
                                    ("DPMSolverMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}),
                                    ("DDIMScheduler", {"timestep_spacing": "trailing"}),
                                    ("UniPCMultistepScheduler", {}), ("HeunDiscreteScheduler", {}),
                                    ("KDPM2DiscreteScheduler", {}), ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True})])
@pytest.mark.parametrize("steps,fraction", [(12, 0.8), (7, 0.5), (10, 0.62)])
def test_denoising_end_and_start_are_sdxls_base_and_refiner(unet64, cls, kw, steps, fraction):
    """`denoising_end=f` stops the walk at the first knot below the timestep round(T − f·T) and returns
    that noisy state; `denoising_start=f` walks on from it with another model, from `x_init`. Heun's and
    KDPM2's own solvers cut the scheduler's list of calls instead: the base may end after a step's
    first stage and the refiner then takes that step again from its output. Together
    they are diffusers' SDXL base + refiner loops with the same noise (the order rules and DDIM's
    landing read the whole schedule; the refiner starts its multistep history afresh, as diffusers'),
    and for one-step methods one walk of the whole schedule when both models are the same."""
    import diffusers
    make = lambda: getattr(diffusers, cls)(**kw)  # noqa: E731
    ref_base, ref, (x_base, info), (x, rinfo) = _experts(unet64, make, steps, fraction, _expert_loops)
    base_model = fs.models.from_diffusers(unet64, make())
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    top = float(base_model.field().grid(steps, "schedule")[0])
    vp = cls not in ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler")  # (VE loops)
    level = float(info.grid[-1])
    alpha = 1 / (1 + level ** 2) ** 0.5 if vp else 1.0
    assert (x_base * alpha - ref_base).abs().max().item() <= 1e-6 * ref_base.abs().max().item()
    calls = _in_float64(make(), steps).timesteps
    if len(calls) == 2 * steps - 1:  # a second-order scheduler: the pipelines cut its list of calls
        cutoff = int(round(1000 * (1 - fraction)))
        below = int((calls < cutoff).sum())
        assert info.nfe == int((calls >= cutoff).sum()) and rinfo.nfe == below + (below % 2 == 0)
        assert (float(rinfo.grid[0]) == level) == (info.nfe % 2 == 0)  # a cut inside a step: that step again
    else:
        assert float(rinfo.grid[0]) == level and info.nfe + rinfo.nfe == len(base_model.field().grid(steps, "schedule")) - 1
    end = 1 / (1 + float(rinfo.grid[-1]) ** 2) ** 0.5 if vp else 1.0
    assert (x * end - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()
    if cls in ("EulerDiscreteScheduler", "DDIMScheduler"):  # one-step methods: the two parts are one walk
        x_one = fs.sample(base_model.field(), "scheduler", steps=steps, x_init=z * base_model.prior_std_at(top),
                          dtype=torch.float64)
        x_two = fs.sample(base_model.field(), "scheduler", steps=steps, x_init=x_base, denoising_start=fraction,
                          dtype=torch.float64)
        assert (x_one - x_two).abs().max().item() <= 1e-12 * x_one.abs().max().item()


def test_denoising_end_and_start_misuse_is_named(gmm64):
    field = fs.fields.EDM(gmm64.denoiser)
    with pytest.raises(fs.errors.ArgumentError, match="denoising_end.*diffusers timestep"):
        fs.sample(field, "euler", steps=8, n=2, denoising_end=0.5)
    with pytest.raises(fs.errors.ArgumentError, match="denoising_start.*x_init"):
        fs.sample(field, "euler", steps=8, n=2, denoising_start=0.5)


def test_the_cli_splits_a_schedule_between_two_diffusers_folders(tmp_path):
    """`flowsolve sample --denoising-end` writes the base's noisy state, and `--x-init` with
    `--denoising-start` walks on from it with another model folder: the same as the API."""
    import numpy as np
    from diffusers import DDPMPipeline, EulerDiscreteScheduler
    from conftest import tiny_unet64
    from flowsolve.cli import main
    for name, seed in (("base", 0), ("refiner", 1)):
        DDPMPipeline(unet=tiny_unet64(seed=seed), scheduler=EulerDiscreteScheduler()).save_pretrained(tmp_path / name)
    common = ["--solver", "euler", "--steps", "8", "--seed", "3", "--quiet", "--dtype", "float64"]
    assert main(["sample", "--model", str(tmp_path / "base"), "--n", "2", "--denoising-end", "0.6",
                 "--out", str(tmp_path / "lat.npy"), *common]) == 0
    assert main(["sample", "--model", str(tmp_path / "refiner"), "--x-init", str(tmp_path / "lat.npy"),
                 "--denoising-start", "0.6", "--out", str(tmp_path / "x.npy"), *common]) == 0
    base = fs.from_pretrained(str(tmp_path / "base"))
    refiner = fs.from_pretrained(str(tmp_path / "refiner"))
    lat = fs.sample(base.field(), "euler", steps=8, n=2, seed=3, denoising_end=0.6, dtype=torch.float64)
    x = fs.sample(refiner.field(), "euler", steps=8, x_init=lat, seed=3, denoising_start=0.6, dtype=torch.float64)
    assert np.allclose(np.load(tmp_path / "lat.npy"), lat.numpy(), atol=1e-6)
    assert np.allclose(np.load(tmp_path / "x.npy"), x.numpy(), atol=1e-6)


def test_img2img_strength_rules_of_the_pipelines():
    """diffusers' img2img pipelines count a strength's steps two ways: SD's walk ⌊N·s⌋ of the N
    (init_timestep = min(int(N·s), N)); SD3's, Flux's, Qwen-Image's skip int(N − min(N·s, N)) and walk
    the rest, one more step where N·s is not whole (8 · 0.3 = 2.4: 3 steps against SD's 2)."""
    from flowsolve.models.pipeline_source import strength_rule_of
    from flowsolve.solvers.names import img2img_steps
    sd3 = peer_function("stable_diffusion_3/pipeline_stable_diffusion_3_img2img.py", "get_timesteps",
                        "StableDiffusion3Img2ImgPipeline")
    sd = peer_function("stable_diffusion/pipeline_stable_diffusion_img2img.py", "get_timesteps",
                       "StableDiffusionImg2ImgPipeline")
    for n in (4, 8, 10, 25, 30):
        for s in (0.1, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0):
            sched = SimpleNamespace(scheduler=SimpleNamespace(timesteps=torch.arange(n), order=1))
            assert img2img_steps(None, n, s, "skipped") == sd3(sched, n, s, "cpu")[1], (n, s)
            assert img2img_steps(None, n, s, "walked") == sd(sched, n, s, "cpu")[1], (n, s)
    assert img2img_steps(None, 8, 0.3, "skipped") == 3 and img2img_steps(None, 8, 0.3, "walked") == 2
    for model in ("SD3Transformer2DModel", "FluxTransformer2DModel", "QwenImageTransformer2DModel"):
        assert strength_rule_of(None, model) == "skipped"
    for model in ("UNet2DConditionModel", "WanTransformer3DModel", "PixArtTransformer2DModel"):
        assert strength_rule_of(None, model) == "walked"
    assert strength_rule_of("FluxImg2ImgPipeline", "UNet2DModel") == "skipped"  # the pipeline's own rule wins
    assert strength_rule_of("StableDiffusionImg2ImgPipeline", "SD3Transformer2DModel") == "walked"


@pytest.mark.parametrize("steps,strength", [(8, 0.3), (10, 0.3), (8, 0.5)])
def test_img2img_on_an_sd3_transformer_is_sd3s_img2img_loop(steps, strength):
    """StableDiffusion3Img2ImgPipeline, its loop written out with its own `get_timesteps`: the data
    noised by `scale_noise` at the first walked timestep, then the scheduler's steps on the rest."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from conftest import tiny_sd3
    net = tiny_sd3().double()
    text = {"encoder_hidden_states": torch.randn(2, 5, 16, dtype=torch.float64),
            "pooled_projections": torch.randn(2, 8, dtype=torch.float64)}
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = _eps(2, (4, 8, 8))
    get_timesteps = peer_function("stable_diffusion_3/pipeline_stable_diffusion_3_img2img.py", "get_timesteps",
                                  "StableDiffusion3Img2ImgPipeline")
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    sched.sigmas = sched.sigmas.double()
    timesteps, walked = get_timesteps(SimpleNamespace(scheduler=sched), steps, strength, "cpu")
    x = sched.scale_noise(x0, timesteps[:1], eps)
    with torch.no_grad():
        for t in timesteps:
            x = sched.step(net(x, timestep=t.expand(2), **text).sample, t, x).prev_sample
    m = fs.models.from_diffusers(net, FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert m.strength_rule == "skipped"
    got, info = fs.sample(m.field(), "euler", steps=steps, init=x0, strength=strength, seed=7, cond=text,
                          return_info=True)
    assert info.nfe == walked
    assert (got - x).abs().max().item() <= 1e-6 * x.abs().max().item()
    # the SD rule, asked for by name, walks ⌊N·s⌋: another loop where N·s is not whole
    sd_rule = fs.models.from_diffusers(net, FlowMatchEulerDiscreteScheduler(shift=3.0), strength_rule="walked")
    _, other = fs.sample(sd_rule.field(), "euler", steps=steps, init=x0, strength=strength, seed=7, cond=text,
                         return_info=True)
    assert other.nfe == int(steps * strength)
    with pytest.raises(ValueError, match="strength_rule: expected one of walked, skipped"):
        fs.models.from_diffusers(net, FlowMatchEulerDiscreteScheduler(), strength_rule="ceil")
