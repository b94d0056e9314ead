"""Load peer libraries for side-by-side runs.

k-diffusion's package __init__ imports training-only dependencies (kornia, clean-fid, wandb...);
its samplers need only torch, scipy, torchdiffeq, torchsde and tqdm. `k_diffusion_sampling()`
imports `k_diffusion.sampling` from the installed wheel without running the package __init__
(install it with `pip install --no-deps k-diffusion`).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def k_diffusion_sampling():
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed: pip install --no-deps k-diffusion")
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("k_diffusion", pkg)
    return importlib.import_module("k_diffusion.sampling")
