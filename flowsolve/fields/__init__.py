"""Fields: particles follow dx/dt = field(x, t) (the paper's ∇h_ρ, Eq. 1)."""
from .base import Field, Function, Scale, Sum, as_column, batch_time
from .particles import SVGD, DiscriminatorFlow, MMDFlow, rbf_kernel_grad
from .score import EDM, Langevin, ScoreDifference

__all__ = ["Field", "Function", "Sum", "Scale", "EDM", "ScoreDifference", "Langevin", "DiscriminatorFlow", "MMDFlow",
           "SVGD", "rbf_kernel_grad", "batch_time", "as_column"]
