"""Trainers on one loop (`loop.fit`): EDM/DDPM data scores (Table 5), the digits feature network, and the\npaper's models: Discriminator Flows (Alg. 3), GANs, Score GANs (Alg. 1), MMD generators."""
from .edm import EDMConfig, ddpm, edm
from .features import FeaturesConfig, digits_features
from .loop import EMA, CheckpointError, LoopConfig, fit
from .paper import (DFConfig, DiscriminatorFlowModel, GANConfig, MMDConfig, ScoreGANConfig, discriminator_flow, gan,
                    int_pm_loss, mmd_generator, noisy_direction, p_sigma, score_gan)

__all__ = ["edm", "ddpm", "digits_features", "discriminator_flow", "gan", "score_gan", "mmd_generator", "int_pm_loss",
           "noisy_direction", "p_sigma", "DFConfig", "GANConfig", "ScoreGANConfig", "MMDConfig",
           "DiscriminatorFlowModel", "EDMConfig", "FeaturesConfig", "LoopConfig", "EMA", "fit", "CheckpointError"]
