"""Networks, EDM preconditioning, diffusers adapters, model classes and folders (paper's s_ψ, Table 5).

A loaded model says what it is by its type: `ParticleModel` (`.field()`) or `GeneratorModel`
(`.sample(n, seed=)`); `from_pretrained` maps a folder's flowsolve.json to its class (`MODEL_TYPES`).
"""

from .controlnet import ControlledModel
from .diffusers_adapter import (
    PREDICTION_TYPES,
    DiffusersAngle,
    DiffusersDenoiser,
    DiffusersFlow,
    DiffusersTrigFlow,
    from_diffusers,
)
from .dynamic_shift import dynamic_shift_mu
from .flows import DiscriminatorFlowModel
from .gan import LOSSES, ConvDiscriminator, DCGANGenerator, Discriminator, GANLoss, Generator, gradient_penalty
from .io import MODEL_TYPES, from_pretrained, read_metadata, register_model_type, save_pretrained
from .nets import MLP, UNET_PRESETS, DigitsFeatures, FourierEmbedding, unet
from .precond import Denoiser, EDMPrecond
from .protocol import GeneratorModel, ParticleModel, generate_sharded

__all__ = [
    "ParticleModel",
    "GeneratorModel",
    "generate_sharded",
    "Denoiser",
    "EDMPrecond",
    "DiffusersDenoiser",
    "DiffusersFlow",
    "DiffusersTrigFlow",
    "DiffusersAngle",
    "from_diffusers",
    "dynamic_shift_mu",
    "ControlledModel",
    "PREDICTION_TYPES",
    "DiscriminatorFlowModel",
    "MLP",
    "FourierEmbedding",
    "unet",
    "UNET_PRESETS",
    "DigitsFeatures",
    "save_pretrained",
    "from_pretrained",
    "read_metadata",
    "register_model_type",
    "MODEL_TYPES",
    "Discriminator",
    "ConvDiscriminator",
    "Generator",
    "DCGANGenerator",
    "GANLoss",
    "LOSSES",
    "gradient_penalty",
]
