import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import flowsolve as fs  # noqa: E402


def tiny_unet64(out_channels: int = 1, seed: int = 0, text_dim: int | None = None):
    """A tiny random diffusers UNet in float64 (1 channel, 8×8), with cross-attention of width
    `text_dim` if given: the model on which peer-equivalence tests run diffusers' loops and flowsolve."""
    from diffusers import UNet2DConditionModel, UNet2DModel
    torch.manual_seed(seed)
    common = dict(sample_size=8, in_channels=1, out_channels=out_channels, block_out_channels=(8, 16),
                  layers_per_block=1, norm_num_groups=4)
    if text_dim is None:
        return UNet2DModel(down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                           **common).eval().double()
    return UNet2DConditionModel(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=text_dim,
                                attention_head_dim=4, **common).eval().double()


def peer_function(relpath: str, name: str, cls: str | None = None):
    """A module-level function (or a static method of class `cls`) of a diffusers pipeline file, compiled
    from its source alone: the pipelines' own helpers as a reference where the pipeline cannot be
    imported here (its text encoders need the transformers library)."""
    import ast

    import diffusers
    path = Path(diffusers.__file__).parent / "pipelines" / relpath
    body = ast.parse(path.read_text()).body
    if cls is not None:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == cls).body
    node = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name)
    node.decorator_list = []
    scope: dict = {"torch": torch}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), scope)  # noqa: S102
    return scope[name]


def tiny_sdxl_unet():
    """A tiny SDXL-like UNet: cross-attention on 16-d text and `added_cond_kwargs` = {"text_embeds" (8-d),
    "time_ids" (6)}, 4 latent channels."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=4, addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4).eval()


def tiny_sd3():
    """A tiny SD3 transformer: 16-d text and 8-d pooled embeddings, 4 latent channels."""
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16).eval()


@pytest.fixture(scope="module")
def unet64():
    return tiny_unet64()


@pytest.fixture(scope="module")
def unet64_var():
    """The tiny UNet with learned variance channels (out = 2 × in, IDDPM-style)."""
    return tiny_unet64(out_channels=2, seed=1)


@pytest.fixture(scope="session")
def gmm():
    return fs.data.GaussianMixture.paper()


@pytest.fixture(scope="session")
def gmm64():
    return fs.data.GaussianMixture.random(64, 10, 0.3, seed=0)


energy_distance = fs.metrics.energy_distance


def reference_solve(field, x0: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    """High-accuracy solution through the library's own torchdiffeq backend (dopri5, rtol = atol = 1e-10, float64)."""
    return fs.sample(field, "torchdiffeq:dopri5", grid=torch.tensor([t0, t1], dtype=torch.float64),
                     x_init=x0.double(), nfe=1_000_000, rtol=1e-10, atol=1e-10)
