"""Gaussian mixtures with exact σ-noised density, score and denoiser.

p ⋆ k_σ of an isotropic mixture Σ_k w_k N(μ_k, s_k² I) is the mixture Σ_k w_k N(μ_k, (s_k² + σ²) I),
so ∇log[p ⋆ k_σ] and the optimal denoiser D(x; σ) = E[x_0 | x_0 + σε = x] are closed-form.
These are the exact fields every solver is checked against (DESIGN.md).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from .._checks import check_int, seeded_generator
from ..errors import ArgumentError

__all__ = ["GaussianMixture"]


def _as_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.dim() == 0:
        s = s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ArgumentError(f"sigma: expected a scalar or shape ({x.shape[0]},), got shape {tuple(s.shape)}")
    if (s < 0).any():
        raise ArgumentError("sigma: expected non-negative noise levels")
    return s


class GaussianMixture:
    """Σ_k w_k N(μ_k, std_k² I) in dimension `dim` with exact log_prob, sample, score and denoiser
    of the σ-noised mixture. All methods follow the dtype and device of their input."""

    def __init__(
        self,
        means: torch.Tensor | Sequence[Sequence[float]],
        std: float | Sequence[float] = 0.5,
        weights: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.dim() != 2 or mu.shape[0] < 1:
            raise ArgumentError(f"means: expected shape (modes, dim), got {tuple(mu.shape)}")
        K = mu.shape[0]
        s = torch.as_tensor(std, dtype=torch.float64)
        s = s.expand(K).clone() if s.dim() == 0 else s
        if s.shape != (K,) or not (s > 0).all():
            raise ArgumentError(f"std: expected a positive number or {K} positive numbers, got {s.tolist()}")
        w = (
            torch.full((K,), 1.0 / K, dtype=torch.float64)
            if weights is None
            else torch.as_tensor(weights, dtype=torch.float64)
        )
        if w.shape != (K,) or (w < 0).any() or not w.sum() > 0:
            raise ArgumentError(f"weights: expected {K} non-negative numbers with a positive sum, got {w.tolist()}")
        self.means: torch.Tensor = mu
        self.std: torch.Tensor = s
        self.weights: torch.Tensor = w / w.sum()
        self.dim = mu.shape[1]
        self.data_shape = (self.dim,)
        self._cache: dict = {}

    @classmethod
    def paper(cls) -> "GaussianMixture":
        """Appendix D.1: 5 two-dimensional Gaussians, std 1/2, means evenly spaced on a circle of radius 5."""
        return cls.circle(modes=5, radius=5.0, std=0.5)

    @classmethod
    def circle(cls, modes: int = 5, radius: float = 5.0, std: float = 0.5) -> "GaussianMixture":
        a = 2 * math.pi * torch.arange(modes, dtype=torch.float64) / modes
        return cls(radius * torch.stack([a.cos(), a.sin()], 1), std)

    @classmethod
    def random(cls, dim: int, modes: int, std: float, scale: float = 1.0, seed: int = 0) -> "GaussianMixture":
        """Means drawn from N(0, scale² I) with a fixed seed (the benchmark's 64-D mixture)."""
        g = torch.Generator().manual_seed(seed)
        return cls(scale * torch.randn(modes, dim, generator=g, dtype=torch.float64), std)

    def __repr__(self) -> str:
        return f"GaussianMixture(modes={len(self.weights)}, dim={self.dim}, std={self.std.tolist()})"

    # -- helpers -------------------------------------------------------------------------
    def _params(self, x: torch.Tensor):
        key = (x.dtype, x.device)
        if key not in self._cache:
            self._cache[key] = (self.means.to(x), self.std.to(x) ** 2, self.weights.to(x).log())
        return self._cache[key]

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ArgumentError(f"x: expected a tensor of shape (batch, {self.dim}), got {got}")
        return x

    def _posterior(self, x, sigma):
        """log responsibilities r_k(x) under the σ-noised mixture, and the noised variances."""
        mu, var0, logw = self._params(x)
        var = var0[None, :] + sigma[:, None] ** 2  # (n, K)
        d2 = ((x[:, None, :] - mu[None]) ** 2).sum(-1)  # (n, K)
        logp = logw - 0.5 * d2 / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return logp, var

    # -- exact quantities ----------------------------------------------------------------
    def log_prob(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        """log[p ⋆ k_σ](x), shape (batch,)."""
        x = self._check(x)
        logp, _ = self._posterior(x, _as_sigma(sigma, x))
        return torch.logsumexp(logp, dim=1)

    def score(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        """∇log[p ⋆ k_σ](x) = Σ_k r_k (μ_k − x)/(s_k² + σ²)."""
        x = self._check(x)
        mu = self._params(x)[0]
        logp, var = self._posterior(x, _as_sigma(sigma, x))
        r = torch.softmax(logp, dim=1) / var
        return r @ mu - r.sum(1, keepdim=True) * x

    def denoiser(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """D(x; σ) = E[x_0 | x] = Σ_k r_k (μ_k + s_k²/(s_k² + σ²)(x − μ_k)) (Tweedie: x + σ² score)."""
        x = self._check(x)
        mu, var0, _ = self._params(x)
        logp, var = self._posterior(x, _as_sigma(sigma, x))
        r = torch.softmax(logp, dim=1)
        shrink = r * (var0[None, :] / var)  # Σ_k r_k s_k²/(s_k²+σ²)
        return (r - shrink) @ mu + shrink.sum(1, keepdim=True) * x

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        return_modes: bool = False,
    ):
        """n exact samples (and their mode indices if return_modes)."""
        check_int("n", n, 0)
        if generator is None:
            generator = seeded_generator(None)
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = (self.means[k] + self.std[k, None] * z).to(dtype=dtype, device=device)
        return (x, k.to(device)) if return_modes else x

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Most likely mode of each point (noise-free mixture)."""
        x = self._check(x)
        return self._posterior(x, _as_sigma(0.0, x))[0].argmax(1)
