"""Packed latents: the token sequences that Flux-family transformers take (Flux, Chroma, Qwen-Image,
...). Their pipelines cut the VAE's latents (b, c, h, w) into k × k patches and lay them out as
(b, (h/k)(w/k), c·k²) in row-major order, each token's channels ordered (c, i, j) (`_pack_latents`),
and undo it before decoding (`_unpack_latents`). The patch size k is the ratio of the transformer's
channels to the VAE's (64 / 16 = 2² for Flux); the grid (h/k, w/k) is read off the inputs that give
the tokens their positions: Flux's `img_ids` (rows (·, row, column)) or Qwen-Image's `img_shapes`."""

from __future__ import annotations

import math

import torch

from ..errors import ArgumentError

__all__ = ["patch_size", "packed_grid", "packed_shape", "pack_latents", "unpack_latents"]


def patch_size(model_channels: int | None, latent_channels: int | None) -> int | None:
    """k where a transformer of `model_channels` (its output's) takes k × k patches of a VAE's
    `latent_channels`; None where the ratio is not a square above 1 (the latents are not packed)."""
    if not isinstance(model_channels, int) or not isinstance(latent_channels, int) or latent_channels < 1:
        return None
    ratio, rest = divmod(model_channels, latent_channels)
    k = math.isqrt(ratio) if rest == 0 and ratio > 1 else 0
    return k if k > 1 and k * k == ratio else None


def packed_grid(model_kwargs: dict) -> tuple[int, int] | None:
    """The (rows, columns) of the token grid from the position inputs: the largest row and column of
    `img_ids` plus one, or the first shape of `img_shapes` (frames, rows, columns) with one frame."""
    ids = model_kwargs.get("img_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() in (2, 3) and ids.shape[-1] >= 3:
        rows = ids.reshape(-1, ids.shape[-1])
        return int(rows[:, 1].max()) + 1, int(rows[:, 2].max()) + 1
    shapes = model_kwargs.get("img_shapes")
    if isinstance(shapes, (list, tuple)) and shapes:
        one = shapes[0] if isinstance(shapes[0], list) else shapes
        if len(one) == 1 and len(one[0]) == 3 and int(one[0][0]) == 1:
            return int(one[0][1]), int(one[0][2])
    return None


def packed_shape(model_config: dict, model_kwargs: dict) -> tuple[int, int] | None:
    """The shape (tokens, channels) of one sample of a transformer of packed latents, where its position
    inputs give the grid: its input channels, or its output's where the input appends conditioning
    (Flux Fill's mask and image); Qwen-Image's `out_channels` counts the VAE's channels, k² fewer."""
    grid = packed_grid(model_kwargs)
    c_in, c_out = model_config.get("in_channels"), model_config.get("out_channels")
    if grid is None or not isinstance(c_in, int):
        return None
    if isinstance(c_out, int) and c_out < c_in and patch_size(c_in, c_out) is None:
        return grid[0] * grid[1], c_out
    return grid[0] * grid[1], c_in


def unpack_latents(latents: torch.Tensor, k: int, grid: tuple[int, int]) -> torch.Tensor:
    """(b, rows·columns, c·k²) tokens → (b, c, rows·k, columns·k) latents (the pipelines' `_unpack_latents`)."""
    b, n, ck = latents.shape
    rows, cols = grid
    if n != rows * cols or ck % (k * k):
        raise ArgumentError(
            f"latents: expected packed latents (batch, {rows}·{cols} tokens, channels·{k * k}) for the model's "
            f"{rows} × {cols} grid of {k} × {k} patches, got shape {tuple(latents.shape)}"
        )
    x = latents.reshape(b, rows, cols, ck // (k * k), k, k)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, ck // (k * k), rows * k, cols * k)


def pack_latents(latents: torch.Tensor, k: int) -> torch.Tensor:
    """(b, c, h, w) latents → (b, (h/k)(w/k), c·k²) tokens (the pipelines' `_pack_latents`)."""
    b, c, h, w = latents.shape
    if h % k or w % k:
        raise ArgumentError(f"images: their latents' size {h} × {w} is not divisible by the patch size {k}")
    x = latents.reshape(b, c, h // k, k, w // k, k).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // k) * (w // k), c * k * k)
