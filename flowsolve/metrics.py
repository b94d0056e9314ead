"""Sample-quality metrics for low-dimensional data."""
from __future__ import annotations

import torch

__all__ = ["energy_distance"]


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2 E|X − Y| − E|X − X'| − E|Y − Y'| (Székely), with the unbiased estimator
    (self-pairs excluded from the within-set terms). x: (n, d), y: (m, d), n, m >= 2."""
    for name, v in (("x", x), ("y", y)):
        if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.shape[0] < 2:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{name}: expected a tensor of shape (n >= 2, d), got {got}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"y: expected dimension {x.shape[1]} like x, got {y.shape[1]}")
    x, y = x.double().reshape(len(x), -1), y.double().reshape(len(y), -1)
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (len(x) * (len(x) - 1))
    yy = torch.cdist(y, y).sum() / (len(y) * (len(y) - 1))
    return float(2 * xy - xx - yy)
