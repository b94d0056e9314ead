"""Particle fields beyond diffusion: Discriminator Flows (Eq. 20, Alg. 3) and kernel flows
(the MMD Wasserstein gradient flow of Table 2 and the Stein / SVGD flow of Eq. 17).

Kernel flows are *interacting*: ∇h_ρ depends on the current particle batch, so sample them in one
chunk (`batch_size` ≥ n, the default).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .base import Field

__all__ = ["DiscriminatorFlow", "MMDFlow", "SVGD", "rbf_kernel_grad"]


class DiscriminatorFlow(Field):
    """dx/dt = −η ∇_x (c∘f)(x, t) on t ∈ [0, 1] from π = N(0, I) (Eq. 20; Alg. 3 is Euler on the
    uniform grid with N steps). Any solver and grid apply; `t_end` < 1 stops early (App. C.5)."""

    default_grid = "uniform"
    time_is_sigma = False
    finite_at_end = True

    def __init__(self, discriminator: Callable, eta: float = 20.0, loss: str = "vanilla", steps: int = 56,
                 t_end: float = 1.0, shape: Sequence[int] | None = None,
                 compute_dtype: torch.dtype | str | None = None) -> None:
        from ..models.gan import GANLoss
        if not callable(discriminator):
            raise TypeError(f"discriminator: expected a callable f(x, t), got {type(discriminator).__name__}")
        if not eta > 0:
            raise ValueError(f"eta: expected a positive gradient strength, got {eta!r}")
        if not 0 < t_end <= 1:
            raise ValueError(f"t_end: expected a time in (0, 1], got {t_end!r}")
        self.f, self.eta, self.loss = discriminator, float(eta), GANLoss(loss)
        self.compute_dtype = _low_precision(compute_dtype)
        self.t_start, self.t_end, self.prior_std = 0.0, float(t_end), 1.0
        self.default_nfe = max(1, round(int(steps) * t_end))
        self.train_steps = int(steps)
        config = getattr(discriminator, "config", None)
        dim, known = getattr(config, "dim", None), getattr(config, "data_shape", None)
        self.data_shape = (tuple(shape) if shape is not None else tuple(known) if known is not None
                           else (dim,) if isinstance(dim, int) else None)

    def grad_h(self, x: torch.Tensor, t) -> torch.Tensor:
        """∇h = −∇_x (c∘f)(x, t) (Finding 9)."""
        fast = getattr(self.f, "value_and_input_grad", None)
        if fast is not None and not torch.is_grad_enabled():   # models.Discriminator: hand-written backward
            value, grad_f = fast(x, t, self.compute_dtype)            # ∇(c∘f) = c'(f) ∇f
            with torch.enable_grad():
                v = value.detach().requires_grad_(True)
                (dc,) = torch.autograd.grad(self.loss.c(v).sum(), v)
            return -dc.view(-1, *([1] * (x.dim() - 1))) * grad_f
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(len(x))
            if self.compute_dtype is None:
                out = self.loss.c(self.f(xg, tt)).sum()
            else:                                           # mixed precision for networks without a fast pass
                with torch.autocast(x.device.type, dtype=self.compute_dtype):
                    f = self.f(xg, tt)
                out = self.loss.c(f.to(x.dtype)).sum()
            (g,) = torch.autograd.grad(out, xg)
        return -g.to(x.dtype)

    def __call__(self, x, t):
        return self.eta * self.grad_h(x, t)


def _low_precision(dtype) -> torch.dtype | None:
    """None, or a torch float dtype given as itself or by name ('bfloat16', 'float16')."""
    if dtype is None or isinstance(dtype, torch.dtype):
        ok = dtype is None or dtype.is_floating_point
    else:
        dtype = getattr(torch, str(dtype), None)
        ok = isinstance(dtype, torch.dtype) and dtype.is_floating_point
    if not ok:
        raise ValueError(f"compute_dtype: expected None or a float dtype such as 'bfloat16', got {dtype!r}")
    return dtype


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
    return k, -(coef[..., None] * diff)           # ∇_x k(x, y) = −(x − y)/s² k


class MMDFlow(Field):
    """The Wasserstein gradient flow of ½ MMD²(ρ, p_data) (Table 2, Finding 2):
    h_ρ(x) = E_data k(x, y) − E_ρ k(x, x'), dx/dt = η ∇h_ρ(x), with ρ the current particles
    and a sum of RBF kernels (one per bandwidth) so that far particles still feel the data."""

    default_grid = "uniform"
    time_is_sigma = False

    interacting = True      # the field at one particle depends on all of them

    def __init__(self, data: torch.Tensor, bandwidths: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0),
                 eta: float = 1.0, t_end: float = 1.0, steps: int = 100) -> None:
        if not isinstance(data, torch.Tensor) or data.dim() != 2:
            raise ValueError(f"data: expected a tensor of data samples (m, d), got "
                             f"{tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__}")
        self.data, self.bandwidths, self.eta = data, tuple(float(b) for b in bandwidths), float(eta)
        self.t_start, self.t_end, self.default_nfe = 0.0, float(t_end), int(steps)
        self.data_shape = (data.shape[1],)

    def grad_h(self, x: torch.Tensor) -> torch.Tensor:
        _, g_data = rbf_kernel_grad(x, self.data.to(x), self.bandwidths)
        _, g_self = rbf_kernel_grad(x, x, self.bandwidths)
        return g_data.mean(1) - g_self.mean(1)

    def __call__(self, x, t):
        return self.eta * self.grad_h(x)


class SVGD(Field):
    """Stein variational gradient descent (Eq. 17, Finding 7): the kernel-smoothed KL flow
    φ(x) = E_{x'∼ρ}[k(x', x) ∇log p(x') + ∇_{x'} k(x', x)], with `score(x)` = ∇log p_data."""

    default_grid = "uniform"
    time_is_sigma = False

    interacting = True      # the field at one particle depends on all of them

    def __init__(self, score: Callable[[torch.Tensor], torch.Tensor], bandwidths: Sequence[float] = (1.0,),
                 eta: float = 1.0, t_end: float = 1.0, steps: int = 200, shape: Sequence[int] | None = None) -> None:
        if not callable(score):
            raise TypeError(f"score: expected a callable score(x), got {type(score).__name__}")
        self.score, self.bandwidths, self.eta = score, tuple(float(b) for b in bandwidths), float(eta)
        self.t_start, self.t_end, self.default_nfe = 0.0, float(t_end), int(steps)
        self.data_shape = tuple(shape) if shape is not None else None

    def __call__(self, x, t):
        k, gk = rbf_kernel_grad(x, x, self.bandwidths)      # gk[i, j] = ∇_{x_i} k(x_i, x_j)
        s = self.score(x)
        return self.eta * (k @ s + gk.sum(0)) / len(x)
