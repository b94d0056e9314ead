"""Fields: particles follow dx/dt = field(x, t) (the paper's ∇h_ρ, Eq. 1). Every field exposes its
direction through one method, `grad_h(x, t)`; the PM integrates the field, an Int-PM pushes the same
`grad_h` through a generator (Eq. 11–13)."""

from .._checks import as_column, batch_time
from .base import Field, Function, Scale, Sum
from .discriminator import LOSSES, DiscriminatorFlow, GANLoss, gradient_penalty
from .flow import FlowMatching, TrigFlow
from .guiders import load_guider
from .paths import FLOW, TRIG, VE, GaussianPath
from .kernels import SVGD, MMDFlow, rbf_kernel_grad
from .score import EDM, Langevin, ScoreDifference

__all__ = [
    "Field",
    "Function",
    "Sum",
    "Scale",
    "EDM",
    "ScoreDifference",
    "Langevin",
    "DiscriminatorFlow",
    "MMDFlow",
    "SVGD",
    "FlowMatching",
    "TrigFlow",
    "GaussianPath",
    "VE",
    "FLOW",
    "TRIG",
    "GANLoss",
    "LOSSES",
    "gradient_penalty",
    "rbf_kernel_grad",
    "batch_time",
    "as_column",
    "load_guider",
]
