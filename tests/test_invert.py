"""`fs.invert`: the probability-flow ODE walked from the data to the prior, checked against the
closed-form flow map of a Gaussian (σ-time and flow fields, each solver at its order), against
diffusers' DPMSolverMultistepInverseScheduler loop, and by a round trip through `fs.sample`."""
import math

import pytest
import torch

import flowsolve as fs

MU, S = torch.tensor([[1.0, -2.0]], dtype=torch.float64), 0.7
X0 = MU + S * torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _gaussian_edm():
    return fs.fields.EDM(fs.data.GaussianMixture(MU, std=S).denoiser, shape=(2,), sigma_max=80.0)


def _gaussian_flow():
    """The exact velocity E[ε − x₀ | x_t] of N(μ, s²) on x_t = (1 − t) x₀ + t ε, finite on [0, 1]."""
    def velocity(x, t):
        t = t.reshape(-1, 1).to(x.dtype)
        var = (1 - t) ** 2 * S**2 + t**2
        r = x - (1 - t) * MU.to(x.dtype)
        return t / var * r - (MU.to(x.dtype) + (1 - t) * S**2 / var * r)
    return fs.fields.FlowMatching(velocity, shape=(2,))


def _orders(errors):
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


@pytest.mark.parametrize("solver,order", [("euler", 1), ("ddim_inverse", 1), ("heun", 2), ("dpmpp_2m", 2), ("dpmpp_3m", 3),
                                          ("unipc", 3), ("deis", 3)])
def test_inversion_is_the_gaussians_flow_map_at_the_solvers_order(solver, order):
    """On σ-time fields the walk goes from the grid's last σ > 0 (`ddim_inverse`: from σ = 0) to σ_max; the PF-ODE of
    N(μ, s²) maps x to μ + (x − μ) √(s² + σ_max²) / √(s² + σ_min²)."""
    errors = []
    for nfe in (16, 32, 64):
        z, info = fs.invert(_gaussian_edm(), X0, solver, nfe, grid="karras", dtype=torch.float64, return_info=True)
        lo, hi = float(info.grid[0]), float(info.grid[-1])
        assert lo < hi == 80.0 and info.nfe <= nfe
        exact = MU + (X0 - MU) * math.sqrt(S**2 + hi**2) / math.sqrt(S**2 + lo**2)
        errors.append((z - exact).abs().max().item())
    assert min(_orders(errors)) >= 0.8 * order, errors


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2), ("torchdiffeq:rk4", 4)])
def test_flow_inversion_reaches_the_exact_latent(solver, order):
    """A flow is walked from t = 0 (the data itself) to t = 1: the latent of N(μ, s²) is (x − μ)/s.
    The velocity is evaluated at t = 0 (before this, off-grid stages there were taken as 0, which made
    RK4 first order on flows, forward too)."""
    errors = []
    for nfe in (16, 32, 64):
        z, info = fs.invert(_gaussian_flow(), X0, solver, nfe, dtype=torch.float64, return_info=True)
        assert float(info.grid[0]) == 0.0 and float(info.grid[-1]) == 1.0
        errors.append((z - (X0 - MU) / S).abs().max().item())
    assert min(_orders(errors)) >= 0.8 * order, errors
    # forward, the same solver reaches the exact sample μ + s z at its order
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fwd = [(fs.sample(_gaussian_flow(), solver, nfe, x_init=z, dtype=torch.float64) - (MU + S * z)).abs().max().item()
           for nfe in (16, 32, 64)]
    assert min(_orders(fwd)) >= 0.8 * (1 if solver == "heun" else order), fwd  # heun ends with Euler at t = 0


def test_inversion_round_trip_on_a_trained_model():
    m = fs.from_pretrained("pretrained/digits-edm")
    x = fs.sample(m.field(), "dpmpp_2m", nfe=32, n=8, seed=0, dtype=torch.float64)
    grid = m.field().grid(64, "karras")
    z = fs.invert(m.field(), x, "dpmpp_3m", grid=grid, dtype=torch.float64)
    back = fs.sample(m.field(), "dpmpp_3m", grid=grid, x_init=z, dtype=torch.float64)
    assert (back - x).abs().max().item() < 0.05 * x.abs().max().item()
    assert abs(float((z / m.field().prior_std).std()) - 1.0) < 0.15  # the latent is about standard normal


def _inverse_loop(unet, sched):
    """Data in [−1, 1] and an inverse scheduler's loop from them (the scheduler set to its steps)."""
    x0 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64).clamp(-1, 1)
    x = x0.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x0, x


@pytest.mark.parametrize("kw,solver,opts", [
    ({}, "dpmpp_2m", {"lower_order_final": True}),
    ({"solver_type": "heun"}, "dpmpp_2m_heun", {"lower_order_final": True}),
    ({"solver_order": 1}, "ddim", {}),
    ({"solver_order": 3}, "dpmpp_3m", {"form": "lu", "lower_order_final": True}),
    ({"lower_order_final": False}, "dpmpp_2m", {}),
])
def test_dpm_solver_inverse_scheduler_is_invert_on_its_grid(unet64, kw, solver, opts):
    """DPMSolverMultistepInverseScheduler (diffusers' DPM-Solver++ inversion) is `invert` walking its
    σ's (given as the sampling grid they reverse) with the same options, to float64 round-off."""
    from diffusers import DPMSolverMultistepInverseScheduler, DPMSolverMultistepScheduler
    sched = DPMSolverMultistepInverseScheduler(**kw)
    sched.set_timesteps(10)
    sched.sigmas, sched.alphas_cumprod = sched.sigmas.double(), sched.alphas_cumprod.double()
    x0, x = _inverse_loop(unet64, sched)
    m = fs.models.from_diffusers(unet64, DPMSolverMultistepScheduler(**kw))
    sig = sched.sigmas.double()
    alpha = 1 / torch.sqrt(1 + sig**2)       # diffusers works on x_VP = α x̃
    z = fs.invert(m.field(), x0 / alpha[0], solver, grid=sig.flip(0), dtype=torch.float64, **opts)
    assert (z * alpha[-1] - x).abs().max().item() <= 1e-10 * x.abs().max().item()
    # the inverse scheduler itself as the solver: the same solver and options
    by_scheduler = fs.invert(m.field(), x0 / alpha[0], DPMSolverMultistepInverseScheduler(**kw), grid=sig.flip(0),
                             dtype=torch.float64)
    assert torch.equal(by_scheduler, z)


@pytest.mark.parametrize("kw", [{}, {"timestep_spacing": "trailing"}, {"set_alpha_to_one": False},
                                {"set_alpha_to_one": False, "steps_offset": 1},
                                {"prediction_type": "v_prediction", "clip_sample": False},
                                {"prediction_type": "v_prediction", "clip_sample_range": 0.5}])
def test_ddim_inverse_scheduler_is_invert_with_its_lagged_step(unet64, kw):
    """DDIMInverseScheduler's loop (null-text inversion, DiffEdit) evaluates each step's network at the
    target timestep on the current sample: `fs.invert` with the scheduler (`ddim_inverse`) is that loop
    to float64 round-off, from the data itself (σ = 0, `set_alpha_to_one`) or from its first knot (a
    step to itself first, which only clips), with as many evaluations."""
    from diffusers import DDIMInverseScheduler
    sched = DDIMInverseScheduler(**kw)
    sched.set_timesteps(10)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.initial_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if kw.get("set_alpha_to_one", True) \
        else sched.alphas_cumprod[0]
    x0, x = _inverse_loop(unet64, sched)
    m = fs.models.from_diffusers(unet64, DDIMInverseScheduler(**kw))
    start = float(m.field().grid(10)[-1])          # the walk's first level: 0, or the first knot's
    z, info = fs.invert(m.field(), x0 * (1 + start**2) ** 0.5, DDIMInverseScheduler(**kw), 10, dtype=torch.float64,
                        return_info=True)
    alpha = 1 / (1 + float(info.grid[-1]) ** 2) ** 0.5      # diffusers works on x_VP = α x̃
    assert info.nfe == 10 and float(info.grid[0]) == start
    assert (z * alpha - x).abs().max().item() <= 1e-10 * x.abs().max().item()
    with pytest.raises(ValueError, match="ddim_inverse.*fs.invert"):
        fs.sample(m.field(), "ddim_inverse", nfe=4, n=1)
    with pytest.raises(ValueError, match="ddim_inverse.*σ-time .VP. models; use euler"):
        fs.invert(_gaussian_flow(), X0, "ddim_inverse", 8)


@pytest.mark.parametrize("field,solver,word", [
    (_gaussian_edm(), "euler_ancestral", "draws noise"),
    (_gaussian_edm(), "torchdiffeq:dopri5", "adaptive"),
    (_gaussian_flow(), "dpmpp_2m", "log-SNR"),
])
def test_inversion_refuses_what_it_cannot_walk_backwards(field, solver, word):
    with pytest.raises(ValueError, match=word):
        fs.invert(field, X0, solver, 8)
    with pytest.raises(TypeError, match="x"):
        fs.invert(_gaussian_edm(), X0.numpy(), "euler", 8)


@pytest.mark.parametrize("kw", [{}, {"clip_sample": False, "prediction_type": "v_prediction"}])
def test_guided_ddim_inversion_is_the_inverse_schedulers_cfg_loop(kw):
    """DDIM inversion with classifier-free guidance (as prompt-to-prompt's and DiffEdit's inversions run
    it): `fs.invert` of the guided field with DDIMInverseScheduler is its CFG loop on a text UNet, the
    guided x̂_0 clipped where the scheduler clips."""
    from diffusers import DDIMInverseScheduler
    from test_guidance import _models
    _, model, cond, uncond = _models()[1]
    model = model.double()
    cond, uncond = ({k: v.double() for k, v in d.items()} for d in (cond, uncond))
    sched = DDIMInverseScheduler(**kw)
    sched.set_timesteps(8)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    x0 = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64).clamp(-1, 1)
    x = x0.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
            p_c, p_u = model(torch.cat([x, x]), t.expand(12), **both).sample.chunk(2)
            x = sched.step(p_u + 3.0 * (p_c - p_u), t, x).prev_sample
    m = fs.models.from_diffusers(model, DDIMInverseScheduler(**kw))
    field = m.field(guidance=3.0, uncond={k: v[:1] for k, v in uncond.items()})
    z, info = fs.invert(field, x0, DDIMInverseScheduler(**kw), 8, cond=cond, dtype=torch.float64, return_info=True)
    alpha = 1 / (1 + float(info.grid[-1]) ** 2) ** 0.5          # (the walk starts at σ = 0: x0 itself)
    assert info.nfe == 8 and (z * alpha - x).abs().max().item() <= 1e-10 * x.abs().max().item()
