"""ComfyUI's SA-Solver (`sample_sa_solver`, its KSampler "sa_solver" / "sa_solver_pece") is not diffusers'
SASolverScheduler (flowsolve's "sa_solver"): orders 3 and 4, no order-2 adjustment, τ taken at the
step's end and by default 1 between the model's levels at 20% and 80% of its range, orders falling to
the steps left before the last, and a flow's start at t = 1 moved to its level at 0.01%.
`fs.sample(field, "sa_solver", form="comfyui")` (names "comfyui:sa_solver", "sa_solver_pece") is checked
against that loop written out here from ComfyUI's code, on the exact mixture and on a flow model, with
the same per-step noise."""
import math

import pytest
import torch

import flowsolve as fs
from flowsolve.noise import SampleNoise


def _lagrange_exp_integrals(nodes, s, t, k):
    """∫_s^t k e^{k(λ − t)} ℓ_j(λ) dλ for the Lagrange basis on `nodes`: the moments
    I_p = ∫ k e^{k(λ − t)} λ^p dλ by parts (I_p = t^p − s^p e^{−kh} − (p/k) I_{p−1}), then V^T b = I."""
    h = t - s
    moments = []
    for q in range(len(nodes)):
        prev = moments[-1] if moments else 0.0
        moments.append(t ** q - s ** q * math.exp(-k * h) - (q / k) * prev)
    v = torch.tensor([[lam ** q for lam in nodes] for q in range(len(nodes))], dtype=torch.float64)
    return torch.linalg.solve(v, torch.tensor(moments, dtype=torch.float64)).tolist()


def _comfy_sa_solver(den, x, sigmas, lam, alpha, noises, tau_func, p=3, c=4, pece=False, s_noise=1.0):
    """ComfyUI's sample_sa_solver loop (comfy/k_diffusion/sampling.py), on levels `sigmas` (already
    offset for flows) with λ = lam(σ), α = alpha(σ), den(x, σ) the data prediction, noises[i] the
    step's noise."""
    n = len(sigmas) - 1
    preds, x_pred, h, tau_t, noise = [], x, 0.0, 0.0, 0.0
    lams = [lam(s) for s in sigmas]

    def update(x_from, s_from, s_to, nodes, values, l_s, l_t, tau):
        k = 1 + tau * tau
        b = _lagrange_exp_integrals(nodes, l_s, l_t, k)
        return (s_to / s_from) * math.exp(-tau * tau * (l_t - l_s)) * x_from + alpha(s_to) * sum(
            w * v for w, v in zip(b, values))

    for i in range(n):
        d = den(x_pred, sigmas[i])
        preds = (preds + [d])[-max(p, c):]
        po = min(p, len(preds))
        co = 0 if i == 0 or (sigmas[i + 1] == 0 and not pece) else min(c, len(preds))
        if sigmas[-1] == 0:
            po, co = min(po, n - 1 - i), min(co, n - i)
        if co == 0:
            x = x_pred
        else:
            x = update(x, sigmas[i - 1], sigmas[i], lams[i - co + 1:i + 1], preds[-co:], lams[i - 1], lams[i], tau_t)
            if tau_t > 0 and s_noise > 0:
                x = x + noise
            if pece:
                d = den(x, sigmas[i])
                preds[-1] = d
        if sigmas[i + 1] == 0:
            x_pred = d
        else:
            tau_t = tau_func(sigmas[i + 1])
            h = lams[i + 1] - lams[i]
            x_pred = update(x, sigmas[i], sigmas[i + 1], lams[i - po + 1:i + 1], preds[-po:], lams[i], lams[i + 1],
                            tau_t)
            if tau_t > 0 and s_noise > 0:
                noise = noises[i] * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * tau_t ** 2 * h)) * s_noise
                x_pred = x_pred + noise
    return x_pred


def _window(start, stop):
    return lambda s: 1.0 if start >= s >= stop else 0.0


@pytest.mark.parametrize("pece,s_noise", [(False, 1.0), (True, 1.0), (False, 0.5)])
def test_comfyuis_sa_solver_on_the_exact_mixture(gmm64, pece, s_noise):
    field = fs.fields.EDM(gmm64.denoiser)
    grid = field.grid(12, "karras")
    z = torch.randn(16, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * float(grid[0])
    src = SampleNoise(4, 0, 16, (64,), torch.float64, "cpu", stream=1)
    noises = [src() for _ in range(12)]
    smin, smax = field.sigma_min, field.sigma_max  # ComfyUI's continuous EDM percent_to_sigma
    level = lambda pct: math.exp(math.log(smin) + (1 - pct) * (math.log(smax) - math.log(smin)))  # noqa: E731
    ref = _comfy_sa_solver(lambda x, s: gmm64.denoiser(x, torch.full((len(x),), s, dtype=torch.float64)), z,
                           grid.tolist(), lambda s: -math.log(s) if s > 0 else math.inf, lambda s: 1.0, noises,
                           _window(level(0.2), level(0.8)), pece=pece, s_noise=s_noise)
    got, info = fs.sample(field, "sa_solver", grid=grid, x_init=z, seed=4, form="comfyui", pece=pece,
                          s_noise=s_noise, return_info=True)
    assert info.nfe == (23 if pece else 12)
    assert (got - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()
    assert fs.solvers.resolve("sa_solver_pece")[1] == {"form": "comfyui", "pece": True}
    if not pece and s_noise == 1.0:
        named = fs.sample(field, "comfyui:sa_solver", grid=grid, x_init=z, seed=4)
        assert torch.equal(named, got)
        ours = fs.sample(field, "sa_solver", grid=grid, x_init=z, seed=4)  # diffusers' SA-Solver differs
        assert (ours - got).abs().max().item() > 1e-3 * ref.abs().max().item()


def test_comfyuis_sa_solver_on_a_flow_moves_its_start_off_t_1(unet64):
    from diffusers import FlowMatchEulerDiscreteScheduler
    model = fs.models.from_diffusers(unet64, FlowMatchEulerDiscreteScheduler(shift=3.0))
    field = model.field()
    grid = field.grid(10, "schedule")
    assert float(grid[0]) == 1.0
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    src = SampleNoise(4, 0, 2, (1, 8, 8), torch.float64, "cpu", stream=1)
    noises = [src() for _ in range(10)]
    shift = lambda t: 3.0 * t / (1 + 2.0 * t)  # noqa: E731  (ComfyUI's time_snr_shift)
    sigmas = [shift(1 - 1e-4)] + grid.tolist()[1:]  # offset_first_sigma_for_snr

    def den(x, t):
        v = model.velocity(x, torch.full((len(x),), t, dtype=torch.float64))
        return x - t * v

    lam = lambda t: math.log((1 - t) / t) if t > 0 else math.inf  # noqa: E731
    ref = _comfy_sa_solver(den, z, sigmas, lam, lambda t: 1 - t, noises, _window(shift(0.8), shift(0.2)))
    got = fs.sample(field, "comfyui:sa_solver", grid=grid, x_init=z, seed=4, dtype=torch.float64)
    assert (got - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


def test_comfyui_options_are_refused_in_diffusers_form(gmm64):
    field = fs.fields.EDM(gmm64.denoiser)
    with pytest.raises(fs.errors.ArgumentError, match="form='comfyui'"):
        fs.sample(field, "sa_solver", nfe=8, n=2, pece=True)
    with pytest.raises(fs.errors.ArgumentError, match="form"):
        fs.sample(field, "sa_solver", nfe=8, n=2, form="comfy")
