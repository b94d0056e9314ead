"""The solvers users compare against (UniPC, DEIS, DPM-Solver-2, DPM-Solver++(2S), the SDE samplers,
ipndm_v): each against its reference implementation on the same denoiser, grid and noise
(k-diffusion's samplers, diffusers' schedulers), for its convergence order on the exact mixture,
and on flow-matching fields against the same solver in VE coordinates."""
import math

import pytest
import torch
from diffusers import DEISMultistepScheduler, UNet2DModel, UniPCMultistepScheduler

import flowsolve as fs
from conftest import tiny_unet64
from flowsolve.noise import SampleNoise


def _diffusers_loop(unet, sched, z, **step_kw):
    x = z * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x, **step_kw).prev_sample
    return x


class BrownianIncrements:
    """A k-diffusion / diffusers noise sampler from flowsolve's per-sample stream (seed 5, stream 1),
    drawn as `dpmpp_sde` draws: called for (ρ_i, ρ_s) it returns a over [ρ_s, ρ_i]; then for
    (ρ_i, ρ_{i+1}) the increment of the same path over [ρ_{i+1}, ρ_i], (√d₁ a + √d₂ b)/√(d₁ + d₂)."""

    def __init__(self, n, shape):
        self.src, self.first = SampleNoise(5, 0, n, shape, torch.float64, "cpu", stream=1), None

    def __call__(self, s, s_next):
        if self.first is None:
            self.first = (self.src(), float(s) - float(s_next), float(s_next))
            return self.first[0]
        (a, d1, s_mid), b = self.first, self.src()
        d2, self.first = s_mid - float(s_next), None
        return (d1 ** 0.5 * a + d2 ** 0.5 * b) / (d1 + d2) ** 0.5


def _in_float64(sched, steps):
    """The scheduler set to `steps` with its σ's and schedule tensors in float64 (as the flowsolve side)."""
    sched.set_timesteps(steps)
    for key in ("sigmas", "alphas_cumprod", "sigmas_interpol", "sigmas_up", "sigmas_down"):
        if isinstance(getattr(sched, key, None), torch.Tensor):
            setattr(sched, key, getattr(sched, key).double())
    return sched


def _noisy_diffusers_loop(unet, sched, z, **step_kw):
    """`_diffusers_loop` with the scheduler module's `randn_tensor` handing out flowsolve's per-sample
    noise stream (seed 5, stream 1), so stochastic schedulers and solvers see the same noise."""
    import importlib

    module = importlib.import_module(type(sched).__module__)
    src = SampleNoise(5, 0, len(z), tuple(z.shape[1:]), z.dtype, "cpu", stream=1)
    original, module.randn_tensor = module.randn_tensor, lambda shape, **k: src()
    try:
        return _diffusers_loop(unet, sched, z, **step_kw)
    finally:
        module.randn_tensor = original


@pytest.mark.parametrize("name,cls,kw", [
    ("unipc", UniPCMultistepScheduler, dict(solver_type="bh2")),
    ("unipc_bh1", UniPCMultistepScheduler, dict(solver_type="bh1", final_sigmas_type="sigma_min")),
    ("deis", DEISMultistepScheduler, {}),
])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [6, 20])
def test_multistep_solvers_equal_diffusers_schedulers(unet64, name, cls, kw, order, steps):
    """Same UNet, same schedule (the scheduler's own, the field's default grid), same start: equal in
    float64 to round-off. diffusers returns x_VP = α x at a last σ_min > 0 (x here is the VE x/α)."""
    sched = cls(num_train_timesteps=1000, solver_order=order, **kw)
    sched.set_timesteps(steps)
    sched.sigmas, sched.alphas_cumprod = sched.sigmas.double(), sched.alphas_cumprod.double()
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _diffusers_loop(unet64, sched, z)
    m = fs.models.from_diffusers(unet64, cls(num_train_timesteps=1000, solver_order=order, **kw))
    field = m.field()
    grid = field.grid(steps, "schedule")
    x, info = fs.sample(field, name, grid=grid, x_init=z * m.prior_std_at(float(grid[0])), order=order,
                        dtype=torch.float64, return_info=True)
    alpha_end = 1.0 / math.sqrt(1.0 + float(grid[-1]) ** 2)
    assert info.nfe == steps
    assert (x * alpha_end - ref).abs().max().item() <= 1e-9 * ref.abs().max().item()


_SCHEDULER_LOOPS = [
    ("HeunDiscreteScheduler", {}, "heun"),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}, "heun"),
    ("KDPM2DiscreteScheduler", {}, "dpm_2"),
    ("PNDMScheduler", {"skip_prk_steps": True}, "plms"),
    ("PNDMScheduler", {"skip_prk_steps": True, "steps_offset": 1, "beta_schedule": "scaled_linear",
                       "beta_start": 0.00085, "beta_end": 0.012}, "plms"),     # Stable Diffusion 1.x's
    ("PNDMScheduler", {"skip_prk_steps": True, "prediction_type": "v_prediction"}, "plms"),  # blends v's
    # "linspace" knots are not a stride T//N apart: each step lands at t − T//N, read at the next knot
    ("PNDMScheduler", {"skip_prk_steps": True, "timestep_spacing": "linspace"}, "plms"),
    ("PNDMScheduler", {"skip_prk_steps": True, "timestep_spacing": "linspace", "prediction_type": "v_prediction"},
     "plms"),
    ("DPMSolverMultistepScheduler", {}, "dpmpp_2m"),
    ("DPMSolverMultistepScheduler", {"solver_type": "heun"}, "dpmpp_2m_heun"),
    ("DPMSolverMultistepScheduler", {"thresholding": True, "sample_max_value": 2.0}, "dpmpp_2m"),
    # spaced σ's whose timesteps the scheduler casts to integers (rounded or truncated): the network
    # sees the scheduler's timestep on its knots (`integer_timesteps`, on by default for these)
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "dpmpp_2m"),
    ("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True}, "dpmpp_2m"),
    ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True}, "dpmpp_2m"),
    ("DPMSolverMultistepScheduler", {"use_beta_sigmas": True, "final_sigmas_type": "sigma_min"}, "dpmpp_2m"),
    ("UniPCMultistepScheduler", {"use_karras_sigmas": True}, "unipc"),
    ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}, "dpm_2"),       # knots' timesteps rounded, not midpoints'
    # the cosine schedule (Nichol & Dhariwal 2021) ends at ᾱ ≈ 2.4e-9, σ_max ≈ 2e4: kept, not clamped
    ("EulerDiscreteScheduler", {"beta_schedule": "squaredcos_cap_v2"}, "euler"),
    ("DPMSolverMultistepScheduler", {"beta_schedule": "squaredcos_cap_v2"}, "dpmpp_2m"),
    ("KDPM2DiscreteScheduler", {"beta_schedule": "squaredcos_cap_v2"}, "dpm_2"),
    # zero terminal SNR (Lin et al. 2024): ᾱ_T = 0 clamped to 2⁻²⁴ as these schedulers do, the first
    # step at the top of the clamped plateau is the last timestep
    ("EulerDiscreteScheduler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                                "prediction_type": "v_prediction"}, "euler"),
    ("DPMSolverMultistepScheduler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                                     "prediction_type": "v_prediction"}, "dpmpp_2m"),
    ("UniPCMultistepScheduler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                                 "prediction_type": "v_prediction"}, "unipc"),
    # DDIM keeps ᾱ_T = 0: its first step is from pure noise (x_0 = −v, ε = x_T), λ = −∞ at the top knot
    ("DDIMScheduler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                       "prediction_type": "v_prediction", "clip_sample": False}, "ddim"),
    ("DDIMScheduler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                       "prediction_type": "v_prediction"}, "ddim"),                  # x̂₀ clipped
    ("DDIMScheduler", {"rescale_betas_zero_snr": True, "timestep_spacing": "linspace",
                       "prediction_type": "sample", "clip_sample": False}, "ddim"),
    ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}, "dpmpp_singlestep"),
    ("EulerDiscreteScheduler", {"final_sigmas_type": "sigma_min"}, "euler"),
    ("EulerDiscreteScheduler", {"timestep_type": "continuous", "prediction_type": "v_prediction",   # CosXL-style
                                "use_karras_sigmas": True, "sigma_min": 0.002, "sigma_max": 120.0}, "euler"),
    ("LMSDiscreteScheduler", {}, "adams"),
    ("EDMEulerScheduler", {}, "euler"),                       # starts from √(σ_max² + 1) z, as diffusers does
    ("EDMDPMSolverMultistepScheduler", {}, "dpmpp_2m"),
    ("EDMDPMSolverMultistepScheduler", {"solver_type": "heun"}, "dpmpp_2m_heun"),
]


@pytest.mark.parametrize("name,kw,solver", _SCHEDULER_LOOPS)
def test_a_schedulers_own_loop_is_the_solver_of_its_name(unet64, name, kw, solver):
    """The field's default grid is the scheduler's schedule with each repeated knot once (Heun and
    KDPM2 list every σ per stage, PLMS revisits its first timestep), and the named solver on it is the
    scheduler's loop: PNDM's PLMS is `plms`, DPM-Solver's default midpoint form `dpmpp_2m`, Imagen's
    dynamic thresholding is applied to D."""
    import diffusers
    cls = getattr(diffusers, name)
    steps = 10
    sched = _in_float64(cls(num_train_timesteps=1000, **kw), steps)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _diffusers_loop(unet64, sched, z)
    m = fs.models.from_diffusers(unet64, cls(num_train_timesteps=1000, **kw))
    field = m.field()
    grid = field.grid(steps, "schedule")
    assert (grid[1:] < grid[:-1]).all()
    x = fs.sample(field, solver, grid=grid, x_init=z * m.prior_std_at(float(grid[0])), dtype=torch.float64,
                  order=4) if solver == "adams" else \
        fs.sample(field, solver, grid=grid, x_init=z * m.prior_std_at(float(grid[0])), dtype=torch.float64)
    vp = m.prior_std_at(float(grid[0])) > float(grid[0])       # diffusers returns α x at a last σ > 0
    alpha_end = 1.0 / math.sqrt(1.0 + float(grid[-1]) ** 2) if vp else 1.0
    tol = 1e-6                          # diffusers keeps σ and timesteps in float32 (PNDM: 1e-12)
    assert (x * alpha_end - ref).abs().max().item() <= tol * ref.abs().max().item()


_AYS = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]   # Align Your Steps' SD 1.5 timesteps (diffusers' docs)


@pytest.mark.parametrize("name,kind,noisy", [
    ("DPMSolverMultistepScheduler", "timesteps", False), ("EulerDiscreteScheduler", "timesteps", False),
    ("EulerDiscreteScheduler", "sigmas", False), ("HeunDiscreteScheduler", "timesteps", False),
    ("DPMSolverSinglestepScheduler", "timesteps", False), ("DDPMScheduler", "timesteps", True),
    ("LCMScheduler", "timesteps", True), ("TCDScheduler", "timesteps", True),
])
def test_a_scheduler_set_to_a_custom_schedule_is_sampled_on_it(unet64, name, kind, noisy):
    """A scheduler set with `set_timesteps(timesteps=...)` (Align Your Steps) or `sigmas=...`, as the
    pipelines' `timesteps=` / `sigmas=` arguments set it: the model loaded with it samples that schedule
    by default ("scheduler" and the default grid: all of its steps) and equals the scheduler's own loop;
    another step count is refused by name, and so is that scheduler handed as the solver of a model
    loaded without its schedule (it sampled another schedule silently before)."""
    import copy
    import warnings

    import diffusers
    cls = getattr(diffusers, name)
    sched = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # LCM and TCD warn that AYS' timesteps are not their training ones
        sched.set_timesteps(**{kind: _AYS if kind == "timesteps" else
                               [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]})
    m = fs.models.from_diffusers(unet64, copy.deepcopy(sched))
    field = m.field()
    assert field.default_steps == 10
    grid = field.grid(10, "schedule")
    if kind == "timesteps" and name != "LCMScheduler":   # its knots are the given timesteps' levels
        torch.testing.assert_close(grid[: len(_AYS)], m.sigma(torch.tensor(_AYS)), rtol=1e-6, atol=0)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    vp = m.prior_std_at(float(grid[0])) > float(grid[0]) * (1 + 1e-9)
    ref = (_noisy_diffusers_loop if noisy else _diffusers_loop)(unet64, sched, z)
    x = fs.sample(field, "scheduler", x_init=z * m.prior_std_at(float(grid[0])), seed=5)
    if vp and name != "LCMScheduler":                                   # diffusers returns α x at a last σ > 0
        x = x / math.sqrt(1.0 + float(grid[-1]) ** 2)
    assert (x - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    with pytest.raises(fs.errors.ArgumentError, match="custom schedule of 10 steps"):
        fs.sample(field, "scheduler", steps=12, n=2, seed=0)
    plain = fs.models.from_diffusers(unet64, cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    with pytest.raises(fs.errors.ArgumentError, match="its custom schedule"):
        fs.sample(plain.field(), sched, n=2, seed=0)


@pytest.mark.parametrize("kw", [dict(use_karras_sigmas=True), dict(timestep_spacing="trailing"),
                                dict(use_exponential_sigmas=True, final_sigmas_type="zero")])
def test_a_swapped_scheduler_is_the_model_with_scheduler_and_never_ignored(unet64, kw):
    """diffusers' `pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)`
    is `m.with_scheduler(that scheduler)`: its field's default schedule is the swapped scheduler's and
    "scheduler" its loop. Handed as the solver of the model loaded with the old one, that scheduler is
    refused by name (its schedule, or its β's, would have been ignored: 3% off with Karras σ's)."""
    from diffusers import DPMSolverMultistepScheduler
    m = fs.models.from_diffusers(unet64, DPMSolverMultistepScheduler())
    swapped = DPMSolverMultistepScheduler.from_config(m.scheduler.config, **kw)
    ref_sched = _in_float64(DPMSolverMultistepScheduler.from_config(m.scheduler.config, **kw), 10)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _diffusers_loop(unet64, ref_sched, z)
    m2 = m.with_scheduler(swapped)
    assert m2.model is m.model and type(m2) is type(m)
    grid = m2.field().grid(10, "schedule")
    x = fs.sample(m2.field(), "scheduler", steps=10, x_init=z * m2.prior_std_at(float(grid[0])))
    x = x / math.sqrt(1.0 + float(grid[-1]) ** 2)
    assert (x - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()
    with pytest.raises(fs.errors.ArgumentError, match="m.with_scheduler"):
        fs.sample(m.field(), swapped, steps=10, n=2, seed=0)
    with pytest.raises(fs.errors.ArgumentError, match="beta_schedule='scaled_linear'"):
        fs.sample(m.field(), DPMSolverMultistepScheduler(beta_schedule="scaled_linear"), steps=10, n=2, seed=0)
    fs.sample(m.field(), DPMSolverMultistepScheduler(), steps=10, n=2, seed=0)   # the same one: accepted


def test_zero_terminal_snr_ddim_in_float32_starts_at_the_last_timestep(unet64):
    """A zero-SNR DDIM model sampled as users do (float32, the default grid): σ_max = 4096 − 2⁻¹³
    rounds down in float32 onto the clamped plateau, which still reads as timestep 999 (not 996, the
    plateau's foot); the run is DDIMScheduler's float32 loop, and the path solvers start from the
    pure-noise knot with a finite, data-scale step (x_0 = −v there; the adaptive DPM-Solver, which needs
    a finite λ, from the clamped level)."""
    from diffusers import DDIMScheduler
    unet = UNet2DModel.from_config(unet64.config)
    unet.load_state_dict({k: v.float() for k, v in unet64.state_dict().items()})
    kw = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    sched = DDIMScheduler(**kw)
    sched.set_timesteps(8)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    ref = _diffusers_loop(unet.eval(), sched, z)
    m = fs.models.from_diffusers(unet.eval(), DDIMScheduler(**kw))
    top = m.field().grid(8)[:1].float()
    assert float(top) < m.sigma_max and m.timestep(top.expand(2)).tolist() == [999.0, 999.0]
    assert m.pure_noise_at(float(top)) and not m.pure_noise_at(float(m.sigma(998)) * 0.99)
    x = fs.sample(m.field(), "ddim", nfe=8, x_init=m.field().from_normal(z, float(top)))
    assert (x - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    for solver in ("unipc", "dpmpp_2m", "deis", "ddpm", "dpm_2", "dpmpp_2s", "dpm_adaptive"):
        y = fs.sample(m.field(), solver, nfe=8 if solver != "dpm_adaptive" else 400, n=3, seed=0)
        assert torch.isfinite(y).all() and y.abs().max() < 50
    # Euler's and DPM-Solver's schedulers clamp ᾱ_T to 2⁻²⁴ themselves: no pure-noise knot there
    from diffusers import EulerDiscreteScheduler
    assert not fs.models.from_diffusers(unet.eval(), EulerDiscreteScheduler(**kw)).zero_terminal_snr


def test_zero_terminal_snr_img2img_at_full_strength_and_inversion(unet64):
    """At a zero-SNR DDIM model's top knot `add_noise` gives the noise alone: img2img at strength 1 is
    DDIMScheduler's loop from `add_noise(x0, ε, 999)` = ε; an inversion, which ends at that knot, stays
    finite (it keeps the clamped level: no step into λ = −∞)."""
    from diffusers import DDIMScheduler
    kw = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction",
              clip_sample=False)
    sched = _in_float64(DDIMScheduler(**kw), 10)
    x0 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps = SampleNoise(0, 0, 3, (1, 8, 8), torch.float64, "cpu", stream=0)()     # what seed=0 noises init with
    start = sched.add_noise(x0, eps, sched.timesteps[:1])
    assert torch.equal(start, eps)
    ref = _diffusers_loop(unet64, sched, start)
    m = fs.models.from_diffusers(unet64, DDIMScheduler(**kw))
    got = fs.sample(m.field(), "ddim", nfe=10, init=x0, strength=1.0, seed=0, dtype=torch.float64)
    assert (got - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()
    grid = m.field().grid(40)
    data = fs.sample(m.field(), "ddim", grid=grid, n=3, seed=1, dtype=torch.float64)
    for solver in ("ddim", "dpmpp_2m", "unipc"):
        z = fs.invert(m.field(), data, solver, grid=grid, dtype=torch.float64)
        assert torch.isfinite(z).all()


def test_unipc_equals_diffusers_in_float32(unet64):
    unet = UNet2DModel.from_config(unet64.config)
    unet.load_state_dict({k: v.float() for k, v in unet64.state_dict().items()})
    sched = UniPCMultistepScheduler(num_train_timesteps=1000, solver_order=3)
    sched.set_timesteps(8)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    ref = _diffusers_loop(unet.eval(), sched, z)
    m = fs.models.from_diffusers(unet.eval(), UniPCMultistepScheduler(num_train_timesteps=1000, solver_order=3))
    x = fs.sample(m.field(), "unipc", nfe=8, x_init=z * m.prior_std_at(float(m.field().grid(8)[0])), order=3)
    assert (x - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("name,kname,opts", [
    ("dpm_2", "sample_dpm_2", {}),
    ("dpmpp_2s", "sample_dpmpp_2s_ancestral", {"eta": 0.0}),
    ("dpmpp_2s", "sample_dpmpp_2s_ancestral", {"eta": 1.0}),
    ("euler_ancestral", "sample_euler_ancestral", {"eta": 1.0}),
    ("euler_ancestral", "sample_euler_ancestral", {"eta": 0.5}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 1.0}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 1.0}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 0.5}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 1.0, "solver_type": "heun"}),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", {"eta": 1.0}),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", {"eta": 0.5, "s_noise": 0.9}),
])
def test_k_diffusion_samplers_with_the_same_noise(gmm64, name, kname, opts):
    """flowsolve's per-sample noise stream (seed, stream 1) handed to k-diffusion's noise_sampler:
    the samples agree to float64 round-off."""
    K = pytest.importorskip("peers").k_diffusion_sampling()
    sig = K.get_sigmas_karras(10, 0.002, 80.0).double()
    z = torch.randn(64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 80
    src = SampleNoise(5, 0, 64, (64,), torch.float64, "cpu", stream=1)

    def model(x, s, **kw):
        return gmm64.denoiser(x, s)
    extra = {} if name == "dpm_2" else {"noise_sampler": lambda a, b: src()}
    ref = getattr(K, kname)(model, z.clone(), sig, disable=True, **opts, **extra)
    got = fs.sample(fs.fields.EDM(gmm64.denoiser), name, grid=sig, x_init=z, seed=5, **opts)
    assert (got - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()


@pytest.mark.parametrize("name,kname,opts", [
    ("euler", "sample_euler", {}), ("heun", "sample_heun", {}), ("dpmpp_2m", "sample_dpmpp_2m", {}),
    ("dpm_2", "sample_dpm_2", {}), ("adams", "sample_lms", {"order": 4}),
])
def test_k_diffusion_deterministic_samplers_under_their_own_names(gmm64, name, kname, opts):
    """Each deterministic k-diffusion sampler is the flowsolve solver of the same name (lms: adams,
    order 4) on the same σ-grid and start, to float64 round-off."""
    K = pytest.importorskip("peers").k_diffusion_sampling()
    sig = K.get_sigmas_karras(12, 0.002, 80.0).double()
    z = torch.randn(32, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 80
    ref = getattr(K, kname)(lambda x, s, **kw: gmm64.denoiser(x, s), z.clone(), sig, disable=True)
    got = fs.sample(fs.fields.EDM(gmm64.denoiser), name, grid=sig, x_init=z, **opts)
    assert (got - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()


def test_dpmpp_sde_is_k_diffusions_with_brownian_increments(gmm64):
    """`dpmpp_sde` draws its two noises per step as increments of one Brownian path in ρ (the law of
    k-diffusion's default BrownianTreeNoiseSampler): handed the same increments, k-diffusion's
    `sample_dpmpp_sde` gives the same samples; eta = 0 is DPM-Solver++(2S)."""
    K = pytest.importorskip("peers").k_diffusion_sampling()
    sig = K.get_sigmas_karras(10, 0.002, 80.0).double()
    z = torch.randn(64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 80

    field = fs.fields.EDM(gmm64.denoiser)
    for eta, r in [(1.0, 0.5), (0.6, 0.3)]:
        ref = K.sample_dpmpp_sde(lambda x, s, **kw: gmm64.denoiser(x, s), z.clone(), sig, disable=True,
                                 eta=eta, r=r, noise_sampler=BrownianIncrements(64, (64,)))
        got, info = fs.sample(field, "dpmpp_sde", grid=sig, x_init=z, seed=5, eta=eta, r=r, return_info=True)
        assert (got - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()
        assert info.nfe == 2 * 10 - 1
    det = fs.sample(field, "dpmpp_sde", grid=sig, x_init=z, seed=5, eta=0.0)
    assert torch.allclose(det, fs.sample(field, "dpmpp_2s", grid=sig, x_init=z), rtol=0, atol=1e-10)


@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 5, 6, 10, 20])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_fast_is_k_diffusions_with_its_orders(gmm64, nfe, eta):
    """DPM-Solver-fast shares the budget out as k-diffusion does (3, ..., 3 then 2, 1 / 1 / 2) on ⌊nfe/3⌋ + 1
    λ-uniform steps from σ_max to σ_min: the same samples (k-diffusion run in float64) and exactly nfe
    evaluations; on the default grid (log-linear, then σ = 0, whose step is first order) too."""
    K = pytest.importorskip("peers").k_diffusion_sampling()
    z = torch.randn(64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 80
    src = SampleNoise(5, 0, 64, (64,), torch.float64, "cpu", stream=1)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)              # k-diffusion builds its λ grid in the default dtype
    try:
        ref = K.sample_dpm_fast(lambda x, s, **kw: gmm64.denoiser(x, s), z.clone(), 0.002, 80.0, nfe, disable=True,
                                eta=eta, noise_sampler=lambda a, b: src())
    finally:
        torch.set_default_dtype(default)
    field = fs.fields.EDM(gmm64.denoiser)
    grid = fs.grids.loglinear(nfe // 3 + 1, 0.002, 80.0, final_zero=False)
    got, info = fs.sample(field, "dpm_fast", nfe=nfe, grid=grid, x_init=z, seed=5, eta=eta, return_info=True)
    assert info.nfe == nfe
    assert (got - ref).abs().max().item() <= 1e-9 * ref.abs().max().item()
    _, info = fs.sample(field, "dpm_fast", nfe=nfe, n=2, seed=0, return_info=True)
    assert info.nfe <= nfe and float(info.grid[-1]) == 0.0


@pytest.mark.parametrize("order,eta,rtol", [(3, 0.0, 0.05), (2, 0.0, 0.05), (3, 0.0, 0.005), (3, 1.0, 0.05)])
def test_dpm_adaptive_is_k_diffusions(gmm64, order, eta, rtol):
    """Adaptive DPM-Solver-12/23 with k-diffusion's PID controller takes the same steps and lands on the
    same samples (k-diffusion in float64), with fewer evaluations (the ε at a rejected step's start is
    reused); it stops at its budget with NFEBudgetExceeded, and a grid to the data ends with a DDIM step."""
    K = pytest.importorskip("peers").k_diffusion_sampling()
    z = torch.randn(64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 80
    src = SampleNoise(5, 0, 64, (64,), torch.float64, "cpu", stream=1)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref, kinfo = K.sample_dpm_adaptive(lambda x, s, **kw: gmm64.denoiser(x, s), z.clone(), 0.002, 80.0,
                                           disable=True, order=order, eta=eta, rtol=rtol,
                                           noise_sampler=lambda a, b: src(), return_info=True)
    finally:
        torch.set_default_dtype(default)
    field = fs.fields.EDM(gmm64.denoiser)
    got, info = fs.sample(field, "dpm_adaptive", nfe=5000, grid=torch.tensor([80.0, 0.002], dtype=torch.float64),
                          x_init=z, seed=5, order=order, eta=eta, rtol=rtol, return_info=True)
    assert (got - ref).abs().max().item() <= 1e-9 * ref.abs().max().item()
    assert info.nfe == kinfo["nfe"] - kinfo["n_reject"]
    with pytest.raises(fs.solvers.NFEBudgetExceeded, match="nfe=10"):
        fs.sample(field, "dpm_adaptive", nfe=10, n=4, seed=0, order=order)
    full = fs.sample(field, "dpm_adaptive", nfe=5000, x_init=z, seed=5, order=order, eta=eta, rtol=rtol)
    last = got - 0.002 * (got - gmm64.denoiser(got, torch.full((64,), 0.002, dtype=torch.float64))) / 0.002
    assert torch.allclose(full, last, rtol=0, atol=1e-9 * float(ref.abs().max()))


@pytest.mark.parametrize("corrector_steps", [0, 1])
def test_pc_is_the_score_sde_ve_loop(corrector_steps):
    """`pc` is diffusers' ScoreSdeVe predictor-corrector loop (Song et al. 2021: Langevin corrector
    with the snr step from the batch's mean norms, reverse-diffusion predictor, the last step's mean)
    on the same σ's and noise."""
    import diffusers.schedulers.scheduling_sde_ve as sde_ve
    from diffusers import ScoreSdeVeScheduler
    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                      time_embedding_type="fourier", down_block_types=("DownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4).eval().double()
    sched = ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=50.0, correct_steps=corrector_steps)
    sched.set_timesteps(6)
    sched.set_sigmas(6)
    knots = sched.discrete_sigmas.double().flip(0)      # the predictor's σ's; the model is called at them too
    src = SampleNoise(5, 0, 3, (1, 8, 8), torch.float64, "cpu", stream=1)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = z * sched.init_noise_sigma
    original, sde_ve.randn_tensor = sde_ve.randn_tensor, lambda shape, **k: src()
    try:
        with torch.no_grad():
            for i, t in enumerate(sched.timesteps):
                sigma = knots[i].expand(3)
                for _ in range(corrector_steps):
                    x = sched.step_correct(net(x, sigma).sample, x).prev_sample
                out = sched.step_pred(net(x, sigma).sample, t, x)
                x, ref = out.prev_sample, out.prev_sample_mean
    finally:
        sde_ve.randn_tensor = original
    m = fs.models.from_diffusers(net, ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=50.0))
    grid = torch.cat([knots, torch.zeros(1, dtype=torch.float64)])
    got, info = fs.sample(m.field(), "pc", grid=grid, x_init=z * 50.0, seed=5, corrector_steps=corrector_steps,
                          dtype=torch.float64, return_info=True)
    assert info.nfe == 6 * (1 + corrector_steps)
    assert (got - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()   # diffusers' step size is float32


@pytest.mark.parametrize("step,sampler", [("heun", "sample_heun"), ("euler", "sample_euler"),
                                          ("dpm_2", "sample_dpm_2")])
def test_edm_churn_is_k_diffusions_sampler_with_churn(gmm64, step, sampler):
    """EDM's Alg. 2 (`edm`, S_churn in [S_min, S_max]) with a Heun, Euler or DPM-2 step is k-diffusion's
    `sample_heun`, `sample_euler` or `sample_dpm_2` with `s_churn`, given the same noise on the churned
    steps (k-diffusion draws on every step), and counts the same evaluations."""
    K = pytest.importorskip("peers").k_diffusion_sampling()
    sig = K.get_sigmas_karras(10, 0.002, 80.0).double()
    z = torch.randn(64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 80
    src = SampleNoise(5, 0, 64, (64,), torch.float64, "cpu", stream=1)
    churned = iter([0.05 <= float(s) <= 50.0 for s in sig[:-1]])
    calls = []

    def den(x, s, **kw):
        calls.append(1)
        return gmm64.denoiser(x, s)
    original = K.torch.randn_like
    K.torch.randn_like = lambda x, *a, **k: src() if next(churned) else torch.zeros_like(x)
    try:
        ref = getattr(K, sampler)(den, z.clone(), sig, disable=True, s_churn=10.0, s_tmin=0.05, s_tmax=50.0,
                                  s_noise=0.9)
    finally:
        K.torch.randn_like = original
    got, info = fs.sample(fs.fields.EDM(gmm64.denoiser), "edm", grid=sig, x_init=z, seed=5, S_churn=10.0,
                          S_min=0.05, S_max=50.0, S_noise=0.9, step=step, return_info=True)
    assert (got - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
    assert info.nfe == len(calls) == (10 if step == "euler" else 19)
    _, budget = fs.sample(fs.fields.EDM(gmm64.denoiser), "edm", nfe=19, n=2, seed=0, step=step, return_info=True)
    assert len(budget.grid) - 1 == (19 if step == "euler" else 10)   # the NFE budget reads the step's evaluations


def test_k_diffusion_churn_names_point_to_edm():
    field = fs.fields.EDM(lambda x, s: 0 * x, shape=(2,))
    with pytest.raises(TypeError, match="s_churn is S_churn of solver 'edm', whose step='euler'"):
        fs.sample(field, "euler", nfe=4, n=2, s_churn=1.0)
    with pytest.raises(TypeError, match="s_tmin is S_min"):
        fs.sample(field, "edm", nfe=4, n=2, s_tmin=1.0)
    with pytest.raises(ValueError, match="step: expected one of 'heun', 'euler', 'dpm_2', got 'rk4'"):
        fs.sample(field, "edm", nfe=4, n=2, step="rk4")


def _endpoint_errors(gmm, name, opts, ns):
    field = fs.fields.EDM(gmm.denoiser)
    x0 = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    ref = fs.sample(field, "torchdiffeq:dopri5", grid=torch.tensor([10.0, 0.5], dtype=torch.float64), x_init=x0,
                    nfe=10 ** 6, rtol=1e-11, atol=1e-11)
    errs = []
    for n in ns:
        grid = torch.linspace(math.log(10.0), math.log(0.5), n + 1, dtype=torch.float64).exp()
        errs.append(float((fs.sample(field, name, grid=grid, x_init=x0, **opts) - ref).norm(dim=1).mean()))
    return [math.log2(a / b) for a, b in zip(errs, errs[1:])]


@pytest.mark.parametrize("name,opts,order", [
    ("unipc", dict(order=1, lower_order_final=False), 2),       # UniPC-p is of order p + 1
    ("unipc", dict(order=2, lower_order_final=False), 3),
    ("unipc", dict(order=3, lower_order_final=False), 3.5),
    ("unipc_bh1", dict(order=3, lower_order_final=False), 3.5),
    ("deis", dict(order=1), 1),
    ("deis", dict(order=2, lower_order_final=False), 1.8),      # the order-1 start costs the last digits
    ("deis", dict(order=3, lower_order_final=False), 2.2),
    ("dpm_2", {}, 1.9),
    ("edm", {"step": "dpm_2"}, 1.9),                            # no churn: DPM-2 in VE coordinates
    ("dpmpp_2s", {}, 1.8),
    ("ipndm_v", {}, 2.2),                                        # AB4 after an order-1 start
    ("dpm_fast", {}, 2.6),                                       # DPM-Solver-3 on every step (no budget)
    ("dpm_fast", {"order": 2}, 1.9),
    ("dpm_2_ancestral", {"eta": 0.0}, 1.9),
    ("dpmpp_sde", {"eta": 0.0}, 1.75),
    ("dpmpp_singlestep", {"order": 2, "lower_order_final": False}, 1.9),
    ("dpmpp_3m", {"form": "lu"}, 2.2),                           # like deis-3: a low-order start
    ("sa_solver", {"tau": 0.0, "lower_order_final": False}, 1.75),
    ("unipc", dict(order=2, lower_order_final=False, predict_x0=False), 2.8),
    ("dpm_multistep", {"order": 2}, 1.8),
    ("dpm_multistep", {"order": 3}, 2.2),  # diffusers' order-2 adjustment is O(h³) locally
])
def test_convergence_orders_on_the_exact_mixture(gmm, name, opts, order):
    orders = _endpoint_errors(gmm, name, opts, (16, 32, 64, 128))
    assert min(orders[1:]) >= order - 0.2, orders


def test_ipndm_v_is_ipndm_on_a_uniform_grid(gmm):
    field = fs.fields.EDM(gmm.denoiser)
    grid = torch.linspace(10.0, 0.5, 13, dtype=torch.float64)
    x0 = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 10
    torch.testing.assert_close(fs.sample(field, "ipndm_v", grid=grid, x_init=x0),
                               fs.sample(field, "ipndm", grid=grid, x_init=x0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,opts", [("unipc", {"order": 3}), ("unipc_bh1", {}), ("deis", {"order": 3}),
                                       ("dpm_2", {}), ("dpmpp_2s", {"eta": 1.0}), ("euler_ancestral", {}),
                                       ("dpmpp_2m_sde", {}), ("dpmpp_3m_sde", {}), ("dpm_2_ancestral", {}),
                                       ("dpmpp_sde", {}), ("dpm_fast", {}), ("dpm_fast", {"eta": 1.0}),
                                       ("dpmpp_singlestep", {"order": 3}), ("dpmpp_3m", {"form": "lu"}),
                                       ("ddpm", {}), ("sa_solver", {}), ("sa_solver", {"predictor_order": 3}),
                                       ("dpm_multistep", {"order": 3}), ("dpm_multistep", {"sde": True}),
                                       ("sde", {}), ("sde", {"alpha": 0.5}), ("sde", {"alpha": 0.0}),
                                       ("edm", {}), ("edm", {"S_churn": 20.0, "S_min": 0.05, "S_max": 10.0}),
                                       ("edm", {"S_churn": 20.0, "step": "euler"}),
                                       ("edm", {"S_churn": 20.0, "step": "dpm_2"}),
                                       ("seeds_2", {}), ("seeds_2", {"eta": 0.0, "r": 1.0, "solver_type": "phi_2"}),
                                       ("seeds_3", {}), ("er_sde", {}),
                                       ("er_sde", {"solver_type": "reverse_time_sde", "eta": 0.5}),
                                       ("er_sde", {"solver_type": "ode"}), ("res_multistep_ancestral", {}),
                                       ("res_multistep_ancestral", {"eta": 0.5})])   # not tcd: its s = (1 − γ) t is in each field's own time
def test_on_a_flow_field_each_solver_is_itself_in_ve_coordinates(gmm, name, opts):
    """x_t = (1 − t) x̃ with x̃ on the VE path at ρ = t/(1 − t): from corresponding starts, grids and
    noise, the flow solve ends where the EDM solve does (the λ-form on any Gaussian path)."""
    rho = fs.grids.karras(10, 0.002, 80.0).double()
    t = rho / (1 + rho)

    def velocity(x, tt):
        tc = tt.reshape(-1, 1).double()
        d = gmm.denoiser(x / (1 - tc), (tc / (1 - tc)).reshape(-1))
        return (x - d) / tc
    flow = fs.fields.FlowMatching(velocity, (2,))
    z = torch.randn(100, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 80
    a = fs.sample(fs.fields.EDM(gmm.denoiser), name, grid=rho, x_init=z, seed=9, **opts)
    b = fs.sample(flow, name, grid=t, x_init=z / (1 + rho[0]), seed=9, **opts)
    assert (a - b).abs().max().item() < 1e-8


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2s", "dpm_2_ancestral",
                                  "dpmpp_sde", "pc", "dpm_fast", "ddpm", "tcd", "sa_solver", "seeds_2",
                                  "seeds_3", "er_sde", "res_multistep_ancestral"])
def test_stochastic_samplers_reach_the_mixture(gmm, name):
    n = 2000
    opts = {"eta": 1.0} if name in ("dpmpp_2s", "dpm_fast") else {}
    x = fs.sample(fs.fields.EDM(gmm.denoiser), name, nfe=128, n=n, seed=4, dtype=torch.float64, **opts)
    g = torch.Generator().manual_seed(5)
    floor = [fs.metrics.energy_distance(gmm.sample(n, generator=g, dtype=torch.float64),
                                        gmm.sample(n, generator=g, dtype=torch.float64)) for _ in range(5)]
    d = fs.metrics.energy_distance(x, gmm.sample(n, generator=g, dtype=torch.float64))
    assert d < max(floor) + 2 * (max(floor) - min(floor)) + 0.005, (d, floor)


def _gmm_flow(gmm):
    """The exact velocity of the mixture on x_t = (1 − t) x_0 + t ε, from its closed-form denoiser (at
    t = 1 its limit, through a VE level of 1e12)."""
    def velocity(x, tt):
        tc = tt.reshape(-1, 1).to(x.dtype).clamp(max=1 - 1e-12)
        return (x - gmm.denoiser(x / (1 - tc), (tc / (1 - tc)).reshape(-1))) / tc
    return fs.fields.FlowMatching(velocity, (2,))


@pytest.mark.parametrize("name,eta", [("euler_ancestral", 0.5), ("euler_ancestral", 1.0), ("dpmpp_2s", 1.0),
                                      ("dpm_2_ancestral", 0.5)])
def test_the_rf_ancestral_split_reaches_the_mixture_on_a_flow_field(gmm, name, eta):
    """The ancestral solvers with ComfyUI's RF split (η moves the flow time of the deterministic part) keep
    the marginals of the path: on the mixture's exact flow they sample the mixture."""
    n = 2000
    grid = fs.grids.uniform(128 if name == "euler_ancestral" else 64, 0.9999, 0.0).double()
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = fs.sample(_gmm_flow(gmm), name, grid=grid, x_init=z, seed=4, eta=eta, split="rf")
    g = torch.Generator().manual_seed(5)
    floor = [fs.metrics.energy_distance(gmm.sample(n, generator=g, dtype=torch.float64),
                                        gmm.sample(n, generator=g, dtype=torch.float64)) for _ in range(5)]
    d = fs.metrics.energy_distance(x, gmm.sample(n, generator=g, dtype=torch.float64))
    assert d < max(floor) + 2 * (max(floor) - min(floor)) + 0.005, (d, floor)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_the_sde_of_eq_21_reaches_the_mixture_on_a_flow_field(gmm, alpha):
    """Eq. 21 on the flow path: the exact steps of `sde` (from t = 1) and Euler–Maruyama on the field's
    own stochastic form (drift v − α g²/2 ∇log p_t, g² = 2t/(1 − t); from t < 1, where g is finite) both
    sample the mixture."""
    n = 2000
    g = torch.Generator().manual_seed(5)
    floor = [fs.metrics.energy_distance(gmm.sample(n, generator=g, dtype=torch.float64),
                                        gmm.sample(n, generator=g, dtype=torch.float64)) for _ in range(5)]
    truth = gmm.sample(n, generator=g, dtype=torch.float64)
    grid = fs.grids.uniform(256, 0.995, 0.0).double()
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    flow = _gmm_flow(gmm)
    exact = fs.sample(flow, "sde", grid=grid, x_init=z * 0.995, seed=4, alpha=alpha)
    em = fs.sample(flow, "sde", grid=grid, x_init=z * 0.995, seed=4, alpha=alpha, method="em")
    for x in (exact, em):
        assert fs.metrics.energy_distance(x, truth) < max(floor) + 2 * (max(floor) - min(floor)) + 0.005
    with pytest.raises(ValueError, match="infinite diffusion at t=1"):
        fs.sample(flow, "sde", nfe=8, n=2, alpha=alpha, method="em")


def test_edm_churn_on_a_flow_field_from_pure_noise_reaches_the_mixture(gmm):
    """EDM's Alg. 2 in the flow path's VE coordinates, from t = 1 (its first step the exact Euler limit)."""
    n = 2000
    g = torch.Generator().manual_seed(5)
    floor = [fs.metrics.energy_distance(gmm.sample(n, generator=g, dtype=torch.float64),
                                        gmm.sample(n, generator=g, dtype=torch.float64)) for _ in range(5)]
    x, info = fs.sample(_gmm_flow(gmm), "edm", nfe=127, n=n, seed=3, dtype=torch.float64, S_churn=40.0,
                        return_info=True)
    assert info.grid[0] == 1.0
    d = fs.metrics.energy_distance(x, gmm.sample(n, generator=g, dtype=torch.float64))
    assert d < max(floor) + 2 * (max(floor) - min(floor)) + 0.005, (d, floor)


def test_dpm_adaptive_from_pure_noise_is_refused_by_name(gmm):
    """DPM-Solver-12/23's step control starts at a finite noise level: a flow field's default grid
    starts at t = 1 (pure noise), and the error says so and what to pass."""
    with pytest.raises(ValueError, match=r"'dpm_adaptive' needs a finite starting noise level.*t=1\b"):
        fs.sample(_gmm_flow(gmm), "dpm_adaptive", nfe=50, n=2)
    x = fs.sample(_gmm_flow(gmm), "dpm_adaptive", nfe=200, n=2, grid=fs.grids.uniform(4, 0.99, 0.0).double(),
                  dtype=torch.float64)
    assert torch.isfinite(x).all()


def _comfy_karras_start():
    sig = fs.grids.karras(10, 0.002, 80.0).double()
    return sig, torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 80


@pytest.mark.parametrize("gamma", [2.0, 1.5])
def test_gradient_estimation_is_comfyuis(gmm, gamma):
    """ComfyUI's `sample_gradient_estimation` (Permenter & Yuan 2024), its loop written out on the VE
    field: Euler first, then d̄ = γ d_i + (1 − γ) d_{i−1}, the last step to σ = 0 the data prediction.
    `gradient_estimation` gives the same samples; γ = 1 is `euler`; at 10 NFE on Karras' grid it is
    closer to the converged solve than Euler (0.21 against 0.48 on this mixture)."""
    sig, z = _comfy_karras_start()
    x, old = z.clone(), None
    for i in range(len(sig) - 1):
        den = gmm.denoiser(x, sig[i].expand(len(x)))
        d = (x - den) / sig[i]
        if sig[i + 1] == 0:
            x = den
        else:
            x = x + d * (sig[i + 1] - sig[i])
            if old is not None:
                x = x + (gamma - 1) * (d - old) * (sig[i + 1] - sig[i])
        old = d
    field = fs.fields.EDM(gmm.denoiser)
    got = fs.sample(field, "gradient_estimation", grid=sig, x_init=z, gamma=gamma)
    assert (got - x).abs().max().item() <= 1e-12 * x.abs().max().item()
    assert torch.equal(fs.sample(field, "gradient_estimation", grid=sig, x_init=z, gamma=1.0),
                       fs.sample(field, "euler", grid=sig, x_init=z))
    ref = fs.sample(field, "heun", nfe=1023, grid="karras", x_init=z)
    err = {s: (fs.sample(field, s, nfe=10, grid="karras", x_init=z) - ref).norm(dim=1).mean().item()
           for s in ("euler", "gradient_estimation")}
    assert err["gradient_estimation"] < 0.7 * err["euler"], err
    with pytest.raises(ValueError, match="gamma: expected a finite number"):
        fs.sample(field, "gradient_estimation", nfe=4, n=2, gamma=float("nan"))


def test_comfyuis_res_multistep_is_dpmpp_2m_heun(gmm):
    """ComfyUI's `res_multistep` (RES's second-order multistep, Zhang et al. 2023; η = 0), its loop
    written out: Euler first and on the last step to σ = 0, between them x = e^{−h} x + h (b₁ D + b₂ D_old)
    with c₂ = (λ_{i−1} − λ_i)/h, b₁ = φ₁(−h) − φ₂(−h)/c₂, b₂ = φ₂(−h)/c₂. That is DPM-Solver++(2M) with the
    exact φ₂ (`dpmpp_2m_heun`), to round-off."""
    sig, z = _comfy_karras_start()
    x, old = z.clone(), None
    for i in range(len(sig) - 1):
        den = gmm.denoiser(x, sig[i].expand(len(x)))
        if sig[i + 1] == 0 or old is None:
            x = x + (x - den) / sig[i] * (sig[i + 1] - sig[i])
        else:
            lam, lam_next, lam_prev = -sig[i].log(), -sig[i + 1].log(), -sig[i - 1].log()
            h = lam_next - lam
            c2 = (lam_prev - lam) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1) / -h
            x = torch.exp(-h) * x + h * ((phi1 - phi2 / c2) * den + (phi2 / c2) * old)
        old = den
    got = fs.sample(fs.fields.EDM(gmm.denoiser), "dpmpp_2m_heun", grid=sig, x_init=z)
    assert (got - x).abs().max().item() <= 1e-12 * x.abs().max().item()


@pytest.mark.parametrize("eta,r,kind", [(1.0, 0.5, "phi_1"), (0.5, 0.5, "phi_2"), (1.0, 0.3, "phi_1"),
                                        (0.0, 1.0, "phi_2")])   # the last: ComfyUI's exp_heun_2_x0
def test_seeds_2_is_comfyuis_with_the_same_noise(gmm, eta, r, kind):
    """ComfyUI's `sample_seeds_2` (SEEDS, Gonzalez et al. 2023), its loop written out on the VE field
    (λ = −log σ, α = 1) and handed flowsolve's per-sample noise stream: `seeds_2` gives the same
    samples, to round-off."""
    sig, z = _comfy_karras_start()
    src = SampleNoise(5, 0, 64, (2,), torch.float64, "cpu", stream=1)
    x = z.clone()
    for i in range(len(sig) - 1):
        den = gmm.denoiser(x, sig[i].expand(len(x)))
        if sig[i + 1] == 0:
            x = den
            continue
        lam_s, lam_t = -sig[i].log(), -sig[i + 1].log()
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        sig_1 = (-torch.lerp(lam_s, lam_t, r)).exp()
        x2 = sig_1 / sig[i] * (-r * h * eta).exp() * x - torch.expm1(-r * h_eta) * den
        if eta > 0:
            noise = (-2 * r * h * eta).expm1().neg().sqrt() * src()
            x2 = x2 + noise * sig_1
        den2 = gmm.denoiser(x2, sig_1.expand(len(x)))
        if kind == "phi_1":
            x = sig[i + 1] / sig[i] * (-h * eta).exp() * x - torch.expm1(-h_eta) * torch.lerp(den, den2, 1 / (2 * r))
        else:
            b2 = (torch.expm1(-h_eta) + h_eta) / -h_eta / r
            x = sig[i + 1] / sig[i] * (-h * eta).exp() * x - ((torch.expm1(-h_eta) - b2) * den + b2 * den2)
        if eta > 0:
            seg = (r - 1) * h * eta
            noise = noise * seg.exp() + (2 * seg).expm1().neg().sqrt() * src()
            x = x + noise * sig[i + 1]
    got = fs.sample(fs.fields.EDM(gmm.denoiser), "seeds_2", grid=sig, x_init=z, seed=5, eta=eta, r=r,
                    solver_type=kind)
    assert (got - x).abs().max().item() <= 1e-10 * x.abs().max().item()


def _two_class_denoiser(gmm):
    """A conditional toy model: c = 1 is the mixture's exact denoiser, c = 0 (the unconditional input)
    that of N(0, 4 I), whose D is x/(1 + σ²/4)."""
    def den(x, sigma, c):
        wide = x / (1 + sigma[:, None] ** 2 / 4)
        return torch.where(c[:, None] > 0, gmm.denoiser(x, sigma), wide)
    return den


@pytest.mark.parametrize("name", ["euler_cfg_pp", "dpmpp_2m_cfg_pp"])
@pytest.mark.parametrize("w", [0.6, 1.5])
def test_cfg_pp_samplers_are_comfyuis(gmm, name, w):
    """CFG++ (Chung et al. 2024), ComfyUI's `euler_cfg_pp` / `dpmpp_2m_cfg_pp` loops written out on the VE
    field: the guided D_w = D_u + w (D_c − D_u) denoises, the unconditional D_u re-noises. flowsolve's
    solvers, reading the guided model's unconditional branch, give the same samples; on a flow field
    they are the same solve in VE coordinates."""
    den = _two_class_denoiser(gmm)
    sig, z = _comfy_karras_start()
    one, zero = torch.ones(len(z)), torch.zeros(len(z))
    x, old_u = z.clone(), None
    for i in range(len(sig) - 1):
        s = sig[i].expand(len(x))
        d_u = den(x, s, zero)
        d_w = d_u + w * (den(x, s, one) - d_u)
        h = -sig[i + 1].log() + sig[i].log()   # λ' − λ (∞ to σ = 0)
        mix = -torch.exp(-h) * d_u
        if name == "dpmpp_2m_cfg_pp" and old_u is not None and sig[i + 1] > 0:
            r = (sig[i - 1].log() - sig[i].log()) / h
            mix = mix - torch.expm1(-h) * (1 / (2 * r)) * (d_w - old_u)
        x = d_w + mix + torch.exp(-h) * x
        old_u = d_u
    field = fs.fields.EDM(den, shape=(2,), guidance=w, uncond={"c": torch.zeros(1)})
    got = fs.sample(field, name, grid=sig, x_init=z, cond={"c": one})
    assert (got - x).abs().max().item() <= 1e-12 * x.abs().max().item()
    if name == "euler_cfg_pp":   # the plain DDIM/Euler step at w = 1 (D_w = D_c, re-noised with D_u, differs)
        assert (got - fs.sample(field, "euler", grid=sig, x_init=z, cond={"c": one})).abs().max() > 1e-3
    rho = sig[sig > 0]
    t = torch.cat([rho / (1 + rho), torch.zeros(1, dtype=torch.float64)])

    def velocity(xf, tt, c):
        tc = tt.reshape(-1, 1).double()
        return (xf - den(xf / (1 - tc), (tc / (1 - tc)).reshape(-1), c)) / tc
    flow = fs.fields.FlowMatching(fs.fields.guidance.GuidedDenoiser(velocity, w, {"c": torch.zeros(1)},
                                                                    prediction="velocity"), (2,))
    flow_x = fs.sample(flow, name, grid=t, x_init=z / (1 + rho[0]), cond={"c": one})
    assert (flow_x - got).abs().max().item() <= 1e-8 * got.abs().max().item()


@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 0.8)])
def test_euler_ancestral_cfg_pp_is_comfyuis_with_the_same_noise(gmm, eta, s_noise):
    """ComfyUI's `euler_ancestral_cfg_pp`, its loop written out on the VE field and handed flowsolve's
    noise: x = D_w + σ_down (x − D_u)/σ + σ_up ε (k-diffusion's ancestral split), D_w at the last step."""
    den = _two_class_denoiser(gmm)
    sig, z = _comfy_karras_start()
    one, zero = torch.ones(len(z)), torch.zeros(len(z))
    src = SampleNoise(5, 0, 64, (2,), torch.float64, "cpu", stream=1)
    K = pytest.importorskip("peers").k_diffusion_sampling()
    x = z.clone()
    for i in range(len(sig) - 1):
        s = sig[i].expand(len(x))
        d_u = den(x, s, zero)
        d_w = d_u + 1.5 * (den(x, s, one) - d_u)
        if sig[i + 1] == 0:
            x = d_w
            continue
        down, up = K.get_ancestral_step(sig[i], sig[i + 1], eta=eta)
        x = d_w + down * (x - d_u) / sig[i] + src() * s_noise * up
    field = fs.fields.EDM(den, shape=(2,), guidance=1.5, uncond={"c": torch.zeros(1)})
    got = fs.sample(field, "euler_ancestral_cfg_pp", grid=sig, x_init=z, cond={"c": one}, seed=5, eta=eta,
                    s_noise=s_noise)
    assert (got - x).abs().max().item() <= 1e-12 * x.abs().max().item()


def test_cfg_pp_needs_a_guided_field(gmm):
    with pytest.raises(ValueError, match=r"'euler_cfg_pp' \(CFG\+\+\) re-noises with the unconditional"):
        fs.sample(fs.fields.EDM(gmm.denoiser), "euler_cfg_pp", nfe=4, n=2)


@pytest.mark.parametrize("eta,r_1,r_2", [(1.0, 1 / 3, 2 / 3), (0.5, 0.25, 0.6), (0.0, 1 / 3, 2 / 3)])
def test_seeds_3_is_comfyuis_with_the_same_noise(gmm, eta, r_1, r_2):
    """ComfyUI's `sample_seeds_3`, its loop written out on the VE field and handed flowsolve's noise:
    `seeds_3` gives the same samples, to round-off."""
    sig, z = _comfy_karras_start()
    src = SampleNoise(5, 0, 64, (2,), torch.float64, "cpu", stream=1)

    def hphi2(v):
        return (torch.expm1(v) - v) / v
    x = z.clone()
    for i in range(len(sig) - 1):
        den = gmm.denoiser(x, sig[i].expand(len(x)))
        if sig[i + 1] == 0:
            x = den
            continue
        lam_s, lam_t = -sig[i].log(), -sig[i + 1].log()
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        s1, s2 = (-torch.lerp(lam_s, lam_t, r_1)).exp(), (-torch.lerp(lam_s, lam_t, r_2)).exp()
        x2 = s1 / sig[i] * (-r_1 * h * eta).exp() * x - torch.expm1(-r_1 * h_eta) * den
        if eta > 0:
            noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * src()
            x2 = x2 + noise * s1
        den2 = gmm.denoiser(x2, s1.expand(len(x)))
        a32 = r_2 / r_1 * hphi2(-r_2 * h_eta)
        x3 = s2 / sig[i] * (-r_2 * h * eta).exp() * x - ((torch.expm1(-r_2 * h_eta) - a32) * den + a32 * den2)
        if eta > 0:
            seg = (r_1 - r_2) * h * eta
            noise = noise * seg.exp() + (2 * seg).expm1().neg().sqrt() * src()
            x3 = x3 + noise * s2
        den3 = gmm.denoiser(x3, s2.expand(len(x)))
        b3 = hphi2(-h_eta) / r_2
        x = sig[i + 1] / sig[i] * (-h * eta).exp() * x - ((torch.expm1(-h_eta) - b3) * den + b3 * den3)
        if eta > 0:
            seg = (r_2 - 1) * h * eta
            noise = noise * seg.exp() + (2 * seg).expm1().neg().sqrt() * src()
            x = x + noise * sig[i + 1]
    got = fs.sample(fs.fields.EDM(gmm.denoiser), "seeds_3", grid=sig, x_init=z, seed=5, eta=eta, r_1=r_1, r_2=r_2)
    assert (got - x).abs().max().item() <= 1e-10 * x.abs().max().item()
    with pytest.raises(ValueError, match="r_2: expected a share above r_1"):
        fs.sample(fs.fields.EDM(gmm.denoiser), "seeds_3", nfe=9, n=2, r_1=0.6, r_2=0.5)


def test_the_rf_and_ve_splits_agree_on_sigma_time_fields_at_eta_1(gmm):
    """On σ-time fields (α = 1) the RF rule's σ_down = σ'(1 + η(σ'/σ − 1)) is k-diffusion's σ'²/σ at
    η = 1 (and σ' at η = 0); between, the two are different samplers."""
    field = fs.fields.EDM(gmm.denoiser)
    runs = {(split, eta): fs.sample(field, "euler_ancestral", nfe=12, n=50, seed=2, dtype=torch.float64,
                                    eta=eta, split=split)
            for split in ("ve", "rf") for eta in (0.0, 0.5, 1.0)}
    assert torch.allclose(runs["ve", 1.0], runs["rf", 1.0], rtol=0, atol=1e-12)
    assert torch.allclose(runs["ve", 0.0], runs["rf", 0.0], rtol=0, atol=1e-12)
    assert (runs["ve", 0.5] - runs["rf", 0.5]).abs().max() > 1e-2


def test_bad_solver_options_are_refused(gmm):
    field = fs.fields.EDM(gmm.denoiser)
    with pytest.raises(ValueError, match="order"):
        fs.sample(field, "unipc", nfe=5, n=2, order=5)
    with pytest.raises(ValueError, match="variant"):
        fs.sample(field, "unipc", nfe=5, n=2, variant="bh3")
    with pytest.raises(ValueError, match="eta"):
        fs.sample(field, "euler_ancestral", nfe=5, n=2, eta=-1.0)
    with pytest.raises(ValueError, match="split: expected one of ve, rf, got 'comfy'"):
        fs.sample(field, "euler_ancestral", nfe=5, n=2, split="comfy")


@pytest.mark.parametrize("name,opts", [("unipc", {"order": 3}), ("deis", {"order": 3}), ("dpmpp_2m", {}),
                                       ("dpmpp_3m", {}), ("ddim", {}), ("dpm_2", {}), ("euler_ancestral", {}),
                                       ("dpmpp_2m_sde", {}), ("consistency", {}), ("dpmpp_sde", {}),
                                       ("dpm_2_ancestral", {}), ("dpm_fast", {}), ("sde", {"alpha": 0.5}),
                                       ("edm", {"S_churn": 20.0})])
def test_on_a_trigflow_field_each_solver_is_itself_in_ve_coordinates(gmm, name, opts):
    """TrigFlow, x_t = cos(t) x_0 + σ_d sin(t) ε: x_t = cos(t) x̃ with x̃ on the VE path at
    ρ = σ_d tan t, so from corresponding starts, grids and noise every path solver ends where it
    does on the EDM field (σ_d = 0.5, sCM's)."""
    sd = 0.5
    rho = fs.grids.karras(10, 0.002, 80.0).double()
    t = torch.atan(rho / sd)

    def velocity(x, tt):
        tc = tt.reshape(-1, 1).double()
        c, s = torch.cos(tc), torch.sin(tc)
        d = gmm.denoiser(x / c, (sd * s / c).reshape(-1))
        eps = (x - c * d) / (sd * s)
        return -s * d + sd * c * eps
    trig = fs.fields.TrigFlow(velocity, (2,), sigma_data=sd, t_max=float(t[0]))
    z = torch.randn(100, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 80
    a = fs.sample(fs.fields.EDM(gmm.denoiser), name, grid=rho, x_init=z, seed=9, **opts)
    b = fs.sample(trig, name, grid=t, x_init=z * torch.cos(t[0]), seed=9, **opts)
    assert (a - b).abs().max().item() < 1e-8


def test_ddim_is_euler_on_edm_and_flow_fields(gmm):
    field = fs.fields.EDM(gmm.denoiser)
    x0 = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80
    torch.testing.assert_close(fs.sample(field, "ddim", nfe=7, x_init=x0), fs.sample(field, "euler", nfe=7, x_init=x0),
                               rtol=0, atol=1e-10)


_ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}


@pytest.mark.parametrize("name,kw,step_kw,solver", [
    ("DDPMScheduler", {"clip_sample": False}, {}, "euler_ancestral"),
    ("DDIMScheduler", {"clip_sample": False}, {"eta": 0.5}, "euler_ancestral"),
    ("EulerAncestralDiscreteScheduler", {}, {}, "euler_ancestral"),
    ("KDPM2AncestralDiscreteScheduler", {}, {}, "dpm_2_ancestral"),
    ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}, {}, "dpm_2_ancestral"),
    ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction",
                                         "timestep_spacing": "trailing"}, {}, "dpm_2_ancestral"),
    # zero terminal SNR: DDIM keeps ᾱ_T = 0 (a pure-noise start), Euler ancestral clamps it to 2⁻²⁴
    ("DDIMScheduler", {"clip_sample": False, **_ZERO_SNR}, {"eta": 0.5}, "euler_ancestral"),
    ("DDIMScheduler", {"clip_sample": False, **_ZERO_SNR}, {"eta": 1.0}, "euler_ancestral"),
    ("EulerAncestralDiscreteScheduler", _ZERO_SNR, {}, "euler_ancestral"),
])
def test_ancestral_schedulers_are_euler_ancestral_with_the_same_noise(unet64, name, kw, step_kw, solver):
    """DDPM's ancestral step (its posterior, variance "fixed_small"), DDIM with η and
    EulerAncestralDiscrete are `euler_ancestral` (k-diffusion's ρ_up / ρ_down split, `eta` = DDIM's η)
    on the scheduler's own grid: handed flowsolve's per-sample noise, diffusers' loop gives the same samples.
    KDPM2 ancestral with Karras σ's feeds its knots their rounded timesteps and its midpoint (at η = 1
    the next knot's σ) the unrounded one (`fields.base.between_knots`)."""
    import diffusers
    cls = getattr(diffusers, name)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _noisy_diffusers_loop(unet64, _in_float64(cls(num_train_timesteps=1000, **kw), 10), z, **step_kw)
    m = fs.models.from_diffusers(unet64, cls(num_train_timesteps=1000, **kw))
    field = m.field()
    grid = field.grid(10, "schedule")
    x = fs.sample(field, solver, grid=grid, x_init=z * m.prior_std_at(float(grid[0])), seed=5,
                  dtype=torch.float64, eta=step_kw.get("eta", 1.0))
    assert (x - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


def test_stable_diffusion_1s_default_loop_is_plms_with_guidance():
    """Stable Diffusion 1.x's default: PNDM (PLMS, steps_offset 1, scaled-linear betas) with
    classifier-free guidance on a text UNet. `plms` at nfe = steps + 1 on the guided field is that loop."""
    from diffusers import PNDMScheduler, UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8).eval()
    kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1,
              set_alpha_to_one=False)
    sched = PNDMScheduler(**kw)
    sched.set_timesteps(10)
    text, null = torch.randn(2, 7, 16), torch.zeros(2, 7, 16)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = latents.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            e_u, e_c = unet(torch.cat([ref, ref]), t, encoder_hidden_states=torch.cat([null, text])).sample.chunk(2)
            ref = sched.step(e_u + 5.0 * (e_c - e_u), t, ref).prev_sample
    m = fs.models.from_diffusers(unet, PNDMScheduler(**kw))
    field = m.field(guidance=5.0, uncond={"encoder_hidden_states": null})
    start = field.grid(10, "schedule")
    x, info = fs.sample(field, "plms", nfe=11, x_init=latents * m.prior_std_at(float(start[0])),
                        cond={"encoder_hidden_states": text}, return_info=True)
    alpha_end = 1.0 / math.sqrt(1.0 + float(info.grid[-1]) ** 2)    # PNDM ends at ᾱ_0 < 1
    assert info.nfe == 11 and len(info.grid) == 11       # 10 steps: timestep 1 then ᾱ_0
    assert (x * alpha_end - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("kw", [{}, _ZERO_SNR])
def test_a_latent_consistency_model_is_consistency_sampling(unet64, steps, kw):
    """LCMScheduler's boundary condition D = c_skip(t) x_t + c_out(t) x̂_0 (scaled timestep, σ_data = 0.5)
    lives in the adapter's D; `consistency` on the model's default grid (LCM's skipping timesteps) is
    its multistep loop, given the same noise."""
    from diffusers import LCMScheduler
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _noisy_diffusers_loop(unet64, _in_float64(LCMScheduler(**kw), steps), z)
    m = fs.models.from_diffusers(unet64, LCMScheduler(**kw))
    field = m.field()
    grid = field.grid(steps, "schedule")
    x, info = fs.sample(field, "consistency", nfe=steps, x_init=z * m.prior_std_at(float(grid[0])), seed=5,
                        dtype=torch.float64, return_info=True)
    assert info.nfe == steps and torch.equal(info.grid, grid)
    assert (x - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_a_consistency_model_is_consistency_sampling_with_its_boundary(unet64, steps):
    """Song et al.'s consistency models (CMStochasticIterativeScheduler): c_noise = 250 log σ, the
    boundary condition c_skip(σ − ε), c_out(σ − ε) and the [−1, 1] clamp live in D; `consistency` with
    `sigma_min=ε` (Alg. 1's re-noising to √(σ² − ε²)) on the model's default grid is the scheduler's
    loop, given the same noise (to diffusers' float32 timesteps)."""
    from diffusers import CMStochasticIterativeScheduler
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _noisy_diffusers_loop(unet64, _in_float64(CMStochasticIterativeScheduler(), steps), z)
    m = fs.models.from_diffusers(unet64, CMStochasticIterativeScheduler())
    assert m.schedule == "cm" and m.clip_sample
    x, info = fs.sample(m.field(), "consistency", nfe=steps, x_init=z * 80.0, seed=5, dtype=torch.float64,
                        sigma_min=0.002, return_info=True)
    assert info.nfe == steps and float(info.grid[-1]) == 0.0
    assert (x - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    with pytest.raises(ValueError, match="sigma_min"):
        fs.sample(m.field(), "consistency", nfe=2, n=1, seed=0, sigma_min=-1.0)


def test_dpm_solver_sde_scheduler_is_dpmpp_sde_with_the_same_brownian_increments(unet64):
    """diffusers' DPMSolverSDEScheduler (k-diffusion's DPM++ SDE with a Brownian tree) is `dpmpp_sde` on
    the model's default grid when its noise sampler hands out flowsolve's Brownian increments."""
    import importlib

    from diffusers import DPMSolverSDEScheduler
    module = importlib.import_module(DPMSolverSDEScheduler.__module__)

    brownian = lambda *args, **kwargs: BrownianIncrements(3, (1, 8, 8))  # noqa: E731  # diffusers' constructor
    original, module.BrownianTreeNoiseSampler = module.BrownianTreeNoiseSampler, brownian
    try:
        z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        ref = _diffusers_loop(unet64, _in_float64(DPMSolverSDEScheduler(), 10), z)
    finally:
        module.BrownianTreeNoiseSampler = original
    m = fs.models.from_diffusers(unet64, DPMSolverSDEScheduler())
    field = m.field()
    grid = field.grid(10, "schedule")
    x, info = fs.sample(field, "dpmpp_sde", grid=grid, x_init=z * m.prior_std_at(float(grid[0])), seed=5,
                        dtype=torch.float64, return_info=True)
    assert info.nfe == 19 and len(grid) == 11
    assert (x - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


@pytest.mark.parametrize("steps", [5, 6, 10])
@pytest.mark.parametrize("order,solver_type", [(2, "midpoint"), (2, "heun"), (3, "midpoint"), (3, "heun")])
def test_dpm_solver_singlestep_scheduler_is_dpmpp_singlestep(unet64, steps, order, solver_type):
    """diffusers' DPMSolverSinglestepScheduler (orders cycling 1, 2, (3), stages on the grid's knots,
    lower-order final steps) is `dpmpp_singlestep` on the model's default grid, to float64 round-off."""
    from diffusers import DPMSolverSinglestepScheduler
    kw = dict(num_train_timesteps=1000, solver_order=order, solver_type=solver_type)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _diffusers_loop(unet64, _in_float64(DPMSolverSinglestepScheduler(**kw), steps), z)
    m = fs.models.from_diffusers(unet64, DPMSolverSinglestepScheduler(**kw))
    field = m.field()
    grid = field.grid(steps, "schedule")
    x, info = fs.sample(field, "dpmpp_singlestep", grid=grid, x_init=z * m.prior_std_at(float(grid[0])),
                        dtype=torch.float64, order=order, solver_type=solver_type, return_info=True)
    assert info.nfe == steps
    assert (x - ref).abs().max().item() <= 1e-9 * ref.abs().max().item()


@pytest.mark.parametrize("cls_name", ["DiscreteEpsDDPMDenoiser", "DiscreteVDDPMDenoiser"])
@pytest.mark.parametrize("quantize", [False, True])
def test_k_diffusions_discrete_wrappers_are_the_diffusers_adapter(unet64, cls_name, quantize):
    """k-diffusion's wrappers of a DDPM-trained network (its `external` module) and `from_diffusers`
    are the same denoiser: fractional timesteps by log-σ interpolation, or with `quantize=True` the
    nearest timestep, which is `integer_timesteps=True` here. Same samples of `sample_dpmpp_2m`."""
    import importlib
    from diffusers import DDPMScheduler
    K = pytest.importorskip("peers").k_diffusion_sampling()
    external = importlib.import_module("k_diffusion.external")
    pred = "epsilon" if "Eps" in cls_name else "v_prediction"

    class Inner(torch.nn.Module):
        def forward(self, x, t, **kw):
            return unet64(x, t).sample
    kd = getattr(external, cls_name)(Inner(), DDPMScheduler().alphas_cumprod.double(), quantize=quantize)
    sig = K.get_sigmas_karras(10, kd.sigma_min.item(), kd.sigma_max.item()).double()
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ref = K.sample_dpmpp_2m(kd, z * sig[0], sig, disable=True)
    # k-diffusion never clips D; DDPMScheduler's default config does
    m = fs.models.from_diffusers(unet64, DDPMScheduler(prediction_type=pred), clip_sample=False,
                                 integer_timesteps=quantize)
    x = fs.sample(m.field(), "dpmpp_2m", grid=sig, x_init=z * sig[0], dtype=torch.float64)
    assert (x - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
    if quantize:       # the rounded timesteps matter: without them the samples differ
        off = fs.sample(fs.models.from_diffusers(unet64, DDPMScheduler(prediction_type=pred), clip_sample=False).field(),
                        "dpmpp_2m", grid=sig, x_init=z * sig[0], dtype=torch.float64)
        assert (off - ref).abs().max().item() > 1e-6 * ref.abs().max().item()


@pytest.mark.parametrize("kw", [{"use_karras_sigmas": True}, {"use_exponential_sigmas": True},
                                {"use_beta_sigmas": True}])
def test_deis_with_spaced_sigmas_repeats_its_last_knot(unet64, kw):
    """DEISMultistepScheduler with Karras / exponential / beta σ's ends on σ_min twice (a step that
    moves nothing, counted in its lower-order-final rule): `deis` with `lower_order_final=False` on
    the distinct knots is its loop, one evaluation fewer."""
    from diffusers import DEISMultistepScheduler
    sched = _in_float64(DEISMultistepScheduler(**kw), 10)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _diffusers_loop(unet64, sched, z)
    m = fs.models.from_diffusers(unet64, DEISMultistepScheduler(**kw))
    grid = m.field().grid(10, "schedule")
    x, info = fs.sample(m.field(), "deis", grid=grid, x_init=z * m.prior_std_at(float(grid[0])), order=2,
                        lower_order_final=False, dtype=torch.float64, return_info=True)
    alpha_end = 1.0 / math.sqrt(1.0 + float(grid[-1]) ** 2)
    assert info.nfe == 9 and (x * alpha_end - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()


@pytest.mark.parametrize("kw,solver,opts", [
    ({"final_sigmas_type": "sigma_min"}, "dpmpp_2m", {"lower_order_final": True}),
    ({"final_sigmas_type": "sigma_min", "solver_type": "heun"}, "dpmpp_2m_heun", {"lower_order_final": True}),
    ({"final_sigmas_type": "sigma_min", "lower_order_final": False}, "dpmpp_2m", {}),     # k-diffusion's rule
    ({"algorithm_type": "sde-dpmsolver++"}, "dpmpp_2m_sde", {}),                           # "DPM++ 2M SDE"
    ({"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, "dpmpp_2m_sde", {}),
    ({"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, "dpmpp_2m_sde", {"solver_type": "heun"}),
    ({"algorithm_type": "sde-dpmsolver++", "final_sigmas_type": "sigma_min", "prediction_type": "v_prediction"},
     "dpmpp_2m_sde", {"lower_order_final": True}),
    ({"algorithm_type": "sde-dpmsolver++", "final_sigmas_type": "sigma_min", "use_karras_sigmas": True},
     "dpmpp_2m_sde", {"lower_order_final": True}),                                     # a repeated σ_min
])
def test_dpm_solver_configurations_are_the_solver_with_the_same_options(unet64, kw, solver, opts):
    """DPMSolverMultistepScheduler ending at σ_min > 0 takes a first-order last step below 15 steps
    (`lower_order_final=True`; k-diffusion's and flowsolve's default keep the second order, as the
    scheduler does with `lower_order_final=False`); its SDE variant, handed the same noise, is
    `dpmpp_2m_sde`."""
    from diffusers import DPMSolverMultistepScheduler
    sched = _in_float64(DPMSolverMultistepScheduler(**kw), 10)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _noisy_diffusers_loop(unet64, sched, z)
    m = fs.models.from_diffusers(unet64, DPMSolverMultistepScheduler(**kw))
    grid = m.field().grid(10, "schedule")
    x = fs.sample(m.field(), solver, grid=grid, x_init=z * m.prior_std_at(float(grid[0])), dtype=torch.float64,
                  seed=5, **opts)
    alpha_end = 1.0 / math.sqrt(1.0 + float(grid[-1]) ** 2)
    assert (x * alpha_end - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


@pytest.mark.parametrize("learned,kw", [
    (False, {}),                                                     # DDPMPipeline's default, with clipping
    (False, {"variance_type": "fixed_large", "clip_sample": False}),
    (True, {"variance_type": "learned_range", "clip_sample": False}),  # IDDPM's interpolated variance
    (True, {"variance_type": "learned_range", "thresholding": True, "sample_max_value": 1.5}),
    # "trailing" spacing ends at a timestep above 0, where DDPMScheduler still adds its step's noise
    (False, {"variance_type": "fixed_large", "clip_sample": False, "timestep_spacing": "trailing"}),
    (False, {"clip_sample": False, "timestep_spacing": "trailing"}),
    (True, {"variance_type": "learned_range", "clip_sample": False, "timestep_spacing": "trailing"}),
    # zero terminal SNR (Lin et al. 2024): ᾱ_T = 0 kept, the first step a fresh draw around x_0 = −v
    (False, {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction",
             "clip_sample": False}),
    (False, {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction",
             "variance_type": "fixed_large"}),
])
def test_ddpm_solver_is_the_ddpm_schedulers_loop(unet64, unet64_var, learned, kw):
    """`ddpm` takes the scheduler's `variance_type` and, for learned variances, the network's variance
    channels at each step; handed the same noise it is `DDPMScheduler`'s loop."""
    from diffusers import DDPMScheduler
    unet = unet64_var if learned else unet64
    sched = _in_float64(DDPMScheduler(**kw), 10)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _noisy_diffusers_loop(unet, sched, z)
    m = fs.models.from_diffusers(unet, DDPMScheduler(**kw))
    grid = m.field().grid(10, "schedule")
    x = fs.sample(m.field(), "ddpm", grid=grid, x_init=z * m.prior_std_at(float(grid[0])), dtype=torch.float64,
                  seed=5)
    assert (x - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
    if not learned:      # its fixed-small form is k-diffusion's Euler ancestral
        y = fs.sample(m.field(), "euler_ancestral", grid=grid, x_init=z * m.prior_std_at(float(grid[0])),
                      dtype=torch.float64, seed=5)
        assert ("variance_type" in kw) == ((y - x).abs().max().item() > 1e-6)
    # Ho et al.'s Alg. 2 (no noise on the last step) on request: the mean of that last step
    quiet = fs.sample(m.field(), "ddpm", grid=grid, x_init=z * m.prior_std_at(float(grid[0])), dtype=torch.float64,
                      seed=5, last_noise=False)
    last_t = int(sched.timesteps[-1])
    if last_t == 0:
        assert torch.equal(quiet, x)
    else:           # diffusers' last noise: std √(1 − ᾱ_t) (fixed_large), √1e-20 (fixed_small), learned between
        gap = (x - quiet).abs().max().item()
        expected = math.sqrt(1 - float(sched.alphas_cumprod[last_t])) if kw.get("variance_type") == "fixed_large" else None
        assert gap > (1e-3 if expected is None and learned else 0.0)
        if expected is not None:
            assert gap > expected and gap < 6 * expected
        elif not learned:
            assert gap < 1e-8
    with pytest.raises(ValueError, match="last_noise: expected True, False or None"):
        fs.sample(m.field(), "ddpm", nfe=3, n=1, last_noise="yes")


def test_ddpm_with_learned_variance_and_guidance_is_deepfloyd_ifs_loop():
    """IFPipeline: CFG on the ε half, the variance channels of the text branch, DDPM's learned-range
    step with dynamic thresholding. Without variance channels `learned_range` is refused up front."""
    from diffusers import DDPMScheduler
    net = tiny_unet64(out_channels=2, text_dim=16)
    B, w = 3, 7.0
    emb, neg = torch.randn(B, 5, 16, dtype=torch.float64), torch.zeros(1, 5, 16, dtype=torch.float64)
    kw = dict(variance_type="learned_range", thresholding=True, sample_max_value=1.5, beta_schedule="squaredcos_cap_v2")
    sched = _in_float64(DDPMScheduler(**kw), 10)
    z = torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    import importlib
    module = importlib.import_module(type(sched).__module__)
    src = SampleNoise(5, 0, B, (1, 8, 8), torch.float64, "cpu", stream=1)
    original, module.randn_tensor = module.randn_tensor, lambda shape, **k: src()
    try:
        x = z.clone()
        with torch.no_grad():
            for t in sched.timesteps:
                out = net(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([neg.expand(B, -1, -1), emb])).sample
                uncond, text = out.chunk(2)
                eps_u, _ = uncond.split(1, dim=1)
                eps_c, var = text.split(1, dim=1)
                x = sched.step(torch.cat([eps_u + w * (eps_c - eps_u), var], dim=1), t, x).prev_sample
    finally:
        module.randn_tensor = original
    m = fs.models.from_diffusers(net, DDPMScheduler(**kw))
    field = m.field(guidance=w, uncond={"encoder_hidden_states": neg})
    grid = field.grid(10, "schedule")
    y = fs.sample(field, "ddpm", grid=grid, x_init=z * m.prior_std_at(float(grid[0])), dtype=torch.float64, seed=5,
                  cond={"encoder_hidden_states": emb})
    assert (y - x).abs().max().item() <= 1e-10 * x.abs().max().item()
    with pytest.raises(ValueError, match="variance: 'learned_range' needs a model"):
        fs.sample(fs.fields.EDM(lambda x, s: x, shape=(2,)), "ddpm", nfe=4, n=2, variance="learned_range")


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_tcd_is_the_tcd_schedulers_loop(unet64, steps, gamma):
    """`tcd` on a diffusers model is TCDScheduler's loop (its default grid ends on timestep 0, where
    TCD stops), the intermediate time ⌊(1 − γ) t_{i+1}⌋ on the model's timesteps, the same noise."""
    from diffusers import TCDScheduler
    sched = _in_float64(TCDScheduler(), steps)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _noisy_diffusers_loop(unet64, sched, z, eta=gamma)
    m = fs.models.from_diffusers(unet64, TCDScheduler())
    grid = m.field().grid(steps, "schedule")
    x = fs.sample(m.field(), "tcd", grid=grid, x_init=z * m.prior_std_at(float(grid[0])), dtype=torch.float64,
                  seed=5, gamma=gamma)
    alpha_end = 1.0 / math.sqrt(1.0 + float(grid[-1]) ** 2)
    assert (x * alpha_end - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()


def test_tcd_spans_ddim_and_the_consistency_sampler(gmm64):
    """γ = 0 is DDIM, γ = 1 the consistency sampler (same noise), on any field in its own time."""
    field = fs.fields.EDM(gmm64.denoiser, shape=(64,))
    for solver, gamma in (("ddim", 0.0), ("consistency", 1.0)):
        a = fs.sample(field, "tcd", nfe=6, n=8, seed=3, gamma=gamma, dtype=torch.float64)
        b = fs.sample(field, solver, nfe=6, n=8, seed=3, dtype=torch.float64)
        assert (a - b).abs().max().item() <= 1e-12
    mid = fs.sample(field, "tcd", nfe=6, n=8, seed=3, gamma=0.3, dtype=torch.float64)
    assert torch.isfinite(mid).all() and (mid - a).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="gamma"):
        fs.sample(field, "tcd", nfe=4, n=2, gamma=1.5)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "EDMDPMSolverMultistepScheduler"])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("steps", [8, 20])
def test_dpmpp_3m_lu_form_is_diffusers_third_order(unet64, name, solver_type, steps):
    """`dpmpp_3m(form="lu")` is Lu et al.'s DPM-Solver++(3M) as diffusers runs it (its second-order
    steps in `solver_type`, lower-order final steps below 15); the default exact form differs."""
    import diffusers
    cls = getattr(diffusers, name)
    sched = _in_float64(cls(solver_order=3, solver_type=solver_type), steps)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _diffusers_loop(unet64, sched, z)
    m = fs.models.from_diffusers(unet64, cls(solver_order=3, solver_type=solver_type))
    grid = m.field().grid(steps, "schedule")
    start = z * m.prior_std_at(float(grid[0]))
    x = fs.sample(m.field(), "dpmpp_3m", grid=grid, x_init=start, dtype=torch.float64, form="lu",
                  solver_type=solver_type, lower_order_final=True)
    assert (x - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()
    exact = fs.sample(m.field(), "dpmpp_3m", grid=grid, x_init=start, dtype=torch.float64, lower_order_final=True)
    assert (exact - ref).abs().max().item() > 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("kw", [{}, {"tau_func": lambda t: 0}, {"tau_func": lambda t: 1},
                                {"predictor_order": 3, "corrector_order": 4}, {"predictor_order": 1, "corrector_order": 1},
                                {"prediction_type": "v_prediction"}])
@pytest.mark.parametrize("steps", [10, 20])
def test_sa_solver_is_the_sa_solver_schedulers_loop(unet64, kw, steps):
    """`sa_solver` on a diffusers model is SASolverScheduler's loop given the same noise: its τ rule
    (the scheduler's `tau_func` on the model's timesteps), predictor / corrector orders, the corrector's
    reuse of the predictor's noise, lower-order final steps, and its grid ending at σ_min."""
    from diffusers import SASolverScheduler
    sched = _in_float64(SASolverScheduler(**kw), steps)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _noisy_diffusers_loop(unet64, sched, z)
    m = fs.models.from_diffusers(unet64, SASolverScheduler(**kw))
    grid = m.field().grid(steps, "schedule")
    opts = {k: v for k, v in kw.items() if k in ("predictor_order", "corrector_order")}
    x, info = fs.sample(m.field(), "sa_solver", grid=grid, x_init=z * m.prior_std_at(float(grid[0])),
                        dtype=torch.float64, seed=5, return_info=True, **opts)
    alpha_end = 1.0 / math.sqrt(1.0 + float(grid[-1]) ** 2)
    assert info.nfe == steps
    assert (x * alpha_end - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()


def test_sa_solver_takes_tau_as_a_number_or_a_function_of_time(gmm64):
    field = fs.fields.EDM(gmm64.denoiser, shape=(64,))
    zero = fs.sample(field, "sa_solver", nfe=8, n=6, seed=2, tau=0.0, dtype=torch.float64)
    again = fs.sample(field, "sa_solver", nfe=8, n=6, seed=7, tau=0.0, dtype=torch.float64)
    assert (zero - fs.sample(field, "sa_solver", nfe=8, n=6, seed=2, tau=lambda t: 0.0,
                             dtype=torch.float64)).abs().max().item() == 0.0
    noisy = fs.sample(field, "sa_solver", nfe=8, n=6, seed=2, tau=lambda t: 1.0 if t > 1.0 else 0.0,
                      dtype=torch.float64)
    assert torch.isfinite(noisy).all() and (noisy - zero).abs().max().item() > 1e-3
    assert (fs.sample(field, "sa_solver", nfe=8, n=6, seed=2, tau=0.0, x_init=zero * 0 + again,
                      dtype=torch.float64) - again).abs().max().item() > 0      # x_init is honoured
    with pytest.raises(ValueError, match="tau"):
        fs.sample(field, "sa_solver", nfe=4, n=2, tau=-1.0)
    # from pure noise (a flow's t = 1) the first step is exact: τ = 0 is then DDIM's first step
    flow = fs.fields.FlowMatching(lambda x, t: (x - gmm64.denoiser(x / (1 - t.reshape(-1, 1)).clamp(min=1e-9),
                                                                     (t / (1 - t).clamp(min=1e-9)))) / t.reshape(-1, 1),
                                  (64,))
    grid = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    one = fs.sample(flow, "sa_solver", grid=grid[:2], n=4, seed=1, tau=0.0, dtype=torch.float64)
    assert (one - fs.sample(flow, "ddim", grid=grid[:2], n=4, seed=1, dtype=torch.float64)).abs().max() <= 1e-12
    assert torch.isfinite(fs.sample(flow, "sa_solver", grid=grid, n=4, seed=1, dtype=torch.float64)).all()


@pytest.mark.parametrize("algorithm,order", [("dpmsolver", 1), ("dpmsolver", 2), ("dpmsolver", 3),
                                             ("sde-dpmsolver", 1), ("sde-dpmsolver", 2)])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("steps", [8, 20])
def test_dpm_multistep_is_the_noise_prediction_dpm_solver(unet64, algorithm, order, solver_type, steps):
    """`dpm_multistep` is DPMSolverMultistepScheduler's noise-prediction algorithms, `"dpmsolver"` and
    (`sde=True`, the same noise) `"sde-dpmsolver"`, for each order and solver type."""
    from diffusers import DPMSolverMultistepScheduler
    kw = dict(algorithm_type=algorithm, final_sigmas_type="sigma_min", solver_order=order, solver_type=solver_type)
    sched = _in_float64(DPMSolverMultistepScheduler(**kw), steps)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _noisy_diffusers_loop(unet64, sched, z)
    m = fs.models.from_diffusers(unet64, DPMSolverMultistepScheduler(**kw))
    grid = m.field().grid(steps, "schedule")
    x = fs.sample(m.field(), "dpm_multistep", grid=grid, x_init=z * m.prior_std_at(float(grid[0])),
                  dtype=torch.float64, seed=5, order=order, solver_type=solver_type, sde=algorithm.startswith("sde"),
                  lower_order_final=True)
    alpha_end = 1.0 / math.sqrt(1.0 + float(grid[-1]) ** 2)
    assert (x * alpha_end - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


def test_plms_blends_v_predictions_for_a_pndm_v_model_and_epsilons_otherwise(unet64):
    """PNDMScheduler combines the raw v outputs of a v-prediction model and converts the blend with the
    current step's ᾱ; `plms` does so by default for such a model (blend="v"), and blend="epsilon"
    (the default elsewhere) is a different method."""
    from diffusers import PNDMScheduler
    m = fs.models.from_diffusers(unet64, PNDMScheduler(skip_prk_steps=True, prediction_type="v_prediction"))
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grid = m.field().grid(10, "schedule")
    start = z * m.prior_std_at(float(grid[0]))
    auto = fs.sample(m.field(), "plms", grid=grid, x_init=start, dtype=torch.float64)
    v = fs.sample(m.field(), "plms", grid=grid, x_init=start, dtype=torch.float64, blend="v")
    eps = fs.sample(m.field(), "plms", grid=grid, x_init=start, dtype=torch.float64, blend="epsilon")
    assert (auto - v).abs().max().item() == 0.0 and (auto - eps).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="blend"):
        fs.sample(m.field(), "plms", grid=grid, x_init=start, blend="x0")


@pytest.mark.parametrize("skip", [[0], [0, 3], [2, 5, 7]])
def test_unipc_disable_corrector_is_diffusers_option(unet64, skip):
    """UniPCMultistepScheduler(disable_corrector=...) leaves those steps' results uncorrected; so does
    `unipc(disable_corrector=...)`, and with an empty list it is the plain loop."""
    sched = _in_float64(UniPCMultistepScheduler(disable_corrector=skip), 10)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _diffusers_loop(unet64, sched, z)
    m = fs.models.from_diffusers(unet64, UniPCMultistepScheduler(disable_corrector=skip))
    grid = m.field().grid(10, "schedule")
    start = z * m.prior_std_at(float(grid[0]))
    x = fs.sample(m.field(), "unipc", grid=grid, x_init=start, dtype=torch.float64, disable_corrector=skip)
    assert (x - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
    plain = fs.sample(m.field(), "unipc", grid=grid, x_init=start, dtype=torch.float64)
    assert (plain - ref).abs().max().item() > 1e-6 * ref.abs().max().item()
    with pytest.raises(ValueError, match="disable_corrector"):
        fs.sample(m.field(), "unipc", grid=grid, x_init=start, disable_corrector="0")


@pytest.mark.parametrize("kw,solver", [({}, "unipc"), ({"solver_type": "bh1"}, "unipc_bh1"),
                                       ({"solver_order": 3}, "unipc"), ({"solver_order": 1}, "unipc")])
@pytest.mark.parametrize("steps", [8, 20])
def test_unipc_on_the_noise_prediction_is_diffusers_predict_x0_false(unet64, kw, solver, steps):
    """UniPCMultistepScheduler(predict_x0=False) runs UniPC on ε (its first-order base step on ε too,
    which differs from the data form once the corrector has moved x): `unipc(predict_x0=False)`."""
    kw = dict(kw, predict_x0=False, final_sigmas_type="sigma_min")   # diffusers' ε form breaks at σ = 0
    sched = _in_float64(UniPCMultistepScheduler(**kw), steps)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _diffusers_loop(unet64, sched, z)
    m = fs.models.from_diffusers(unet64, UniPCMultistepScheduler(**kw))
    grid = m.field().grid(steps, "schedule")
    start = z * m.prior_std_at(float(grid[0]))
    x = fs.sample(m.field(), solver, grid=grid, x_init=start, dtype=torch.float64, order=kw.get("solver_order", 2),
                  predict_x0=False)
    alpha_end = 1.0 / math.sqrt(1.0 + float(grid[-1]) ** 2)
    assert (x * alpha_end - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
    data = fs.sample(m.field(), solver, grid=grid, x_init=start, dtype=torch.float64, order=kw.get("solver_order", 2))
    assert (data * alpha_end - ref).abs().max().item() > 1e-6 * ref.abs().max().item()


@pytest.mark.parametrize("kw", [{}, {"set_alpha_to_one": True, "beta_schedule": "squaredcos_cap_v2"},
                                {"prediction_type": "v_prediction", "beta_schedule": "scaled_linear", "steps_offset": 1},
                                {"timestep_spacing": "trailing"}, {"timestep_spacing": "linspace"},
                                {"timestep_spacing": "linspace", "prediction_type": "v_prediction"}])
@pytest.mark.parametrize("steps", [4, 8, 10])
def test_pndm_is_the_pndm_schedulers_default_loop(unet64, kw, steps):
    """PNDMScheduler without `skip_prk_steps` (its default): three pseudo Runge-Kutta steps with
    midpoints half a stride down, then PLMS; v-prediction models blend v. `pndm` is that loop, with
    one evaluation fewer where diffusers' last step moves nothing (final ᾱ equal to the last knot's).
    Where the stride δ = T//N is odd (8 steps: 125) its first stage goes to t − ⌊δ/2⌋ and is evaluated
    at t' + ⌊δ/2⌋ (t' the next knot), and with "linspace" spacing its knots are not δ apart: the
    scheduler's levels are followed (`multistep._PNDMLevels`)."""
    from diffusers import PNDMScheduler
    sched = _in_float64(PNDMScheduler(**kw), steps)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _diffusers_loop(unet64, sched, z)
    m = fs.models.from_diffusers(unet64, PNDMScheduler(**kw))
    grid = m.field().grid(steps, "schedule")
    x, info = fs.sample(m.field(), "pndm", grid=grid, x_init=z * m.prior_std_at(float(grid[0])), dtype=torch.float64,
                        return_info=True)
    alpha_end = 1.0 / math.sqrt(1.0 + float(grid[-1]) ** 2)
    assert info.nfe == len(sched.timesteps) - (len(grid) - 1 < steps)
    assert (x * alpha_end - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()


def test_pndm_warm_up_is_rk4_on_any_field(gmm):
    """Away from diffusers' timesteps the warm-up is classical RK4 with midpoints at the mean time:
    one warm-up step on the exact mixture is fourth order (error ratio ≈ 2⁵ per halving)."""
    field = fs.fields.EDM(gmm.denoiser)
    x0 = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    errs = []
    for dt in (0.2, 0.1, 0.05):
        grid = torch.tensor([3.0, 3.0 - dt], dtype=torch.float64)
        exact = fs.sample(field, "torchdiffeq:dopri5", grid=torch.tensor([3.0, 3.0 - dt], dtype=torch.float64),
                          x_init=x0, nfe=10 ** 6, rtol=1e-12, atol=1e-12)
        errs.append(float((fs.sample(field, "pndm", grid=grid, x_init=x0) - exact).norm(dim=1).max()))
    assert all(math.log2(a / b) > 4.5 for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize("kind,eta,s_noise,max_stage", [("er_sde", 1.0, 1.0, 3), ("er_sde", 0.5, 0.7, 2),
                                                        ("reverse_time_sde", 1.0, 1.0, 3),
                                                        ("reverse_time_sde", 2.0, 1.0, 3), ("ode", 1.0, 1.0, 3),
                                                        ("er_sde", 0.0, 1.0, 3), ("er_sde", 1.0, 1.0, 1)])
def test_er_sde_is_comfyuis_with_the_same_noise(gmm, kind, eta, s_noise, max_stage):
    """ComfyUI's `sample_er_sde` (ER-SDE-Solver, Cui et al. 2023) with the scalers of its `SamplerER_SDE` node,
    its loop written out on the VE field (α = 1, so λ_ER = σ) and handed flowsolve's per-sample noise:
    `er_sde` gives the same samples, to round-off. At η = 0 (or "ode") the node draws no noise."""
    if kind == "er_sde":
        def psi(v):
            return v * ((v ** 0.3).exp() + 10.0) ** eta
    elif kind == "reverse_time_sde":
        def psi(v):
            return v ** (eta + 1)
    else:
        def psi(v):
            return v
    noise = 0.0 if kind == "ode" or eta == 0 else s_noise
    sig, z = _comfy_karras_start()
    src = SampleNoise(5, 0, 64, (2,), torch.float64, "cpu", stream=1)
    pts = torch.arange(0, 200.0, dtype=torch.float64)
    x, old, old_d = z.clone(), None, None
    for i in range(len(sig) - 1):
        den = gmm.denoiser(x, sig[i].expand(len(x)))
        stage = min(max_stage, i + 1)
        if sig[i + 1] == 0:
            x = den
        else:
            ls, lt = sig[i], sig[i + 1]
            r = psi(lt) / psi(ls)
            x = r * x + (1 - r) * den
            if stage >= 2:
                dt = lt - ls
                pos = lt + pts * (-dt / 200)
                d1 = (den - old) / (ls - sig[i - 1])
                x = x + (dt + torch.sum(1 / psi(pos)) * (-dt / 200) * psi(lt)) * d1
                if stage >= 3:
                    d2 = (d1 - old_d) / ((ls - sig[i - 2]) / 2)
                    x = x + (dt ** 2 / 2 + torch.sum((pos - ls) / psi(pos)) * (-dt / 200) * psi(lt)) * d2
                old_d = d1
            if noise > 0:
                x = x + src() * noise * (lt ** 2 - ls ** 2 * r ** 2).sqrt().nan_to_num(nan=0.0)
        old = den
    got = fs.sample(fs.fields.EDM(gmm.denoiser), "er_sde", grid=sig, x_init=z, seed=5, solver_type=kind, eta=eta,
                    s_noise=s_noise, max_stage=max_stage)
    assert (got - x).abs().max().item() <= 1e-12 * x.abs().max().item()


def test_er_sde_from_pure_noise_is_its_limit(gmm):
    """From a flow's t = 1 (ρ = ∞) the first step is the scaler's limit: D + ρ' ε for the SDEs (ψ(ρ)/ρ → ∞),
    DDIM for "ode" (ψ = ρ): the same samples as starting at t = 1 − 1e-9, where ComfyUI offsets the grid."""
    flow = _gmm_flow(gmm)
    z = torch.randn(200, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grid = fs.grids.uniform(12, 1.0, 0.0).double()
    near = grid.clone()
    near[0] = 1 - 1e-9
    for opts in ({}, {"solver_type": "ode"}, {"solver_type": "reverse_time_sde"}):
        a = fs.sample(flow, "er_sde", grid=grid, x_init=z, seed=3, **opts)
        b = fs.sample(flow, "er_sde", grid=near, x_init=z * (1 - 1e-9), seed=3, **opts)
        assert torch.isfinite(a).all() and (a - b).abs().max().item() < 1e-5, opts
    with pytest.raises(ValueError, match="solver_type: expected one of 'er_sde', 'reverse_time_sde', 'ode'"):
        fs.sample(flow, "er_sde", nfe=4, n=2, solver_type="ER-SDE")
    with pytest.raises(ValueError, match="max_stage: expected an integer <= 3"):
        fs.sample(flow, "er_sde", nfe=4, n=2, max_stage=4)


@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 0.8)])
def test_dpmpp_2s_rf_is_comfyuis_dpmpp_2s_ancestral_rf(gmm, eta, s_noise):
    """ComfyUI's `sample_dpmpp_2s_ancestral_RF` (what `dpmpp_2s_ancestral` runs on flow models), its loop
    written out on the mixture's exact flow (x = (1 − t) x_0 + t ε, D in the flow's own coordinates) and
    handed flowsolve's noise: `dpmpp_2s` with `split="rf"` gives the same samples. The grid starts below
    t = 1, where ComfyUI evaluates at 0.9999 instead of its midpoint."""
    def den(x, t):
        return gmm.denoiser(x / (1 - t), (t / (1 - t)).expand(len(x)))
    sig = fs.grids.uniform(9, 0.97, 0.0).double()
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.97
    src = SampleNoise(5, 0, 64, (2,), torch.float64, "cpu", stream=1)
    x = z.clone()
    for i in range(len(sig) - 1):
        d = den(x, sig[i])
        down = sig[i + 1] * (1 + (sig[i + 1] / sig[i] - 1) * eta)
        a_next, a_down = 1 - sig[i + 1], 1 - down
        renoise = (sig[i + 1] ** 2 - down ** 2 * a_next ** 2 / a_down ** 2) ** 0.5
        if sig[i + 1] == 0:
            x = d
            continue
        lam_i, lam_down = ((1 - sig[i]) / sig[i]).log(), ((1 - down) / down).log()
        sig_s = 1 / ((0.5 * (lam_i + lam_down)).exp() + 1)
        u = sig_s / sig[i] * x + (1 - sig_s / sig[i]) * d
        x = down / sig[i] * x + (1 - down / sig[i]) * den(u, sig_s)
        if eta > 0:
            x = a_next / a_down * x + src() * s_noise * renoise
    got = fs.sample(_gmm_flow(gmm), "dpmpp_2s", grid=sig, x_init=z, seed=5, eta=eta, s_noise=s_noise, split="rf")
    assert (got - x).abs().max().item() <= 1e-9 * x.abs().max().item()
    ve = fs.sample(_gmm_flow(gmm), "dpmpp_2s", grid=sig, x_init=z, seed=5, eta=0.0)
    assert torch.equal(ve, fs.sample(_gmm_flow(gmm), "dpmpp_2s", grid=sig, x_init=z, seed=5, eta=0.0, split="rf"))
    with pytest.raises(ValueError, match="split: expected one of ve, rf"):
        fs.sample(_gmm_flow(gmm), "dpm_2_ancestral", grid=sig, x_init=z, split="RF")


@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 0.8), (0.0, 1.0)])
def test_res_multistep_ancestral_is_comfyuis(gmm, eta, s_noise):
    """ComfyUI's `res_multistep` loop with `eta` (its `res_multistep_ancestral`), written out on the VE field
    and handed flowsolve's noise: Euler to σ_down on the first and last steps, RES's second-order step
    between them with c₂ measured from the previous σ_down; at η = 0 it is `dpmpp_2m_heun`."""
    sig, z = _comfy_karras_start()
    src = SampleNoise(5, 0, 64, (2,), torch.float64, "cpu", stream=1)
    K = pytest.importorskip("peers").k_diffusion_sampling()
    x, old, old_down = z.clone(), None, None
    for i in range(len(sig) - 1):
        den = gmm.denoiser(x, sig[i].expand(len(x)))
        down, up = K.get_ancestral_step(sig[i], sig[i + 1], eta=eta)
        if down == 0 or old is None:
            x = x + (x - den) / sig[i] * (down - sig[i])
        else:
            h = -down.log() + sig[i].log()
            c2 = (-sig[i - 1].log() + old_down.log()) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1) / -h
            x = torch.exp(-h) * x + h * ((phi1 - phi2 / c2) * den + (phi2 / c2) * old)
        if sig[i + 1] > 0 and eta > 0:
            x = x + src() * s_noise * up
        old, old_down = den, torch.as_tensor(down, dtype=torch.float64)
    field = fs.fields.EDM(gmm.denoiser)
    got = fs.sample(field, "res_multistep_ancestral", grid=sig, x_init=z, seed=5, eta=eta, s_noise=s_noise)
    assert (got - x).abs().max().item() <= 1e-12 * x.abs().max().item()
    if eta == 0:
        heun = fs.sample(field, "dpmpp_2m_heun", grid=sig, x_init=z)
        assert (got - heun).abs().max().item() <= 1e-12 * x.abs().max().item()


def _guided_pair(gmm, w):
    """The toy conditional model as a guided VE field and as the same guided flow (x = (1 − t) x̃, ρ = t/(1 − t))."""
    den = _two_class_denoiser(gmm)
    field = fs.fields.EDM(den, shape=(2,), guidance=w, uncond={"c": torch.zeros(1)})

    def velocity(xf, tt, c):
        tc = tt.reshape(-1, 1).double()
        return (xf - den(xf / (1 - tc), (tc / (1 - tc)).reshape(-1), c)) / tc
    flow = fs.fields.FlowMatching(fs.fields.guidance.GuidedDenoiser(velocity, w, {"c": torch.zeros(1)},
                                                                    prediction="velocity"), (2,))
    return den, field, flow


@pytest.mark.parametrize("w", [0.6, 1.5])
@pytest.mark.parametrize("gamma", [2.0, 1.0])
def test_gradient_estimation_cfg_pp_is_comfyuis(gmm, w, gamma):
    """ComfyUI's `gradient_estimation_cfg_pp`, its loop written out on the VE field: x = D_w + σ' d_u with
    d_u = (x − D_u)/σ, plus (γ − 1)(d_u − d_u,old)(σ' − σ) from the second step; γ = 1 is `euler_cfg_pp`. On the
    flow field it is the same solve in VE coordinates."""
    den, field, flow = _guided_pair(gmm, w)
    sig, z = _comfy_karras_start()
    one, zero = torch.ones(len(z)), torch.zeros(len(z))
    x, old = z.clone(), None
    for i in range(len(sig) - 1):
        s = sig[i].expand(len(x))
        d_u = den(x, s, zero)
        d_w = d_u + w * (den(x, s, one) - d_u)
        d = (x - d_u) / sig[i]
        if sig[i + 1] == 0:
            x = d_w
        else:
            x = d_w + d * sig[i + 1]
            if i >= 1:
                x = x + (gamma - 1) * (d - old) * (sig[i + 1] - sig[i])
        old = d
    got = fs.sample(field, "gradient_estimation_cfg_pp", grid=sig, x_init=z, cond={"c": one}, gamma=gamma)
    assert (got - x).abs().max().item() <= 1e-12 * x.abs().max().item()
    if gamma == 1.0:
        assert torch.equal(got, fs.sample(field, "euler_cfg_pp", grid=sig, x_init=z, cond={"c": one}))
    rho = sig[sig > 0]
    t = torch.cat([rho / (1 + rho), torch.zeros(1, dtype=torch.float64)])
    flow_x = fs.sample(flow, "gradient_estimation_cfg_pp", grid=t, x_init=z / (1 + rho[0]), cond={"c": one},
                       gamma=gamma)
    assert (flow_x - got).abs().max().item() <= 1e-8 * got.abs().max().item()


@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 0.8), (0.0, 1.0)])
def test_dpmpp_2s_ancestral_cfg_pp_is_comfyuis(gmm, eta, s_noise):
    """ComfyUI's `dpmpp_2s_ancestral_cfg_pp`, its loop written out on the VE field and handed flowsolve's noise:
    DPM-Solver++(2S) to σ_down on the unconditional predictions (knot and midpoint), σ_up ε, then the knot's
    guidance D_w − D_u added once. On the flow field it is the same solve in VE coordinates."""
    w = 1.5
    den, field, flow = _guided_pair(gmm, w)
    sig, z = _comfy_karras_start()
    one, zero = torch.ones(len(z)), torch.zeros(len(z))
    src = SampleNoise(5, 0, 64, (2,), torch.float64, "cpu", stream=1)
    K = pytest.importorskip("peers").k_diffusion_sampling()
    x = z.clone()
    for i in range(len(sig) - 1):
        s = sig[i].expand(len(x))
        d_u = den(x, s, zero)
        guidance = w * (den(x, s, one) - d_u)
        down, up = K.get_ancestral_step(sig[i], sig[i + 1], eta=eta)
        if down == 0:
            x = x + (x - d_u) / sig[i] * (down - sig[i])
        else:
            t, t_next = -sig[i].log(), -torch.as_tensor(down, dtype=torch.float64).log()
            h = t_next - t
            s_m = (-(t + h / 2)).exp()
            x_2 = s_m / sig[i] * x - torch.expm1(-h / 2) * d_u
            d_u2 = den(x_2, s_m.expand(len(x)), zero)
            x = (-t_next).exp() / sig[i] * x - torch.expm1(-h) * d_u2
        if sig[i + 1] > 0 and eta > 0:
            x = x + src() * s_noise * up
        x = x + guidance
    got = fs.sample(field, "dpmpp_2s_ancestral_cfg_pp", grid=sig, x_init=z, cond={"c": one}, seed=5, eta=eta,
                    s_noise=s_noise)
    assert (got - x).abs().max().item() <= 1e-12 * x.abs().max().item()
    rho = sig[sig > 0]
    t = torch.cat([rho / (1 + rho), torch.zeros(1, dtype=torch.float64)])
    flow_x = fs.sample(flow, "dpmpp_2s_ancestral_cfg_pp", grid=t, x_init=z / (1 + rho[0]), cond={"c": one}, seed=5,
                       eta=eta, s_noise=s_noise)
    assert (flow_x - got).abs().max().item() <= 1e-8 * got.abs().max().item()


@pytest.mark.parametrize("split", ["ve", "rf"])
def test_res_multistep_ancestral_from_pure_noise_reaches_the_mixture(gmm, split):
    """From a flow's t = 1 at η = 1 the first step ends its deterministic part at ρ_down = 0 (x̃ = D, then
    ρ' ε); the next step's c₂ is then −∞, a first-order step, not log(0) (a math domain error before)."""
    n = 2000
    x = fs.sample(_gmm_flow(gmm), "res_multistep_ancestral", nfe=96, n=n, seed=4, dtype=torch.float64, split=split)
    g = torch.Generator().manual_seed(5)
    floor = [fs.metrics.energy_distance(gmm.sample(n, generator=g, dtype=torch.float64),
                                        gmm.sample(n, generator=g, dtype=torch.float64)) for _ in range(5)]
    d = fs.metrics.energy_distance(x, gmm.sample(n, generator=g, dtype=torch.float64))
    assert d < max(floor) + 2 * (max(floor) - min(floor)) + 0.005, (d, floor)


# -- schedules that end with a step from σ_min to itself, and DDIM's clipping ----------------------
_REPEATED_FINAL = [  # (scheduler, config, solver, options); Karras σ's end at σ_min, so a sigma_min end repeats it
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "solver_order": 3},
     "dpmpp_3m", {"form": "lu", "lower_order_final": True}),
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min", "solver_order": 3},     # not repeated
     "dpmpp_3m", {"form": "lu", "lower_order_final": True}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
     "dpmpp_2m", {"lower_order_final": True}),
    ("UniPCMultistepScheduler", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, "unipc", {}),
    ("UniPCMultistepScheduler", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "solver_order": 3,
                                 "solver_type": "bh1"}, "unipc_bh1", {"order": 3}),
    ("DEISMultistepScheduler", {"use_karras_sigmas": True}, "deis", {"order": 2}),
    ("DEISMultistepScheduler", {"use_exponential_sigmas": True, "solver_order": 3}, "deis", {"order": 3}),
    ("SASolverScheduler", {"use_karras_sigmas": True, "tau_func": lambda t: 0}, "sa_solver", {"tau": 0.0}),
    ("DPMSolverSinglestepScheduler", {"final_sigmas_type": "sigma_min", "prediction_type": "v_prediction"},
     "dpmpp_singlestep", {}),                                    # lower_order_final False for even steps
    ("DPMSolverSinglestepScheduler", {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True,
                                      "prediction_type": "v_prediction"}, "dpmpp_singlestep", {}),
    ("DPMSolverSinglestepScheduler", {"final_sigmas_type": "sigma_min", "use_beta_sigmas": True, "solver_order": 3},
     "dpmpp_singlestep", {"order": 3}),                          # a repeated σ_min closing a cycle
    ("EDMDPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min", "solver_order": 3},   # σ's from float32
     "dpmpp_3m", {"form": "lu", "lower_order_final": True}),
]


@pytest.mark.parametrize("name,kw,solver,opts", _REPEATED_FINAL)
@pytest.mark.parametrize("steps", [6, 9])
def test_schedules_ending_at_sigma_min_are_their_schedulers_loops(unet64, name, kw, solver, opts, steps):
    """A `sigma_min` end that repeats the last knot is a step that moves nothing, which flowsolve does
    not take; the scheduler still counts it in its lower-order rules (DPM-Solver, DEIS), and UniPC and
    SA-Solver spend its evaluation on correcting the last real step, which `unipc` and `sa_solver` do
    too (then the evaluations are the scheduler's), and DPM-Solver singlestep on the stage at the last
    knot of a cycle that step closes. DPM-Solver singlestep lowers no order where its steps are a
    multiple of its order and the schedule ends above 0."""
    import diffusers
    cls = getattr(diffusers, name)
    sched = _in_float64(cls(num_train_timesteps=1000, **kw), steps)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _diffusers_loop(unet64, sched, z)
    m = fs.models.from_diffusers(unet64, cls(num_train_timesteps=1000, **kw))
    grid = m.field().grid(steps, "schedule")
    last, before = float(sched.sigmas[-1]), float(sched.sigmas[-2])
    repeated = last > 0 and abs(last - before) <= 1e-6 * last           # (EDM's: σ_min and its float32 knot)
    assert len(grid) - 1 == steps - (1 if repeated else 0)
    x, info = fs.sample(m.field(), solver, grid=grid, x_init=z * m.prior_std_at(float(grid[0])), dtype=torch.float64,
                        return_info=True, **opts)
    alpha_end = 1.0 / math.sqrt(1.0 + float(grid[-1]) ** 2) if m.schedule == "discrete" else 1.0
    assert (x * alpha_end - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()   # DPM-Solver's σ's: float32
    sched_orders = getattr(sched, "order_list", [1] * (steps + 1))
    corrects_last = repeated and (solver in ("unipc", "unipc_bh1", "sa_solver") or sched_orders[-1] > 1)
    assert info.nfe == len(grid) - 1 + (1 if corrects_last else 0)


def test_final_corrector_is_an_option_whose_evaluation_the_budget_counts(gmm64):
    field = fs.fields.EDM(gmm64.denoiser, shape=(64,))
    grid = fs.grids.karras(6, 0.05, 80.0, final_zero=False)          # ends above σ = 0
    z = torch.randn(20, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    plain, a = fs.sample(field, "unipc", grid=grid, x_init=z, return_info=True)
    corrected, b = fs.sample(field, "unipc", grid=grid, x_init=z, return_info=True, final_corrector=True)
    assert (a.nfe, b.nfe) == (6, 7) and not torch.allclose(plain, corrected)
    ref = fs.sample(field, "torchdiffeq:dopri5", grid=torch.tensor([80.0, 0.05], dtype=torch.float64), x_init=z,
                    nfe=10 ** 6, rtol=1e-10, atol=1e-10)
    assert (corrected - ref).norm(dim=1).mean() < (plain - ref).norm(dim=1).mean()   # UniC: one order more
    with pytest.raises(ValueError, match="needs 7 evaluations"):
        fs.sample(field, "unipc", grid=grid, x_init=z, nfe=6, final_corrector=True)


@pytest.mark.parametrize("kw", [{}, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
                                {"prediction_type": "sample"}, {"thresholding": True, "sample_max_value": 1.5},
                                {"set_alpha_to_one": False}])
def test_ddim_is_ddim_schedulers_default_loop_which_clips(unet64, kw):
    """DDIMScheduler clips x̂_0 by default but steps along the ε of the unclipped prediction; `ddim`
    does the same on a model that clips or thresholds (`euler` moves along the clipped one, DDIM's
    `use_clipped_model_output=True`). With `set_alpha_to_one=False` its last step, from σ(0) to itself,
    only clips, and `ddim` takes it."""
    from diffusers import DDIMScheduler
    sched = _in_float64(DDIMScheduler(num_train_timesteps=1000, **kw), 10)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _diffusers_loop(unet64, sched, z)
    m = fs.models.from_diffusers(unet64, DDIMScheduler(num_train_timesteps=1000, **kw))
    grid = m.field().grid(10, "schedule")
    start = z * m.prior_std_at(float(grid[0]))
    alpha_end = 1.0 / math.sqrt(1.0 + float(grid[-1]) ** 2)
    x = fs.sample(m.field(), "ddim", grid=grid, x_init=start, dtype=torch.float64)
    assert (x * alpha_end - ref).abs().max().item() <= 1e-8 * ref.abs().max().item()   # its final ᾱ is float32
    clipped = fs.sample(m.field(), "euler", grid=grid, x_init=start, dtype=torch.float64)
    assert (clipped * alpha_end - ref).abs().max().item() > 1e-3 * ref.abs().max().item()


@pytest.mark.parametrize("kw", [{}, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_eta_and_its_default_clipping_is_euler_ancestral(unet64, kw, eta):
    """DDIMScheduler's η > 0 step under its default clip_sample: x_{i+1} = α' clip(x̂_0) + √(1 − ᾱ' − σ_t²) ε_raw
    + σ_t ξ, ε_raw the noise of the unclipped prediction; `euler_ancestral` (eta=η) given the same noise."""
    from diffusers import DDIMScheduler
    sched = _in_float64(DDIMScheduler(num_train_timesteps=1000, **kw), 8)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _noisy_diffusers_loop(unet64, sched, z, eta=eta)
    m = fs.models.from_diffusers(unet64, DDIMScheduler(num_train_timesteps=1000, **kw))
    grid = m.field().grid(8, "schedule")
    x = fs.sample(m.field(), "euler_ancestral", grid=grid, x_init=z * m.prior_std_at(float(grid[0])), seed=5,
                  dtype=torch.float64, eta=eta)
    alpha_end = 1.0 / math.sqrt(1.0 + float(grid[-1]) ** 2)
    assert (x * alpha_end - ref).abs().max().item() <= 1e-8 * ref.abs().max().item()


@pytest.mark.parametrize("cls", ["DDIMScheduler", "DDIMParallelScheduler", "CogVideoXDDIMScheduler"])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("steps", [7, 12, 30])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_steps_to_its_prev_timestep_between_knots(unet64, cls, spacing, steps, clip):
    """DDIMScheduler steps from timestep t to t − T//N, which with "linspace" spacing, or "trailing"
    where N does not divide T, is not the next timestep of its list, and reads the result as the
    sample there (CogVideoXDDIMScheduler too). `ddim` on a model loaded with it does the same
    (`landing_sigma`): equal to its loop."""
    import diffusers
    make = lambda: getattr(diffusers, cls)(timestep_spacing=spacing, clip_sample=clip)  # noqa: E731
    sched = make()
    sched.set_timesteps(steps)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _diffusers_loop(unet64, sched, z)
    m = fs.models.from_diffusers(unet64, make())
    grid = m.field().grid(steps, "schedule")
    x = fs.sample(m.field(), "ddim", steps=steps, x_init=z * m.prior_std_at(float(grid[0])), dtype=torch.float64)
    assert (x - ref).abs().max().item() <= 1e-9 * ref.abs().max().item()


def test_ddims_landing_applies_on_its_own_schedule_only(unet64):
    """On a grid of the user's (Karras), `ddim` on a DDIM-loaded model steps knot to knot: the same as
    on the same network loaded with a scheduler that has no such quirk ("leading")."""
    import diffusers
    quirky = fs.models.from_diffusers(unet64, diffusers.DDIMScheduler(timestep_spacing="linspace", clip_sample=False))
    plain = fs.models.from_diffusers(unet64, diffusers.DDIMScheduler(timestep_spacing="leading", clip_sample=False))
    grid = quirky.field().grid(12, "karras")
    a = fs.sample(quirky.field(), "ddim", grid=grid, n=3, seed=0, dtype=torch.float64)
    b = fs.sample(plain.field(), "ddim", grid=grid, n=3, seed=0, dtype=torch.float64)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
