"""The model protocol: a loaded model says what it is by its type (DESIGN.md, Definitions 1–2).

- `ParticleModel` (PM, Definition 1): particles follow a field; `model.field(**kw)` is that
  `Field`, for `fs.sample` with any solver. Denoisers (EDM, diffusers) and Discriminator Flows.
- `GeneratorModel` (Int-PM, Definition 2): a generator trained along a field; `model.sample(n,
  seed=)` draws n samples with one network evaluation each.

Every model carries `data_shape` and the `metadata` its folder's flowsolve.json holds.
"""

from __future__ import annotations

import torch

from ..distributed import gather_ranges, shard_range, world
from .._checks import check_int
from ..errors import ArgumentError

__all__ = ["ParticleModel", "GeneratorModel", "generate_sharded"]


class ParticleModel:
    """A PM: `field(**kw)` returns the model's `flowsolve.fields.Field`."""

    data_shape: tuple[int, ...] | None = None
    calibrated: dict = {}  # "solver:nfe" -> grid, from the folder's calibration.json
    guidable: bool = False  # field(guidance=w, uncond=...) is supported (denoisers, flow models)

    def field(self, **kw):  # pragma: no cover - abstract
        raise NotImplementedError

    def _calibrated(self, field):
        """Hand the model's calibrated grids to its field (`fs.sample(..., grid="calibrated")`)."""
        if self.calibrated:
            field.calibrated = dict(self.calibrated)
        return field


class GeneratorModel:
    """An Int-PM generator: `sample(n, seed=)` draws n samples, one evaluation each. Subclasses
    provide `latents(n, seed)` and `generate(z)`."""

    data_shape: tuple[int, ...] | None = None

    def latents(self, n: int, seed: int | None = None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def generate(self, z: torch.Tensor, **cond) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, n: int, seed: int | None = None, cond: dict | None = None) -> torch.Tensor:
        """n samples with one network evaluation each (a k-step student: k), latents from `seed`.
        A conditional generator takes `cond` (e.g. {"class_labels": y}, leading size n or 1);
        without it, class-balanced labels i mod classes."""
        check_int("n", n, 1)
        return self.generate(self.latents(n, seed), **_rows(cond, n))


def _rows(cond: dict | None, n: int) -> dict:
    """`cond` with every value a tensor of leading size n (size-1 and scalars broadcast)."""
    out = {}
    for k, v in (cond or {}).items():
        t = torch.as_tensor(v)
        t = t.reshape(1) if t.dim() == 0 else t
        if len(t) not in (1, n):
            raise ArgumentError(f"cond: key {k!r} has leading size {len(t)}; expected {n} (one per sample) or 1")
        out[k] = t.expand(n, *t.shape[1:]) if len(t) == 1 else t
    return out


@torch.no_grad()
def generate_sharded(generator: GeneratorModel, n: int, *, seed: int, cond: dict | None = None) -> torch.Tensor:
    """`generator.sample(n, seed, cond)` split over the launched processes: the latents (and the
    default class-balanced labels) are drawn once for all n (so the result equals one process's),
    each process evaluates its rows, all gather."""
    if seed is None:
        raise ArgumentError("seed: sharded sampling needs an explicit seed shared by every process")
    rank, size = world()
    if size == 1:
        return generator.sample(n, seed=seed, cond=cond)
    start, end = shard_range(n, rank, size)
    rows = _rows(cond, n) or getattr(generator, "default_cond", lambda _n: {})(n)
    part = (
        generator.generate(generator.latents(n, seed)[start:end], **{k: v[start:end] for k, v in rows.items()})
        if end > start
        else None
    )
    return gather_ranges(part, n, tuple(generator.data_shape))
