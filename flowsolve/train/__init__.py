"""Trainers on one loop (`loop.fit`): EDM/DDPM data scores (Table 5) and the digits feature network."""
from .edm import EDMConfig, ddpm, edm
from .features import FeaturesConfig, digits_features
from .loop import EMA, CheckpointError, LoopConfig, fit

__all__ = ["edm", "ddpm", "digits_features", "EDMConfig", "FeaturesConfig", "LoopConfig", "EMA", "fit",
           "CheckpointError"]
