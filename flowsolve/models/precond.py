"""Denoisers D(x; σ) and EDM preconditioning (Karras et al. 2022, Table 1; the data score
s_ψ(x, σ) = (D(x; σ) − x)/σ² of the paper, Eq. 8, Table 5).
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import as_column as _col
from .._checks import model_dtype, sigma_column
from ..fields import EDM
from .protocol import ParticleModel
from ..errors import ArgumentError

__all__ = ["Denoiser", "EDMPrecond", "sigma_column"]


class Denoiser(ParticleModel, nn.Module):
    """Base class: `D(x, sigma) -> E[x_0 | x]`, σ a float or a (batch,) tensor, with the noise
    range it was trained on (`sigma_min`, `sigma_max`: EDM fields clamp their default grid to
    it) and its `data_shape`. `metadata` holds what `flowsolve.json` stored with it."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    data_shape: tuple[int, ...] | None = None
    # conditioning keys this denoiser takes, e.g. {"class_labels": {"classes": 10, "null": 10}}: the
    # value of "null" is the unconditional input of classifier-free guidance (label dropout)
    conditioning: dict = {}
    guidable = True

    def __init__(self) -> None:
        super().__init__()
        self.metadata: dict = {}

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def default_uncond(self) -> dict:
        """The unconditional input of each conditioning key (its "null" value), for CFG."""
        return {k: v["null"] for k, v in self.conditioning.items() if isinstance(v, dict) and "null" in v}

    def field(self, **kw):
        """The probability-flow ODE of this denoiser as a `fields.EDM` (keywords go to it: sigma_min,
        guidance=, uncond=, guide=, rescale=, interval=, apg=, ...). With guidance and no `uncond`,
        the null inputs the model was trained with are used."""
        if kw.get("guidance") is not None and kw.get("uncond") is None and kw.get("guide") is None:
            null = self.default_uncond()
            if null:
                kw["uncond"] = null
        return self._calibrated(EDM(self, **kw))

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ArgumentError(
                f"x: expected a tensor of shape (batch, *data_shape), got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        if self.data_shape is not None and tuple(x.shape[1:]) != tuple(self.data_shape):
            raise ArgumentError(f"x: expected samples of shape {tuple(self.data_shape)}, got {tuple(x.shape[1:])}")
        return self.denoise(x, sigma_column(sigma, x), **cond)

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """∇log[p ⋆ k_σ](x) by Tweedie's formula, (D − x)/σ²."""
        s = sigma_column(sigma, x)
        return (self(x, s) - x) / _col(s, x) ** 2


def _net_output(out):
    return getattr(out, "sample", out)


class EDMPrecond(Denoiser):
    """D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, c_noise(σ)) with
    c_skip = σ_d²/(σ² + σ_d²), c_out = σ σ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²),
    c_noise = noise_scale · ln σ (EDM: noise_scale 1/4; 250 for UNet2DModel's positional
    embedding, which then sees DDPM-like timestep magnitudes). F is any network F(x, t)
    (diffusers models return `.sample`)."""

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        noise_scale: float = 0.25,
        data_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if not (sigma_data > 0 and 0 < sigma_min < sigma_max):
            raise ArgumentError(
                f"sigma_data, sigma_min, sigma_max: expected positive values with sigma_min < sigma_max, "
                f"got {sigma_data}, {sigma_min}, {sigma_max}"
            )
        self.net = net
        self.sigma_data, self.sigma_min, self.sigma_max = float(sigma_data), float(sigma_min), float(sigma_max)
        self.noise_scale = float(noise_scale)
        self.data_shape = tuple(data_shape) if data_shape is not None else None

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) at σ (Karras et al. 2022, Table 1)."""
        sd2 = self.sigma_data**2
        norm = (sigma**2 + sd2).rsqrt()
        return sd2 * norm**2, sigma * self.sigma_data * norm, norm, self.noise_scale * sigma.log()

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        net_dtype = model_dtype(self.net, x.dtype) or x.dtype  # the network runs in its own dtype (EDM's `.to(dtype)`)
        f = _net_output(self.net((_col(c_in, x) * x).to(net_dtype), c_noise.to(net_dtype), **cond))
        return _col(c_skip, x) * x + _col(c_out, x) * f.to(x.dtype)

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """λ(σ) = (σ² + σ_d²)/(σ σ_d)², which makes the effective target of F unit-variance."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def extra_repr(self) -> str:
        return (
            f"sigma_data={self.sigma_data}, sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, "
            f"noise_scale={self.noise_scale}"
        )
