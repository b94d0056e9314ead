"""What every generator trainer shares (Int-PM, Definition 2): the generator step of Eq. 11, 25, 27,
its noisy form (Eq. 22), the σ distribution of Eq. 28, the networks of Tables 4, 6, 7, and saving.

Every generator is trained by the same step: minimise −Σ g_θ(z) · stopgrad(∇h(g_θ(z))), where ∇h is
asked of the field the generated particles would follow as a PM (`Field.grad_h`): ScoreDifference
for Score GANs, the discriminator field for GANs, MMDFlow for the MMD generator.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .. import data as fsdata
from ..errors import ArgumentError
from ..models import ConvDiscriminator, DCGANGenerator, Discriminator, Generator, save_pretrained
from .loop import LoopConfig, is_main_process

__all__ = [
    "PaperLoopConfig",
    "int_pm_loss",
    "unit_rms",
    "noisy_direction",
    "p_sigma",
    "GeneratorPair",
    "generator_network",
    "discriminator_network",
    "data_source",
    "selection",
    "save_generator",
]


@dataclasses.dataclass
class PaperLoopConfig(LoopConfig):
    """The loop settings the paper's Tables 4, 6, 7 share: batch 128, lr 2e-4, no warm-up, no EMA
    (the flow uses the networks it was trained with), no gradient clipping, a checkpoint every 500."""

    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 0
    ema_decay: float = 0.0
    grad_clip: float | None = None
    checkpoint_every: int = 500


def int_pm_loss(x: torch.Tensor, direction: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """−mean_b g_θ(z_b) · stopgrad(v_b) (Eq. 25, 27): its θ-gradient is −E[∇_θ g^T v], so a gradient
    step moves every generated particle along v through the generator's NTK (Eq. 12–13).
    `normalize` rescales each v_b to unit RMS (per-sample gradient normalisation)."""
    v = unit_rms(direction.detach()) if normalize else direction.detach()
    return -(x * v).reshape(len(x), -1).sum(1).mean()


def unit_rms(v: torch.Tensor) -> torch.Tensor:
    """Each sample's direction v_b rescaled to unit RMS (per-sample gradient normalisation)."""
    return v / v.reshape(len(v), -1).square().mean(1).sqrt().clamp(min=1e-12).view(-1, *([1] * (v.dim() - 1)))


def noisy_direction(direction: torch.Tensor, gamma: float, dt: float, noise: torch.Tensor) -> torch.Tensor:
    """The particle direction of the noisy Int-PM (Eq. 22), dg = A(∇h dt + γ dW): ∇h + γ ξ/√dt with
    ξ ~ N(0, I), so that a generator step of size dt moves free particles by ∇h dt + γ √dt ξ, the
    Euler–Maruyama step. For the mean loss of `int_pm_loss` under SGD, dt = lr / batch size."""
    if not dt > 0:
        raise ArgumentError(f"dt: expected a positive step, got {dt!r}")
    return direction + gamma * noise / dt**0.5


def p_sigma(n: int, sigma_min: float, sigma_max: float, rho_grid: float, generator: torch.Generator) -> torch.Tensor:
    """σ = (σ_max^{1/ρ} + u (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, u ~ U[0, 1], ρ = rho_grid (Eq. 28)."""
    u = torch.rand(n, generator=generator)
    r = rho_grid
    return (sigma_max ** (1 / r) + u * (sigma_min ** (1 / r) - sigma_max ** (1 / r))) ** r


def generator_network(
    shape: tuple[int, ...], cfg, activation: str = "relu", init_gain: float | None = None, num_classes: int = 0
) -> nn.Module:
    """The generator of Tables 6–7: an MLP for vectors, DCGAN (batch norm, tanh, normal init 0.02)
    for images (C, H, W); with `num_classes`, a class embedding added to z."""
    if len(shape) == 3:
        return DCGANGenerator(shape, cfg.latent, cfg.conv_width, init_gain=0.02, num_classes=num_classes)
    return Generator(shape, cfg.latent, cfg.width, cfg.depth, activation, init_gain=init_gain, num_classes=num_classes)


def discriminator_network(shape: tuple[int, ...], cfg, time_conditioned: bool, num_classes: int = 0) -> nn.Module:
    """The discriminator of Tables 4, 6: an MLP for vectors, a DCGAN-style conv net (FiLM time
    modulation when time-conditioned) for images; with `num_classes`, a projection discriminator."""
    emb = dict(
        emb_size=getattr(cfg, "emb_size", 128), emb_scale=getattr(cfg, "emb_scale", 16.0), num_classes=num_classes
    )
    if len(shape) == 3:
        act = getattr(cfg, "activation", "leaky_relu")
        return ConvDiscriminator(
            shape, cfg.conv_width, time_conditioned, init_gain=cfg.init_gain, seed=cfg.seed, activation=act, **emb
        )
    if len(shape) != 1:
        raise ArgumentError(f"data: expected vectors (d,) or images (C, H, W), got samples of shape {shape}")
    return Discriminator(
        shape[0], cfg.width, cfg.depth, time_conditioned, init_gain=cfg.init_gain, seed=cfg.seed, **emb
    )


def data_source(data, size=None):
    name = data if isinstance(data, str) else "custom"
    src = fsdata.load(data, size=size) if isinstance(data, str) else fsdata.as_source(data)
    return src, name, fsdata.shape_of(src)


# -- generator models (Int-PM) --------------------------------------------------------------------------
class GeneratorPair(nn.Module):
    """Generator plus its auxiliary network (discriminator or generated-distribution score), and
    an optional discriminator head on the auxiliary network's features (`head`)."""

    g: Any  # a generator network (its class varies: MLP, DCGAN, a teacher-initialised student)
    aux: Any  # a discriminator or a generated-distribution score, or None
    head: Any  # a discriminator head on the auxiliary network's features, or None

    def __init__(self, g: nn.Module, aux: nn.Module | None, head: nn.Module | None = None) -> None:
        super().__init__()
        self.g, self.aux, self.head = g, aux, head


def selection(select, every, pair: bool = True) -> dict:
    """fit's model selection (Table 7: best validation FID) for a generator model: `select(generator)`
    is scored on the EMA generator (lower is better)."""
    if select is None:
        return {}
    return {"select": (lambda m: select(m.g)) if pair else select, "select_every": every}


def save_generator(gen, out, objective: str, name: str, metadata: dict) -> None:
    if not is_main_process():
        return
    save_pretrained(gen, out, type="generator", objective=objective, data=name, **metadata)
