"""The discriminator field (Eq. 20, Alg. 3) and the GAN losses a, b, c of Eq. 15–16 it is trained with.

L_d(f; ρ, p_data) = E_ρ[a∘f] − E_data[b∘f] + R(f) is maximised by the discriminator (Eq. 15); the
generated particles (or a generator, Eq. 16) minimise c∘f, i.e. follow ∇h = −∇(c∘f) (Eq. 20). The
same `DiscriminatorFlow` object is the PM (no generator: `fs.sample`) and, through `grad_h`, the
direction a GAN's generator is pushed along (Int-PM, Finding 5).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .._checks import check_choice, deprecated, model_dtype
from ..errors import ArgumentError, ArgumentTypeError
from .base import Field

__all__ = ["GANLoss", "LOSSES", "gradient_penalty", "DiscriminatorFlow"]


class GANLoss:
    """The (a, b, c) triple of Eq. 15–16 by name.

    - "vanilla": a = log(1 − sigmoid), b = −log sigmoid, c = −log sigmoid (non-saturating; Table 4,
      Gaussians); f is high on data.
    - "saturating": as vanilla with c = log(1 − sigmoid).
    - "ipm": a = b = c = id (WGAN; Table 4, MNIST): f is high on generated samples, particles descend f.
    - "hinge": a = −relu(1 + f), b = relu(1 − f), c = −f (Lim & Ye 2017).
    """

    NAMES = ("vanilla", "saturating", "ipm", "hinge")

    def __init__(self, name: str = "vanilla") -> None:
        check_choice("loss", name, self.NAMES)
        self.name = name

    def a(self, f: torch.Tensor) -> torch.Tensor:
        if self.name in ("vanilla", "saturating"):
            return -F.softplus(f)  # log(1 − sigmoid f)
        if self.name == "ipm":
            return f
        return -F.relu(1 + f)

    def b(self, f: torch.Tensor) -> torch.Tensor:
        if self.name in ("vanilla", "saturating"):
            return F.softplus(-f)  # −log sigmoid f
        if self.name == "ipm":
            return f
        return F.relu(1 - f)

    def c(self, f: torch.Tensor) -> torch.Tensor:
        if self.name == "vanilla":
            return F.softplus(-f)  # −log sigmoid f
        if self.name == "saturating":
            return -F.softplus(f)  # log(1 − sigmoid f)
        if self.name == "ipm":
            return f
        return -f

    def discriminator_objective(self, f_fake: torch.Tensor, f_real: torch.Tensor) -> torch.Tensor:
        """L_d without R (Eq. 15), to be maximised."""
        return self.a(f_fake).mean() - self.b(f_real).mean()


LOSSES = GANLoss.NAMES


def gradient_penalty(
    f,
    fake: torch.Tensor,
    real: torch.Tensor,
    t: torch.Tensor | None,
    center: float,
    generator: torch.Generator | None = None,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """E[(‖∇f(x̂)‖ − center)²] at random interpolates x̂ of fake and real (Gulrajani et al. 2017;
    Table 4: center 0)."""
    if u is None:
        u = torch.rand(len(fake), generator=generator)
    u = u.view(-1, *([1] * (fake.dim() - 1))).to(fake.dtype)
    xh = (u * fake.detach() + (1 - u) * real).requires_grad_(True)
    out = f(xh) if t is None else f(xh, t)
    (grad,) = torch.autograd.grad(out.sum(), xh, create_graph=True)
    return (grad.reshape(len(xh), -1).norm(dim=1) - center).square().mean()


class DiscriminatorFlow(Field):
    """dx/dt = η ∇h(x, t), ∇h = −∇_x (c∘f)(x, t), on t ∈ [0, 1] from π = N(0, I) (Eq. 20; Alg. 3 is
    Euler on the uniform grid with N steps). Any solver and grid apply; `t_end` < 1 stops early
    (App. C.5). With `time_conditioned=False` the discriminator is f(x) (a GAN's), and `grad_h`
    is the direction its generator is trained along (Finding 5).

    N: Alg. 3's number of generation steps (the default NFE, scaled by t_end).
    compute_dtype: e.g. 'bfloat16' to evaluate f in low precision (the particles stay in x's dtype).
    """

    default_grid = "uniform"
    time_is_sigma = False
    finite_at_end = True
    takes_cond = True  # a class-conditional discriminator f(x, t, class_labels=y)

    def __init__(
        self,
        discriminator: Callable,
        eta: float = 20.0,
        loss: str = "vanilla",
        N: int = 56,
        t_end: float = 1.0,
        shape: Sequence[int] | None = None,
        compute_dtype: torch.dtype | str | None = None,
        *,
        time_conditioned: bool = True,
        steps: int | None = None,
    ) -> None:
        if steps is not None:  # the name before 0.2
            deprecated("steps", "N", "DiscriminatorFlow")
            N = steps
        if not callable(discriminator):
            raise ArgumentTypeError(f"discriminator: expected a callable f(x, t), got {type(discriminator).__name__}")
        if not eta > 0:
            raise ArgumentError(f"eta: expected a positive gradient strength, got {eta!r}")
        if not 0 < t_end <= 1:
            raise ArgumentError(f"t_end: expected a time in (0, 1], got {t_end!r}")
        self.f, self.eta, self.loss = discriminator, float(eta), GANLoss(loss)
        self.time_conditioned = bool(time_conditioned)
        self.compute_dtype = _low_precision(compute_dtype)
        self.t_start, self.t_end, self.prior_std = 0.0, float(t_end), 1.0
        self.N = int(N)
        self.default_nfe = max(1, round(self.N * t_end))
        known = getattr(discriminator, "data_shape", None)
        self.data_shape = tuple(shape) if shape is not None else tuple(known) if known is not None else None

    def _f(self, x: torch.Tensor, t) -> torch.Tensor:
        self.network_passes += 1
        nd = model_dtype(self.f, x.dtype) or x.dtype  # the network runs in its own dtype; grads come back in x's
        if not self.time_conditioned:
            return self.f(x.to(nd), **self.cond)
        tt = torch.as_tensor(t, dtype=nd, device=x.device).reshape(-1).expand(len(x))
        return self.f(x.to(nd), tt, **self.cond)

    def grad_h(self, x: torch.Tensor, t) -> torch.Tensor:
        """∇h = −∇_x (c∘f)(x, t) (Eq. 20, Finding 9); a conditional f gets the bound `cond`."""
        fast = getattr(self.f, "value_and_input_grad", None)
        if fast is not None and self.time_conditioned and not torch.is_grad_enabled():
            self.network_passes += 1
            nd = model_dtype(self.f, x.dtype) or x.dtype
            value, grad_f = fast(x.to(nd), t, self.compute_dtype, **self.cond)  # hand-written backward: c'(f) ∇f
            value, grad_f = value.to(x.dtype), grad_f.to(x.dtype)
            with torch.enable_grad():
                v = value.detach().requires_grad_(True)
                (dc,) = torch.autograd.grad(self.loss.c(v).sum(), v)
            return -dc.view(-1, *([1] * (x.dim() - 1))) * grad_f
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            if self.compute_dtype is None:
                out = self.loss.c(self._f(xg, t)).sum()
            else:  # mixed precision for networks without a fast pass
                with torch.autocast(x.device.type, dtype=self.compute_dtype):
                    f = self._f(xg, t)
                out = self.loss.c(f.to(x.dtype)).sum()
            (g,) = torch.autograd.grad(out, xg)
        return -g.to(x.dtype)

    def __call__(self, x, t):
        return self.eta * self.grad_h(x, t)

    def domain(self) -> tuple[float, float]:
        """t ∈ [0, 1] (Alg. 3), whatever `t_end` the sampler stops at."""
        return 0.0, 1.0

    @property
    def train_steps(self) -> int:  # the name before 0.2
        return self.N


def _low_precision(dtype) -> torch.dtype | None:
    """None, or a torch float dtype given as itself or by name ('bfloat16', 'float16')."""
    if dtype is None or isinstance(dtype, torch.dtype):
        ok = dtype is None or dtype.is_floating_point
    else:
        dtype = getattr(torch, str(dtype), None)
        ok = isinstance(dtype, torch.dtype) and dtype.is_floating_point
    if not ok:
        raise ArgumentError(f"compute_dtype: expected None or a float dtype such as 'bfloat16', got {dtype!r}")
    return dtype
