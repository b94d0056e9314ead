"""The model protocol: a loaded model says what it is by its type (DESIGN.md, Definitions 1–2).

- `ParticleModel` (PM, Definition 1): particles follow a field; `model.field(**kw)` is that
  `Field`, for `fs.sample` with any solver. Denoisers (EDM, diffusers) and Discriminator Flows.
- `GeneratorModel` (Int-PM, Definition 2): a generator trained along a field; `model.sample(n,
  seed=)` draws n samples with `steps` network evaluations each (one; a k-step student: k).

Every model carries `data_shape` and the `metadata` its folder's flowsolve.json holds.
"""

from __future__ import annotations

from typing import Any

import torch

from ..distributed import gather_ranges, shard_range, world
from .._checks import check_int, model_dtype
from .._cond import map_leaves
from ..sample import check_cond, cond_rows
from ..errors import ArgumentError

__all__ = ["ParticleModel", "GeneratorModel", "generate_sharded"]


class ParticleModel:
    """A PM: `field(**kw)` returns the model's `flowsolve.fields.Field`."""

    data_shape: tuple[int, ...] | None = None
    calibrated: dict = {}  # "solver:nfe" -> grid, from the folder's calibration.json
    guidable: bool = False  # field(guidance=w, uncond=...) is supported (denoisers, flow models)
    strength_rule: str = "walked"  # how its img2img pipelines count steps (`Field.strength_rule`)

    def field(self, *args: Any, **kw: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _calibrated(self, field):
        """Hand the model's calibrated grids to its field (`fs.sample(..., grid="calibrated")`)."""
        if self.calibrated:
            field.calibrated = dict(self.calibrated)
        field.strength_rule = self.strength_rule
        return field


class GeneratorModel:
    """An Int-PM generator: `sample(n, seed=)` draws n samples, `steps` evaluations each. Subclasses
    provide `latents(n, seed)`, and either are networks (`nn.Module`s whose forward is g(z, **cond),
    with `conditioning` such as {"class_labels": {"classes": K}}) or override `generate(z)`."""

    data_shape: tuple[int, ...] | None = None
    conditioning: dict = {}

    @property
    def steps(self) -> int:
        """Network evaluations per sample: one (Int-PM); a multi-step student's chain overrides it."""
        return 1

    def latents(self, n: int, seed: int | None = None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def default_cond(self, n: int) -> dict:
        """Class-balanced labels i mod K for a class-conditional generator, else {}."""
        spec = self.conditioning.get("class_labels")
        k = spec.get("classes") if isinstance(spec, dict) else None
        return {"class_labels": torch.arange(n) % int(k)} if k else {}

    @torch.no_grad()
    def generate(self, z: torch.Tensor, **cond) -> torch.Tensor:
        """g(z, **cond) in inference mode (batch norm on its running statistics), on the network's
        device; without `cond`, `default_cond`."""
        net: Any = self  # a GeneratorModel network is also an nn.Module
        was = net.training
        net.eval()
        p = next(net.parameters())
        cond = map_leaves(lambda _k, v: v.to(p.device), cond or self.default_cond(len(z)))
        x = net(z.to(p.device, p.dtype), **cond)
        net.train(was)
        return x

    def sample(self, n: int, seed: int | None = None, cond: dict | None = None) -> torch.Tensor:
        """n samples with one network evaluation each (a k-step student: k), latents from `seed`.
        A conditional generator takes `cond` (e.g. {"class_labels": y}, leading size n or 1);
        without it, class-balanced labels i mod classes."""
        check_int("n", n, 1)
        return self.generate(self.latents(n, seed), **cond_rows(check_cond(cond, n), 0, n, n))


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
    rows = check_cond(cond, n) or generator.default_cond(n)
    part = (
        generator.generate(generator.latents(n, seed)[start:end], **cond_rows(rows, start, end - start, n))
        if end > start
        else None
    )
    dtype = model_dtype(generator, torch.float32) or torch.float32  # a process without rows pads in it
    return gather_ranges(part, n, tuple(generator.data_shape or ()), dtype)
