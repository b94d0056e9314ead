"""Networks, EDM preconditioning, diffusers adapters and model folders (paper's s_ψ, Table 5)."""
from .gan import LOSSES, ConvDiscriminator, DCGANGenerator, Discriminator, GANLoss, Generator, gradient_penalty
from .diffusers_adapter import PREDICTION_TYPES, DiffusersDenoiser, from_diffusers
from .io import from_pretrained, read_metadata, save_pretrained
from .nets import MLP, UNET_PRESETS, DigitsFeatures, FourierEmbedding, unet
from .precond import Denoiser, EDMPrecond

__all__ = ["Denoiser", "EDMPrecond", "DiffusersDenoiser", "from_diffusers", "PREDICTION_TYPES", "MLP",
           "FourierEmbedding", "unet", "UNET_PRESETS", "DigitsFeatures", "save_pretrained", "from_pretrained",
           "read_metadata", "Discriminator", "ConvDiscriminator", "Generator", "DCGANGenerator", "GANLoss", "LOSSES", "gradient_penalty"]
