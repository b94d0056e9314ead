"""Rules that diffusers' pipelines apply around their scheduler, read from their source files: how a
pipeline class sets its schedule, computes its dynamic shift, or turns an img2img strength into steps.
The files are read rather than the classes imported, so that a pipeline whose optional dependencies
are missing (a placeholder class without its code) is read as well."""

from __future__ import annotations

import functools
import re
from pathlib import Path

__all__ = ["pipeline_source", "strength_rule_of", "STRENGTH_RULES", "token_concat"]

# a pipeline that appends a reference image's tokens to the latents' (Flux Kontext, Flux 2, Qwen-Image Edit)
_TOKEN_CONCAT = "torch.cat([latents, image_latents], dim=1)"

# how `get_timesteps(N, strength)` counts the steps an img2img or inpaint pipeline walks:
#  "walked": ⌊N·strength⌋ of them (init_timestep = min(int(N · strength), N): SD, SDXL, Wan, ...);
#  "skipped": all but the int(N − N·strength) it skips (init_timestep = min(N · strength, N): SD3, Flux, ...)
STRENGTH_RULES = ("walked", "skipped")
_WALKED = "init_timestep = min(int(num_inference_steps * strength), num_inference_steps)"
_SKIPPED = "init_timestep = min(num_inference_steps * strength, num_inference_steps)"


@functools.lru_cache(maxsize=None)
def _index() -> tuple[dict[str, str], dict[str, set[str]]]:
    """One reading of diffusers' pipeline files: {pipeline class: its file's text} and {model class:
    the strength rules of the pipeline files that name it}."""
    import diffusers

    sources: dict[str, str] = {}
    rules: dict[str, set[str]] = {}
    for path in sorted((Path(diffusers.__file__).parent / "pipelines").rglob("pipeline_*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        for name in _CLASS.findall(text):
            sources.setdefault(name, text)
        rule = _strength_rule(text)
        if rule is not None:
            for model in set(_MODEL.findall(text)):
                rules.setdefault(model, set()).add(rule)
    return sources, rules


_CLASS = re.compile(r"^class (\w+)\(", re.MULTILINE)
_MODEL = re.compile(r"\b([A-Z][A-Za-z0-9]*Model)\b")


def pipeline_source(name: str) -> str:
    """The text of the diffusers source file that defines pipeline class `name` ('' if none does)."""
    return _index()[0].get(name, "") if name else ""


def _strength_rule(text: str) -> str | None:
    return "skipped" if _SKIPPED in text else "walked" if _WALKED in text else None


def strength_rule_of(pipeline_class: str | None, model_class: str) -> str:
    """How img2img counts its steps for a model loaded from pipeline class `pipeline_class` (its source's
    rule), or, where that class has none (a text-to-image pipeline), the rule of the img2img and inpaint
    pipelines that use `model_class`: "skipped" where all of them skip (SD3, Flux, Qwen-Image, Chroma,
    Z-Image transformers), else "walked"."""
    own = _strength_rule(pipeline_source(pipeline_class)) if pipeline_class else None
    if own is not None:
        return own
    return "skipped" if _index()[1].get(model_class) == {"skipped"} else "walked"


def token_concat(pipeline_class: str | None) -> bool:
    """Whether a pipeline class appends its reference image's latents to the sample as more tokens
    (its source's `torch.cat([latents, image_latents], dim=1)`): then `cond["concat"]` extends the
    sequence axis, not the channels."""
    return pipeline_class is not None and _TOKEN_CONCAT in pipeline_source(pipeline_class)
