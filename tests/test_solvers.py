"""Solvers against exact fields: convergence orders, EDM/k-diffusion equivalence, Eq. 21 marginals, NFE counts."""
import math

import pytest
import torch

import flowsolve as fs
from conftest import energy_distance, reference_solve


@pytest.fixture(scope="module")
def edm_field(gmm):
    return fs.fields.EDM(gmm.denoiser)


@pytest.fixture(scope="module")
def start():
    return torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80


@pytest.fixture(scope="module")
def ref_to_half(edm_field, start):
    return reference_solve(edm_field, start, 80.0, 0.5)


def _rmse(a, b):
    return float(((a - b) ** 2).sum(1).mean().sqrt())


# (solver, lowest acceptable error ratio when the steps double, highest)
ORDERS = [("euler", 1.8, 2.4), ("heun", 3.5, 4.6), ("dpmpp_2m", 3.2, 6), ("dpmpp_2m_heun", 3.2, 6), ("dpmpp_3m", 5.5, 9),
          ("dpmpp_2m_pc", 3.8, 8), ("dpmpp_3m_pc", 6, 30), ("adams", 3.8, 8), ("ipndm", 3.5, 15),
          ("torchdiffeq:rk4", 12, 17), ("torchdiffeq:midpoint", 2.8, 4.5), ("torchsde:heun", 3.5, 4.6),
          ("torchsde:srk", 7, 9), ("sde", 1.8, 2.4), ("gradient_estimation", 1.6, 2.4), ("seeds_2", 3.2, 4.6),
          ("seeds_3", 5.5, 10), ("er_sde", 3.2, 4.6)]
ORDER_OPTIONS = {"sde": {"alpha": 0.0}, "seeds_2": {"eta": 0.0}, "seeds_3": {"eta": 0.0}, "er_sde": {"eta": 0.0}}   # the deterministic (ODE) forms


@pytest.mark.parametrize("solver,lo,hi", ORDERS)
def test_convergence_order(solver, lo, hi, edm_field, start, ref_to_half):
    """Error against a dopri5 (1e-10) solve falls at the solver's order as the steps double."""
    kw = {"alpha": 0.0} if solver.startswith("torchsde") else ORDER_OPTIONS.get(solver, {})
    errs = []
    for steps in (32, 64, 128):
        g = fs.grids.karras(steps, 0.5, 80.0, final_zero=False)
        errs.append(_rmse(fs.sample(edm_field, solver, grid=g, x_init=start, seed=0, **kw), ref_to_half))
    ratio = errs[-2] / errs[-1]
    assert lo <= ratio <= hi, (solver, errs)


def _edm_alg1(D, x, sigmas):
    """A plain reimplementation of EDM's deterministic sampler (Karras et al. 2022, Alg. 1)."""
    for i in range(len(sigmas) - 1):
        t, t_next = sigmas[i], sigmas[i + 1]
        d = (x - D(x, t.expand(len(x)))) / t
        x_next = x + (t_next - t) * d
        if t_next != 0:
            d2 = (x_next - D(x_next, t_next.expand(len(x)))) / t_next
            x_next = x + (t_next - t) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


def test_heun_is_edm_algorithm_1(gmm, edm_field):
    sig = fs.grids.karras(18, 0.002, 80.0)
    z = torch.randn(300, 2, generator=torch.Generator().manual_seed(1)) * 80
    want = _edm_alg1(gmm.denoiser, z, sig.float())
    got, info = fs.sample(edm_field, "heun", grid=sig, x_init=z, return_info=True)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)      # float32 round-off
    assert info.nfe == 35
    got64 = fs.sample(edm_field, "heun", grid=sig, x_init=z.double())
    assert torch.allclose(got64, _edm_alg1(gmm.denoiser, z.double(), sig), rtol=0, atol=1e-11)


def test_heun_matches_k_diffusion(gmm64):
    K = pytest.importorskip("peers").k_diffusion_sampling()
    field = fs.fields.EDM(gmm64.denoiser)
    sig = K.get_sigmas_karras(16, 0.002, 80.0)
    z = torch.randn(256, 64, generator=torch.Generator().manual_seed(2)) * 80

    class Model:
        def __call__(self, x, s, **kw):
            return gmm64.denoiser(x, s)
    want = K.sample_heun(Model(), z, sig, disable=True)
    got = fs.sample(field, "heun", grid=sig, x_init=z)
    assert (got - want).abs().max() <= 1e-5
    want_e = K.sample_euler(Model(), z, sig, disable=True)
    assert (fs.sample(field, "euler", grid=sig, x_init=z) - want_e).abs().max() <= 1e-5


def test_sde_alpha_zero_is_euler_ddim(edm_field, start):
    g = fs.grids.karras(20)
    a = fs.sample(edm_field, "sde", grid=g, x_init=start, alpha=0.0, seed=3)
    b = fs.sample(edm_field, "euler", grid=g, x_init=start)
    assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("method", ["exp", "em"])
def test_eq21_same_marginals(alpha, method, gmm, edm_field):
    """Every alpha of Eq. 21 gives the data distribution (energy distance at the level of two true sets)."""
    n = 2000
    x = fs.sample(edm_field, "sde", nfe=256, n=n, seed=10, alpha=alpha, method=method, dtype=torch.float64)
    g = torch.Generator().manual_seed(11)
    truth = gmm.sample(n, generator=g, dtype=torch.float64)
    floor = [energy_distance(gmm.sample(n, generator=g, dtype=torch.float64), gmm.sample(n, generator=g, dtype=torch.float64))
             for _ in range(5)]
    bound = max(floor) + 2 * (max(floor) - min(floor)) + 0.005
    assert energy_distance(x, truth) < bound, (energy_distance(x, truth), floor)


def test_langevin_reaches_noised_mixture(gmm):
    """Eq. 6: Langevin at fixed σ samples p ⋆ k_σ (within one basin per particle: check mode shape)."""
    sigma = 2.0
    field = fs.fields.Langevin(gmm.denoiser, sigma=sigma, T=20.0, scale_by_sigma2=False)
    x = fs.sample(field, "sde", nfe=2000, n=2000, seed=4, alpha=1.0, dtype=torch.float64)
    noised = fs.data.GaussianMixture(gmm.means, std=math.sqrt(0.25 + sigma ** 2))
    g = torch.Generator().manual_seed(5)
    floor = max(energy_distance(noised.sample(2000, generator=g, dtype=torch.float64),
                                noised.sample(2000, generator=g, dtype=torch.float64)) for _ in range(5))
    assert energy_distance(x, noised.sample(2000, generator=g, dtype=torch.float64)) < 2 * floor + 0.01
    with pytest.raises(ValueError, match="alpha"):
        fs.sample(field, "sde", nfe=10, n=2, alpha=0.5)


def test_score_difference_with_true_rho_is_edm(gmm, edm_field, start):
    sd = fs.fields.ScoreDifference(gmm.denoiser, gmm.denoiser, mu_data=2.0, mu_rho=1.0)
    x = start[:20]
    t = torch.tensor(3.0, dtype=torch.float64)
    assert torch.allclose(sd(x, t), edm_field(x, t), atol=1e-10)
    # as scores (prediction="score") and through the algebra of fields
    sc = fs.fields.ScoreDifference(gmm.score, gmm.score, mu_data=2.0, mu_rho=1.0, prediction="score")
    assert torch.allclose(sc(x, t), edm_field(x, t), atol=1e-10)
    half = 0.5 * edm_field + 0.5 * edm_field
    assert torch.allclose(half(x, t), edm_field(x, t), atol=1e-12)
    # ∇h of Eq. 19 with μ = (1, 1) and ρ = p vanishes
    eq19 = fs.fields.ScoreDifference(gmm.denoiser, gmm.denoiser)
    assert eq19.grad_h(x, 1.0).abs().max() < 1e-12


def test_score_difference_with_learned_rho_sde(gmm):
    """Eq. 9 (right) with an explicit generated score equal to the truth: every alpha samples the mixture."""
    sd = fs.fields.ScoreDifference(gmm.denoiser, gmm.denoiser, mu_data=2.0, mu_rho=1.0)
    x = fs.sample(sd, "sde", nfe=128, n=1000, seed=6, alpha=0.5, dtype=torch.float64)
    truth = gmm.sample(1000, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert energy_distance(x, truth) < 0.05


# ----------------------------------------------------------------------------------- NFE


@pytest.mark.parametrize("solver", fs.solvers.available())
def test_nfe_is_counted_and_within_budget(solver, gmm):
    calls = [0]

    def den(x, s):
        calls[0] += 1
        return gmm.denoiser(x, s)
    spec = fs.solvers.get(solver)
    if spec.needs_flow_map:  # a flow map's field: ū(x, t, r) from the mixture's velocity at t
        def avg(x, t, r=None):
            calls[0] += 1
            tc = t.reshape(-1, 1)
            return (x - gmm.denoiser(x / (1 - tc + 1e-3), (tc / (1 - tc + 1e-3)).reshape(-1))) / tc
        field = fs.fields.FlowMatching(avg, shape=(2,), flow_map=True)
    elif spec.needs_guidance:  # CFG++: a guided field, its two branches one network pass
        field = fs.fields.EDM(lambda x, s, c: den(x, s) * (1 + 0.1 * c[:, None]), shape=(2,), guidance=1.5,
                              uncond={"c": torch.zeros(1)})
    else:
        field = fs.fields.EDM(den, shape=(2,))
    budget = 2000 if spec.adaptive else 24
    opts = {"rtol": 1e-3, "atol": 1e-3} if spec.adaptive else {}
    cond = {"c": torch.ones(8)} if spec.needs_guidance else None
    if spec.inpaints:  # RePaint: inpainting the second coordinate of given points
        opts = {"init": torch.zeros(8, 2), "mask": torch.tensor([0.0, 1.0])}
    if spec.inverts:  # DDIM inversion's lagged step: from data up to the prior
        x, info = fs.invert(field, gmm.sample(8, generator=torch.Generator().manual_seed(0)), solver, budget,
                            return_info=True)
    else:
        x, info = fs.sample(field, solver, nfe=budget, n=8, seed=0, return_info=True, cond=cond, **opts)
    assert info.nfe == calls[0] and 0 < info.nfe <= budget
    assert torch.isfinite(x).all()
    if not spec.adaptive:
        # the budget is used well: one more step would not fit
        assert spec.evals(info.steps + 1, True) > budget


def test_budget_to_steps_for_heun(edm_field):
    _, info = fs.sample(edm_field, "heun", nfe=32, n=4, seed=0, return_info=True)
    assert (info.steps, info.nfe) == (16, 31)
    _, info = fs.sample(edm_field, "euler", nfe=32, n=4, seed=0, return_info=True)
    assert (info.steps, info.nfe) == (32, 32)


def test_adaptive_stops_at_budget(edm_field):
    with pytest.raises(fs.solvers.NFEBudgetExceeded, match="nfe=20"):
        fs.sample(edm_field, "torchdiffeq:dopri5", nfe=20, n=4, seed=0, rtol=1e-8, atol=1e-8)


# ----------------------------------------------------------------------- seeds and chunks


@pytest.mark.parametrize("solver,opts", [("heun", {}), ("sde", {"alpha": 0.5}), ("edm", {"S_churn": 40.0}),
                                         ("torchsde:euler", {"alpha": 1.0}), ("torchsde:srk", {"alpha": 1.0})])
def test_sample_i_independent_of_n_and_chunks(solver, opts, edm_field):
    full = fs.sample(edm_field, solver, nfe=12, n=70, seed=5, **opts)
    small = fs.sample(edm_field, solver, nfe=12, n=3, seed=5, **opts)
    chunked = fs.sample(edm_field, solver, nfe=12, n=70, seed=5, batch_size=17, **opts)
    assert torch.allclose(full[:3], small, atol=1e-5)
    assert torch.allclose(full, chunked, atol=1e-5)
    other = fs.sample(edm_field, solver, nfe=12, n=3, seed=6, **opts)
    assert not torch.allclose(small, other)


def test_no_global_rng_use(edm_field):
    torch.manual_seed(123)
    before = torch.get_rng_state().clone()
    fs.sample(edm_field, "sde", nfe=8, n=5, seed=1)
    fs.sample(edm_field, "sde", nfe=8, n=5)
    assert torch.equal(before, torch.get_rng_state())


def test_dtype_follows_inputs(edm_field):
    x = fs.sample(edm_field, "heun", nfe=8, n=3, seed=0, dtype=torch.float64)
    assert x.dtype == torch.float64
    z = torch.randn(4, 2, dtype=torch.float64)
    assert fs.sample(edm_field, "euler", nfe=8, x_init=z).dtype == torch.float64


# ------------------------------------------------------------- trajectories, callbacks, ODE facts


def test_trajectory_and_callback(edm_field):
    seen = []
    x, info = fs.sample(edm_field, "euler", nfe=10, n=6, seed=0, return_info=True, trajectory_every=3,
                        callback=lambda i, t, xx: seen.append((i, t, xx.shape)))
    assert [s[0] for s in seen] == list(range(10))
    assert seen[-1][1] == 0.0
    assert info.trajectory.shape == (5, 6, 2)          # start, steps 3, 6, 9, and the last
    assert info.trajectory_times[0] == 80.0 and info.trajectory_times[-1] == 0.0
    assert torch.equal(info.trajectory[-1], x)
    assert info.seconds > 0 and torch.equal(info.grid, edm_field.grid(10))


@pytest.mark.parametrize("solver", ["euler", "heun", "ipndm", "adams", "torchdiffeq:rk4", "torchsde:heun"])
def test_zero_field_leaves_particles(solver):
    field = fs.fields.Function(lambda x, t: torch.zeros_like(x), 0.0, 1.0, shape=(3,),
                               diffusion=lambda t: 0.0)
    z = torch.randn(5, 3)
    kw = {"alpha": 0.0} if solver.startswith("torchsde") else {}
    assert torch.equal(fs.sample(field, solver, nfe=16, x_init=z, seed=0, **kw), z)


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2), ("adams", 2), ("torchdiffeq:rk4", 4)])
def test_linear_field_matches_exponential(solver, order):
    """(adams of order 3 converges at order 2 globally: its first step is Euler.)"""
    A = torch.tensor([[-1.0, 2.0], [-2.0, -1.0]], dtype=torch.float64)
    field = fs.fields.Function(lambda x, t: x @ A.T, 0.0, 1.0, shape=(2,))
    z = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    exact = z @ torch.linalg.matrix_exp(A).T
    errs = [float((fs.sample(field, solver, grid=fs.grids.uniform(n), x_init=z) - exact).norm()) for n in (40, 80)]
    assert errs[0] / errs[1] == pytest.approx(2 ** order, rel=0.25)


def test_dpmpp_2m_heun_weights_equal_the_closed_form():
    """The numeric Lagrange weights of the exponential multistep solver are DPM-Solver++(2M)'s closed
    form: W_i = −φ₁ + φ₂/r, W_{i−1} = −φ₂/r, with φ₁ = expm1(−h), φ₂ = (φ₁ + h)/h, r = h_{i−1}/h;
    and the first step is DDIM's −φ₁."""
    import math

    from flowsolve.solvers.base import lagrange_weights, sigma_lambda
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        s = torch.sort(torch.rand(3, generator=gen, dtype=torch.float64) * 80 + 1e-3, descending=True).values
        lam_prev, lam_i, lam_next = (sigma_lambda(float(v)) for v in s)
        h, h_prev = lam_next - lam_i, lam_i - lam_prev
        r = h_prev / h
        phi1 = math.expm1(-h)
        phi2 = (phi1 + h) / h
        w = lagrange_weights([lam_i, lam_prev], lam_i, lam_next, exp_kernel=True)
        assert w[0] == pytest.approx(-phi1 + phi2 / r, rel=1e-10, abs=1e-12)
        assert w[1] == pytest.approx(-phi2 / r, rel=1e-10, abs=1e-12)
        (w1,) = lagrange_weights([lam_i], lam_i, lam_next, exp_kernel=True)
        assert w1 == pytest.approx(-phi1, rel=1e-12)
