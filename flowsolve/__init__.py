"""flowsolve: generative models as particles following a vector field ∇h_ρ
(Franceschi et al., "Unifying GANs and Score-Based Diffusion as Generative Particle Models", NeurIPS 2023).
"""
from . import data, fields, grids, metrics, solvers
from .fields import Field
from .sample import SampleInfo, sample

__version__ = "0.1.0"
__all__ = ["sample", "SampleInfo", "Field", "fields", "solvers", "grids", "data", "metrics", "__version__"]
