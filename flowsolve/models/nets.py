"""Networks: an MLP with Fourier time embedding for low-dimensional data (paper Tables 4–7),
UNet2DModel configurations for small images, and a digits feature network for Fréchet distance.

All are diffusers `ModelMixin`/`ConfigMixin` models, so `save_pretrained` writes
config.json + diffusion_pytorch_model.safetensors and diffusers' own `from_pretrained` reads them.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn
from ..errors import ArgumentError

__all__ = ["FourierEmbedding", "MLP", "unet", "UNET_PRESETS", "DigitsFeatures"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation layer by name (leaky_relu is leaky ReLU 0.2, the DCGAN one)."""
    if name not in _ACTIVATIONS:
        raise ArgumentError(f"activation: expected one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


class FourierEmbedding(nn.Module):
    freqs: torch.Tensor
    """Random Fourier features of a scalar time: [cos 2π f t, sin 2π f t], f ~ N(0, scale²)
    (Tables 4, 5: "Fourier", frequency scale 16, size 128). The frequencies are a buffer drawn
    from `seed`, saved with the weights."""

    def __init__(self, size: int = 128, scale: float = 16.0, seed: int = 0) -> None:
        super().__init__()
        if size % 2:
            raise ArgumentError(f"size: expected an even embedding size, got {size}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(size // 2, generator=g) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = 2 * math.pi * t.reshape(-1, 1).to(self.freqs.dtype) * self.freqs
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class MLP(ModelMixin, ConfigMixin):
    """F(x, t): x (batch, *shape) flattened, concatenated with a Fourier embedding of t, then
    `depth` hidden layers of `width` units (Table 5, Gaussians: width 512, depth 4, leaky ReLU 0.2,
    Fourier embedding of size 128 and scale 16)."""

    @register_to_config
    def __init__(
        self,
        dim: int = 2,
        width: int = 512,
        depth: int = 4,
        emb_size: int = 128,
        emb_scale: float = 16.0,
        activation: str = "leaky_relu",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.embed = FourierEmbedding(emb_size, emb_scale, seed)
        act = make_activation(activation)  # stateless: one instance serves every layer
        layers: list[nn.Module] = []
        d_in = dim + emb_size
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), act]
            d_in = width
        layers.append(nn.Linear(d_in, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(len(x), -1)
        t = torch.as_tensor(t, dtype=flat.dtype, device=flat.device).reshape(-1).expand(len(x))
        out = self.net(torch.cat([flat, self.embed(t).to(flat.dtype)], dim=1))
        return out.reshape(x.shape)


UNET_PRESETS = {
    # 0.7 M parameters; 8×8 digits: 115 ms per batch-128 training step on 2 CPU cores
    "tiny": dict(
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    ),
    "small": dict(
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        norm_num_groups=16,
    ),
}


def unet(data_shape: tuple[int, int, int], preset: str = "tiny", **overrides) -> UNet2DModel:
    """A diffusers UNet2DModel for images of `data_shape` = (C, H, W), from a preset plus overrides."""
    if preset not in UNET_PRESETS:
        raise ArgumentError(f"preset: expected one of {sorted(UNET_PRESETS)}, got {preset!r}")
    if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
        raise ArgumentError(f"data_shape: expected square images (C, H, W), got {tuple(data_shape)}")
    cfg = dict(UNET_PRESETS[preset], sample_size=data_shape[1], in_channels=data_shape[0], out_channels=data_shape[0])
    cfg.update(overrides)
    return UNet2DModel(**cfg)


class DigitsFeatures(ModelMixin, ConfigMixin):
    """A small convolutional classifier of 8×8 digits; `features(x)` (the penultimate layer)
    feeds Fréchet distance, `forward(x)` gives class logits for per-class coverage."""

    @register_to_config
    def __init__(
        self, channels: int = 1, size: int = 8, width: int = 32, features: int = 64, classes: int = 10
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(2 * width * ((size + 1) // 2) ** 2, features),
            nn.SiLU(),
        )
        self.head = nn.Linear(features, classes)

    @property
    def num_features(self) -> int:
        return int(self.config["features"])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
