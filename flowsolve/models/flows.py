"""Particle models beyond denoisers: a trained Discriminator Flow (Alg. 3) as a `ParticleModel`."""

from __future__ import annotations

import torch
from torch import nn

from ..fields import DiscriminatorFlow
from .protocol import ParticleModel

__all__ = ["DiscriminatorFlowModel"]


class DiscriminatorFlowModel(ParticleModel, nn.Module):
    """A trained Discriminator Flow: the time-conditioned discriminator f(x, t) and its flow settings
    (η, the loss of Eq. 15–16, Alg. 3's N). `field(t_end=...)` is the PM of Eq. 20 for `fs.sample`
    with any solver and grid; the trainer steps the same field."""

    def __init__(
        self, discriminator: nn.Module, eta: float, loss: str, N: int, data_shape: tuple[int, ...] | None = None
    ) -> None:
        super().__init__()
        self.f, self.eta, self.loss, self.N = discriminator, float(eta), loss, int(N)
        self.data_shape = data_shape
        self.metadata: dict = {}
        self.conditioning: dict = {}  # {"class_labels": {"classes": K}} for a class-conditional flow

    @property
    def steps(self) -> int:  # the name before 0.2
        return self.N

    def field(self, t_end: float = 1.0, compute_dtype: torch.dtype | str | None = None) -> DiscriminatorFlow:
        return self._calibrated(
            DiscriminatorFlow(
                self.f, self.eta, self.loss, self.N, t_end=t_end, shape=self.data_shape, compute_dtype=compute_dtype
            )
        )

    def forward(self, x, t, **cond):
        return self.f(x, t, **cond)
