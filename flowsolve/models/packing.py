"""Packed latents: the token sequences that Flux-family transformers take (Flux, Chroma, Qwen-Image,
...). Their pipelines cut the VAE's latents (b, c, h, w) into k × k patches and lay them out as
(b, (h/k)(w/k), c·k²) in row-major order, each token's channels ordered (c, i, j) (`_pack_latents`),
and undo it before decoding (`_unpack_latents`). The patch size k is the ratio of the transformer's
channels to the VAE's (64 / 16 = 2² for Flux); the grid (h/k, w/k) is read off the inputs that give
the tokens their positions: Flux's `img_ids` (rows (·, row, column)) or Qwen-Image's `img_shapes`.
Flux 2's VAE normalises the patches (b, c·k², h/k, w/k) with its batch norm's running statistics
before they are laid out as tokens; `LatentDecoding` undoes that between the two steps."""

from __future__ import annotations

import math

import torch

from ..errors import ArgumentError

__all__ = [
    "latent_channels",
    "vae_packing",
    "tokens_to_latents",
    "latents_to_tokens",
    "patch_size",
    "packed_grid",
    "packed_shape",
    "generated_shape",
    "token_positions",
    "tokens_to_patches",
    "patches_to_tokens",
    "patchify",
    "unpatchify",
]


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
    `img_ids` plus one, or the first shape of `img_shapes` (frames, rows, columns: the generated image's)
    with one frame."""
    where = token_positions(model_kwargs)
    if where is not None:
        return int(where[0].max()) + 1, int(where[1].max()) + 1
    shape = generated_shape(model_kwargs)
    return (shape[1], shape[2]) if shape is not None and shape[0] == 1 else None


def generated_shape(model_kwargs: dict) -> tuple[int, int, int] | None:
    """(frames, rows, columns) of the generated image from Qwen-Image's `img_shapes` (per sample a list
    of such shapes: the generated image's first, then a reference image's in Qwen-Image Edit)."""
    shapes = model_kwargs.get("img_shapes")
    if not (isinstance(shapes, (list, tuple)) and shapes):
        return None
    one = shapes[0] if isinstance(shapes[0], list) else shapes
    return (int(one[0][0]), int(one[0][1]), int(one[0][2])) if len(one[0]) == 3 else None


def token_positions(model_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row, column) of each generated token from `img_ids` (columns 1 and 2: Flux's (·, row, column),
    Flux 2's (t, row, column, l)), one table for the batch; None without one. Rows whose first column
    is not 0 are a reference image's tokens (Flux Kontext's 1, Flux 2's 10, 20, ...) that follow the
    generated ones and are left out."""
    ids = model_kwargs.get("img_ids")
    if not (isinstance(ids, torch.Tensor) and ids.dim() in (2, 3) and ids.shape[-1] >= 3):
        return None
    rows = ids[0] if ids.dim() == 3 else ids
    rows = rows[rows[:, 0] == 0]
    return rows[:, 1].long(), rows[:, 2].long()


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


def _flat_index(n: int, grid: tuple[int, int], where) -> torch.Tensor | None:
    """The place of each of n tokens in the row-major grid: from their (row, column) positions, None
    for tokens already in row-major order (Qwen-Image's)."""
    if where is None:
        return None
    flat = where[0] * grid[1] + where[1]
    return None if len(flat) != n or torch.equal(flat, torch.arange(n)) else flat


def tokens_to_patches(latents: torch.Tensor, grid: tuple[int, int], where=None) -> torch.Tensor:
    """(b, rows·columns, C) tokens → (b, C, rows, columns): each token at its place in the grid (its
    `where` (row, column), else in row-major order), as `_unpack_latents_with_ids` scatters them."""
    b, n, c = latents.shape
    rows, cols = grid
    if n != rows * cols:
        raise ArgumentError(
            f"latents: expected packed latents (batch, {rows}·{cols} tokens, channels) for the model's "
            f"{rows} × {cols} grid, got shape {tuple(latents.shape)}"
        )
    flat = _flat_index(n, grid, where)
    if flat is not None:
        latents = torch.zeros_like(latents).index_copy(1, flat.to(latents.device), latents)
    return latents.reshape(b, rows, cols, c).permute(0, 3, 1, 2)


def patches_to_tokens(patches: torch.Tensor, where=None) -> torch.Tensor:
    """(b, C, rows, columns) → (b, rows·columns, C) tokens, each read at its `where` (row, column)."""
    b, c, rows, cols = patches.shape
    tokens = patches.permute(0, 2, 3, 1).reshape(b, rows * cols, c)
    flat = _flat_index(rows * cols, (rows, cols), where)
    return tokens if flat is None else tokens.index_select(1, flat.to(tokens.device))


def unpatchify(patches: torch.Tensor, k: int) -> torch.Tensor:
    """(b, c·k², rows, columns) → (b, c, rows·k, columns·k), a patch's channels ordered (c, i, j)."""
    b, ck, rows, cols = patches.shape
    if ck % (k * k):
        raise ArgumentError(f"latents: {ck} channels are not {k}×{k} patches of the VAE's latent channels")
    x = patches.reshape(b, ck // (k * k), k, k, rows, cols).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, ck // (k * k), rows * k, cols * k)


def patchify(latents: torch.Tensor, k: int) -> torch.Tensor:
    """(b, c, h, w) → (b, c·k², h/k, w/k), the inverse of `unpatchify`."""
    b, c, h, w = latents.shape
    if h % k or w % k:
        raise ArgumentError(f"images: their latents' size {h} × {w} is not divisible by the patch size {k}")
    x = latents.reshape(b, c, h // k, k, w // k, k).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * k * k, h // k, w // k)


def _cfg(obj) -> dict:
    return dict(getattr(obj, "config", None) or {})


def latent_channels(vae) -> int | None:
    """The channels of a VAE's latents (`latent_channels`, Wan / Qwen-Image's `z_dim`)."""
    cfg = _cfg(vae)
    return cfg.get("latent_channels") or cfg.get("z_dim")


def vae_packing(model, vae) -> int | None:
    """The patch size k of `model`'s packed latents of `vae`'s (its input channels, else its output's
    where the input appends conditioning, Flux Fill's, are k² times the VAE's), or None: not packed."""
    cfg, c = _cfg(model), latent_channels(vae)
    return patch_size(cfg.get("in_channels"), c) or patch_size(cfg.get("out_channels"), c)


def _patch_statistics(vae, channels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, std) per channel of a VAE's batch norm over its patchified latents (Flux 2's `vae.bn`:
    running mean, √(running var + batch_norm_eps)), shaped for (b, channels, h, w); None without one."""
    bn = getattr(vae, "bn", None)
    if not isinstance(bn, torch.nn.BatchNorm2d) or bn.num_features != channels or bn.running_mean is None:
        return None
    eps = float(_cfg(vae).get("batch_norm_eps", bn.eps))
    var = bn.running_var if bn.running_var is not None else torch.ones_like(bn.running_mean)
    return bn.running_mean.view(1, -1, 1, 1), torch.sqrt(var.view(1, -1, 1, 1) + eps)


def tokens_to_latents(latents: torch.Tensor, k: int, model_kwargs: dict, vae) -> torch.Tensor:
    """Packed (b, tokens, c·k²) latents → the VAE's (b, c, h, w), as the pipelines unpack them: each token
    at its place in the grid, Flux 2's patches un-normalised by its VAE's batch norm, then unpatchified."""
    grid = packed_grid(model_kwargs)
    if grid is None:
        raise ArgumentError(
            "decode: packed latents (batch, tokens, channels) need the token grid, which the model "
            "reads off its position inputs; load it with img_ids= (Flux) or img_shapes= (Qwen-Image)"
        )
    patches = tokens_to_patches(latents, grid, token_positions(model_kwargs))
    stats = _patch_statistics(vae, patches.shape[1])
    if stats is not None:  # Flux 2: the patches were normalised by the VAE's batch norm
        patches = patches * stats[1].to(patches) + stats[0].to(patches)
    return unpatchify(patches, k)


def latents_to_tokens(z: torch.Tensor, k: int, model_kwargs: dict, vae=None) -> torch.Tensor:
    """The VAE's (b, c, h, w) latents → packed (b, tokens, c·k²), the inverse of `tokens_to_latents`
    (without `vae`: no batch norm, as for a mask)."""
    patches = patchify(z, k)
    stats = _patch_statistics(vae, patches.shape[1]) if vae is not None else None
    if stats is not None:  # Flux 2: normalised by the VAE's batch norm
        patches = (patches - stats[0].to(patches)) / stats[1].to(patches)
    return patches_to_tokens(patches, token_positions(model_kwargs))
