"""Kernel flows: the MMD Wasserstein gradient flow of Table 2 and the Stein / SVGD flow of Eq. 17.

Kernel flows are *interacting*: ∇h_ρ depends on the current particle batch, so sample them in one
chunk (`batch_size` ≥ n, the default).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .._checks import check_int, deprecated
from .base import Field
from ..errors import ArgumentError, ArgumentTypeError

__all__ = ["MMDFlow", "SVGD", "rbf_kernel_grad"]


def rbf_kernel_grad(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float]):
    """k(x_i, y_j) = Σ_s exp(−‖x_i − y_j‖² / (2 s²)) and ∇_{x_i} k (closed form). x (n, d), y (m, d)."""
    diff = x[:, None, :] - y[None, :, :]
    d2 = diff.square().sum(-1)
    k = torch.zeros_like(d2)
    coef = torch.zeros_like(d2)
    for s in bandwidths:
        e = torch.exp(-d2 / (2 * s * s))
        k = k + e
        coef = coef + e / (s * s)
    return k, -(coef[..., None] * diff)  # ∇_x k(x, y) = −(x − y)/s² k


class MMDFlow(Field):
    """The Wasserstein gradient flow of ½ MMD²(ρ, p_data) (Table 2, Finding 2):
    h_ρ(x) = E_data k(x, y) − E_ρ k(x, x'), dx/dt = η ∇h_ρ(x), with a sum of RBF kernels (one per
    bandwidth) so that far particles still feel the data.

    ρ is the particles being moved (the PM), or the fixed samples `rho` (the Int-PM step of the MMD
    generator, where ρ is the whole generated batch and x this process's rows of it).
    nfe: the default number of Euler steps (and field evaluations) of `fs.sample`.
    """

    default_grid = "uniform"
    time_is_sigma = False

    interacting = True  # the field at one particle depends on all of them

    def __init__(
        self,
        data: torch.Tensor,
        bandwidths: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0),
        eta: float = 1.0,
        t_end: float = 1.0,
        nfe: int = 100,
        *,
        rho: torch.Tensor | None = None,
        steps: int | None = None,
    ) -> None:
        if steps is not None:  # the name before 0.2
            deprecated("steps", "nfe", "MMDFlow")
            nfe = steps
        for name, v in (("data", data), ("rho", rho)):
            if v is not None and (not isinstance(v, torch.Tensor) or v.dim() != 2):
                raise ArgumentError(
                    f"{name}: expected a tensor of samples (m, d), got "
                    f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
                )
        self.data, self.rho, self.bandwidths, self.eta = data, rho, tuple(float(b) for b in bandwidths), float(eta)
        self.t_start, self.t_end, self.default_nfe = 0.0, float(t_end), check_int("nfe", nfe, 1)
        self.data_shape = (data.shape[1],)
        self.interacting = rho is None

    def grad_h(self, x: torch.Tensor, t=None) -> torch.Tensor:
        """∇h_ρ(x) = E_data ∇k(x, y) − E_ρ ∇k(x, x') (Table 2); the flow does not depend on t."""
        _, g_data = rbf_kernel_grad(x, self.data.to(x), self.bandwidths)
        _, g_self = rbf_kernel_grad(x, x if self.rho is None else self.rho.to(x), self.bandwidths)
        return g_data.mean(1) - g_self.mean(1)

    def __call__(self, x, t):
        return self.eta * self.grad_h(x, t)


class SVGD(Field):
    """Stein variational gradient descent (Eq. 17, Finding 7): the kernel-smoothed KL flow
    φ(x) = E_{x'∼ρ}[k(x', x) ∇log p(x') + ∇_{x'} k(x', x)], with `score(x)` = ∇log p_data."""

    default_grid = "uniform"
    time_is_sigma = False

    interacting = True  # the field at one particle depends on all of them

    def __init__(
        self,
        score: Callable[[torch.Tensor], torch.Tensor],
        bandwidths: Sequence[float] = (1.0,),
        eta: float = 1.0,
        t_end: float = 1.0,
        nfe: int = 200,
        shape: Sequence[int] | None = None,
        *,
        steps: int | None = None,
    ) -> None:
        if steps is not None:  # the name before 0.2
            deprecated("steps", "nfe", "SVGD")
            nfe = steps
        if not callable(score):
            raise ArgumentTypeError(f"score: expected a callable score(x), got {type(score).__name__}")
        self.score, self.bandwidths, self.eta = score, tuple(float(b) for b in bandwidths), float(eta)
        self.t_start, self.t_end, self.default_nfe = 0.0, float(t_end), check_int("nfe", nfe, 1)
        self.data_shape = tuple(shape) if shape is not None else None

    def grad_h(self, x: torch.Tensor, t=None) -> torch.Tensor:
        """The Stein direction φ(x) (Eq. 17): the kernel-smoothed ∇log(p_data/ρ)."""
        k, gk = rbf_kernel_grad(x, x, self.bandwidths)  # gk[i, j] = ∇_{x_i} k(x_i, x_j)
        return (k @ self.score(x) + gk.sum(0)) / len(x)

    def __call__(self, x, t):
        return self.eta * self.grad_h(x, t)
