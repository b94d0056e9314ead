"""Inpainting and per-element strengths: how the kept part of `init` enters a walk.

Three ways the peers keep it, all with the sample's own noise ε (`fs.sample(..., init=, mask=,
inpaint=)`; the mask is 1 where to generate):

- "diffusers" (the inpaint pipeline for a UNet without mask channels): after every step the state's
  kept part is init noised to the new level, and init itself after the last step (`state_blend`);
- "comfyui" (KSamplerX0Inpaint): before every evaluation the input's kept part is init noised to the
  evaluation's level, and the data prediction's kept part is init (`BlendedModel`);
- "a1111" (AUTOMATIC1111's CFGDenoiser with a model without mask channels): the data prediction's kept
  part is init, and the state's after the last step.

Differential diffusion (a tensor of strengths) holds each element at init noised to the step's level
until its share of the last steps begins (`differential_blend`, the community pipelines' rule); with
"comfyui", the strengths are thresholded by the model's timestep at each evaluation
(`comfyui_thresholds`, ComfyUI's DifferentialDiffusion node).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch

from .errors import ArgumentError, ArgumentTypeError
from .fields.base import Field, field_model

__all__ = [
    "INPAINT_MODES",
    "noised_data",
    "walk_start",
    "check_mask",
    "state_blend",
    "differential_blend",
    "blended_field",
]

INPAINT_MODES = ("diffusers", "comfyui", "a1111")


def noised_data(field: Field, x0: torch.Tensor, t: float, eps: torch.Tensor) -> torch.Tensor:
    """x_t = α_t x0 + σ_t ε on the field's Gaussian path (`field.path`: x0 + σ ε on σ-time fields,
    (1 − t) x0 + t ε on a flow's): the forward process that img2img starts from. Where the field's
    diffusers scheduler noises data otherwise at its knot (`add_noise_coefficients`: SA-Solver's ᾱ
    at the knot's integer timestep), as that scheduler does."""
    path = field.path
    if path is None:
        raise ArgumentError(f"field: a {type(field).__name__} has no Gaussian path to noise data on")
    model = field_model(field, lambda m: callable(getattr(m, "add_noise_coefficients", None)))
    at = model.add_noise_coefficients(float(t)) if model is not None else None
    if at is not None:
        return at[0] * x0 + at[1] * eps
    return path.alpha(t) * x0 + path.sigma(t) * eps


def walk_start(
    field: Field,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t0: float,
    mode: str,
    masked: bool,
    strength: Any,
    start: tuple[float, float] | None = None,
) -> torch.Tensor:
    """The state img2img and inpainting start from at the walk's first time t0, with the sample's ε:
    x0 noised there (img2img), except for inpainting from the top, where diffusers' inpaint pipeline
    starts from the prior's draw (strength 1) and ComfyUI's noise_scaling from x0 + √(1 + σ_0²) ε on
    σ-time models (its `max_denoise`, the walk at or above the top of the field's domain). `start`:
    (a, b), the state a x0 + b ε where a scheduler's img2img pipeline starts elsewhere
    (`img2img_start_coefficients`)."""
    if masked and mode == "diffusers" and not isinstance(strength, torch.Tensor) and strength == 1.0:
        return field.from_normal(eps, t0)
    if masked and mode == "comfyui" and field.time_is_sigma:
        top, end = float(field.t_start), float(field.t_end)
        if abs(t0 - top) <= 1e-5 * abs(top) or (t0 - top) * (top - end) > 0:
            return x0 + math.sqrt(1.0 + t0 * t0) * eps
    if start is not None:
        return start[0] * x0 + start[1] * eps
    return noised_data(field, x0, t0, eps)


def check_mask(values: Any, init: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """A tensor of values in [0, 1] broadcast to init's shape, or a refusal naming the argument."""
    if not isinstance(values, torch.Tensor):
        raise ArgumentTypeError(f"{name}: expected a tensor (1 where to generate, 0 where to keep), got {values!r:.60}")
    try:
        full = torch.broadcast_to(values, init.shape)
    except RuntimeError:
        raise ArgumentError(
            f"{name}: expected a tensor that broadcasts to init's shape {tuple(init.shape)}, got {tuple(values.shape)}"
        ) from None
    if not torch.isfinite(full).all() or float(full.min()) < 0 or float(full.max()) > 1:
        what = "1 where to generate, 0 where to keep init" if name == "mask" else "per element"
        raise ArgumentError(f"{name}: expected values in [0, 1] ({what})")
    return full


def strength_map_top(strengths: torch.Tensor) -> float:
    """The walk's strength for per-element strengths (checked by `check_mask`): their largest."""
    top = float(strengths.max())
    if not top > 0:
        raise ArgumentError("strength: expected per-element strengths in [0, 1], some above 0; got all 0")
    return top


def state_blend(
    field: Field, g64: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor, last_only: bool = False
) -> Callable[..., torch.Tensor]:
    """After step i: the kept part (mask 0) set to x0 noised to times[i + 1] with the same noise, and to
    x0 itself at the end (`final`; diffusers' inpaint pipeline for a UNet without mask channels, whose
    closing step from σ_min to itself, where a solver takes it, still sees x0 noised to σ_min);
    `last_only`: after the last step only (AUTOMATIC1111's blend of the samples). With `at`, a stage
    of step i whose state the pipeline passes on at time `at` (`Run.stage`): x0 noised there."""
    times, last, keep = g64.tolist(), len(g64) - 2, 1 - mask

    def blend(i: int, x: torch.Tensor, at: float | None = None, final: bool = False) -> torch.Tensor:
        if last_only:
            return x if i < last or at is not None else mask * x + keep * x0
        if final:
            return mask * x + keep * x0
        return mask * x + keep * noised_data(field, x0, times[i + 1] if at is None else at, eps)

    return blend


def differential_blend(
    field: Field,
    g64: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    strengths: torch.Tensor,
    total: int,
    skipped: int,
) -> Callable[..., torch.Tensor]:
    """Differential diffusion: before walk step j ≥ 1 (after step j − 1), an element of strength s is
    x0 noised to times[j] with the sample's noise while 1 − s > (skipped + j)/total, so it is free
    for the last s·total steps of the schedule; nothing is blended after the last step (the
    differential img2img pipelines' loop). With `at`, a stage of step i passed on at time `at`
    (`Run.stage`), held as after step i but noised to `at`."""
    times, last, hold = g64.tolist(), len(g64) - 2, 1 - strengths

    def blend(i: int, x: torch.Tensor, at: float | None = None, final: bool = False) -> torch.Tensor:
        if i >= last or final:
            return x
        kept = (hold > (skipped + i + 1) / total).to(x.dtype)
        return kept * noised_data(field, x0, times[i + 1] if at is None else at, eps) + (1 - kept) * x

    return blend


def timestep_of(field: Field) -> Callable[[float], float]:
    """The model's timestep at a level of the field, as ComfyUI's `model_sampling.timestep` reads it:
    the diffusers model's own (its scheduler's timestep), else ¼ log σ on σ-time fields (EDM's c_noise)
    and the time itself on flows."""
    model = field_model(
        field, lambda m: callable(getattr(m, "scheduler_timestep", None) or getattr(m, "timestep", None))
    )
    own = None if model is None else getattr(model, "scheduler_timestep", None) or getattr(model, "timestep", None)
    if own is not None:
        return lambda t: float(own(torch.tensor([float(t)], dtype=torch.float64))[0])
    if field.time_is_sigma:
        return lambda t: 0.25 * math.log(t)
    return float


def comfyui_thresholds(field: Field, g64: torch.Tensor) -> Callable[[float], float]:
    """ComfyUI's DifferentialDiffusion node: at level t, the mask's elements at or above
    (ts(t) − ts(t_to)) / (ts(t_from) − ts(t_to)) are generated, t_from the walk's first level and t_to
    its last, or the model's lowest level where the walk ends below it (at the data)."""
    ts = timestep_of(field)
    t_to = float(g64[-1])
    lowest = getattr(field, "sigma_min", None) if field.time_is_sigma else getattr(field, "t_min", None)
    if lowest is not None and t_to < float(lowest):
        t_to = float(lowest)
    if t_to <= 0:  # a flow's data end: its table's first time (ComfyUI's sigma_min, 1/1000 shifted)
        shift = getattr(field, "time_shift", None)
        t_to = shift(1e-3) if callable(shift) else 1e-3
    ts_from, ts_to = ts(float(g64[0])), ts(t_to)
    return lambda t: (ts(t) - ts_to) / (ts_from - ts_to)


class BlendedModel:
    """A field's model whose data prediction keeps init where the mask is 0 (D' = m D + (1 − m) x0),
    with the input's kept part set to x0 noised to the evaluation's level first (`blend_input`,
    ComfyUI's KSamplerX0Inpaint); for a velocity model, the velocity of D' at the solver's x. With
    `threshold` (ComfyUI's DifferentialDiffusion), the mask at level t is (mask ≥ threshold(t))."""

    def __init__(
        self,
        model: Callable,
        field: Field,
        x0: torch.Tensor,
        eps: torch.Tensor,
        mask: torch.Tensor,
        blend_input: bool,
        velocity: bool,
        threshold: Callable[[float], float] | None = None,
    ) -> None:
        if field.path is None:
            raise ArgumentError(f"inpaint: a {type(field).__name__} has no Gaussian path to noise init on")
        self.denoiser, self.path = model, field.path  # `.denoiser`: the model under it (`field_model`)
        self.x0, self.eps, self.mask, self.keep = x0, eps, mask, 1 - mask
        self.blend_input, self.velocity, self.threshold = blend_input, velocity, threshold

    @property
    def last_passes(self) -> int:
        return getattr(self.denoiser, "last_passes", 1)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        path, tf = self.path, float(t.reshape(-1)[0])
        a, s = path.alpha(tf), path.sigma(tf)
        mask, keep = self.mask, self.keep
        if self.threshold is not None:
            mask = (self.mask >= self.threshold(tf)).to(x.dtype)
            keep = 1 - mask
        x_in = mask * x + keep * (a * self.x0 + s * self.eps) if self.blend_input else x
        out = self.denoiser(x_in, t, **cond)
        if not self.velocity:  # a data prediction D(x, σ)
            return mask * out + keep * self.x0
        if s == 0:  # at the data: the path's own velocity for the kept part
            return mask * out + keep * (path.d_alpha(tf) * self.x0 + path.d_sigma(tf) * self.eps)
        d = mask * path.data_prediction(x_in, out, tf) + keep * self.x0
        da, ds = path.d_alpha(tf), path.d_sigma(tf)
        return (ds * x - (ds * a - s * da) * d) / s


def blended_field(
    field: Field,
    x0: torch.Tensor,
    eps: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    threshold: Callable[[float], float] | None = None,
) -> Field:
    """A copy of a bound field whose model keeps init as `mode` ("comfyui" or "a1111") does: a σ-time
    field's denoiser (`data`), or a flow field's velocity; `threshold`: ComfyUI's DifferentialDiffusion."""
    other = copy.copy(field)
    blend_input = mode == "comfyui"
    if getattr(field, "prediction", None) == "denoiser" and callable(getattr(field, "data", None)):
        other.data = BlendedModel(field.data, field, x0, eps, mask, blend_input, False, threshold)  # type: ignore[attr-defined]
    elif callable(getattr(field, "velocity", None)) and field.path is not None:
        other.velocity = BlendedModel(field.velocity, field, x0, eps, mask, blend_input, True, threshold)  # type: ignore[attr-defined]
    else:
        raise ArgumentError(
            f"inpaint: {mode!r} blends the model's data prediction; a {type(field).__name__} has no denoiser or "
            f"velocity model to blend (use inpaint='diffusers')"
        )
    return other
