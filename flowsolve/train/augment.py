"""Differentiable augmentation for discriminators on small data sets (DiffAugment, Zhao et al. 2020;
ADA, Karras et al. 2020): the same random transformations are applied to real and generated images
before the discriminator sees them, and they are differentiable in x, so the generator's GAN
direction (Eq. 20's ∇(c∘f)) flows back through them. A discriminator that only ever sees shifted,
partly masked digits cannot single out the 1397 training images it would otherwise memorise.

A policy is a comma-separated list of AUGMENTS, applied in that order, e.g. "translation,cutout".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ArgumentError

__all__ = ["AUGMENTS", "check_policy", "diff_augment"]


def _uniform(n: int, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """n draws of U[0, 1) from g, shaped to broadcast over an image batch like `like`."""
    return torch.rand(n, generator=g).to(like).view(n, *([1] * (like.dim() - 1)))


def translation(x: torch.Tensor, g: torch.Generator, ratio: float = 0.125) -> torch.Tensor:
    """Each image shifted by a random whole number of pixels in [−s, s] on both axes, s = ratio·size
    (at least 1), the border pixels repeated into the space it leaves (an 8×8 digit: ±1 pixel)."""
    b, _, h, w = x.shape
    sy, sx = max(1, round(ratio * h)), max(1, round(ratio * w))
    dy = torch.randint(-sy, sy + 1, (b,), generator=g).to(x.device)
    dx = torch.randint(-sx, sx + 1, (b,), generator=g).to(x.device)
    padded = F.pad(x, (sx, sx, sy, sy), mode="replicate")
    rows = (torch.arange(h, device=x.device)[None, :] + sy + dy[:, None])[:, None, :, None]  # (b, 1, h, 1)
    cols = (torch.arange(w, device=x.device)[None, :] + sx + dx[:, None])[:, None, None, :]  # (b, 1, 1, w)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def cutout(x: torch.Tensor, g: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    """Each image with a random ratio·size square (centred anywhere, clipped at the border) set to 0."""
    b, _, h, w = x.shape
    ch, cw = max(1, round(ratio * h)), max(1, round(ratio * w))
    top = torch.randint(0, h + 1 - ch % 2, (b,), generator=g).to(x.device) - ch // 2
    left = torch.randint(0, w + 1 - cw % 2, (b,), generator=g).to(x.device) - cw // 2
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    inside_y = (ys[None, :] >= top[:, None]) & (ys[None, :] < top[:, None] + ch)  # (b, h)
    inside_x = (xs[None, :] >= left[:, None]) & (xs[None, :] < left[:, None] + cw)  # (b, w)
    keep = ~(inside_y[:, :, None] & inside_x[:, None, :])  # (b, h, w)
    return x * keep[:, None].to(x.dtype)


def color(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """DiffAugment's colour transform: brightness + U[−½, ½), saturation × U[0, 2) (about the
    channel mean; nothing for one channel), contrast × U[½, 3/2) (about the image mean)."""
    b = len(x)
    x = x + (_uniform(b, g, x) - 0.5)
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * (2 * _uniform(b, g, x)) + mean_c
    mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return (x - mean) * (_uniform(b, g, x) + 0.5) + mean


AUGMENTS = {"translation": translation, "cutout": cutout, "color": color}


def check_policy(policy: str | None, name: str = "gan_augment") -> tuple[str, ...]:
    """The augmentations of a policy string, refusing unknown names (an empty policy: none)."""
    if policy is None or policy == "":
        return ()
    if not isinstance(policy, str):
        raise ArgumentError(f"{name}: expected a comma-separated list of {', '.join(AUGMENTS)}, got {policy!r}")
    names = tuple(p.strip() for p in policy.split(","))
    unknown = [p for p in names if p not in AUGMENTS]
    if unknown:
        raise ArgumentError(f"{name}: expected augmentations among {', '.join(AUGMENTS)}, got {unknown[0]!r}")
    return names


def diff_augment(x: torch.Tensor, policy: str | None, g: torch.Generator) -> torch.Tensor:
    """x (B, C, H, W) through the policy's random augmentations (drawn from g), differentiably."""
    names = check_policy(policy)
    if names and x.dim() != 4:
        raise ArgumentError(f"gan_augment: augmentations are for image batches (B, C, H, W), got {tuple(x.shape)}")
    for n in names:
        x = AUGMENTS[n](x, g)
    return x
