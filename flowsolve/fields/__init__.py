"""Fields: particles follow dx/dt = field(x, t) (the paper's ∇h_ρ, Eq. 1)."""
from .base import Field, Function, Scale, Sum, as_column, batch_time
from .score import EDM, Langevin, ScoreDifference

__all__ = ["Field", "Function", "Sum", "Scale", "EDM", "ScoreDifference", "Langevin", "batch_time", "as_column"]
