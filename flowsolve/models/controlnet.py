"""A denoiser steered by ControlNets (Zhang et al. 2023), as one network for the diffusers adapters.

Each ControlNet sees the denoiser's own input, timestep and conditioning (the inputs its forward
takes), plus its conditioning image `controlnet_cond`; its residuals, scaled by its
`conditioning_scale`, are summed over the ControlNets and handed to the denoiser, as diffusers'
ControlNet pipelines (and their Multi-ControlNet models) call them: a UNet's skip connections and
middle block, a Flux transformer's double- and single-stream blocks, an SD3 transformer's blocks.
So `from_diffusers(unet, scheduler, controlnet=cn)` samples it with every solver, guidance
included (the image is the same in both branches unless `uncond` names it).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from ..errors import ArgumentError, ArgumentTypeError

__all__ = ["ControlledModel"]

# the denoiser's keywords for the ControlNet outputs, in the order the ControlNet returns them
_RESIDUAL_INPUTS: dict[str, tuple[str, ...]] = {
    "FluxTransformer2DModel": ("controlnet_block_samples", "controlnet_single_block_samples"),
    "SD3Transformer2DModel": ("block_controlnet_hidden_states",),
}
_UNET_RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual")
# inputs for the ControlNets only
_CONTROL_ONLY = frozenset({"controlnet_cond", "controlnet_mode", "conditioning_scale", "guess_mode"})


def _signature(cls: Any) -> tuple[str, frozenset[str] | None]:
    """(the name of the sample input, the keyword inputs; None where the forward takes **kwargs)."""
    return _signature_of(cls)


@functools.lru_cache(maxsize=None)
def _signature_of(cls: Any) -> tuple[str, frozenset[str] | None]:
    params = inspect.signature(cls.forward).parameters
    names = list(params)[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return names[0], None
    return names[0], frozenset(names[1:])


def _named(controlnets: Any) -> tuple[dict[str, nn.Module], bool]:
    """The ControlNets by name, and whether there is a single one (its image is a tensor, not a dict):
    a module, a dict of modules, a list of modules or diffusers' Multi-ControlNet models (names "0", "1", ...)."""
    nets = getattr(controlnets, "nets", controlnets)  # Multi-ControlNet models hold their list in .nets
    if isinstance(nets, nn.Module) and not isinstance(nets, nn.ModuleList):
        return {"0": nets}, True
    if isinstance(nets, dict):
        named = dict(nets)
    elif isinstance(nets, (list, tuple, nn.ModuleList)):
        named = {str(i): n for i, n in enumerate(nets)}
    else:
        raise ArgumentTypeError(
            f"controlnet: expected a ControlNet model, a list or dict of them, or a Multi-ControlNet model, "
            f"got {type(controlnets).__name__}"
        )
    if not named or not all(isinstance(n, nn.Module) for n in named.values()):
        raise ArgumentError(f"controlnet: expected at least one ControlNet model, got {controlnets!r}")
    return named, False


def _add(a: Any, b: Any) -> Any:
    """The sum of two ControlNet outputs, position by position (lists of residuals, tensors, None)."""
    if a is None or b is None:
        return a if b is None else b
    if isinstance(a, (list, tuple)):
        return [_add(x, y) for x, y in zip(a, b)]
    return a + b


def _masked(out: Any, active: torch.Tensor) -> Any:
    """ControlNet outputs times a per-sample 0/1 (or one for the batch), position by position."""
    if out is None:
        return None
    if isinstance(out, (list, tuple)):
        return [_masked(o, active) for o in out]
    return out * active.reshape(-1, *([1] * (out.dim() - 1)))


class ControlledModel(nn.Module):
    """`model` (a diffusers UNet, Flux or SD3 transformer) with ControlNets: forward(sample, timestep,
    controlnet_cond, **inputs). `controlnet_cond` is the conditioning image (one row per sample), or a
    dict of them by ControlNet name for several; `scale` is each ControlNet's conditioning scale (a
    number, or a dict by name); `window` the (low, high) timesteps, in the network's own units, where
    each acts (None: everywhere). Every input goes to each network whose forward takes it."""

    def __init__(
        self,
        model: nn.Module,
        controlnet: Any,
        scale: float | dict[str, float] = 1.0,
        window: tuple[float, float] | dict[str, tuple[float, float]] | None = None,
    ) -> None:
        super().__init__()
        named, self.single = _named(controlnet)
        self.model = model
        self.controlnets = nn.ModuleDict(named)
        scales = scale if isinstance(scale, dict) else {k: scale for k in named}
        if set(scales) != set(named):
            raise ArgumentError(f"controlnet_scale: expected a scale for each of {sorted(named)}, got {sorted(scales)}")
        self.scales = {k: float(v) for k, v in scales.items()}
        # the timesteps (in the network's own units) where each ControlNet acts: diffusers'
        # control_guidance_start / end, which count steps, are the timesteps of those steps
        windows = window if isinstance(window, dict) else {k: window for k in named}
        if set(windows) != set(named):
            raise ArgumentError(
                f"controlnet_window: expected a window for each of {sorted(named)}, got {sorted(windows)}"
            )
        self.windows: dict[str, tuple[float, float] | None] = {}
        for k, w in windows.items():
            if w is not None and not (isinstance(w, (tuple, list)) and len(w) == 2 and float(w[0]) <= float(w[1])):
                raise ArgumentError(f"controlnet_window: expected (low, high) timesteps with low <= high, got {w!r}")
            self.windows[k] = None if w is None else (float(w[0]), float(w[1]))
        self.config = getattr(model, "config", None)  # the denoiser's: sample shape, channels
        self.residual_inputs = _RESIDUAL_INPUTS.get(type(model).__name__, _UNET_RESIDUALS)
        known = [_signature(type(m))[1] for m in (model, *named.values())]
        # the inputs a caller may give (None: any): the networks', and the ControlNet image
        self.input_names: frozenset[str] | None = (
            None if any(k is None for k in known) else frozenset().union(*known) | {"controlnet_cond"}  # type: ignore[arg-type]
        )

    @property
    def base_model(self) -> nn.Module:
        """The denoiser the ControlNets steer (its class decides the time convention)."""
        return self.model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, controlnet_cond: Any = None, **inputs: Any):
        if controlnet_cond is None:
            raise ArgumentError(
                "controlnet_cond: the ControlNet needs its conditioning image in cond (one row per sample"
                + ("" if self.single else f", a dict by name: {sorted(self.controlnets)}")
                + ")"
            )
        images: Any = {"0": controlnet_cond} if self.single else controlnet_cond
        if not isinstance(images, dict) or set(images) != set(self.controlnets):
            raise ArgumentError(
                f"controlnet_cond: expected an image for each ControlNet {sorted(self.controlnets)}, got "
                f"{sorted(images) if isinstance(images, dict) else type(images).__name__}"
            )
        residuals: Any = None
        repeat = False
        for name, net in self.controlnets.items():
            first, takes = _signature(type(net))
            kw = {k: v for k, v in inputs.items() if takes is None or k in takes}
            kw.update({first: sample, "timestep": timestep, "return_dict": False})
            kw.update(controlnet_cond=images[name].to(sample.dtype), conditioning_scale=self.scales[name])
            out = list(net(**kw))
            window = self.windows[name]
            if window is not None:  # outside its window a ControlNet adds nothing (scale 0 there)
                active = ((timestep >= window[0]) & (timestep <= window[1])).to(sample.dtype).reshape(-1)
                out = _masked(out, active)
            residuals = _add(residuals, out)
            repeat = repeat or getattr(net, "input_hint_block", None) is not None  # XLabs' Flux ControlNets
        first, takes = _signature(type(self.model))
        kw = {k: v for k, v in inputs.items() if k not in _CONTROL_ONLY and (takes is None or k in takes)}
        kw.update({first: sample, "timestep": timestep})
        kw.update(zip(self.residual_inputs, residuals))
        if repeat:
            kw["controlnet_blocks_repeat"] = True
        return self.model(**kw)
