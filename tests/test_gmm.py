"""GaussianMixture against independent computations: scipy densities, autograd, Tweedie, moments."""
import math

import pytest
import torch
from scipy.stats import multivariate_normal

import flowsolve as fs


def test_paper_mixture_layout(gmm):
    assert gmm.dim == 2 and len(gmm.weights) == 5
    assert torch.allclose(gmm.means.norm(dim=1), torch.full((5,), 5.0, dtype=torch.float64))
    assert torch.allclose(gmm.std, torch.full((5,), 0.5, dtype=torch.float64))


@pytest.mark.parametrize("sigma", [0.0, 0.3, 2.0])
def test_log_prob_matches_scipy(sigma):
    g = fs.data.GaussianMixture([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]], std=[0.5, 1.5], weights=[0.3, 0.7])
    x = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = [math.log(sum(w * multivariate_normal(m.numpy(), (s ** 2 + sigma ** 2) * torch.eye(3).numpy()).pdf(xi.numpy())
                         for w, m, s in zip([0.3, 0.7], g.means, [0.5, 1.5]))) for xi in x]
    assert torch.allclose(g.log_prob(x, sigma), torch.tensor(want, dtype=torch.float64), atol=1e-10)


def test_score_is_gradient_of_log_prob_and_tweedie(gmm):
    x = (3 * torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))).requires_grad_()
    sigma = torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3
    grad, = torch.autograd.grad(gmm.log_prob(x, sigma).sum(), x)
    assert torch.allclose(gmm.score(x, sigma), grad, atol=1e-10)
    x = x.detach()
    tweedie = x + sigma[:, None] ** 2 * gmm.score(x, sigma)
    assert torch.allclose(gmm.denoiser(x, sigma), tweedie, atol=1e-10)


def test_denoiser_is_posterior_mean_by_monte_carlo(gmm):
    g = torch.Generator().manual_seed(4)
    x0 = gmm.sample(400_000, generator=g, dtype=torch.float64)
    sigma = 1.0
    y = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    # E[x0 | y in a small box around a point] ≈ D(point)
    p = torch.tensor([[4.5, 0.5]], dtype=torch.float64)
    near = ((y - p).abs() < 0.15).all(1)
    assert near.sum() > 500
    assert torch.allclose(x0[near].mean(0), gmm.denoiser(p, sigma)[0], atol=0.05)


def test_sample_moments(gmm):
    x, k = gmm.sample(200_000, generator=torch.Generator().manual_seed(5), dtype=torch.float64, return_modes=True)
    assert torch.allclose(x.mean(0), gmm.means.mean(0), atol=0.03)
    assert torch.allclose(torch.bincount(k, minlength=5).double() / len(k), gmm.weights, atol=0.01)
    assert (gmm.assign(x) == k).double().mean() > 0.99


def test_follows_input_dtype(gmm):
    x = torch.zeros(3, 2)
    assert gmm.denoiser(x, 1.0).dtype == torch.float32
    assert gmm.score(x.double(), 1.0).dtype == torch.float64


@pytest.mark.parametrize("kwargs,match", [
    (dict(means=[1.0, 2.0]), "means"),
    (dict(means=[[0.0, 0.0]], std=-1.0), "std"),
    (dict(means=[[0.0], [1.0]], weights=[1.0]), "weights"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fs.data.GaussianMixture(**kwargs)


def test_bad_inputs(gmm):
    with pytest.raises(ValueError, match="x: expected a tensor of shape"):
        gmm.denoiser(torch.zeros(3, 5), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        gmm.denoiser(torch.zeros(3, 2), torch.ones(4))


def test_energy_distance_closed_form():
    """1-D N(0, 1) vs N(m, 1): 2 E|Z_m| − 2 E|Z_0| with Z_m ~ N(m, 2), E|N(m, s²)| = s√(2/π) e^{−m²/2s²} + m(1 − 2Φ(−m/s))."""
    from scipy.stats import norm
    m, s = 1.0, 2 ** 0.5
    e_abs = lambda mu: s * math.sqrt(2 / math.pi) * math.exp(-mu ** 2 / (2 * s ** 2)) + mu * (1 - 2 * norm.cdf(-mu / s))
    exact = 2 * e_abs(m) - 2 * e_abs(0.0)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4000, 1, generator=g, dtype=torch.float64)
    y = torch.randn(4000, 1, generator=g, dtype=torch.float64) + m
    assert fs.metrics.energy_distance(x, y) == pytest.approx(exact, abs=0.02)
    with pytest.raises(ValueError, match="y: expected dimension 1"):
        fs.metrics.energy_distance(x, torch.zeros(3, 2))


def test_sigma_dependent_weights_equal_constant_ones(gmm):
    """ScoreDifference with μ_data, μ_ρ given as functions of σ (the DiffFlow family) follows the same
    ODE and Euler–Maruyama SDE as with the equal constants, and a weight switched off above σ = 2
    changes the flow."""
    rho = fs.data.GaussianMixture(gmm.means, gmm.std, weights=[0.6, 0.1, 0.1, 0.1, 0.1]).denoiser
    const = fs.fields.ScoreDifference(gmm.denoiser, rho, mu_data=2.0, mu_rho=1.0, sigma_max=40.0)
    funcs = fs.fields.ScoreDifference(gmm.denoiser, rho, mu_data=lambda s: torch.full_like(s, 2.0),
                                      mu_rho=lambda s: torch.ones_like(s), sigma_max=40.0)
    for solver, kw in (("heun", {}), ("sde", {"alpha": 0.5, "method": "em"})):
        a = fs.sample(const, solver, nfe=16, n=200, seed=0, **kw)
        b = fs.sample(funcs, solver, nfe=16, n=200, seed=0, **kw)
        assert torch.allclose(a, b, atol=1e-5)
    gated = fs.fields.ScoreDifference(gmm.denoiser, rho, mu_data=lambda s: 1.0 + (s < 2).to(s.dtype),
                                      mu_rho=lambda s: (s < 2).to(s.dtype), sigma_max=40.0)
    ode = fs.sample(const, "heun", nfe=16, n=200, seed=0)
    assert not torch.allclose(fs.sample(gated, "heun", nfe=16, n=200, seed=0), ode, atol=1e-3)
