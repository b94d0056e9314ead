"""flowsolve: generative models as particles following a vector field ∇h_ρ
(Franceschi et al., "Unifying GANs and Score-Based Diffusion as Generative Particle Models", NeurIPS 2023).
"""

from . import data, errors, fields, grids, latent, metrics, solvers, viz
from .errors import FlowsolveError
from .fields import Field
from .sample import SampleInfo, invert, sample, sample_sharded
from .calibrate import Calibration, calibrate as _calibrate

grids.calibrate = _calibrate  # type: ignore[attr-defined]  # fs.grids.calibrate: grids sits below sample, so the function lives in calibrate.py

__version__ = "0.1.0"
__all__ = [
    "sample",
    "invert",
    "sample_sharded",
    "SampleInfo",
    "Calibration",
    "Field",
    "FlowsolveError",
    "errors",
    "fields",
    "solvers",
    "grids",
    "data",
    "metrics",
    "models",
    "viz",
    "latent",
    "train",
    "from_pretrained",
    "compare",
    "__version__",
]


def __getattr__(name: str):
    """`models`, `train` and `evaluate` (and so diffusers, ~4 s to import) load on first use."""
    if name in ("models", "train", "evaluate"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'flowsolve' has no attribute {name!r}")


def compare(*args, **kwargs):
    """Solver × NFE comparison table (see `flowsolve.comparison.compare`)."""
    from .comparison import compare as run

    return run(*args, **kwargs)


def from_pretrained(path, *, device=None, torch_dtype=None):
    """Load a model folder (see `flowsolve.models.from_pretrained`)."""
    from .models import from_pretrained as load

    return load(path, device=device, torch_dtype=torch_dtype)
