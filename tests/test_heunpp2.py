"""ComfyUI's Heun++ (`heunpp2`) against its loop written out, on σ (EDM) and on a flow's t, and its
convergence on the exact mixture."""
import pytest
import torch

import flowsolve as fs
from test_peer_solvers import _gmm_flow


def _heunpp2_loop(slope, x, ts: list[float]):
    """ComfyUI's loop (no churn) on slopes d(x, t) = (x − D)/σ, or a flow's velocity in t."""
    n, calls = len(ts) - 1, [0]

    def d(v, t):
        calls[0] += 1
        return slope(v, t)
    for i in range(n):
        k, dt = d(x, ts[i]), ts[i + 1] - ts[i]
        if i == n - 1:
            x = x + k * dt
        elif i == n - 2:
            k2 = d(x + k * dt, ts[i + 1])
            w2 = ts[i + 1] / (2 * ts[0])
            x = x + (k * (1 - w2) + k2 * w2) * dt
        else:
            x2 = x + k * dt
            k2 = d(x2, ts[i + 1])
            k3 = d(x2 + k2 * (ts[i + 2] - ts[i + 1]), ts[i + 2])
            w2, w3 = ts[i + 1] / (3 * ts[0]), ts[i + 2] / (3 * ts[0])
            x = x + ((1 - w2 - w3) * k + w2 * k2 + w3 * k3) * dt
    return x, calls[0]


@pytest.mark.parametrize("steps", [1, 2, 3, 10])
def test_heunpp2_is_comfyuis_on_edm_sigmas(gmm64, steps):
    sig = fs.grids.karras(steps, 0.002, 80.0).double()
    z = torch.randn(16, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 80
    slope = lambda v, s: (v - gmm64.denoiser(v, torch.full((len(v),), s, dtype=v.dtype))) / s  # noqa: E731
    ref, calls = _heunpp2_loop(slope, z.clone(), sig.tolist())
    got, info = fs.sample(fs.fields.EDM(gmm64.denoiser), "heunpp2", grid=sig, x_init=z, return_info=True)
    assert (got - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
    assert info.nfe == calls == max(1, 3 * steps - 3)


def test_heunpp2_is_comfyuis_on_a_flows_time(gmm):
    field = _gmm_flow(gmm)
    ts = torch.linspace(1, 0, 9, dtype=torch.float64)
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    slope = lambda v, t: field(v, torch.tensor(t, dtype=v.dtype))  # noqa: E731
    ref, _ = _heunpp2_loop(slope, z.clone(), ts.tolist())
    got = fs.sample(field, "heunpp2", grid=ts, x_init=z)
    assert (got - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()


def test_heunpp2_converges_on_the_exact_mixture(gmm):
    """Its endpoint error against a converged solve falls as the NFE grows, at first order: the weights
    sum to one, so each step is consistent, but w₂ and w₃ do not vanish with the step, so the error
    halves as the NFE doubles (Heun's would quarter)."""
    field = fs.fields.EDM(gmm.denoiser)
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    exact = fs.sample(field, "torchdiffeq:dopri5", nfe=20000, x_init=z, rtol=1e-9, atol=1e-9)
    errs = [(fs.sample(field, "heunpp2", nfe=nfe, x_init=z) - exact).norm(dim=1).mean().item() for nfe in (30, 60, 120)]
    assert errs[0] > errs[1] > errs[2]
    assert 1.6 < errs[0] / errs[1] < 2.6 and 1.6 < errs[1] / errs[2] < 2.6
