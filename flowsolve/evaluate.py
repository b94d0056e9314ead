"""Quality of a digits model: Fréchet distance on the shipped digits features against the 400
held-out digits, beside the real-vs-real floor (training digits against the same held-out set),
and per-class coverage from the feature network's classifier head."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import torch

from . import data as fsdata
from .metrics import frechet_distance, frechet_distance_features, image_features, kernel_distance_features
from ._checks import check_int
from .errors import ArgumentError, ArgumentTypeError

__all__ = [
    "DigitsReport",
    "evaluate_digits",
    "digits_quality",
    "feature_spread",
    "validation_fd",
    "validation_energy",
    "svc_predict",
    "match_class_mix",
]


@dataclasses.dataclass
class DigitsReport:
    fd: float  # generated vs held-out
    floor: float  # training digits vs held-out, same n
    n: int
    class_share: list[float]  # share of samples per predicted class 0..9
    solver: str | None = None
    nfe: int | None = None
    seconds: float | None = None
    # judges the project did not train on its own features: FD on raw pixels (and its floor), and
    # the class shares by a scikit-learn SVC fitted on the training digits
    pixel_fd: float | None = None
    pixel_floor: float | None = None
    svc_class_share: list[float] | None = None
    # diversity: the trace of the samples' feature covariance over the held-out digits' (1: as varied;
    # below 1: the mode-seeking deficit of reverse-KL students; FD charges it as a covariance term)
    spread: float | None = None
    # kernel distance (KID) on the same features against the held-out digits: unbiased, so unlike FD
    # (whose bias falls with n and is set by the 400-digit reference) it compares models at any n
    kid: float | None = None
    # the class mix: the 400 held-out digits are not balanced (shares 0.078 for 2 to 0.115 for 7; the
    # training digits' 0.094-0.105), so FD against them rewards a generator whose class shares drift
    # toward theirs. `fd_mix` is the FD of the largest subset of the samples (drawn without replacement)
    # whose SVC classes have the held-out digits' shares: within-class quality, blind to the apportioning;
    # `floor_mix` the same for the training digits (true labels); `mix_tv` the total variation between
    # the samples' SVC shares and the held-out digits' (training digits: 0.052)
    fd_mix: float | None = None
    floor_mix: float | None = None
    mix_tv: float | None = None

    @property
    def ratio(self) -> float:
        return self.fd / self.floor

    @property
    def classes_present(self) -> int:
        return sum(s > 0 for s in self.class_share)

    def markdown(self) -> str:
        shares = " ".join(f"{i}:{s:.0%}" for i, s in enumerate(self.class_share))
        how = f"{self.solver}, {self.nfe} NFE, " if self.solver else ""
        kid = self.kid if self.kid is not None else float("nan")
        table = (
            f"| FD (n={self.n}) | real floor | ratio | FD at the held-out class mix | its floor | KID | pixel FD "
            f"| pixel floor | classes | per-class share |\n"
            f"|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
            f"| {self.fd:.2f} | {self.floor:.2f} | {self.ratio:.2f} | {_num(self.fd_mix)} | {_num(self.floor_mix)} "
            f"| {kid:.4g} | "
            f"{self.pixel_fd or float('nan'):.2f} | "
            f"{self.pixel_floor or float('nan'):.2f} | {self.classes_present}/10 | {shares} |\n"
        )
        if self.seconds is not None:
            table += f"({how}{self.seconds:.1f} s sampling)\n"
        return table

    def json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "ratio": self.ratio}, indent=2) + "\n"


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def match_class_mix(labels: torch.Tensor, shares: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Indices of the largest subset of items with these class `labels` (n,) whose class shares are
    `shares` (C,), each class's items drawn without replacement (seeded): m = min_c count_c / share_c
    items, round(share_c m) of class c. A class with share 0 contributes none; a class with a positive
    share but no items leaves nothing to match and is refused."""
    labels, shares = torch.as_tensor(labels).long().flatten(), torch.as_tensor(shares, dtype=torch.float64)
    if shares.dim() != 1 or (shares < 0).any() or not shares.sum() > 0:
        raise ArgumentError(f"shares: expected a 1-D tensor of non-negative class shares, got {shares.tolist()}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(shares)):
        raise ArgumentError(f"labels: expected classes in [0, {len(shares)}), got {labels.min()}..{labels.max()}")
    shares = shares / shares.sum()
    counts = torch.bincount(labels, minlength=len(shares)).double()
    wanted = shares > 0
    if missing := _missing_classes(labels, shares):
        raise ArgumentError(f"labels: no item of class {missing}, which shares asks for")
    m = float((counts[wanted] / shares[wanted]).min())
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in torch.nonzero(wanted).flatten().tolist():
        pool = torch.nonzero(labels == c).flatten()
        k = min(int(round(float(shares[c]) * m)), len(pool))
        picked.append(pool[torch.randperm(len(pool), generator=g)[:k]])
    return torch.cat(picked).sort().values


def _missing_classes(labels: torch.Tensor, shares: torch.Tensor) -> list[int]:
    """The classes with a positive share of which `labels` has no item."""
    counts = torch.bincount(labels.long(), minlength=len(shares))
    return torch.nonzero((shares > 0) & (counts == 0)).flatten().tolist()


def _class_shares(labels: torch.Tensor) -> torch.Tensor:
    """The share of each digit class 0..9 among `labels`."""
    return torch.bincount(torch.as_tensor(labels).long(), minlength=10).double() / len(labels)


def _fd_at_mix(f: torch.Tensor, labels: torch.Tensor, shares: torch.Tensor, ref: torch.Tensor, seed: int):
    """FD of the features f of the largest subset at the class `shares` against ref; None where a class
    the shares ask for was not drawn or the subset is too small (a few samples)."""
    if _missing_classes(labels, shares):
        return None
    matched = match_class_mix(labels, shares, seed)
    return frechet_distance_features(f[matched], ref) if len(matched) > 1 else None


def digits_quality(samples: torch.Tensor, features: torch.nn.Module, seed: int = 0) -> DigitsReport:
    """FD of `samples` (n, 1, 8, 8) in [−1, 1] against the held-out digits, its floor, class shares."""
    if samples.dim() != 4 or tuple(samples.shape[1:]) != (1, 8, 8):
        raise ArgumentError(f"samples: expected digits of shape (n, 1, 8, 8), got {tuple(samples.shape)}")
    samples = samples.detach().float().cpu()  # judged on the CPU in float32, whatever device and dtype drew them
    test, train = fsdata.digits("test"), fsdata.digits("train")
    n = len(samples)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: min(n, len(train))]
    # each image set through the feature network once, for FD, its floor, KID and the spread
    fx, fr, ft = (image_features(v, features) for v in (samples, test.x, train.x[idx]))
    fd, floor = frechet_distance_features(fx, fr), frechet_distance_features(ft, fr)
    spread, kid = _trace_ratio(fx, fr), kernel_distance_features(fx, fr)
    with torch.no_grad():
        pred = features(samples.float().clamp(-1, 1)).argmax(1)
    share = _class_shares(pred)

    def pixels(x: torch.Tensor) -> torch.Tensor:
        return x.detach().float().clamp(-1, 1).reshape(len(x), -1).cpu()

    pixel_fd = frechet_distance_features(pixels(samples), pixels(test.x))
    pixel_floor = frechet_distance_features(pixels(train.x[idx]), pixels(test.x))
    svc = torch.as_tensor(svc_predict(samples))
    svc_share = _class_shares(svc)
    # the class mix (DigitsReport.fd_mix): subsets at the held-out digits' class shares
    assert test.labels is not None and train.labels is not None
    test_share = _class_shares(test.labels)
    fd_mix, floor_mix = (_fd_at_mix(f, y, test_share, fr, seed) for f, y in ((fx, svc), (ft, train.labels[idx])))
    mix_tv = 0.5 * float((svc_share - test_share).abs().sum())
    return DigitsReport(
        fd=fd,
        floor=floor,
        n=n,
        class_share=[round(float(s), 4) for s in share],
        pixel_fd=pixel_fd,
        pixel_floor=pixel_floor,
        svc_class_share=[round(float(s), 4) for s in svc_share],
        spread=spread,
        kid=kid,
        fd_mix=fd_mix,
        floor_mix=floor_mix,
        mix_tv=round(mix_tv, 4),
    )


def feature_spread(x: torch.Tensor, ref: torch.Tensor, features: torch.nn.Module) -> float:
    """tr Cov f(x) / tr Cov f(ref) on the feature network f (its `.features` if it has one): how varied
    the samples x are against the reference images, in the features FD is computed on."""
    return _trace_ratio(image_features(x, features), image_features(ref, features))


def _trace_ratio(fx: torch.Tensor, fr: torch.Tensor) -> float:
    """tr Cov(fx) / tr Cov(fr) of two (n, d) feature sets."""
    return float(torch.cov(fx.T).trace() / torch.cov(fr.T).trace())


_SVC: list = []


def svc_predict(samples: torch.Tensor):
    """Class predictions of a scikit-learn SVC (RBF, C = 10) fitted on the training digits: a judge of
    class identity that the project's feature network did not shape (held-out accuracy ≈ 0.99)."""
    if not _SVC:
        from sklearn.svm import SVC

        train = fsdata.digits("train")
        assert train.labels is not None
        _SVC.append(SVC(C=10.0, gamma="scale").fit(train.x.reshape(len(train.x), -1).numpy(), train.labels.numpy()))
    x = samples.detach().float().clamp(-1, 1).reshape(len(samples), -1).cpu().numpy()
    return _SVC[0].predict(x)


def evaluate_digits(
    model,
    features: str | os.PathLike | torch.nn.Module = "pretrained/digits-features",
    *,
    solver: str = "heun",
    nfe: int = 32,
    n: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> DigitsReport:
    """Sample n digits from `model` (a field, a denoiser, or a generator, which draws with its own
    evaluations, one or a student's chain, and ignores solver/nfe) and report their quality."""
    from .fields import Field
    from .models import GeneratorModel, ParticleModel, from_pretrained
    from .sample import sample

    feats = from_pretrained(features) if isinstance(features, (str, os.PathLike)) else features
    t0 = time.perf_counter()
    if isinstance(model, GeneratorModel):  # a generator (Int-PM): its own evaluations per sample
        x, solver, used = model.sample(n, seed=seed), "generator", model.steps
    else:
        if not isinstance(model, (Field, ParticleModel)):
            raise ArgumentTypeError(
                f"model: expected a Field, a ParticleModel (a denoiser, a Discriminator Flow) or a "
                f"GeneratorModel, got {type(model).__name__}"
            )
        field = model if isinstance(model, Field) else model.field()
        x, info = sample(field, solver=solver, nfe=nfe, n=n, seed=seed, return_info=True, progress=progress)
        used = info.nfe
    seconds = time.perf_counter() - t0
    report = digits_quality(x, feats, seed=seed)
    report.solver, report.nfe, report.seconds = solver, used, round(seconds, 1)
    return report


def validation_fd(
    features: str | os.PathLike | torch.nn.Module = "pretrained/digits-features", *, n: int = 1000, seed: int = 1
):
    """A model-selection score for digits generators (Table 7, "best validation FID"): the FD of n
    samples (latents from `seed`) against the 1397 *training* digits, so the 400 held-out digits of
    `evaluate_digits` stay unseen by the selection. Returns a callable model ↦ FD: a generator, or a
    particle model such as a Discriminator Flow (its field at its own N Euler steps, Alg. 3)."""
    from .models import from_pretrained

    feats = from_pretrained(features) if isinstance(features, (str, os.PathLike)) else features
    train = fsdata.digits("train").x

    def score(model) -> float:
        return frechet_distance(_model_samples(model, n, seed), train, feats)

    return score


def _model_samples(model, n: int, seed: int) -> torch.Tensor:
    """n samples of a model for a selection score: a generator's `sample(n, seed=)`, or a particle
    model's field at its own N Euler steps (as Alg. 3 simulates it during training)."""
    if hasattr(model, "sample"):
        return model.sample(n, seed=seed).float().cpu()
    if not hasattr(model, "field"):
        raise ArgumentError(
            f"model: expected a generator (.sample) or a particle model (.field), got {type(model).__name__}"
        )
    from .sample import sample

    return sample(model.field(), "euler", nfe=int(getattr(model, "N", 32)), n=n, seed=seed).float().cpu()


def validation_energy(data="gmm2d", *, n: int = 3000, seed: int = 7, sample_seed: int = 123):
    """A model-selection score for generators of vector data (the 2-D analogue of Table 7's "best
    validation FID"): the energy distance between n generated samples (latents from `sample_seed`)
    and n validation samples drawn from `data` (a name, a source or a tensor of samples) with
    `seed`. The seeds differ from the evaluation seeds of `examples/paper_gaussians.py` (samples
    seed 0, reference seed 1), so the selection does not see the test sets. Returns a callable
    generator ↦ energy distance (lower is better)."""
    from .metrics import energy_distance

    check_int("n", n, 2)
    source: Any = fsdata.as_source(data)
    shape = fsdata.shape_of(source)
    if len(shape) != 1:
        raise ArgumentError(
            f"data: validation by energy distance is for vectors (d,), got samples of shape {shape}; "
            f"use validation_fd for digits"
        )
    reference = source.sample(n, generator=torch.Generator().manual_seed(seed)).float()

    def score(model) -> float:
        return energy_distance(_model_samples(model, n, sample_seed), reference)

    return score
