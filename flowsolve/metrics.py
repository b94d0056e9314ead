"""Sample-quality metrics: energy distance (low-dimensional data), Fréchet distance (images, on any
feature network, through torchmetrics) and the kernel distance (KID: unbiased at any sample size)."""

from __future__ import annotations

from typing import Any

import torch
from .errors import ArgumentError, MissingDependency

__all__ = [
    "energy_distance",
    "gaussian_frechet",
    "frechet_distance_features",
    "frechet_distance",
    "kernel_distance",
    "kernel_distance_features",
    "image_features",
    "mmd",
    "median_bandwidth",
    "inception_features",
    "sliced_wasserstein",
    "mode_coverage",
    "nll",
    "pf_ode_log_likelihood",
]


def _pairs(x: torch.Tensor, y: torch.Tensor, name_x: str = "x", name_y: str = "y", flat: bool = True):
    """Two sample sets as float64 (n, d) matrices: at least 2 rows each and equal d; `flat` accepts
    (n, *shape) and flattens, otherwise (n, d) is required."""
    for name, v in ((name_x, x), (name_y, y)):
        ok = isinstance(v, torch.Tensor) and v.dim() >= 2 and (flat or v.dim() == 2) and v.shape[0] >= 2
        if not ok:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            want = "(n >= 2, ...)" if flat else "(n >= 2, d)"
            raise ArgumentError(f"{name}: expected samples of shape {want}, got {got}")
    x, y = x.double().reshape(len(x), -1), y.double().reshape(len(y), -1)
    if x.shape[1] != y.shape[1]:
        raise ArgumentError(f"{name_y}: expected dimension {x.shape[1]} like {name_x}, got {y.shape[1]}")
    return x, y


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2 E|X − Y| − E|X − X'| − E|Y − Y'| (Székely), with the unbiased estimator
    (self-pairs excluded from the within-set terms). x: (n, d), y: (m, d), n, m >= 2."""
    x, y = _pairs(x, y, flat=False)
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
    a, b = _pairs(a, b, "a", "b", flat=False)
    return gaussian_frechet(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def _check_images(x: torch.Tensor, y: torch.Tensor) -> None:
    """Two image batches (n >= 2, C, H, W), or an error naming the argument."""
    for name, v in (("x", x), ("y", y)):
        if not isinstance(v, torch.Tensor) or v.dim() != 4 or len(v) < 2:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ArgumentError(f"{name}: expected images of shape (n >= 2, C, H, W), got {got}")


class _Unit2Signed(torch.nn.Module):
    """torchmetrics feeds images in [0, 1] (normalize=True); feature nets here expect [−1, 1]."""

    def __init__(self, features: torch.nn.Module) -> None:
        super().__init__()
        self.features = features
        self.num_features = int(getattr(features, "num_features"))  # noqa: B009 - a module attribute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = getattr(self.features, "features", self.features)
        return f(x.float() * 2 - 1).double()


def inception_features(dims: int = 2048) -> int:
    """The standard FID feature extractor (torchmetrics' Inception, `feature=dims`) when torch-fidelity
    and its weights are available locally; a clear error otherwise (nothing is downloaded here)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:
        FrechetInceptionDistance(feature=dims)
    except (ModuleNotFoundError, RuntimeError, OSError, ValueError) as e:
        raise MissingDependency(
            f"features: Inception features are not available offline ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160]}); pass a feature network instead, e.g. "
            f"fs.from_pretrained('pretrained/digits-features')"
        ) from None
    return dims


def frechet_distance(x: torch.Tensor, y: torch.Tensor, features: torch.nn.Module | str, batch_size: int = 500) -> float:
    """Fréchet distance of images x, y (n, C, H, W) in [−1, 1] on a pluggable feature network, through
    torchmetrics' FrechetInceptionDistance (its `feature=` module). `features` needs `num_features` and
    either `.features(x)` or a forward returning (n, num_features)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_images(x, y)
    if features == "inception":  # the standard FID: 3-channel images, resized by torchmetrics
        fid = FrechetInceptionDistance(feature=inception_features(), normalize=True)
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
    elif not hasattr(features, "num_features"):
        raise ArgumentError("features: expected 'inception' or a module with a `num_features` attribute")
    else:
        assert isinstance(features, torch.nn.Module)
        fid = FrechetInceptionDistance(feature=_Unit2Signed(features).eval(), normalize=True)
    with torch.no_grad():
        for imgs, real in ((y, True), (x, False)):
            for chunk in imgs.split(batch_size):
                fid.update(((chunk.float().clamp(-1, 1) + 1) / 2), real=real)
        return float(fid.compute())


def kernel_distance_features(a: torch.Tensor, b: torch.Tensor, degree: int = 3, chunk: int = 2048) -> float:
    """Kernel distance (KID, Bińkowski et al. 2018) between feature sets a (n, d), b (m, d): the unbiased
    squared MMD with the polynomial kernel k(u, v) = (u·v / d + 1)^degree. Unlike FD it has no bias that
    depends on n and m, so models sampled at different n (or against a small reference set) compare
    directly; its sampling noise is the only error. Uses every pair (torchmetrics' KID averages random
    subsets of equal size; with one subset of all n = m samples the two agree)."""
    a, b = _pairs(a, b, "a", "b", flat=False)
    d = a.shape[1]

    def total(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # Σ_ij k(u_i, v_j), row chunks
        return sum(((c @ v.T) / d + 1).pow(degree).sum() for c in u.split(chunk))

    def within(u: torch.Tensor) -> torch.Tensor:  # mean over i ≠ j
        diag = ((u * u).sum(1) / d + 1).pow(degree).sum()
        return (total(u, u) - diag) / (len(u) * (len(u) - 1))

    return float(within(a) + within(b) - 2 * total(a, b) / (len(a) * len(b)))


def kernel_distance(x: torch.Tensor, y: torch.Tensor, features: torch.nn.Module, batch_size: int = 500) -> float:
    """Kernel distance (KID) of images x, y (n, C, H, W) in [−1, 1] on a feature network (its
    `.features(x)` if it has one, as `frechet_distance`); see `kernel_distance_features`."""
    _check_images(x, y)
    if not isinstance(features, torch.nn.Module):
        raise ArgumentError(f"features: expected a feature network (torch.nn.Module), got {type(features).__name__}")
    return kernel_distance_features(image_features(x, features, batch_size), image_features(y, features, batch_size))


def image_features(x: torch.Tensor, features: torch.nn.Module, batch_size: int = 500) -> torch.Tensor:
    """The (n, d) float64 features of images x in [−1, 1] (clamped) on a feature network: its
    `.features(x)` if it has one (the layer FD and KID are computed on), else its output."""
    f = getattr(features, "features", features)
    with torch.no_grad():
        return torch.cat([f(c.float().clamp(-1, 1)).double().reshape(len(c), -1) for c in x.split(batch_size)])


def median_bandwidth(x: torch.Tensor, y: torch.Tensor) -> float:
    """The median rule: the median pairwise distance of the pooled samples."""
    z = torch.cat([x, y])[:2000]
    d = torch.pdist(z)
    return float(d.median())


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD with the RBF kernel exp(−‖a − b‖²/(2 h²)), h by the median rule by default."""
    x, y = _pairs(x, y)
    h = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)
    if not h > 0:
        raise ArgumentError(f"bandwidth: expected a positive bandwidth, got {h}")
    k = lambda a, b: torch.exp(-torch.cdist(a, b).square() / (2 * h * h))  # noqa: E731
    n, m = len(x), len(y)
    kxx = (k(x, x).sum() - n) / (n * (n - 1))
    kyy = (k(y, y).sum() - m) / (m * (m - 1))
    return float(kxx + kyy - 2 * k(x, y).mean())


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance: sqrt of the mean over random directions of W2² between the
    1-D projections (equal sample sizes use sorted matching; otherwise quantiles)."""
    x, y = _pairs(x, y)
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).sort(0).values, (y @ theta).sort(0).values
    if len(px) != len(py):
        q = torch.linspace(0, 1, max(len(px), len(py)), dtype=torch.float64)
        px, py = torch.quantile(px, q, dim=0), torch.quantile(py, q, dim=0)
    return float((px - py).square().mean().sqrt())


def mode_coverage(x: torch.Tensor, mixture, radius_std: float = 3.0) -> dict:
    """For a `GaussianMixture`: the share of samples per mode (nearest in likelihood), the share within
    `radius_std` std of their mode, and per-mode precision (the share of a mode's samples within it)."""
    x = x.reshape(len(x), -1)
    k = mixture.assign(x)
    d = (x.double() - mixture.means[k]).norm(dim=1) / mixture.std[k]
    near = d < radius_std
    modes = len(mixture.means)
    count = torch.bincount(k, minlength=modes).double()
    good = torch.bincount(k[near], minlength=modes).double()
    return {
        "share": (count / len(x)).tolist(),
        "within": float(near.double().mean()),
        "precision": (good / count.clamp(min=1)).tolist(),
        "modes_covered": int((count > 0).sum()),
    }


def nll(x: torch.Tensor, mixture) -> float:
    """Mean negative log-likelihood of samples under an exact density (a `GaussianMixture`)."""
    return float(-mixture.log_prob(x.reshape(len(x), -1).double()).mean())


def pf_ode_log_likelihood(
    model,
    x: torch.Tensor,
    *,
    hutchinson: bool | None = None,
    seed: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
) -> torch.Tensor:
    """log p(x) under the probability-flow ODE of an EDM field or denoiser (Song et al. 2021):
    integrate dx/dσ = v(x, σ) from σ_min up to σ_max with d/dσ ℓ = ∇·v, then
    log p(x) = log N(x_σmax; 0, σ_max² I) + ℓ. The divergence is exact (d autograd passes) for
    d ≤ 8 and a Hutchinson estimate with one fixed Rademacher probe otherwise. Returns (n,) nats."""
    from torchdiffeq import odeint

    from .fields import EDM, Field

    field = model if isinstance(model, Field) else EDM(model)
    if not getattr(field, "time_is_sigma", False):
        raise ArgumentError("model: expected an EDM-type field (time = σ) or a denoiser")
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not torch.isfinite(x).all():
        raise ArgumentError("x: expected finite samples of shape (n, *data_shape)")
    shape = tuple(x.shape[1:])
    d = int(torch.tensor(shape).prod())
    use_h = d > 8 if hutchinson is None else hutchinson
    g = torch.Generator().manual_seed(seed)
    eps = (torch.randint(0, 2, (len(x), d), generator=g) * 2 - 1).to(x.dtype) if use_h else None

    def rhs(sigma, state):
        xs = state[:, :d]
        with torch.enable_grad():
            xg = xs.detach().requires_grad_(True)
            v = field(xg.reshape(len(xg), *shape), sigma).reshape(len(xg), d)
            if use_h:
                (gv,) = torch.autograd.grad((v * eps).sum(), xg)
                div = (gv * eps).sum(1)
            else:
                div = torch.zeros(len(xg), dtype=xg.dtype)
                for i in range(d):
                    (gi,) = torch.autograd.grad(v[:, i].sum(), xg, retain_graph=i < d - 1)
                    div = div + gi[:, i]
        return torch.cat([v.detach(), div.detach()[:, None]], 1)

    state = torch.cat([x.reshape(len(x), d), torch.zeros(len(x), 1, dtype=x.dtype)], 1)
    edm: Any = field  # an EDM-type field (checked above): it has sigma_min and sigma_max
    span = torch.tensor([edm.sigma_min, edm.sigma_max], dtype=x.dtype)
    out = odeint(rhs, state, span, rtol=rtol, atol=atol, method=method)[-1]
    xT, delta = out[:, :d], out[:, d]
    s = edm.sigma_max
    log_prior = -0.5 * (xT.square().sum(1) / s**2) - d * (
        torch.log(torch.tensor(s, dtype=x.dtype)) + 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=x.dtype))
    )
    return log_prior + delta
