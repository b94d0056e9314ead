"""The paper's trainers, one module each since 0.2 (discriminator_flow, gan, score_gan, mmd, and their
shared Int-PM step in int_pm); this module keeps the old import path working."""

from ..models import DiscriminatorFlowModel
from .discriminator_flow import DF_IMAGE_DEFAULTS, DFConfig, discriminator_flow
from .gan import GANConfig, gan
from .int_pm import int_pm_loss, noisy_direction, p_sigma
from .mmd import MMDConfig, mmd_generator
from .score_gan import SCORE_GAN_IMAGE_DEFAULTS, ScoreGANConfig, score_gan

__all__ = [
    "int_pm_loss",
    "noisy_direction",
    "p_sigma",
    "DFConfig",
    "DF_IMAGE_DEFAULTS",
    "GANConfig",
    "ScoreGANConfig",
    "SCORE_GAN_IMAGE_DEFAULTS",
    "MMDConfig",
    "DiscriminatorFlowModel",
    "discriminator_flow",
    "gan",
    "score_gan",
    "mmd_generator",
]
