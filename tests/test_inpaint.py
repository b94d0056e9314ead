"""Inpainting with any model by blending (diffusers' StableDiffusionInpaintPipeline with a 4-channel
UNet, ComfyUI's latent noise mask, RePaint's replacement step without its resampling; `solver="repaint"` adds the resampling):
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


def _pipeline_and_scheduler_loop(unet, cls, kw, strength, steps=10):
    """The inpaint pipeline's loop and `fs.sample(..., "scheduler", mask=)` on a model loaded with the
    scheduler `cls(**kw)`, the latter's generated part read as the VP sample the pipeline returns
    (a schedule ending above σ = 0); and the model."""
    import diffusers
    make = lambda: getattr(diffusers, cls)(**kw)  # noqa: E731
    ref = _inpaint_loop(unet, _in_float64(make(), steps), steps, strength, X0, MASK, _eps())
    model = fs.models.from_diffusers(unet, make())
    got, info = fs.sample(model.field(), "scheduler", steps=steps, init=X0, mask=MASK, strength=strength, seed=7,
                          return_info=True)
    vp = model.scheduler_class not in ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler")  # (VE loops end at σ)
    scale = 1 / (1 + float(info.grid[-1]) ** 2) ** 0.5 if vp else 1.0
    return ref, MASK * got * scale + (1 - MASK) * got, model


@pytest.mark.parametrize("cls,kw,strength", [
    *[(c, k, s) for c, k in [("HeunDiscreteScheduler", {}), ("KDPM2DiscreteScheduler", {}),
                             ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
                             ("PNDMScheduler", {"skip_prk_steps": True})] for s in (0.6, 1.0)],
    ("PNDMScheduler", {}, 1.0),  # (the pipelines' cut of its Runge-Kutta list is not followed: sampling guide)
])
def test_inpainting_blends_the_stages_the_pipeline_passes_between_scheduler_calls(unet64, cls, kw, strength):
    """The inpaint pipeline blends after every scheduler call: a second-order scheduler's first call
    (Heun's predictor, KDPM2's midpoint, read with the next knot's level, PLMS's first step, PNDM's
    Runge-Kutta stages) is blended before the model sees it. `heun`, `dpm_2`, `plms` and `pndm` blend
    those stages too (`Run.stage`), equal to the pipeline's loop."""
    ref, got, model = _pipeline_and_scheduler_loop(unet64, cls, kw, strength)
    assert (got - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()
    plain = fs.sample(model.field(), "scheduler", steps=10, init=X0, strength=strength, seed=7)
    assert not torch.allclose(plain, got)


@pytest.mark.parametrize("cls,kw", [
    ("UniPCMultistepScheduler", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}),
    ("DPMSolverSinglestepScheduler", {"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"}),
    ("SASolverScheduler", {"use_beta_sigmas": True, "tau_func": lambda t: 0}),
])
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_a_closing_step_sees_the_kept_part_noised_to_sigma_min(unet64, cls, kw, strength):
    """Schedules that end with a step from σ_min to itself: the pipeline blends x0 noised to σ_min before
    that closing call and x0 itself after it. The solvers that take the closing step (UniPC's and
    SA-Solver's last correction, a singlestep cycle's last stage) see the same (`final=` blend)."""
    ref, got, _ = _pipeline_and_scheduler_loop(unet64, cls, kw, strength)
    assert (got - ref).abs().max().item() <= 1e-9 * ref.abs().max().item()
    assert torch.equal(got * (1 - MASK), X0 * (1 - MASK))


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_dpm_sde_inpainting_blends_its_midpoint(unet64, strength, monkeypatch):
    """DPMSolverSDEScheduler calls twice per step; the inpaint pipeline blends its midpoint stage (with
    the next knot's level, as its `add_noise` reads it). `dpmpp_sde` does too, equal to the loop handed
    the same Brownian increments."""
    import importlib
    from diffusers import DPMSolverSDEScheduler
    from test_peer_solvers import BrownianIncrements
    module = importlib.import_module(DPMSolverSDEScheduler.__module__)
    monkeypatch.setattr(module, "BrownianTreeNoiseSampler", lambda *a, **k: BrownianIncrements(len(X0), (1, 8, 8)))
    steps = 8
    ref = _inpaint_loop(unet64, _in_float64(DPMSolverSDEScheduler(), steps), steps, strength, X0, MASK, _eps(seed=5))
    model = fs.models.from_diffusers(unet64, DPMSolverSDEScheduler())
    got = fs.sample(model.field(), "scheduler", steps=steps, init=X0, mask=MASK, strength=strength, seed=5,
                    dtype=torch.float64)
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()  # (its midpoint timesteps: float32)


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


# -- RePaint: resampling ---------------------------------------------------------------------------
def _repaint_loop(unet, sched, steps, jump_length, jump_n_sample, eta, x0, keep, seed):
    """RePaintPipeline's loop written out (set_timesteps with jumps, step at each lower timestep,
    undo_step at each higher one), the scheduler module's randn_tensor handing out flowsolve's
    per-sample noise stream (stream 1); the start is the sample's stream-0 draw, as flowsolve's."""
    import importlib
    module = importlib.import_module(type(sched).__module__)
    src = SampleNoise(seed, 0, len(x0), tuple(x0.shape[1:]), torch.float64, "cpu", stream=1)
    original, module.randn_tensor = module.randn_tensor, lambda shape, **k: src()
    try:
        image = SampleNoise(seed, 0, len(x0), tuple(x0.shape[1:]), torch.float64, "cpu", stream=0)()
        sched.set_timesteps(steps, jump_length, jump_n_sample)
        sched.eta = eta
        sched.alphas_cumprod, sched.betas = sched.alphas_cumprod.double(), sched.betas.double()
        t_last = sched.timesteps[0] + 1
        with torch.no_grad():
            for t in sched.timesteps:
                if t < t_last:
                    image = sched.step(unet(image, t).sample, t, image, x0, keep).prev_sample
                else:
                    image = sched.undo_step(image, t_last)
                t_last = t
        return image
    finally:
        module.randn_tensor = original


@pytest.mark.parametrize("steps,jump_length,jump_n_sample,eta,clip", [
    (10, 3, 2, 0.5, True), (10, 3, 2, 0.5, False), (12, 4, 3, 0.0, True), (8, 10, 10, 1.0, True), (20, 5, 2, 0.0, False),
])
def test_repaint_is_the_repaint_pipelines_loop(unet64, steps, jump_length, jump_n_sample, eta, clip):
    """`solver="repaint"` on a model loaded with RePaintScheduler: its jumps, its DDIM-with-η step with the
    kept part noised afresh, its clipping (the direction keeps the unclipped ε) and its undo_step, equal
    to the loop with the same noise, whole and in chunks of 3; `from_scheduler` names it."""
    from diffusers import RePaintScheduler
    kw = {"clip_sample": clip}
    keep = 1 - MASK                                   # RePaint's mask: 1 where the image is known
    ref = _repaint_loop(unet64, RePaintScheduler(**kw), steps, jump_length, jump_n_sample, eta, X0, keep, seed=7)
    m = fs.models.from_diffusers(unet64, RePaintScheduler(**kw))
    name, opts = fs.solvers.names.from_scheduler(RePaintScheduler(eta=eta, **kw), jump_length=jump_length,
                                                 jump_n_sample=jump_n_sample)
    assert (name, opts) == ("repaint", {"eta": eta, "jump_length": jump_length, "jump_n_sample": jump_n_sample})
    walk = fs.solvers.peers.repaint_walk(steps, jump_length, jump_n_sample)
    for batch in (None, 3):
        x, info = fs.sample(m.field(), name, steps=steps, init=X0, mask=MASK, seed=7, dtype=torch.float64,
                            batch_size=batch, return_info=True, **opts)
        assert info.nfe == sum(b > a for a, b in walk)
        assert (x - ref).abs().max().item() <= 1e-12 * max(1.0, ref.abs().max().item()), batch


@pytest.mark.parametrize("steps,jump_length,jump_n_sample", [(10, 3, 2), (25, 10, 10), (50, 10, 10), (7, 2, 4)])
def test_repaint_walk_is_the_schedulers_timesteps(steps, jump_length, jump_n_sample):
    """The walk's knots, read as RePaintScheduler's timesteps (knot k is inference index N − 1 − k), are
    the scheduler's own list: a step down at each lower timestep, one knot up at each higher one."""
    from diffusers import RePaintScheduler
    sched = RePaintScheduler()
    sched.set_timesteps(steps, jump_length, jump_n_sample)
    stride = 1000 // steps
    walk = fs.solvers.peers.repaint_walk(steps, jump_length, jump_n_sample)
    ours = [(steps - 1 - a) * stride if b > a else (steps - b) * stride for a, b in walk]
    assert ours == sched.timesteps.tolist()


def test_repaint_reaches_the_exact_conditional_of_the_mixture(gmm):
    """On the exact 2-D mixture, inpainting x₂ given x₁ = 0: the exact conditional is a mixture of two
    Gaussians (weights ∝ w_k N(0; μ_k1, s²)). The plain blend (diffusers' inpaint pipeline) misses it
    (energy distance 0.11); RePaint's resampling reaches it (energy at the two-sample noise floor)."""
    n = 2000
    field = fs.fields.EDM(gmm.denoiser, shape=(2,))
    x0 = torch.zeros(n, 2, dtype=torch.float64)
    mask = torch.tensor([0.0, 1.0], dtype=torch.float64)
    m, s, w = gmm.means, gmm.std, gmm.weights
    weights = torch.softmax(torch.log(w) - 0.5 * (m[:, 0] / s) ** 2, 0)
    gen = torch.Generator().manual_seed(0)
    k = torch.multinomial(weights, n, replacement=True, generator=gen)
    exact = (m[k, 1] + s[k] * torch.randn(n, generator=gen, dtype=torch.float64))[:, None]
    plain = fs.sample(field, "euler", steps=50, init=x0, mask=mask, seed=1, dtype=torch.float64)
    x, info = fs.sample(field, "repaint", steps=50, init=x0, mask=mask, seed=1, dtype=torch.float64,
                        jump_length=5, jump_n_sample=5, return_info=True)
    assert torch.equal(x[:, 0], x0[:, 0]) and info.nfe == 230
    assert fs.metrics.energy_distance(plain[:, 1:], exact) > 0.05
    assert fs.metrics.energy_distance(x[:, 1:], exact) < 0.02


def test_repaint_on_a_flow_starts_from_pure_noise_and_keeps_the_kept_part(gmm):
    """On a flow-matching velocity (its grid starts at t = 1, α = 0) the step is finite and the kept
    coordinates come back exactly."""
    flow = fs.fields.FlowMatching(lambda x, t: _gmm_velocity(gmm, x, t), (2,))
    x0 = gmm.sample(64, generator=torch.Generator().manual_seed(0)).double()
    mask = torch.tensor([1.0, 0.0], dtype=torch.float64)
    x = fs.sample(flow, "repaint", steps=20, init=x0, mask=mask, seed=2, dtype=torch.float64,
                  jump_length=4, jump_n_sample=3)
    assert torch.isfinite(x).all() and torch.equal(x[:, 1], x0[:, 1])


def _gmm_velocity(gmm, x, t):
    """The exact flow velocity of the mixture on x_t = (1 − t) x_0 + t ε: v = (x − D(x/(1 − t); t/(1 − t)))/t."""
    col = t.reshape(-1, 1)
    safe = torch.where(col < 1, 1 - col, torch.ones_like(col))
    d = gmm.denoiser(x / safe, (col / safe).squeeze(1))
    return torch.where(col < 1, (x - d) / col, x)  # at t = 1, D is the mean, 0 here: v = x


def test_repaint_misuse_is_named(gmm):
    field = fs.fields.EDM(gmm.denoiser, shape=(2,))
    x0 = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="repaint.*init=.*mask="):
        fs.sample(field, "repaint", steps=10, n=4)
    with pytest.raises(ValueError, match="repaint.*mask="):
        fs.sample(field, "repaint", steps=10, init=x0)
    with pytest.raises(ValueError, match="jump_length"):
        fs.sample(field, "repaint", steps=10, init=x0, mask=torch.tensor([0.0, 1.0]), jump_length=0)


# -- ComfyUI's and AUTOMATIC1111's blends: the model's data prediction keeps init ------------------------
def _comfyui_model(denoiser, x0, noise, mask, flow=False):
    """ComfyUI's KSamplerX0Inpaint around a k-diffusion model (comfy/samplers.py), written out: the input's
    kept part set to the data noised to σ with the sample's noise (its model_sampling.noise_scaling: x0 +
    σ n, or (1 − σ) x0 + σ n for flows), the denoised output's kept part set to the data."""
    def model(x, sigma):
        s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        scaled = (1 - s) * x0 + s * noise if flow else x0 + s * noise
        out = denoiser(x * mask + scaled * (1 - mask), sigma)
        return out * mask + x0 * (1 - mask)
    return model


def _a1111_model(denoiser, x0, mask):
    """AUTOMATIC1111's CFGDenoiser with `mask_before_denoising=False` (its default), written out: the
    denoised output blended with the data (init_latent · mask + nmask · denoised in its keep-mask terms)."""
    return lambda x, sigma: denoiser(x, sigma) * mask + x0 * (1 - mask)


@pytest.mark.parametrize("sampler,solver", [("sample_euler", "euler"), ("sample_dpmpp_2m", "dpmpp_2m"),
                                            ("sample_heun", "heun")])
@pytest.mark.parametrize("mode", ["comfyui", "a1111"])
def test_the_uis_inpainting_is_their_wrapped_model_under_k_diffusion(gmm64, sampler, solver, mode):
    """`inpaint="comfyui"` / `"a1111"` on the exact mixture: k-diffusion's sampler on the UI's wrapped
    model, from the data noised to the first level (and, for A1111, its samples blended with the data
    after the last step), with the same noise: equal in float64."""
    K = pytest.importorskip("peers").k_diffusion_sampling()
    n = 8
    x0 = gmm64.sample(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = torch.zeros(64, dtype=torch.float64)
    mask[::3] = 1.0
    sigmas = K.get_sigmas_karras(12, 0.002, 10.0).double()              # below the field's σ_max = 80
    field = fs.fields.EDM(gmm64.denoiser, shape=(64,))
    eps = SampleNoise(4, 0, n, (64,), torch.float64, "cpu", stream=0)()
    wrapped = _comfyui_model(gmm64.denoiser, x0, eps, mask) if mode == "comfyui" else \
        _a1111_model(gmm64.denoiser, x0, mask)
    ref = getattr(K, sampler)(wrapped, x0 + eps * sigmas[0], sigmas, disable=True)
    if mode == "a1111":
        ref = ref * mask + x0 * (1 - mask)
    x = fs.sample(field, solver, grid=sigmas, init=x0, strength=1.0, mask=mask, inpaint=mode, seed=4)
    assert (x - ref).abs().max().item() <= 1e-12 * max(1.0, ref.abs().max().item())
    if mode == "a1111":
        assert torch.equal(x[:, mask == 0], x0[:, mask == 0])
    plain = fs.sample(field, solver, grid=sigmas, init=x0, strength=1.0, mask=mask, seed=4)
    assert not torch.allclose(plain[:, mask == 1], x[:, mask == 1])


def test_comfyuis_inpainting_on_a_flow_and_from_the_top(gmm):
    """On a flow-matching velocity (k-diffusion on ComfyUI's CONST sampling: D = x − σ v, the noise scaled
    as (1 − σ) x0 + σ n), and from the top of the schedule, where ComfyUI's max_denoise start is the
    prior's draw plus α x0 (α = 0 at t = 1)."""
    K = pytest.importorskip("peers").k_diffusion_sampling()
    n = 16
    x0 = gmm.sample(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0], dtype=torch.float64)
    flow = fs.fields.FlowMatching(lambda x, t: _gmm_velocity(gmm, x, t), (2,))
    ts = torch.linspace(1, 0, 11, dtype=torch.float64)
    eps = SampleNoise(5, 0, n, (2,), torch.float64, "cpu", stream=0)()
    denoiser = lambda x, s: x - s.reshape(-1, 1) * _gmm_velocity(gmm, x, s)  # noqa: E731
    ref = K.sample_euler(_comfyui_model(denoiser, x0, eps, mask, flow=True), eps.clone(), ts, disable=True)
    x = fs.sample(flow, "euler", grid=ts, init=x0, strength=1.0, mask=mask, inpaint="comfyui", seed=5)
    assert (x - ref).abs().max().item() <= 1e-12 * max(1.0, ref.abs().max().item())
    assert (x[:, 1] - x0[:, 1]).abs().max() < 1e-12   # the last prediction's kept part is x0 itself


def test_inpaint_modes_are_checked(gmm):
    field = fs.fields.EDM(gmm.denoiser, shape=(2,))
    x0 = torch.zeros(4, 2)
    mask = torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match="inpaint: expected one of diffusers, comfyui, a1111"):
        fs.sample(field, "euler", steps=4, init=x0, mask=mask, inpaint="forge")
    with pytest.raises(ValueError, match="inpaint.*needs mask="):
        fs.sample(field, "euler", steps=4, init=x0, inpaint="comfyui")
    with pytest.raises(ValueError, match="inpaint.*repaint"):
        fs.sample(field, "repaint", steps=4, init=x0, mask=mask, inpaint="a1111")
    with pytest.raises(ValueError, match="inpaint.*no denoiser or velocity"):   # a score model: no D to blend
        fs.sample(fs.fields.ScoreDifference(gmm.score, prediction="score", shape=(2,)), "euler", steps=4,
                  init=x0, mask=mask, inpaint="comfyui")


def test_an_a1111_label_inpaints_as_a1111_and_the_cli_takes_the_mode(ddpm_unet, tmp_path):
    """With an AUTOMATIC1111 label as the solver, inpainting is A1111's (its blended prediction, its
    samples blended after the last step) unless inpaint= says otherwise; `--inpaint` on the CLI."""
    import numpy as np
    from flowsolve.cli import main
    field = ddpm_unet.field()
    a = fs.sample(field, "Euler", steps=6, init=X0, mask=MASK, seed=3)
    b = fs.sample(field, "Euler", steps=6, init=X0, mask=MASK, seed=3, inpaint="a1111")
    c = fs.sample(field, "Euler", steps=6, init=X0, mask=MASK, seed=3, inpaint="diffusers")
    assert torch.equal(a, b) and not torch.allclose(a, c)
    gmm = fs.data.GaussianMixture.paper()
    np.save(tmp_path / "in.npy", gmm.sample(5, generator=torch.Generator().manual_seed(0)).numpy())
    np.save(tmp_path / "mask.npy", np.array([[0.0, 1.0]], dtype=np.float32))
    out = tmp_path / "y.npy"
    assert main(["sample", "--model", "gmm2d", "--solver", "heun", "--steps", "8", "--init", str(tmp_path / "in.npy"),
                 "--mask", str(tmp_path / "mask.npy"), "--inpaint", "comfyui", "--seed", "4", "--quiet",
                 "--out", str(out)]) == 0
    ref = fs.sample(fs.fields.EDM(gmm.denoiser), "heun", steps=8, init=torch.from_numpy(np.load(tmp_path / "in.npy")),
                    mask=torch.tensor([0.0, 1.0]), inpaint="comfyui", seed=4)
    assert np.allclose(np.load(out), ref.numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def ddpm_unet(unet64):
    from diffusers import DDPMScheduler
    return fs.models.from_diffusers(unet64, DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                          beta_end=0.012))


def test_comfyuis_differential_diffusion_node(gmm64):
    """`inpaint="comfyui"` with a tensor `strength=`: ComfyUI's DifferentialDiffusion node (its
    denoise_mask_function, written out) under KSamplerX0Inpaint: at level σ the mask's elements at or
    above (ts(σ) − ts(σ_to)) / (ts(σ_from) − ts(σ_to)) are generated, ts the model's timestep (¼ log σ
    for an EDM model), σ_to the model's σ_min where the walk ends at 0. Equal to k-diffusion's samplers
    on that wrapper in float64."""
    K = pytest.importorskip("peers").k_diffusion_sampling()
    n = 8
    x0 = gmm64.sample(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    change = torch.linspace(0, 1, 64, dtype=torch.float64)
    sigmas = K.get_sigmas_karras(12, 0.002, 10.0).double()
    field = fs.fields.EDM(gmm64.denoiser, shape=(64,))                # σ_min 0.002, as ComfyUI's model
    eps = SampleNoise(4, 0, n, (64,), torch.float64, "cpu", stream=0)()
    ts = lambda s: 0.25 * torch.as_tensor(s, dtype=torch.float64).log()  # noqa: E731
    ts_from, ts_to = ts(sigmas[0]), ts(0.002)

    def model(x, sigma):
        m = (change >= (ts(sigma[0]) - ts_to) / (ts_from - ts_to)).to(x.dtype)
        out = gmm64.denoiser(x * m + (x0 + eps * sigma.reshape(-1, 1)) * (1 - m), sigma)
        return out * m + x0 * (1 - m)

    for sampler, solver in [("sample_euler", "euler"), ("sample_dpmpp_2m", "dpmpp_2m")]:
        ref = getattr(K, sampler)(model, x0 + eps * sigmas[0], sigmas, disable=True)
        x = fs.sample(field, solver, grid=sigmas, init=x0, strength=change, inpaint="comfyui", seed=4)
        assert (x - ref).abs().max().item() <= 1e-12 * max(1.0, ref.abs().max().item()), sampler
    # elements of strength 0 are kept until the last level, where the threshold reaches 0 (≥): close to x0;
    # elements of strength 1 are free throughout and end far from it
    assert (x[:, 0] - x0[:, 0]).abs().max() < 0.01 < (x[:, -1] - x0[:, -1]).abs().max()


def test_comfyuis_inpainting_from_the_top_of_an_edm_schedule(gmm64):
    """At the top of the schedule (σ_0 = the field's σ_max) ComfyUI's noise_scaling starts from
    x0 + √(1 + σ_0²) ε (its max_denoise), below it from x0 + σ_0 ε."""
    K = pytest.importorskip("peers").k_diffusion_sampling()
    n = 6
    x0 = gmm64.sample(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = (torch.arange(64) % 2).double()
    field = fs.fields.EDM(gmm64.denoiser, shape=(64,))
    sigmas = K.get_sigmas_karras(10, 0.002, float(field.t_start)).double()
    eps = SampleNoise(2, 0, n, (64,), torch.float64, "cpu", stream=0)()
    ref = K.sample_euler(_comfyui_model(gmm64.denoiser, x0, eps, mask), x0 + eps * (1 + sigmas[0] ** 2).sqrt(), sigmas,
                         disable=True)
    x = fs.sample(field, "euler", grid=sigmas, init=x0, mask=mask, inpaint="comfyui", seed=2)
    assert (x - ref).abs().max().item() <= 1e-12 * max(1.0, ref.abs().max().item())
