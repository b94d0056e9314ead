"""Dynamic shifting: the `mu` that diffusers pipelines compute from the number of latent tokens.

Flow-matching schedulers with `use_dynamic_shifting` shift their times by e^μ/(e^μ + 1/t − 1), and
each pipeline computes μ from the image's token count L (and, for Flux 2, the number of steps N).
The rules, read off diffusers' pipelines:

- `linear` (`calculate_shift` of Flux, SD3, Qwen-Image, Chroma, LTX, ...): μ grows linearly from
  `base_shift` at L = `base_image_seq_len` to `max_shift` at L = `max_image_seq_len`;
- `sqrt` (CogView4's): μ = `base_shift` + `max_shift` · √(L / `base_image_seq_len`);
- `flux2` (Flux 2's `compute_empirical_mu`): a fit in L and N, interpolated between its 10- and
  200-step lines (the 200-step line alone above L = 4300).

The settings are the scheduler config's, with each pipeline's defaults where the config is silent.
"""

from __future__ import annotations

import math
from typing import Callable

from ..errors import ArgumentError
from .packing import generated_shape, token_positions
from .pipeline_source import pipeline_source

MU_RULES = ("linear", "sqrt", "flux2")

# the steps at which a steps-dependent rule (Flux 2's) gives the model's time shift: its pipeline's default
_DEFAULT_STEPS = 50


def dynamic_shift_mu(
    scheduler_config: dict, image_seq_len: int, steps: int | None = None, rule: str = "linear"
) -> float:
    """μ for `image_seq_len` latent tokens (and `steps` steps, for the `flux2` rule), as the pipeline of
    `rule` computes it from the scheduler's config `scheduler_config`."""
    if rule not in MU_RULES:
        raise ArgumentError(f"rule: expected one of {', '.join(MU_RULES)}, got {rule!r}")
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int) or image_seq_len < 1:
        raise ArgumentError(f"image_seq_len: expected a positive int (latent tokens), got {image_seq_len!r}")
    get, L = scheduler_config.get, float(image_seq_len)
    if rule == "linear":
        lo, hi = float(get("base_image_seq_len", 256)), float(get("max_image_seq_len", 4096))
        b0, b1 = float(get("base_shift", 0.5)), float(get("max_shift", 1.15))
        slope = (b1 - b0) / (hi - lo)
        return L * slope + (b0 - slope * lo)
    if rule == "sqrt":
        base = float(get("base_image_seq_len", 256))
        return math.sqrt(L / base) * float(get("max_shift", 0.75)) + float(get("base_shift", 0.25))
    at_200 = 0.00016927 * L + 0.45666666  # Flux 2's fits of μ at 200 and at 10 steps
    if L > 4300:
        return at_200
    at_10 = 8.73809524e-05 * L + 1.89833333
    n = _DEFAULT_STEPS if steps is None else steps
    per_step = (at_200 - at_10) / 190.0
    return per_step * n + (at_200 - 200.0 * per_step)


def mu_rule_of(pipeline_class: str | None) -> str:
    """The rule by which a pipeline class (its name) computes μ, from its source file; `linear` (the most
    common) when there is no pipeline or its source cannot be read."""
    text = pipeline_source(pipeline_class) if pipeline_class else ""
    if "compute_empirical_mu(" in text:
        return "flux2"
    if "(image_seq_len / base_seq_len) ** 0.5" in text:
        return "sqrt"
    return "linear"


def latent_tokens(model_config: dict, model_kwargs: dict, data_shape: tuple[int, ...] | None) -> int | None:
    """The number of latent tokens a pipeline computes μ from, where the model's inputs or config say it:
    the generated tokens' rows of Flux-family position tables (`img_ids`), the first of Qwen-Image's
    `img_shapes` (Qwen-Image Edit lists the reference image's after it), LTX's
    `num_frames` · `height` · `width`, or an image's (h / p)(w / p) patches from the config's sample
    size and `patch_size` p (SD3). None where none of them does."""
    where = token_positions(model_kwargs)  # the generated tokens (not a reference image's: Flux Kontext)
    if where is not None:
        return len(where[0])
    shape = generated_shape(model_kwargs)
    if shape is not None:
        return math.prod(shape)
    if all(isinstance(model_kwargs.get(k), int) for k in ("num_frames", "height", "width")):
        return int(model_kwargs["num_frames"] * model_kwargs["height"] * model_kwargs["width"])
    if data_shape is not None and len(data_shape) == 3:  # a transformer's patches of its sample size
        return sample_tokens(model_config, (1, *data_shape))
    return None


def sample_tokens(model_config: dict, shape: tuple[int, ...]) -> int | None:
    """The latent tokens of a batch of shape `shape` as its pipeline counts them: a packed batch's
    (b, tokens, c) rows, or an image batch's (h / p)(w / p) patches for a config's `patch_size` p;
    None where the shape does not say (a UNet's images, video)."""
    if len(shape) == 3:
        return int(shape[1])
    p = model_config.get("patch_size")
    if len(shape) == 4 and isinstance(p, int) and p > 0:
        return (shape[2] // p) * (shape[3] // p)
    return None


def mu_function(
    scheduler_config: dict,
    mu: float | None,
    n: int | None,
    rule: str,
) -> Callable[[int | None], float] | None:
    """steps ↦ μ for a scheduler with dynamic shifting: the given `mu`, else the pipeline's `rule` at
    `n` latent tokens. None without dynamic shifting; an error naming `mu` and `image_seq_len` where
    neither is known."""
    if not scheduler_config.get("use_dynamic_shifting"):
        return None
    if mu is not None:
        value = float(mu)
        return lambda steps: value
    if n is None:
        raise ArgumentError(
            "mu: the scheduler uses dynamic shifting and the number of latent tokens it is computed from is "
            "unknown; pass mu= (the shift the pipeline computes) or image_seq_len= (the latent tokens, e.g. "
            "(height / 16) · (width / 16) for Flux)"
        )
    return lambda steps: dynamic_shift_mu(scheduler_config, n, steps, rule)
