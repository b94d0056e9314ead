"""Trainers on one loop (`loop.fit`), one module per objective: EDM/DDPM data scores (Table 5), the
digits feature network, flow matching, and the paper's models: Discriminator Flows (Alg. 3), GANs, Score GANs (Alg. 1),
MMD generators, each generator trainer asking its field for the direction (Int-PM, `int_pm`)."""

from ..errors import CheckpointError
from ..models import DiscriminatorFlowModel
from .augment import diff_augment
from .discriminator_flow import DFConfig, discriminator_flow
from .edm import EDMConfig, ddpm, edm
from .features import FeaturesConfig, digits_features
from .flow_matching import FlowMatchingConfig, flow_matching
from .gan import GANConfig, gan
from .int_pm import int_pm_loss, noisy_direction, p_sigma
from .loop import EMA, LoopConfig, fit
from .mmd import MMDConfig, mmd_generator
from .score_gan import ScoreGANConfig, score_gan

__all__ = [
    "edm",
    "ddpm",
    "flow_matching",
    "FlowMatchingConfig",
    "digits_features",
    "discriminator_flow",
    "gan",
    "score_gan",
    "mmd_generator",
    "int_pm_loss",
    "diff_augment",
    "noisy_direction",
    "p_sigma",
    "DFConfig",
    "GANConfig",
    "ScoreGANConfig",
    "MMDConfig",
    "DiscriminatorFlowModel",
    "EDMConfig",
    "FeaturesConfig",
    "LoopConfig",
    "EMA",
    "fit",
    "CheckpointError",
]
