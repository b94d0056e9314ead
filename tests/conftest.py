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


energy_distance = fs.metrics.energy_distance


def reference_solve(field, x0: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    """High-accuracy solution through the library's own torchdiffeq backend (dopri5, rtol = atol = 1e-10, float64)."""
    return fs.sample(field, "torchdiffeq:dopri5", grid=torch.tensor([t0, t1], dtype=torch.float64),
                     x_init=x0.double(), nfe=1_000_000, rtol=1e-10, atol=1e-10)
