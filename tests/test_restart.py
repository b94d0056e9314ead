"""Restart sampling (Xu et al. 2023): against the algorithm written out as AUTOMATIC1111 runs it (its
`restart_sampler`), given the same noise; its NFE accounting; and on flow and EDM fields of the exact
mixture, the distribution it reaches."""
import math

import pytest
import torch

import flowsolve as fs
from flowsolve.noise import SampleNoise


def _karras(n: int, lo: float, hi: float, rho: float = 7.0) -> list[float]:
    """n levels from hi to lo (EDM's Eq. 5 spacing), without a final zero."""
    return [(hi ** (1 / rho) + k / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for k in range(n)]


def _reference(den, x, sigmas: list[float], restarts, noise):
    """The restart loop written out: the step list (every grid step; after reaching the knot nearest
    ρ_min, `times` passes over Karras levels from the knot nearest ρ_max down to it), Heun on each step
    (Euler into σ = 0), and forward noise √(σ_old² − σ_last²) whenever a step starts above the last level."""
    calls = [0]

    def d(v, s):
        calls[0] += 1
        return (v - den(v, torch.full((len(v),), s, dtype=v.dtype))) / s

    near = {}
    for lo, hi, steps, times in restarts:
        i_lo = min(range(len(sigmas)), key=lambda j: abs(sigmas[j] - lo))
        i_hi = min(range(len(sigmas)), key=lambda j: abs(sigmas[j] - hi))
        near[i_lo] = (i_hi, steps, times)
    plan = []
    for i in range(len(sigmas) - 1):
        plan.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in near:
            i_hi, steps, times = near[i + 1]
            if i_hi < i + 1:
                levels = _karras(steps + 1, sigmas[i + 1], sigmas[i_hi])
                plan += list(zip(levels[:-1], levels[1:])) * times
    last = None
    for s, s_next in plan:
        if last is not None and last < s:
            x = x + noise() * math.sqrt(s**2 - last**2)
        k = d(x, s)
        x_next = x + (s_next - s) * k
        if s_next > 0:
            x_next = x + 0.5 * (s_next - s) * (k + d(x_next, s_next))
        x, last = x_next, s_next
    return x, calls[0]


@pytest.mark.parametrize("restarts", [((0.1, 2.0, 9, 1),), ((0.1, 2.0, 4, 3),), ((0.06, 0.3, 3, 2), (0.5, 5.0, 2, 1))])
def test_restart_is_the_restart_loop_given_the_same_noise(gmm64, restarts):
    sig = fs.grids.karras(12, 0.002, 80.0).double()
    z = torch.randn(16, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 80
    src = SampleNoise(5, 0, 16, (64,), torch.float64, "cpu", stream=1)
    ref, calls = _reference(gmm64.denoiser, z.clone(), sig.tolist(), restarts, src)
    field = fs.fields.EDM(gmm64.denoiser)
    got, info = fs.sample(field, "restart", grid=sig, x_init=z, seed=5, restarts=restarts, return_info=True)
    assert (got - ref).abs().max().item() <= 1e-11 * ref.abs().max().item()
    assert info.nfe == calls == 2 * 12 - 1 + sum(2 * s * t for _, _, s, t in restarts)


def test_restart_spends_its_nfe_budget_and_without_restarts_is_heun(gmm64):
    field = fs.fields.EDM(gmm64.denoiser)
    _, info = fs.sample(field, "restart", nfe=59, n=2, seed=0, return_info=True)
    assert info.nfe == 59 and len(info.grid) - 1 == 21           # 2·21 − 1 + 2·9: A1111's 30 steps
    a = fs.sample(field, "restart", nfe=31, n=4, seed=0, restarts=(), dtype=torch.float64)
    assert torch.equal(a, fs.sample(field, "heun", nfe=31, n=4, seed=0, dtype=torch.float64))
    with pytest.raises(ValueError, match="restarts: expected \\(rho_min, rho_max, steps, times\\)"):
        fs.sample(field, "restart", nfe=59, n=2, seed=0, restarts=((2.0, 0.1, 9, 1),))
    with pytest.raises(ValueError, match="nfe"):
        fs.sample(field, "restart", nfe=12, n=2, seed=0)        # below one Heun step and the restart's 18


@pytest.mark.parametrize("kind", ["edm", "flow"])
def test_restart_reaches_the_mixture(gmm, kind):
    """On the exact field of the paper's mixture, EDM's σ-time or the flow-matching path (restart runs
    in the path's VE coordinates), samples match exact ones by energy distance."""
    from test_peer_solvers import _gmm_flow
    field = fs.fields.EDM(gmm.denoiser) if kind == "edm" else _gmm_flow(gmm)
    x = fs.sample(field, "restart", nfe=59, n=2000, seed=0, dtype=torch.float64)
    truth = gmm.sample(2000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    floor = fs.metrics.energy_distance(gmm.sample(2000, generator=torch.Generator().manual_seed(2),
                                                  dtype=torch.float64), truth)
    assert fs.metrics.energy_distance(x, truth) <= floor + 0.01
