"""Gaussian paths (issue 14, first part): a flow-matching model is a field on the path
x_t = (1 − t) x_0 + t ε, and every solver, the exponential ones included, runs on it. Checked
against diffusers' own FlowMatch and DPM-Solver loops on tiny random models, k-diffusion's
DPM-Solver++(2M), and the exact mixture."""
import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
                       UNet2DModel)

import flowsolve as fs

GMM = fs.data.GaussianMixture.paper()


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8).eval()


Z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _loop(unet, sched, z):
    x = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x


def _close(x, ref):
    return (x - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("kw", [dict(shift=1.0), dict(shift=3.0),
                                dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)])
def test_flow_match_euler_is_euler_on_the_flow_field(unet, kw):
    mu = {"mu": 0.8} if kw.get("use_dynamic_shifting") else {}
    sched = FlowMatchEulerDiscreteScheduler(**kw)
    sched.set_timesteps(12, **mu)
    ref = _loop(unet, sched, Z)
    m = fs.models.from_diffusers(unet, FlowMatchEulerDiscreteScheduler(**kw), **mu)
    assert isinstance(m, fs.models.ParticleModel) and m.data_shape == (1, 8, 8)
    x, info = fs.sample(m.field(), "euler", nfe=12, x_init=Z, return_info=True)      # default grid: its schedule
    assert info.nfe == 12 and _close(x, ref)


def test_dynamic_shifting_needs_mu(unet):
    with pytest.raises(ValueError, match="mu"):
        fs.models.from_diffusers(unet, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))


def test_flow_match_heun_is_heun_with_an_euler_last_step(unet):
    sched = FlowMatchHeunDiscreteScheduler(shift=1.0)
    sched.set_timesteps(6)
    ref = _loop(unet, sched, Z)
    m = fs.models.from_diffusers(unet, FlowMatchHeunDiscreteScheduler(shift=1.0))
    x, info = fs.sample(m.field(), "heun", nfe=len(sched.timesteps), x_init=Z, return_info=True)
    assert info.nfe == len(sched.timesteps) and _close(x, ref)


@pytest.mark.parametrize("solver_type,name", [("heun", "dpmpp_2m"), ("midpoint", "dpmpp_2m_midpoint")])
def test_dpm_solver_with_flow_sigmas(unet, solver_type, name):
    """diffusers evaluates the model at integer timesteps floor(1000 t); the same model here."""
    def velocity(x, t):
        return unet(x, torch.floor(t.double() * 1000 + 1e-6).float()).sample
    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                        solver_type=solver_type, flow_shift=1.0)
    sched.set_timesteps(8)
    ref = _loop(unet, sched, Z)
    x = fs.sample(fs.fields.FlowMatching(velocity, (1, 8, 8)), name, grid=sched.sigmas.double(), x_init=Z)
    assert _close(x, ref)


def test_midpoint_form_matches_k_diffusion(gmm64):
    K = pytest.importorskip("peers").k_diffusion_sampling()
    sig = fs.grids.karras(10, 0.002, 80.0).float()
    z = torch.randn(50, 64, generator=torch.Generator().manual_seed(0)) * 80

    class M(torch.nn.Module):
        def forward(self, x, s, **kw):
            return gmm64.denoiser(x, s)
    ref = K.sample_dpmpp_2m(M(), z, sig, disable=True)
    x = fs.sample(fs.fields.EDM(gmm64.denoiser), "dpmpp_2m_midpoint", grid=sig.double(), x_init=z)
    assert (x - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def exact_velocity(x, t):
    """The mixture's exact flow velocity v = (x_t − D)/t with D the VE denoiser at σ = t/(1 − t)."""
    tc = t.reshape(-1, 1).double().clamp(max=1 - 1e-9)
    d = GMM.denoiser((x.double() / (1 - tc)), (tc / (1 - tc)).reshape(-1))
    return ((x.double() - d) / tc).to(x.dtype)


def test_every_gaussian_path_solver_reaches_the_same_endpoint_as_edm():
    """The flow ODE from t = 1 and the EDM ODE from σ = ∞ are one ODE: from the same ε, a converged
    flow solve lands where the EDM solve does; the exponential solvers converge on the flow field."""
    flow = fs.fields.FlowMatching(exact_velocity, (2,))
    eps = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = fs.sample(flow, "heun", grid=flow.grid(400, "karras", sigma_max=1e4), x_init=eps)
    edm = fs.sample(fs.fields.EDM(GMM.denoiser, sigma_max=1e4), "heun", nfe=799, x_init=eps * 1e4)
    assert (ref - edm).abs().max() < 5e-3
    errors = {}
    for solver in ("euler", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_pc", "ipndm"):
        errors[solver] = [float((fs.sample(flow, solver, grid=flow.grid(n, "karras"), x_init=eps) - ref)
                                .norm(dim=1).mean()) for n in (8, 32)]
        assert errors[solver][1] < errors[solver][0], (solver, errors[solver])
    for solver in ("euler", "dpmpp_2m", "dpmpp_3m"):      # in λ these steps are the EDM steps (from σ = ∞, not 80)
        x = fs.sample(flow, solver, grid=flow.grid(12, "karras"), x_init=eps)
        e = fs.sample(fs.fields.EDM(GMM.denoiser), solver, grid=fs.grids.karras(12, 0.002, 80.0), x_init=eps * 80)
        assert (x - e).abs().max() < 0.05, solver


def test_flow_fields_refuse_what_they_cannot_do():
    flow = fs.fields.FlowMatching(exact_velocity, (2,))
    with pytest.raises(ValueError, match="edm"):
        fs.sample(flow, "edm", nfe=5, n=2)
    with pytest.raises(ValueError, match="domain"):
        fs.sample(flow, "euler", grid=torch.tensor([1.5, 0.5, 0.0]), n=2)
