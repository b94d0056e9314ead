"""Sample-quality metrics: energy distance (low-dimensional data) and Fréchet distance (images,
on any feature network, through torchmetrics)."""
from __future__ import annotations

import torch

__all__ = ["energy_distance", "gaussian_frechet", "frechet_distance_features", "frechet_distance"]


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


def gaussian_frechet(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Fréchet (2-Wasserstein²) distance of two Gaussians:
    ‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}), in float64 through symmetric eigendecompositions."""
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    w, v = torch.linalg.eigh(cov1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * cross)


def frechet_distance_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between the Gaussian fits (mean, unbiased covariance) of two feature sets (n, d)."""
    for name, v in (("a", a), ("b", b)):
        if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.shape[0] < 2:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{name}: expected features of shape (n >= 2, d), got {got}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"b: expected {a.shape[1]} features like a, got {b.shape[1]}")
    a, b = a.double(), b.double()
    return gaussian_frechet(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


class _Unit2Signed(torch.nn.Module):
    """torchmetrics feeds images in [0, 1] (normalize=True); feature nets here expect [−1, 1]."""

    def __init__(self, features: torch.nn.Module) -> None:
        super().__init__()
        self.features = features
        self.num_features = int(getattr(features, "num_features"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = getattr(self.features, "features", self.features)
        return f(x.float() * 2 - 1).double()


def frechet_distance(x: torch.Tensor, y: torch.Tensor, features: torch.nn.Module, batch_size: int = 500) -> float:
    """Fréchet distance of images x, y (n, C, H, W) in [−1, 1] on a pluggable feature network, through
    torchmetrics' FrechetInceptionDistance (its `feature=` module). `features` needs `num_features` and
    either `.features(x)` or a forward returning (n, num_features)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    for name, v in (("x", x), ("y", y)):
        if not isinstance(v, torch.Tensor) or v.dim() != 4 or len(v) < 2:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{name}: expected images of shape (n >= 2, C, H, W), got {got}")
    if not hasattr(features, "num_features"):
        raise ValueError("features: expected a module with a `num_features` attribute")
    fid = FrechetInceptionDistance(feature=_Unit2Signed(features).eval(), normalize=True)
    with torch.no_grad():
        for imgs, real in ((y, True), (x, False)):
            for chunk in imgs.split(batch_size):
                fid.update(((chunk.float().clamp(-1, 1) + 1) / 2), real=real)
        return float(fid.compute())
