import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import flowsolve as fs  # noqa: E402


@pytest.fixture(scope="session")
def gmm():
    return fs.data.GaussianMixture.paper()


@pytest.fixture(scope="session")
def gmm64():
    return fs.data.GaussianMixture.random(64, 10, 0.3, seed=0)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """2 E|X−Y| − E|X−X'| − E|Y−Y'| (independent estimator, diagonal excluded)."""
    x, y = x.double(), y.double()
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (len(x) * (len(x) - 1))
    yy = torch.cdist(y, y).sum() / (len(y) * (len(y) - 1))
    return float(2 * xy - xx - yy)


def reference_solve(field, x0: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    """High-accuracy solution (torchdiffeq dopri5, rtol = atol = 1e-10, float64)."""
    from torchdiffeq import odeint

    def f(t, x):
        if float(t) == 0.0 and not field.finite_at_end:
            return torch.zeros_like(x)
        return field(x, t)
    ts = torch.tensor([t0, t1], dtype=torch.float64)
    return odeint(f, x0.double(), ts, rtol=1e-10, atol=1e-10, method="dopri5")[-1]
