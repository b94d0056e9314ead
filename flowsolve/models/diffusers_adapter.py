"""diffusers models as denoisers D(x; σ): the pretrained data score of the paper (s_ψ, Eq. 8).

A discrete variance-preserving model (DDPM, DDIM, PNDM, Euler-discrete, DPM-Solver, ... schedulers)
sees x_t = √ᾱ x_0 + √(1 − ᾱ) ε. In EDM's variance-exploding variable x = x_t/√ᾱ = x_0 + σ ε with
σ = √((1 − ᾱ)/ᾱ), so the network gets c_in x with c_in = 1/√(1 + σ²), and a continuous σ maps to a
fractional timestep by interpolating log σ between the schedule's knots. DDIM (η = 0) is then
exactly Euler on dx/dσ = (x − D)/σ. EDM-style schedulers (EDMEulerScheduler, ...) carry their own
preconditioning (c_in, c_noise = ln σ / 4, c_skip, c_out with σ_data).
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .packing import latent_channels, latents_to_tokens, packed_grid, packed_shape, tokens_to_latents, vae_packing
from .dynamic_shift import MU_RULES, latent_tokens, mu_function, mu_rule_of, sample_tokens
from .pipeline_source import STRENGTH_RULES, pipeline_source, strength_rule_of, token_concat
from .precond import Denoiser
from .protocol import ParticleModel
from .._checks import check_int, model_dtype, nearest
from .._cond import map_leaves, merge_leaves
from ..errors import ArgumentError, ArgumentTypeError, PathError
from ..fields.base import BETWEEN_KNOTS
from ..fields.paths import vp_reread

__all__ = [
    "DiffusersDenoiser",
    "DiffusersFlow",
    "FlowDenoiser",
    "from_diffusers",
    "PREDICTION_TYPES",
    "load_diffusers_component",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "score")
_MODEL_CLASSES = (  # examples named in errors; any diffusers ModelMixin class loads
    "UNet2DModel",
    "UNet2DConditionModel",
    "DiTTransformer2DModel",
    "Transformer2DModel",
    "SD3Transformer2DModel",
    "AutoencoderKL",
    "VQModel",
)


def _config(obj) -> dict:
    cfg = getattr(obj, "config", None)
    return dict(cfg) if cfg is not None else {}


class LatentDecoding:
    """`decode(latents)` (and its inverse `encode(images)`) for models of latent pipelines: the latents
    un-normalised as the pipelines do (latents / scaling_factor + shift_factor: SD, SD3, Flux;
    latents · std / scaling_factor + mean where the VAE lists per-channel `latents_mean` /
    `latents_std`: SDXL's, Wan's), then the VAE's decoder
    (images in the VAE's range, about [−1, 1]). Packed latents (b, tokens, c·k²: Flux, Chroma, Qwen-Image)
    are unpacked first as their pipelines unpack them, on the grid their position inputs give
    (`img_ids`, `img_shapes`; `models.packing`; Flux 2's patches un-normalised by its VAE's batch norm),
    and `encode` packs them the same way.

    Frames-first video latents (b, f, c, h, w: Stable Video Diffusion, CogVideoX, AnyFlow) are decoded
    as their pipelines decode them: a video VAE (3-D convolutions) takes them channels first; an image
    or temporal VAE (SVD's) takes the frames as a batch, `decode_chunk_size` frames per call (with
    `num_frames` where its decoder takes it). Videos come back as (b, c, f, H, W)."""

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, decode_chunk_size: int = 14) -> torch.Tensor:
        vae = getattr(self, "vae", None)
        if vae is None:
            raise ArgumentError(
                "decode: this model has no VAE (it samples in data space); load the whole latent "
                "pipeline, or pass vae= to from_diffusers"
            )
        check_int("decode_chunk_size", decode_chunk_size, 1)
        k = vae_packing(getattr(self, "model", None), vae)
        if latents.dim() == 3 and k is not None:  # tokens of k × k patches: the latent image first
            latents = tokens_to_latents(latents, k, getattr(self, "model_kwargs", {}), vae)
            if _video_vae(vae):  # Qwen-Image's VAE: one frame of video, decoded and returned as an image
                return self.decode(latents[:, :, None], decode_chunk_size)[:, :, 0]
        frames_first = latents.dim() == 5 and getattr(self, "concat_dim", 1) == 2
        if frames_first:
            latents = latents.transpose(1, 2)  # (b, c, f, h, w): the statistics are per channel
        offset, scale = _latent_normalisation(vae, latents)
        latents = latents / scale + offset
        p = next(vae.parameters())
        latents = latents.to(p.device, p.dtype)
        if frames_first and not _video_vae(vae):
            return _decode_frames(vae, latents, decode_chunk_size)
        return _vae_output(vae.decode(latents))

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, mode: str = "mean", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The model's latents of `images` (n, C, H, W) in the VAE's range (about [−1, 1]), normalised as
        the img2img pipelines normalise them, the inverse of `decode`: (z − shift_factor)·scaling_factor,
        or (z − mean)·scaling_factor/std with per-channel statistics. `mode`: "mean" (the posterior's
        mean) or "sample" (a draw from it with `generator`, diffusers' default in img2img); a VQ model
        gives its latents."""
        vae = getattr(self, "vae", None)
        if vae is None:
            raise ArgumentError("encode: this model has no VAE (it samples in data space); pass the data as it is")
        if mode not in ("mean", "sample"):
            raise ArgumentError(f"mode: expected 'mean' or 'sample', got {mode!r}")
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ArgumentError(
                f"images: expected a tensor of images (n, C, H, W), got {getattr(images, 'shape', images)}"
            )
        p = next(vae.parameters())
        k = vae_packing(getattr(self, "model", None), vae)
        if k is not None and _video_vae(vae):  # Qwen-Image's VAE: an image is one frame of video
            images = images[:, :, None]
        out = vae.encode(images.to(p.device, p.dtype))
        dist = getattr(out, "latent_dist", None)
        if dist is not None:
            z = dist.sample(generator) if mode == "sample" else dist.mode()
        else:  # a VQ model's encoder output
            z = out.latents if hasattr(out, "latents") else out[0]
        offset, scale = _latent_normalisation(vae, z)
        z = (z - offset) * scale
        if k is not None:  # a transformer of packed latents takes them as its pipeline packs them
            return latents_to_tokens(z[:, :, 0] if z.dim() == 5 else z, k, getattr(self, "model_kwargs", {}), vae)
        return z

    @torch.no_grad()
    def latent_mask(self, mask: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """An inpainting mask drawn on the images (1: generate, 0: keep; (H, W), (n, H, W) or (n, 1, H, W),
        values in [0, 1]) in the layout of the model's latents, for `fs.sample(..., mask=)`, as diffusers'
        inpaint pipelines make it: binarised at 0.5 (their mask processor), resized (nearest) to the
        latents' size, and for packed latents repeated over the latent channels and packed (Flux's
        `prepare_mask_latents`). `size`: the latents' (h, w); by default the token grid's (packed), else
        H and W over the VAE's scale factor (2^(levels − 1), the pipelines' `vae_scale_factor`)."""
        vae = getattr(self, "vae", None)
        if vae is None:
            raise ArgumentError("latent_mask: this model has no VAE; its mask is drawn on the data itself")
        shaped = isinstance(mask, torch.Tensor) and mask.dim() in (2, 3, 4)
        if not shaped or (mask.dim() == 4 and mask.shape[1] != 1):
            raise ArgumentError(
                f"mask: expected an image mask (H, W), (n, H, W) or (n, 1, H, W), got {getattr(mask, 'shape', mask)}"
            )
        m = mask.float().reshape(-1, 1, *mask.shape[-2:])
        m = (m >= 0.5).float()  # the pipelines' mask processor binarises
        k = vae_packing(getattr(self, "model", None), vae)
        grid = packed_grid(getattr(self, "model_kwargs", {})) if k is not None else None
        if size is None and grid is not None:
            size = (grid[0] * k, grid[1] * k)  # type: ignore[operator]
        if size is None:  # the images' latents: H and W over the VAE's scale factor, as the pipelines compute it
            vcfg = _config(vae)
            scale = vcfg.get("spatial_compression_ratio") or 2 ** (len(vcfg.get("block_out_channels") or [0]) - 1)
            size = (m.shape[-2] // int(scale), m.shape[-1] // int(scale))
        m = torch.nn.functional.interpolate(m, size=tuple(size))
        if k is None:
            return m
        m = m.repeat(1, int(latent_channels(vae) or 1), 1, 1)  # every latent channel, packed as the latents
        return latents_to_tokens(m, k, getattr(self, "model_kwargs", {}))


class Rescheduling:
    """`with_scheduler(s)`: the same network with another scheduler (diffusers' `pipe.scheduler = ...`)."""

    _rebuild: tuple = ()
    scheduler: Any

    def with_scheduler(self, scheduler):
        """This model loaded with `scheduler` instead (the same network, VAE and settings): its field's
        default grid is that scheduler's schedule, and its conversions (prediction type, clipping) that
        scheduler's, as in a pipeline whose scheduler was swapped, e.g. for
        `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)`."""
        if not self._rebuild:
            raise ArgumentError("with_scheduler: this model was not made by fs.models.from_diffusers")
        model, vae, kw = self._rebuild
        kw = dict(kw)
        if not is_flow_scheduler(scheduler):
            kw.pop("pipeline_sigmas", None)
            kw.pop("mu_rule", None)
        return from_diffusers(model, scheduler, vae=vae, **kw)

    def scheduler_differences(self, scheduler, schedule: bool = True) -> str:
        """How a scheduler handed as a solver differs from the one this model was loaded with, in what
        the model takes from its own: the settings it reads (`_MODEL_READS`) and, with `schedule`, a
        custom schedule or the schedule `set_timesteps(N)` makes (spacing, Karras σ's, final σ); ""
        where they agree."""
        own = self.scheduler
        a, b = _config(scheduler), _config(own)
        keys = [k for k in _MODEL_READS if k in a and k in b and a[k] != b[k]]
        if keys:
            return ", ".join(f"{k}={a[k]!r} (the model's: {b[k]!r})" for k in keys)
        if not schedule:
            return ""
        mine, theirs = custom_steps(scheduler), custom_steps(own)
        if mine is not None or theirs is not None:
            same = mine == theirs and _same_schedule(scheduler, own)
            return "" if same else "its custom schedule (set_timesteps(timesteps=...) or sigmas=...)"
        for steps in (7, 20):
            try:
                made = scheduler_at(scheduler, steps), scheduler_at(own, steps)
            except Exception:  # noqa: BLE001 - one of them cannot make this schedule alone (mu, ...): no verdict
                return ""
            if not _same_schedule(*made):
                return f"the schedule set_timesteps({steps}) makes"
        return ""


def _latent_normalisation(vae, z: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(offset, scale) with which the pipelines normalise the VAE's latents z: (z − offset)·scale, where
    offset = shift_factor and scale = scaling_factor, or per channel offset = latents_mean and scale =
    scaling_factor / latents_std where the VAE lists them."""
    cfg = _config(vae)
    factor = float(cfg.get("scaling_factor", 1.0) or 1.0)
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    if mean is None or std is None:
        return float(cfg.get("shift_factor", 0.0) or 0.0), factor
    col = (1, -1, *([1] * (z.dim() - 2)))
    mean_t = torch.as_tensor(mean, dtype=z.dtype, device=z.device).reshape(col)
    std_t = torch.as_tensor(std, dtype=z.dtype, device=z.device).reshape(col)
    return mean_t, factor / std_t


def _vae_output(out) -> torch.Tensor:
    return out.sample if hasattr(out, "sample") else out[0] if isinstance(out, (tuple, list)) else out


def _video_vae(vae) -> bool:
    """A VAE that decodes whole videos (3-D convolutions: Wan's, CogVideoX's), not frames; SVD's
    temporal decoder, which takes frames and their count, is not one."""
    if "num_frames" in inspect.signature(vae.decode).parameters:
        return False
    return any(isinstance(m, nn.Conv3d) for m in vae.modules())


def _decode_frames(vae, latents: torch.Tensor, chunk: int) -> torch.Tensor:
    """(b, c, f, h, w) latents through an image (or temporal) VAE, `chunk` frames of the flattened
    batch per call as StableVideoDiffusionPipeline.decode_latents does; back as (b, C, f, H, W)."""
    b, f = latents.shape[0], latents.shape[2]
    flat = latents.transpose(1, 2).flatten(0, 1)
    takes_frames = "num_frames" in inspect.signature(vae.decode).parameters
    outs = []
    for i in range(0, len(flat), chunk):
        part = flat[i : i + chunk]
        outs.append(_vae_output(vae.decode(part, num_frames=len(part)) if takes_frames else vae.decode(part)))
    frames = torch.cat(outs)
    return frames.reshape(b, f, *frames.shape[1:]).transpose(1, 2)


def accepted_inputs(model) -> frozenset[str] | None:
    """The keyword inputs a diffusers model's forward takes (None: any, it takes **kwargs); read once
    per model class, not on every network call (a composed model, ControlNets over a UNet, says its own)."""
    own = getattr(model, "input_names", None)
    if isinstance(own, frozenset):
        return own
    return _forward_inputs(type(model))  # type: ignore[arg-type]  # classes are hashable


def base_class_name(model) -> str:
    """The class name of the denoiser itself (under ControlNets: the UNet's or transformer's), which
    decides the time convention, the channel axis and the label table."""
    return type(getattr(model, "base_model", model)).__name__


_TIMESTEP_NAMES = ("timestep", "timesteps", "t")


@functools.lru_cache(maxsize=None)
def _timestep_keyword(cls) -> str | None:
    """The name of the forward's timestep input when it is not the second one (SD3 / Flux transformers
    take (hidden_states, encoder_hidden_states, pooled_projections, timestep)); None: positional."""
    names = list(inspect.signature(cls.forward).parameters)[1:]  # without self
    if len(names) > 1 and names[1] in _TIMESTEP_NAMES:
        return None
    return next((n for n in names if n in _TIMESTEP_NAMES), None)


@functools.lru_cache(maxsize=None)
def _forward_inputs(cls) -> frozenset[str] | None:
    params = inspect.signature(cls.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    names = list(params)[2:]  # after (self, sample)
    return frozenset(n for n in names if n not in _TIMESTEP_NAMES)


_KNOWN_DTYPE_CLASSES: dict[type, type] = {}


def _known_dtype(self) -> torch.dtype:
    return self.__dict__["_flowsolve_dtype"]


def network_output(model, x: torch.Tensor, timestep: torch.Tensor, **inputs) -> torch.Tensor:
    """The network's whole output for input x at `timestep` (in the model's dtype, variance channels
    included): the one place the adapters call a diffusers model.

    The inputs are cast to the model's dtype, and `model.dtype` is answered at once during the call.
    diffusers' UNet and transformer forwards read that property, which walks every submodule and
    parameter (0.7 ms of a 21 ms call on the digits UNet, more on larger models; the same in
    diffusers' own loops). For the call, the model's class is a subclass whose `dtype` returns the
    value diffusers' property gave once, recomputed whenever the first floating parameter's dtype
    changes; the class is restored afterwards. Models without a `dtype` property are called as they are."""
    mdtype = model_dtype(model, x.dtype)
    cls = type(model)
    by_name = _timestep_keyword(cls) if isinstance(model, nn.Module) else None  # type: ignore[arg-type]
    args: tuple = (x.to(mdtype),) if by_name else (x.to(mdtype), timestep.to(mdtype))
    if by_name:
        inputs = {**inputs, by_name: timestep.to(mdtype)}
    if mdtype is None or cls in _KNOWN_DTYPE_CLASSES.values() or not isinstance(getattr(cls, "dtype", None), property):
        out = model(*args, **inputs)
    else:
        if model.__dict__.get("_flowsolve_dtype_of") != mdtype:
            model.__dict__["_flowsolve_dtype"] = model.dtype  # diffusers' own answer (layerwise casting included)
            model.__dict__["_flowsolve_dtype_of"] = mdtype
        fast = _KNOWN_DTYPE_CLASSES.get(cls)
        if fast is None:
            fast = type(cls.__name__, (cls,), {"dtype": property(_known_dtype), "__module__": cls.__module__})
            _KNOWN_DTYPE_CLASSES[cls] = fast
        model.__class__ = fast
        try:
            out = model(*args, **inputs)
        finally:
            model.__class__ = cls
    out = getattr(out, "sample", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


def call_network(model, x: torch.Tensor, timestep: torch.Tensor, **inputs) -> torch.Tensor:
    """`network_output` in x's dtype and channels (the mean half of a learned-variance output)."""
    return network_output(model, x, timestep, **inputs)[:, : x.shape[1]].to(x.dtype)


# inputs that describe positions, not samples: one table for the whole batch (Flux-family transformers)
_POSITION_INPUTS = frozenset({"img_ids", "txt_ids"})

# conditioning by channels: cond["concat"] is appended to the network's (scaled) input along its channel
# axis, as inpainting, InstructPix2Pix, upscaler, SVD and Flux Fill pipelines append their mask, image
# or image latents. The axis is 1 but for frames-first video latents (b, f, c, h, w) and packed
# token sequences (b, n, c).
CONCAT_KEY = "concat"
_CONCAT_DIMS = {
    "UNetSpatioTemporalConditionModel": 2,
    "CogVideoXTransformer3DModel": 2,
    "FluxTransformer2DModel": 2,
    "Flux2Transformer2DModel": 2,
    "ChromaTransformer2DModel": 2,
    "AnyFlowTransformer3DModel": 2,
}


def concat_dim_of(model, concat_dim: int | None) -> int:
    """The channel axis of the network's input that `cond["concat"]` extends."""
    if concat_dim is not None:
        return check_int("concat_dim", concat_dim, 1)
    return _CONCAT_DIMS.get(base_class_name(model), 1)


def with_concat(net_input: torch.Tensor, inputs: dict, dim: int) -> torch.Tensor:
    """The network input with `inputs["concat"]` (taken out of `inputs`) appended along `dim`."""
    extra = inputs.pop(CONCAT_KEY, None)
    if extra is None:
        return net_input
    if extra.dim() != net_input.dim() or any(
        a != b for d, (a, b) in enumerate(zip(extra.shape, net_input.shape)) if d != dim
    ):
        raise ArgumentError(
            f"cond: key 'concat' must match the sample's shape {tuple(net_input.shape)} except along axis "
            f"{dim} (the channels it adds), got {tuple(extra.shape)}"
        )
    return torch.cat([net_input, extra.to(net_input.dtype)], dim=dim)


def model_inputs(model, fixed: dict, batch: int, cond: dict) -> dict:
    """The model's keyword inputs: fixed `model_kwargs` and per-sample `cond`, checked by key (known to the
    model, one row per sample or one for all, integer labels, float embeddings cast to the model's dtype).
    A dict-valued input (SDXL's `added_cond_kwargs`) is merged and treated leaf by leaf."""
    merged = merge_leaves(fixed, cond) if fixed else dict(cond)
    if not merged:
        return {}
    known = accepted_inputs(model) if cond else None
    mdtype = model_dtype(model)
    for k in merged:
        if known is not None and k not in known and k != CONCAT_KEY:
            raise ArgumentError(
                f"cond: {type(model).__name__}.forward takes no input {k!r}{nearest(k, known)}; "
                f"it takes {', '.join(sorted(known))}"
            )

    def prepare(path: str, v):
        k = path.rsplit(".", 1)[-1]
        if not isinstance(v, torch.Tensor):
            return v
        if k in _POSITION_INPUTS:  # one table for the batch (Flux's ids)
            return v.to(mdtype) if v.is_floating_point() and mdtype is not None else v
        if k == "class_labels" and v.is_floating_point():
            raise ArgumentTypeError(f"cond: key 'class_labels' must hold integer labels, got {v.dtype}")
        if k == "encoder_hidden_states" and not v.is_floating_point():
            raise ArgumentTypeError(f"cond: key 'encoder_hidden_states' must be floating point, got {v.dtype}")
        if v.dim() > 0 and v.shape[0] == 1 and batch != 1:
            v = v.expand(batch, *v.shape[1:])
        elif v.dim() > 0 and v.shape[0] != batch:
            top = path.split(".", 1)[0]
            if top in fixed and top not in cond:  # a keyword of from_diffusers: one row for every sample
                raise ArgumentError(
                    f"{top}: the model's fixed input has {v.shape[0]} rows, the batch {batch}; a fixed input "
                    f"holds one row for every sample (pass per-sample inputs in cond=)"
                )
            raise ArgumentError(f"cond: key {path!r} has {v.shape[0]} rows for a batch of {batch}")
        if v.is_floating_point() and mdtype is not None and v.dtype != mdtype:
            v = v.to(mdtype)
        return v

    return map_leaves(prepare, merged)


# schedulers whose loop is DDPM's ancestral step with their `variance_type` (the `ddpm` solver)
_DDPM_SCHEDULERS = frozenset({"DDPMScheduler", "DDPMParallelScheduler", "UnCLIPScheduler"})

# models of sequences (audio): `sample_size` is a length, the data is (channels, length)
_SEQUENCE_MODELS = frozenset({"UNet1DModel", "StableAudioDiTModel"})


def _data_shape(model) -> tuple[int, ...] | None:
    """The shape of one sample from the model's config: (channels, length) for sequence models,
    (channels, size, size) for image models; None where the config does not say (video models: the
    number of frames is the pipeline's choice), so that `n=` asks for `shape=`."""
    mcfg = _config(model)
    c, size, out = mcfg.get("in_channels"), mcfg.get("sample_size"), mcfg.get("out_channels")
    if not isinstance(c, int) or size is None:
        return None
    if isinstance(out, int) and out < c:  # channels appended by conditioning (inpainting: 9 in, 4 out)
        c = out
    name = base_class_name(model)
    if name in _SEQUENCE_MODELS or "1D" in name:
        return (c, size) if isinstance(size, int) else None
    if isinstance(size, int):
        return None if ("3D" in name or "SpatioTemporal" in name) else (c, size, size)
    return (c, *size)


# How a flow transformer's pipeline feeds it the time and reads its output, where it is not the
# FlowMatch default (timestep = 1000 t, v = ε − x_0): (timestep per unit t, reversed time, negated output).
# Flux-family pipelines pass timestep / 1000 (= t); Lumina's pass 1 − t and negate the prediction
# (their models run from noise at 0 to data at 1); HiDream's negate it.
_FLOW_CONVENTIONS: dict[str, tuple[float | None, bool, bool]] = {
    **{
        name: (1.0, False, False)
        for name in (
            "FluxTransformer2DModel",
            "Flux2Transformer2DModel",
            "ChromaTransformer2DModel",
            "QwenImageTransformer2DModel",
            "AuraFlowTransformer2DModel",
            "LongCatImageTransformer2DModel",
            "OvisImageTransformer2DModel",
        )
    },
    "Lumina2Transformer2DModel": (1.0, True, True),
    "LuminaNextDiT2DModel": (1.0, True, True),
    "HiDreamImageTransformer2DModel": (None, False, True),
}


def _flow_match_family(scheduler) -> bool:
    """FlowMatch and FlowMap schedulers and those that build their schedule as FlowMatchEuler does (they
    list it among their `_compatibles`: LTX's `LTXEulerAncestralRFScheduler`); their timesteps are
    continuous."""
    cls = type(scheduler)
    return (
        cls.__name__.startswith(("FlowMatch", "FlowMap"))
        or cls.__name__ in _SCHEDULER_FLOW_CONVENTIONS
        or "FlowMatchEulerDiscreteScheduler" in getattr(cls, "_compatibles", ())
    )


# DDIM-type schedulers whose step goes from timestep t to t − T//N, read as the sample at the next timestep
_LANDING_SCHEDULERS = ("DDIMScheduler", "DDIMParallelScheduler", "CogVideoXDDIMScheduler")
# schedulers that fix their model's conventions (timestep scale, reverse time, negate): MiniMax-H3's
# transformer predicts the data-ward velocity x0 − ε and sees t = 1 − σ in [0, 1]
_SCHEDULER_FLOW_CONVENTIONS: dict[str, tuple[float, bool, bool]] = {"MiniMaxH3Scheduler": (1.0, True, True)}
# schedulers whose `num_inference_steps` counts the schedule's points (the terminal 0 among them), not its steps
_POINT_COUNTING_SCHEDULERS = ("MiniMaxH3Scheduler",)


def is_flow_scheduler(scheduler) -> bool:
    """FlowMatch schedulers (and their compatibles), and the multistep ones (DPM-Solver, UniPC, DEIS,
    SA-Solver) in their flow mode (`use_flow_sigmas`, `prediction_type="flow_prediction"`: Wan, Sana)."""
    return _flow_match_family(scheduler) or bool(_config(scheduler).get("use_flow_sigmas"))


# Schedulers whose ancestral step divides η as ComfyUI's RF sampler does (`euler_ancestral`'s split).
_RF_ANCESTRAL = ("LTXEulerAncestralRFScheduler",)

# The input by which a flow-map network (AnyFlow) takes its target time r, in the timestep's units.
_FLOW_MAP_INPUT = "r_timestep"

# Models that take one timestep per frame of their frames-first latents (b, f, c, h, w): (b, f).
_FRAME_TIMESTEPS = frozenset({"AnyFlowTransformer3DModel"})


class DiffusersFlow(Rescheduling, LatentDecoding, ParticleModel, nn.Module):
    """A diffusers flow-matching model (UNet or transformer predicting the velocity v = ε − x_0 of
    x_t = (1 − t) x_0 + t ε) with its FlowMatch scheduler, or a multistep scheduler in flow mode
    (DPM-Solver / UniPC / DEIS with `use_flow_sigmas`, `prediction_type="flow_prediction"`).
    `field()` is a `fields.FlowMatching` whose default grid is the scheduler's own schedule for the
    number of steps the NFE budget allows (shift, and dynamic shifting), so `fs.sample(m.field(),
    "euler", nfe=N)` is the scheduler's loop with N steps and every other solver runs on the same field.

    The network sees the time as its pipeline feeds it: timestep = `timestep_scale` · t (default
    num_train_timesteps; 1 for Flux-family transformers, whose pipelines pass timestep / 1000), or
    `timestep_scale` · (1 − t) with `reverse_time` (Lumina); `negate` flips the sign of its output
    (Lumina, HiDream predict x_0 − ε). Multistep schedulers in flow mode cast their timesteps to
    integers (`integer_timesteps`): the network then sees ⌊1000 t⌋, and exactly the scheduler's
    timestep on its own knots. `None` picks each from the model's class and the scheduler
    (`MiniMaxH3Scheduler` fixes them: 1 − t and the data-ward velocity, and its N counts the schedule's
    points, so N − 1 steps). `pipeline_sigmas`: the schedule of N steps is the scheduler set with
    sigmas = linspace(1, 1/N, N), as Flux-family pipelines (Flux, Flux 2, Chroma, Qwen-Image, LTX, ...)
    set it, instead of its own `set_timesteps(N)`; `from_diffusers` reads it off the pipeline's class.

    Dynamic shifting (`use_dynamic_shifting`): `mu` if given, else μ as the pipeline computes it
    (`mu_rule`, read off the pipeline's class by `from_diffusers`: `dynamic_shift.MU_RULES`) from
    `image_seq_len` latent tokens, or from the count the inputs or config give (the rows of `img_ids`,
    Qwen-Image's `img_shapes`, LTX's frames · height · width, SD3's patches of its sample size)."""

    guidable = True

    def __init__(
        self,
        model: nn.Module,
        scheduler,
        mu: float | None = None,
        timestep_scale: float | None = None,
        reverse_time: bool | None = None,
        negate: bool | None = None,
        integer_timesteps: bool | None = None,
        concat_dim: int | None = None,
        pipeline_sigmas: bool = False,
        image_seq_len: int | None = None,
        mu_rule: str = "linear",
        **model_kwargs,
    ) -> None:
        super().__init__()
        self.model, self.scheduler, self.model_kwargs = model, scheduler, model_kwargs
        # Flux-family pipelines hand the scheduler sigmas = linspace(1, 1/N, N) (`_LINEAR_SIGMAS_RULE`)
        self.pipeline_sigmas = bool(pipeline_sigmas) and not _config(scheduler).get("use_flow_sigmas")
        self.concat_dim = concat_dim_of(model, concat_dim)
        cfg = _config(scheduler)
        self.num_train_timesteps = int(cfg.get("num_train_timesteps", 1000))
        self.data_shape = _data_shape(model) or packed_shape(_config(model), model_kwargs)
        # dynamic shifting: steps ↦ μ, given or computed as the pipeline does from the latent tokens
        if mu_rule not in MU_RULES:
            raise ArgumentError(f"mu_rule: expected one of {', '.join(MU_RULES)}, got {mu_rule!r}")
        self._mu_tokens: int | None = None  # the latent tokens μ is computed from (the samples must have them)
        if cfg.get("use_dynamic_shifting") and mu is None:
            found = latent_tokens(_config(model), model_kwargs, self.data_shape)
            self._mu_tokens = image_seq_len if image_seq_len is not None else found
        self._tokens_checked: tuple[int, ...] | None = None  # the last batch shape found to have them
        self._mu_at = mu_function(cfg, mu, self._mu_tokens, mu_rule)
        self.mu = self._mu_at(None) if self._mu_at is not None else mu
        if cfg.get("use_flow_sigmas") and cfg.get("prediction_type") != "flow_prediction":
            raise ArgumentError(
                f"scheduler: {type(scheduler).__name__} has use_flow_sigmas with prediction_type "
                f"{cfg.get('prediction_type')!r}; a flow model predicts 'flow_prediction'"
            )
        scale, rev, neg = _SCHEDULER_FLOW_CONVENTIONS.get(
            type(scheduler).__name__, _FLOW_CONVENTIONS.get(base_class_name(model), (None, False, False))
        )
        if scale is None:  # Sana scales the pipeline's timestep by its config's timestep_scale
            scale = self.num_train_timesteps * float(_config(model).get("timestep_scale", 1.0) or 1.0)
        self.timestep_scale = float(scale if timestep_scale is None else timestep_scale)
        self.reverse_time = rev if reverse_time is None else bool(reverse_time)
        self.negate = neg if negate is None else bool(negate)
        integer = not _flow_match_family(scheduler)
        self.integer_timesteps = integer if integer_timesteps is None else bool(integer_timesteps)
        self.ancestral_split = "rf" if type(scheduler).__name__ in _RF_ANCESTRAL else None
        # FlowMatchEuler's `invert_sigmas`: its loop walks 1 − σ from the data up to the noise (an inversion,
        # `fs.invert` on the same grid); `fs.sample` refuses such a model rather than walk that grid down
        self.inverts = bool(cfg.get("invert_sigmas", False))
        # a flow map (AnyFlow): the network also takes the target time, and returns the average velocity
        self.flow_map = _FLOW_MAP_INPUT in (accepted_inputs(model) or ()) if isinstance(model, nn.Module) else False
        self._frame_timesteps = base_class_name(model) in _FRAME_TIMESTEPS
        self._knots = KnotTable()  # the scheduler's knots t -> its integer timestep
        self._repeated_ends: set[float] = set()  # last knots the scheduler steps to twice (`repeats_final`)
        known = accepted_inputs(model) if isinstance(model, nn.Module) else None
        # Flux-family transformers fail deep inside without their position tables: said at the first call
        self._missing_ids = [k for k in sorted(_POSITION_INPUTS) if known and k in known and k not in model_kwargs]
        self.metadata: dict = {}

    def add_noise_coefficients(self, t: float) -> tuple[float, float] | None:
        """Where the scheduler's `add_noise` puts data asked for at its knot t, as (a, b): the state
        a x0 + b ε. SA-Solver in flow mode keeps its VP `add_noise`, √ᾱ x0 + √(1 − ᾱ) ε with ᾱ of its β
        schedule at the knot's integer timestep, and its img2img reads that as the flow's sample at t.
        None: the path's own (1 − t) x0 + t ε (every other scheduler)."""
        if type(self.scheduler).__name__ != "SASolverScheduler":
            return None
        step = self._knots.get(float(t))
        abar = getattr(self.scheduler, "alphas_cumprod", None)
        if step is None or abar is None:
            return None
        level = float(abar[int(round(step))])
        return math.sqrt(level), math.sqrt(1.0 - level)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor | None = None, **cond) -> torch.Tensor:
        """v(x, t); for a flow-map model the average velocity over [r, t] (r = t: the instantaneous one)."""
        if self._mu_tokens is not None and x.shape != self._tokens_checked:
            self._check_tokens(tuple(x.shape))
        v = self._network(x, self._timestep(t), self._with_target(t, r, cond))
        return -v if self.negate else v

    def _check_tokens(self, shape: tuple[int, ...]) -> None:
        """Refuse samples whose latent tokens are not those the dynamic shift's μ was computed from (its
        pipeline computes μ from the latents it samples: another size has another schedule)."""
        n = sample_tokens(_config(self.model), shape)
        if n is not None and n != self._mu_tokens:
            raise ArgumentError(
                f"image_seq_len: the schedule's dynamic shift μ = {self.mu:.4f} is for {self._mu_tokens} latent "
                f"tokens, and these samples of shape {shape} have {n}; load the model with image_seq_len={n} "
                f"(or mu=) for this size"
            )
        self._tokens_checked = shape

    def _with_target(self, t: torch.Tensor, r: torch.Tensor | None, cond: dict) -> dict:
        """The inputs with a flow map's target timestep (r, or t without one); models that are not flow
        maps refuse r."""
        if self.flow_map:
            return {**cond, _FLOW_MAP_INPUT: self._timestep(t if r is None else r)}
        if r is not None:
            raise ArgumentTypeError(
                f"r: {base_class_name(self.model)} is not a flow-map model (its forward takes no {_FLOW_MAP_INPUT})"
            )
        return cond

    def scheduler_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The scheduler's timestep at flow time t (one per sample): t · num_train_timesteps, cast to an
        integer as multistep schedulers in flow mode cast theirs (`integer_timesteps`)."""
        steps = t * self.num_train_timesteps
        if self.integer_timesteps:
            value = _one_value(t)  # one time for the batch: a scheduler knot?
            known = self._knots.get(value, t.dtype) if value is not None else None
            if known is not None:
                steps = torch.full_like(t, known)
            else:
                steps = torch.floor(t.double() * self.num_train_timesteps + 1e-6).to(t.dtype)
        return steps

    def _timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The network's timestep input at flow time t (one per sample)."""
        n = self.num_train_timesteps
        steps = self.scheduler_timestep(t)
        if self.reverse_time:
            steps = n - steps
        return steps if self.timestep_scale == n else steps * (self.timestep_scale / n)

    def _network(self, x: torch.Tensor, timestep: torch.Tensor, cond: dict) -> torch.Tensor:
        missing = self._missing_ids
        if missing:
            raise ArgumentError(
                f"{missing[0]}: {type(self.model).__name__} needs its position ids ({', '.join(missing)}), one "
                f"table for the whole batch as its pipeline builds them; pass them to from_diffusers(..., "
                f"img_ids=..., txt_ids=...)"
            )
        inputs = model_inputs(self.model, self.model_kwargs, len(x), cond)
        if self._frame_timesteps:  # one (equal) timestep per frame
            timestep = timestep[:, None].expand(-1, x.shape[1])
            if _FLOW_MAP_INPUT in inputs:
                inputs[_FLOW_MAP_INPUT] = inputs[_FLOW_MAP_INPUT][:, None].expand(-1, x.shape[1])
        out = network_output(self.model, with_concat(x, inputs, self.concat_dim), timestep, **inputs)
        return out[:, : x.shape[1]].to(x.dtype)

    def schedule(self, steps: int, **kw: Any) -> torch.Tensor:
        """The scheduler's times (its `sigmas`) for `steps` steps, from 1 to 0; `kw` go to its
        `set_timesteps` (the model's `mu` unless given: with dynamic shifting, μ for this many steps)."""
        if self._mu_at is not None:
            kw.setdefault("mu", self._mu_at(steps))
        elif self.mu is not None:
            kw.setdefault("mu", self.mu)
        if self.pipeline_sigmas and "sigmas" not in kw and "timesteps" not in kw:
            import numpy as np

            kw["sigmas"] = np.linspace(1.0, 1 / steps, steps)  # the pipelines' own expression (_LINEAR_SIGMAS_RULE)
        points = type(self.scheduler).__name__ in _POINT_COUNTING_SCHEDULERS
        sched = scheduler_at(self.scheduler, steps + 1 if points else steps, **kw)
        sigmas = torch.as_tensor(sched.sigmas).double()
        if self.integer_timesteps:  # remember the timestep the scheduler gives each knot
            self._knots.learn(knot_timesteps(sched, sigmas))
        return _distinct_knots(sigmas, self._repeated_ends)  # Heun schedulers repeat their knots

    def repeats_final(self, t_end: float) -> bool:
        """Whether the scheduler ended the schedule whose last knot is t_end with a step to itself."""
        return _repeats_final(self, t_end)

    def field(self, guidance: float | None = None, uncond: dict | None = None, **kw):
        from ..fields import FlowMatching
        from ..fields.guiders import guided

        if guidance is None and kw:
            raise ArgumentError(f"guidance: {', '.join(sorted(kw))} need guidance=<scale>")
        v = self.velocity if guidance is None else guided(self.velocity, guidance, uncond, "velocity", **kw)
        field = FlowMatching(v, self.data_shape, self.schedule, flow_map=self.flow_map)
        # a multistep scheduler's flow-sigma schedule is made for every solver (not only Euler/Heun)
        field.schedule_for_every_solver = not _flow_match_family(self.scheduler)
        field.time_shift = self.time_shift()
        field.default_steps = _custom_default_steps(self.scheduler)
        return self._calibrated(field)

    def time_shift(self) -> Callable[[float], float]:
        """The scheduler's shift of a flow time, t ↦ shift(t): with dynamic shifting (`mu`; a μ that depends on
        the steps, Flux 2's, at its pipeline's default 50) Flux's
        e^μ/(e^μ + 1/t − 1) (or μ/(μ + 1/t − 1) for a linear `time_shift_type`), else s t/(1 + (s − 1) t)
        with its `shift` (FlowMatch schedulers) or `flow_shift` (multistep schedulers in flow mode)."""
        cfg = _config(self.scheduler)
        if cfg.get("use_dynamic_shifting") and self.mu is not None:
            m = math.exp(self.mu) if cfg.get("time_shift_type", "exponential") == "exponential" else self.mu
            return lambda t: t if t <= 0 or t >= 1 else m / (m + (1 / t - 1))
        s = float(cfg.get("shift", cfg.get("flow_shift", 1.0)) or 1.0)
        return lambda t: t if t <= 0 or t >= 1 else s * t / (1 + (s - 1) * t)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.velocity(x, t, **cond)

    def as_denoiser(self) -> "FlowDenoiser":
        """The same model as an EDM denoiser D(x̃; σ̃) (x̃ = x_t/α_t at the t whose VE level is σ̃): a
        teacher for Score GANs and learned-ρ sampling, which take data scores (one PF-ODE, Eq. 8)."""
        return FlowDenoiser(self)

    def ve_time(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, α_t) where the VE level t/(1 − t) equals sigma."""
        t = sigma / (1 + sigma)
        return t, 1 - t

    def data_prediction(self, xt: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """D = x_t − t v."""
        return xt - t * v


class DiffusersTrigFlow(DiffusersFlow):
    """A diffusers TrigFlow model (sCM; Lu & Song 2024) with its `SCMScheduler`: a network F with
    dx/dt = σ_d F(x/σ_d, t · timestep_scale) on x_t = cos(t) x_0 + σ_d sin(t) ε, t from π/2 to 0.
    `field()` is a `fields.TrigFlow` whose default grid is the scheduler's schedule (uniform in t from
    its 1.5708, SCMScheduler's 1.3 intermediate time for two steps), so
    `fs.sample(m.field(), "consistency", nfe=N)` is the scheduler's multistep loop and `ddim` with one
    step its one-step sample; every other solver runs on the same field (its probability-flow ODE)."""

    def __init__(self, model: nn.Module, scheduler, timestep_scale: float = 1.0, **model_kwargs) -> None:
        super().__init__(model, scheduler, **model_kwargs)
        cfg = _config(scheduler)
        if cfg.get("prediction_type", "trigflow") != "trigflow":
            raise ArgumentError(f"scheduler: expected prediction_type 'trigflow', got {cfg.get('prediction_type')!r}")
        self.sigma_data = float(cfg.get("sigma_data", 0.5))
        self.timestep_scale = float(timestep_scale)
        self.integer_timesteps = False  # SCMScheduler's times are continuous (its velocity is its own)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor | None = None, **cond) -> torch.Tensor:
        cond = self._with_target(t, r, cond)
        return self.sigma_data * self._network(x / self.sigma_data, t * self.timestep_scale, cond)

    def schedule(self, steps: int, **kw: Any) -> torch.Tensor:
        """SCMScheduler's times for `steps` steps: linspace(1.5708, 0), or (1.5708, 1.3, 0) for two;
        `kw` go to its `set_timesteps`."""
        kw.setdefault("intermediate_timesteps", 1.3 if steps == 2 else None)
        sched = scheduler_at(self.scheduler, steps, **kw)
        return sched.timesteps.double()

    def field(self, guidance: float | None = None, uncond: dict | None = None, **kw):
        from ..fields import TrigFlow
        from ..fields.guiders import guided

        if guidance is None and kw:
            raise ArgumentError(f"guidance: {', '.join(sorted(kw))} need guidance=<scale>")
        if guidance is not None and (kw.get("rescale") or kw.get("apg") or kw.get("interval")):
            raise ArgumentError("guidance: rescale, apg and interval are for denoisers and flow-matching velocities")
        v = self.velocity if guidance is None else guided(self.velocity, guidance, uncond, **kw)
        first = float(self.schedule(2)[0])
        return self._calibrated(TrigFlow(v, self.data_shape, self.schedule, sigma_data=self.sigma_data, t_max=first))

    def ve_time(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, α_t) where the VE level σ_d tan t equals sigma."""
        t = torch.atan(sigma / self.sigma_data)
        return t, torch.cos(t)

    def data_prediction(self, xt: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """D = cos(t) x_t − sin(t) v."""
        return torch.cos(t) * xt - torch.sin(t) * v


class DiffusersAngle(DiffusersTrigFlow):
    """A v-prediction model on the angle (cosine) schedule with diffusers' `IPNDMScheduler` (Crowson's
    v-diffusion; Dance Diffusion): x_θ = cos θ x_0 + sin θ ε, the network sees the timestep 2θ/π and
    predicts v = cos θ ε − sin θ x_0 = dx/dθ. That is TrigFlow with σ_d = 1 (`fields.TrigFlow`, θ from
    π/2 to 0), so every solver runs on it; the default grid is the scheduler's knots θ_i = atan2(β_i, α_i)
    (β_i = sin²(π s_i/2), s_i uniform from 1 to 0). The scheduler's own loop (Adams–Bashforth on ε with
    uniform coefficients, then DDIM) drops the network's output on its first step, where α = 0, so no
    solver reproduces it to round-off; `ipndm`-type loops on this field solve the same ODE."""

    def __init__(self, model: nn.Module, scheduler, **model_kwargs) -> None:
        if _config(scheduler).get("trained_betas") is not None:
            raise ArgumentError(
                "scheduler: IPNDMScheduler with trained_betas has a fixed-length schedule that set_timesteps "
                "does not size; use its default angle schedule"
            )
        super().__init__(model, scheduler, timestep_scale=2.0 / math.pi, **model_kwargs)
        self.sigma_data = 1.0

    def schedule(self, steps: int, **kw: Any) -> torch.Tensor:
        """IPNDMScheduler's angles for `steps` steps (its timesteps · π/2), then θ = 0 (the data);
        `kw` go to its `set_timesteps`."""
        sched = scheduler_at(self.scheduler, steps, **kw)
        theta = torch.as_tensor(sched.timesteps, dtype=torch.float64) * (math.pi / 2)
        return torch.cat([theta.clamp(max=math.pi / 2), torch.zeros(1, dtype=torch.float64)])

    def field(self, guidance: float | None = None, uncond: dict | None = None, **kw):
        field = super().field(guidance, uncond, **kw)
        field.schedule_for_every_solver = True  # the scheduler's angles are every solver's default grid
        return field


class FlowDenoiser(Denoiser):
    """D(x̃; σ̃) of a flow model on its Gaussian path (flow matching, TrigFlow): the time t with VE
    level σ̃, x_t = α_t x̃, and the model's data prediction from its velocity there (flow matching:
    t = σ̃/(1 + σ̃), D = x_t − t v)."""

    def __init__(self, flow: DiffusersFlow) -> None:
        super().__init__()
        self.flow = flow
        self.data_shape = flow.data_shape
        self.sigma_min, self.sigma_max = 1e-3, 1e3

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        t, alpha = self.flow.ve_time(sigma)
        col = (-1, *([1] * (x.dim() - 1)))
        xt = alpha.reshape(col).to(x.dtype) * x
        t = t.to(x.dtype)
        return self.flow.data_prediction(xt, self.flow.velocity(xt, t, **cond), t.reshape(col))


class DiffusersDenoiser(Rescheduling, LatentDecoding, Denoiser):
    """D(x; σ) from a diffusers UNet2DModel / UNet2DConditionModel and its scheduler.

    `model_kwargs` are passed to every model call (e.g. `encoder_hidden_states=` for a
    UNet2DConditionModel; tensors with batch 1 are broadcast to the batch). Where the scheduler's
    `prediction_type` is wrong for the weights, pass `prediction_type=`.

    A σ between the training timesteps maps to a fractional timestep (log-σ interpolation). With
    `integer_timesteps` the network sees the nearest timestep in log σ (k-diffusion's `quantize=True`),
    and exactly the scheduler's own timestep on the knots of its schedule. By default this holds
    for the DPM-Solver, UniPC, DEIS and SA-Solver schedulers whose σ's are Karras, Lu, exponential
    or beta spaced: they cast their timesteps to integers.
    """

    def __init__(
        self,
        model: nn.Module,
        scheduler,
        prediction_type: str | None = None,
        clip_sample: bool | None = None,
        integer_timesteps: bool | None = None,
        concat_dim: int | None = None,
        **model_kwargs,
    ) -> None:
        super().__init__()
        if not callable(model):
            raise ArgumentTypeError(f"model: expected a diffusers model, got {type(model).__name__}")
        if scheduler is None:
            raise ArgumentError(
                "scheduler: a diffusers scheduler (or its config) is needed to know the noise schedule "
                "of the model; got None"
            )
        self.model = model
        self.model_kwargs = model_kwargs
        self.concat_dim = concat_dim_of(model, concat_dim)
        cfg = _config(scheduler)
        # score-SDE VE models (NCSN++, ScoreSdeVeScheduler) are called at σ itself and return the score
        ve_score = type(scheduler).__name__ == "ScoreSdeVeScheduler"
        self.prediction_type = prediction_type or ("score" if ve_score else cfg.get("prediction_type", "epsilon"))
        if self.prediction_type not in PREDICTION_TYPES:
            raise ArgumentError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        self.scheduler_class = type(scheduler).__name__
        self.scheduler = scheduler
        # DDPM/DDIM schedulers clip the predicted x_0 to [−range, range] when `clip_sample` is set;
        # Euler with the clipped D is then still exactly their η = 0 update
        # (only schedulers whose code applies the option honour it: configs carry stale keys across
        # classes, and CogVideoX's DDIM / DPM and TCD take `clip_sample` without ever clipping)
        own = bool(cfg.get("clip_sample", False)) and _applies(type(scheduler), "clip_sample")  # type: ignore[arg-type]
        self.clip_sample = own if clip_sample is None else bool(clip_sample)
        self.clip_range = float(cfg.get("clip_sample_range", 1.0))
        # Imagen's dynamic thresholding of the predicted x_0 (DDIM, DDPM, DPM-Solver, UniPC, DEIS):
        # clamp to the per-sample `ratio` quantile s of |x_0| (s within [1, sample_max_value]), divide by s
        self.thresholding = bool(cfg.get("thresholding", False)) and _applies(type(scheduler), "thresholding")  # type: ignore[arg-type]
        self.threshold_ratio = float(cfg.get("dynamic_thresholding_ratio", 0.995))
        self.threshold_max = float(cfg.get("sample_max_value", 1.0))
        # latent consistency models (LCMScheduler): D = c_skip(t) x_t + c_out(t) x̂_0, EDM's boundary
        # scalings at the scaled timestep s t (σ_data = 0.5), x_t the model's VP input
        is_lcm = type(scheduler).__name__ == "LCMScheduler"
        self.lcm_scaling = float(cfg.get("timestep_scaling", 10.0)) if is_lcm else None
        alphas = getattr(scheduler, "alphas_cumprod", None)
        self.zero_terminal_snr = False
        # EulerDiscrete's "continuous" v-prediction models (EDM-trained VP-scaled ones, e.g. CosXL) take
        # the timestep 0.25 log σ, as EDM's c_noise, with the discrete schedule's input scaling
        self.continuous_time = cfg.get("timestep_type") == "continuous" and cfg.get("prediction_type") == "v_prediction"
        if alphas is not None and not type(scheduler).__name__.startswith("EDM"):
            self.schedule = "discrete"
            a = torch.as_tensor(alphas, dtype=torch.float64)
            # schedulers that keep a zero terminal SNR (DDIM, DDPM, ...; Lin et al. 2024) start from pure
            # noise: their top knot is λ = −∞ (`pure_noise_at`), as a flow's t = 1
            self.zero_terminal_snr = bool(a[-1] == 0)
            # zero-SNR schedules end at ᾱ = 0, which the schedulers replace by 2⁻²⁴; the ᾱ's just before it
            # that fall below are raised to it (a plateau whose top is the last timestep), so that σ is
            # monotone in t. Schedules that stay above 0 (cosine: ᾱ_T ≈ 2.4e-9, σ_max ≈ 2e4) keep theirs.
            a = torch.where(a > 0, a, torch.full_like(a, 2.0**-24))
            a = torch.flip(torch.cummax(torch.flip(a, [0]), 0).values, [0])
            self.log_sigmas = ((1 - a) / a).sqrt().log()  # increasing in t
            self.sigma_min = float(self.log_sigmas[0].exp())
            self.sigma_max = float(self.log_sigmas[-1].exp())
            if self.continuous_time and cfg.get("sigma_min") is not None and cfg.get("sigma_max") is not None:
                self.sigma_min, self.sigma_max = float(cfg["sigma_min"]), float(cfg["sigma_max"])
        elif type(scheduler).__name__ == "DDPMWuerstchenScheduler":
            # Würstchen / Stable Cascade: ᾱ(t) a cosine in the continuous time t ∈ [0, 1] (optionally
            # warped by `scaler`), clamped to [1e-4, 0.9999]; the network takes t itself
            # (`timestep_ratio`), VP input scaling as for the discrete schedules
            self.schedule = "ratio"
            ends = scheduler._alpha_cumprod(torch.tensor([0.0, 1.0]), "cpu").double()
            self.sigma_min, self.sigma_max = (float(((1 - a) / a).sqrt()) for a in ends)
        elif type(scheduler).__name__ == "CMStochasticIterativeScheduler":
            # Song et al. 2023's consistency models: EDM input scaling, c_noise = 250 log σ, and the
            # boundary condition D = c_skip x + c_out F with c_skip = σ_d²/((σ − ε)² + σ_d²),
            # c_out = (σ − ε) σ_d/√(σ² + σ_d²), ε = σ_min; the scheduler clamps D to [−1, 1]
            self.schedule = "cm"
            self.sigma_data = float(cfg.get("sigma_data", 0.5))
            self.sigma_min, self.sigma_max = float(cfg.get("sigma_min", 0.002)), float(cfg.get("sigma_max", 80.0))
            if clip_sample is None:
                self.clip_sample, self.clip_range = bool(cfg.get("clip_denoised", True)), 1.0
        elif ve_score:
            self.schedule = "ve"  # x = x_0 + σ ε, the network sees x and σ (Song et al. 2021's VE SDE)
            self.sigma_min, self.sigma_max = float(cfg.get("sigma_min", 0.01)), float(cfg.get("sigma_max", 1348.0))
            if self.prediction_type == "v_prediction":
                raise ArgumentError("prediction_type: a VE score model predicts 'score', 'epsilon' or 'sample', not v")
        elif "sigma_data" in cfg:
            self.schedule = "edm"
            self.sigma_data = float(cfg["sigma_data"])
            self.sigma_min, self.sigma_max = float(cfg.get("sigma_min", 0.002)), float(cfg.get("sigma_max", 80.0))
        else:
            raise ArgumentError(
                f"scheduler: {type(scheduler).__name__} has neither `alphas_cumprod` (a discrete "
                f"DDPM-style schedule) nor `sigma_data` (an EDM-style one); cannot map σ to its timesteps"
            )
        mcfg = _config(model)
        self.data_shape = _data_shape(model)
        if base_class_name(model).startswith("DiT") and isinstance(mcfg.get("num_embeds_ada_norm"), int):
            k = mcfg["num_embeds_ada_norm"]  # DiT's label table has a null row at index K (DiTPipeline)
            self.conditioning = {"class_labels": {"classes": k, "null": k}}
        self.channels = mcfg.get("in_channels")
        # IDDPM-style models (DeepFloyd IF, DiT, PixArt) also output their variance: out = 2 × in channels
        out_ch = mcfg.get("out_channels")
        self.learned_variance = (
            isinstance(out_ch, int) and isinstance(self.channels, int) and out_ch == 2 * self.channels
        )
        self.variance_type: str | None = (
            cfg.get("variance_type") if type(scheduler).__name__ in _DDPM_SCHEDULERS else None
        )
        self.variance_output: torch.Tensor | None = None
        self.unclipped_output: torch.Tensor | None = None  # D before clipping / thresholding (last call)
        self._knot_cache: dict[tuple[float, torch.dtype], torch.Tensor] = {}  # σ knot -> timestep (CPU)
        # schedulers that cast the timesteps of their non-uniform σ's to integers (rounded or truncated)
        spaced = any(
            cfg.get(k) for k in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas")
        )
        casts = type(scheduler).__name__ in _INTEGER_TIMESTEP_SCHEDULERS and spaced and self.schedule == "discrete"
        self.integer_timesteps = casts if integer_timesteps is None else bool(integer_timesteps)
        if self.integer_timesteps and self.schedule != "discrete":
            raise ArgumentError(
                f"integer_timesteps: only discrete DDPM-style schedules have timesteps, not {self.schedule!r}"
            )
        self._knots = KnotTable()  # the scheduler's σ knots -> its timestep
        self._repeated_ends: set[float] = set()  # last knots the scheduler steps to twice (`repeats_final`)

    # -- schedule ----------------------------------------------------------------------------
    @property
    def steps_between_knots(self) -> bool:
        """Whether the scheduler steps from timestep t to t − T//N and reads the result at its next
        timestep (DDIM-type schedulers: `landing_sigma`)."""
        return self.scheduler_class in _LANDING_SCHEDULERS and self.schedule == "discrete"

    def landing_sigma(self, sigma: float, steps: int) -> float | None:
        """The σ where a DDIM-type scheduler's step from its knot σ lands: σ at t − T//N (its
        `prev_timestep`, T training timesteps, N = `steps`) for the knot's timestep t; None where the
        step goes to the schedule's final level, or the model's scheduler is not DDIM's. Where t − T//N
        is not the next timestep ("linspace" spacing, or "trailing" where N does not divide T), the
        scheduler lands between its knots and reads the result as the sample at the next one."""
        if not self.steps_between_knots:
            return None
        t = self._knots.get(float(sigma))
        if t is None:  # a DDIM knot is the level of an integer timestep
            t = float(self._timesteps(torch.tensor([float(sigma)], dtype=torch.float64))[0])
        prev = int(round(t)) - len(self.log_sigmas) // int(steps)
        return float(self.log_sigmas[prev].exp()) if prev >= 0 else None

    def add_noise_coefficients(self, sigma: float) -> tuple[float, float] | None:
        """Where the scheduler's `add_noise` puts data asked for at its knot σ (img2img's start, the
        inpaint pipeline's blend), as (a, b): the state a x0 + b ε in the field's (VE) coordinates.
        SA-Solver reads ᾱ at the knot's integer timestep, whose level is not the knot's where its σ's
        are Karras, exponential or beta spaced; the state is then read as the sample at the knot.
        At a zero-terminal-SNR schedule's top knot (`pure_noise_at`), `add_noise` gives the noise alone:
        (0, √(1 + σ²)). None: the knot's own level (every other scheduler)."""
        if self.pure_noise_at(sigma):
            return 0.0, math.sqrt(1.0 + float(sigma) ** 2)
        if self.scheduler_class != "SASolverScheduler" or self.schedule != "discrete":
            return None
        t = self._knots.get(float(sigma))
        if t is None:
            return None
        level = float(self.log_sigmas[int(round(t))].exp())
        if abs(level - float(sigma)) <= 1e-9 * float(sigma):
            return None
        scale = vp_reread(level, float(sigma))
        return scale, scale * level

    def img2img_start_coefficients(self, grid: torch.Tensor, begin: int) -> tuple[float, float] | None:
        """Where the scheduler's img2img pipeline puts the data when it walks `grid` (the scheduler's
        own) from knot `begin`, as (a, b): the state a x0 + b ε read at that knot; None: the knot's own
        level. PNDMScheduler in PLMS mode lists its second timestep twice, so the pipelines' cut at
        t_start ≥ 2 starts one knot higher, at grid[begin − 1] (and skips a knot after its first step:
        `plms`). Applies to the solver the scheduler names (`plms`) only."""
        skips_prk = bool(getattr(getattr(self.scheduler, "config", None), "skip_prk_steps", False))
        if self.scheduler_class != "PNDMScheduler" or begin < 1 or self.schedule != "discrete":
            return None
        if skips_prk:
            if begin < 2:
                return None
            level = float(grid[begin - 1])
        else:  # Runge–Kutta mode: the list's entry t_start, a knot or a midpoint k + ⌊δ/2⌋ (`pndm`)
            listed = self.pndm_timesteps(grid)
            if listed is None:
                return None
            level = float(self.sigma(torch.tensor(listed[begin])))
        scale = vp_reread(level, float(grid[begin]))
        return scale, scale * level

    def pndm_timesteps(self, grid: torch.Tensor) -> list[int] | None:
        """PNDMScheduler's whole list of timesteps for its own schedule `grid` (set on a copy of the
        scheduler; with a last step that moves nothing the grid holds one knot fewer), or None where no
        step count gives the grid's knots."""
        knots = [round(float(k)) for k in self.timestep(grid[:-1].double())] if len(grid) > 1 else []
        for steps in (len(grid) - 1, len(grid)):
            sched = copy.deepcopy(self.scheduler)
            sched.set_timesteps(steps)
            if [int(k) for k in sched._timesteps[::-1]][: len(knots)] == knots:  # its knots, highest first
                return [int(k) for k in sched.timesteps]
        return None

    def repaint_betas(self, sigma: float, stride: int) -> list[float] | None:
        """RePaintScheduler's `undo_step` from its knot at σ: the β's of the `stride` (T/N) one-timestep
        transitions it applies, from the knot's timestep t up (β_t, ..., β_{t+stride−1}); None where the
        model's scheduler is not RePaint's or σ is not the level of an integer timestep."""
        if self.scheduler_class != "RePaintScheduler" or self.schedule != "discrete":
            return None
        t = float(self._timesteps(torch.tensor([float(sigma)], dtype=torch.float64))[0])
        if abs(t - round(t)) > 1e-6 or round(t) + stride > len(self.log_sigmas):
            return None
        return self.scheduler.betas[round(t) : round(t) + stride].double().tolist()  # the scheduler's own

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The model's (fractional) timestep for σ: log-σ interpolation between the discrete
        knots, clamped to [0, T − 1]; σ on a knot gives its integer timestep exactly."""
        if self.schedule == "edm":  # the scheduler's c_noise: EDM's ¼ ln σ, Stable Audio's 2 atan(σ)/π
            precondition = getattr(self.scheduler, "precondition_noise", None)
            return precondition(sigma) if callable(precondition) else 0.25 * sigma.log()
        if self.continuous_time:
            return 0.25 * sigma.log()
        if self.schedule == "cm":
            return 250.0 * (sigma + 1e-44).log()
        if self.schedule == "ve":
            return sigma
        if sigma.dim() == 1 and len(sigma) > 1 and sigma.stride(0) == 0 and sigma.device.type != "cpu":
            return self._timesteps(sigma[:1]).expand(len(sigma))  # reading the value would wait for the device
        value = _one_value(sigma) if sigma.dim() == 1 and len(sigma) > 1 else None
        if value is not None and not BETWEEN_KNOTS.get():  # one σ for the batch: a solver's knot (guidance's too)
            key = (value, sigma.dtype)  # a solver visits the same knots on every batch: remember them
            if key not in self._knot_cache:
                if len(self._knot_cache) > 4096:
                    self._knot_cache.clear()
                own = self._knots.get(value, sigma.dtype)  # a scheduler knot: its own timestep
                self._knot_cache[key] = (
                    torch.full((1,), own, dtype=sigma.dtype) if own is not None else self._timesteps(sigma[:1])
                )
            return self._knot_cache[key].expand(len(sigma))
        return self._timesteps(sigma)

    def _learn_knots(self, knots: dict[float, float]) -> None:
        """Remember a scheduler's knots and their timesteps; what was looked up before is stale."""
        self._knots.learn(knots)
        self._knot_cache.clear()

    def _timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.schedule == "ratio":
            return self._ratio(sigma)
        ls = self.log_sigmas.to(sigma.device)
        q = sigma.double().log().clamp(ls[0], ls[-1])
        hi = torch.searchsorted(ls, q).clamp(1, len(ls) - 1)
        lo = hi - 1
        t = lo + (q - ls[lo]) / (ls[hi] - ls[lo])
        # zero-terminal-SNR schedules end on a plateau (ᾱ clamped to 2⁻²⁴): its top is the last timestep,
        # also where σ_max rounded to float32 falls just below it (4096 − 2⁻¹³ rounds down)
        t = torch.where(q >= ls[-1] - 1e-6, torch.full_like(t, len(ls) - 1), t)
        near = (t - t.round()).abs() < 1e-4
        if self.integer_timesteps:  # the nearest knot in log σ
            return t.round().to(sigma.dtype)
        return torch.where(near, t.round(), t).to(sigma.dtype)

    def _ratio(self, sigma: torch.Tensor) -> torch.Tensor:
        """Würstchen's time t for σ: the inverse of ᾱ(t) = cos²((t′ + s)/(1 + s) · π/2) / cos²(s/(1 + s) · π/2),
        t′ = t warped by `scaler`; clamped to [0, 1] (where the scheduler clamps ᾱ)."""
        off, scaler = float(self.scheduler.config.s), float(self.scheduler.config.scaler)
        abar = 1.0 / (1.0 + sigma.double() ** 2)
        first = math.cos(off / (1 + off) * math.pi / 2) ** 2
        t = (torch.acos((abar * first).clamp(0.0, 1.0).sqrt()) * 2 / math.pi * (1 + off) - off).clamp(0.0, 1.0)
        if scaler > 1:
            t = 1 - (1 - t) ** (1 / scaler)
        elif scaler < 1:
            t = t ** (1 / scaler)
        return t.to(sigma.dtype)

    def prior_std_at(self, sigma: float) -> float:
        """The spread of x = x_t/√ᾱ where the scheduler starts: x_T ~ N(0, I) gives √(1 + σ²) (VP
        schedulers: DDIM, DDPM, DPM-Solver); VE-type schedulers (Euler, Heun, ...) start from their
        init_noise_sigma: σ for "linspace" / "trailing" spacing, √(σ² + 1) otherwise; EDM-style
        schedulers from √(σ_max² + 1) too."""
        sigma = float(sigma)
        vp = (1.0 + sigma**2) ** 0.5
        if self.schedule == "edm":  # EDMEuler / EDM-DPM start from √(σ_max² + 1) (their init_noise_sigma)
            return vp
        if float(getattr(self.scheduler, "init_noise_sigma", 1.0)) <= 1.0 + 1e-6:
            return vp
        spacing = _config(self.scheduler).get("timestep_spacing", "linspace")
        return sigma if spacing in ("linspace", "trailing") else vp

    def scheduler_grid(self, steps: int, **kw: Any) -> torch.Tensor:
        """The scheduler's own σ-grid for `steps` steps: its `sigmas` (Euler, Heun, DPM, EDM-style
        schedulers, ending in 0) or its `timesteps` mapped to σ (DDIM, DDPM, PNDM), then the final σ.
        `kw` go to its `set_timesteps` (LCM's and TCD's `strength`: their img2img pipelines' schedule)."""
        sched = scheduler_at(self.scheduler, steps, **kw)
        if self.schedule == "cm":  # its Karras knots, then the data (its last step returns D)
            knots = torch.as_tensor(sched.sigmas, dtype=torch.float64)[:-1]
            return torch.cat([knots, torch.zeros(1, dtype=torch.float64)])
        if self.schedule == "ratio":  # Würstchen: t from 1 to 0; its last knot is σ(0) > 0 (ᾱ = 0.9999)
            abar = sched._alpha_cumprod(sched.timesteps, "cpu").double()
            sig = ((1 - abar) / abar).sqrt()
            self._learn_knots(knot_timesteps(sched, sig))
            return _distinct_knots(sig)
        if self.schedule == "ve":  # ScoreSdeVe: geometric σ from σ_max to σ_min, then the data
            sched.set_sigmas(steps)
            return torch.cat([torch.as_tensor(sched.sigmas, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
        sig = getattr(sched, "sigmas", None)
        if isinstance(sig, torch.Tensor) and sig.dim() == 1 and len(sig) > 1:
            if self.schedule == "discrete" and not self.continuous_time:
                self._learn_knots(knot_timesteps(sched, sig.double()))
            return _distinct_knots(torch.as_tensor(sig, dtype=torch.float64), self._repeated_ends)
        # where the scheduler's walk ends (DDIM: final_alpha_cumprod) or, for an inverse one, starts
        final = float(getattr(sched, "final_alpha_cumprod", getattr(sched, "initial_alpha_cumprod", torch.tensor(1.0))))
        if type(sched).__name__ == "TCDScheduler":  # its last step lands on timestep 0, not on the data
            final = float(sched.alphas_cumprod[0])
        steps_at = sched.timesteps
        if type(sched).__name__ == "PNDMScheduler":  # its Runge-Kutta / PLMS stages revisit its knots
            steps_at = torch.as_tensor(sched._timesteps.copy()).flip(0)
        if type(sched).__name__ == "RePaintScheduler":  # its walk goes back up; its knots, descending
            steps_at = torch.unique(torch.as_tensor(sched.timesteps)).flip(0)
        final_sigma = ((1 - final) / final) ** 0.5 if final < 1 else 0.0
        if len(steps_at) > 1 and bool(steps_at[0] < steps_at[-1]):
            # an inverse scheduler (DDIMInverse) walks up from its initial level: in sampling order, its
            # knots then that level (0 where `set_alpha_to_one`); a start on its first knot is a step from
            # that knot to itself, noted as a repeated end (it moves x only by clipping x̂_0 there)
            knots = self.sigma(steps_at).flip(0)
            if final_sigma < float(knots[-1]) * (1 - 1e-9):
                return torch.cat([knots, torch.tensor([final_sigma], dtype=torch.float64)])
            self._repeated_ends.add(float(knots[-1]))
            return knots
        return _distinct_knots(self.ddim_grid(steps_at, final_sigma))

    def repeats_final(self, sigma_end: float) -> bool:
        """Whether the scheduler ended the schedule whose last σ is sigma_end with a step to itself."""
        return _repeats_final(self, sigma_end)

    def field(self, **kw):
        """`fields.EDM` on this denoiser whose default grid is the scheduler's own schedule, so
        `fs.sample(m.field(), "euler", nfe=N)` is the scheduler's DDIM/Euler loop with N steps."""
        kw.setdefault("schedule", self.scheduler_grid)
        kw.setdefault("sigma_max", self.sigma_max)
        field = super().field(**kw)
        field.default_steps = _custom_default_steps(self.scheduler)
        return field

    def _pure_noise_level(self) -> float:
        """σ_max to float32 rounding: the top of the clamped plateau, which stands for ᾱ = 0."""
        return self.sigma_max * (1.0 - 1e-6)

    def pure_noise_at(self, sigma: float) -> bool:
        """Whether σ is the top knot of a schedule whose scheduler keeps ᾱ_T = 0 (zero terminal SNR,
        Lin et al. 2024: DDIM, DDPM; Euler and DPM-Solver clamp it to 2⁻²⁴ instead). There the state
        x = √(1 + σ²) x_T is pure noise, and the path solvers take the knot as λ = −∞ (`PathGrid`),
        so DDIM's and DDPM's first step is theirs exactly."""
        return self.zero_terminal_snr and float(sigma) >= self._pure_noise_level()

    def sigma(self, timesteps) -> torch.Tensor:
        """σ at (integer or fractional) timesteps of a discrete schedule (float64)."""
        if self.schedule != "discrete":
            raise ArgumentError("timesteps: only discrete DDPM-style schedules have timesteps; this model is EDM-style")
        t = torch.as_tensor(timesteps, dtype=torch.float64).clamp(0, len(self.log_sigmas) - 1)
        lo = t.floor().long().clamp(max=len(self.log_sigmas) - 2)
        w = t - lo
        return (self.log_sigmas[lo] * (1 - w) + self.log_sigmas[lo + 1] * w).exp()

    def ddim_grid(self, timesteps, final_sigma: float = 0.0) -> torch.Tensor:
        """The σ-grid that reproduces a DDIM/DDPM-style scheduler's `timesteps` (then `final_sigma`,
        0 when the scheduler's final ᾱ is 1). A final σ equal to the last knot (DDIM with
        set_alpha_to_one=False and "leading" spacing, whose last step is the identity) is not repeated."""
        knots = self.sigma(timesteps)
        if abs(float(final_sigma) - float(knots[-1])) <= 1e-9 * max(1.0, float(knots[-1])):
            if float(knots[-1]) > 0:  # the scheduler's last step goes from this σ to itself (`repeats_final`)
                self._repeated_ends.add(float(knots[-1]))
            return knots
        return torch.cat([knots, torch.tensor([float(final_sigma)], dtype=torch.float64)])

    # -- D(x; σ) -----------------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        return self.finish_denoised(self._denoise(x, sigma, cond), x, sigma)

    def denoise_raw(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        """D before `finish_denoised`: what guidance combines (diffusers clips and thresholds the
        guided x_0, not each branch's)."""
        return self._denoise(x, sigma, cond)

    def finish_denoised(self, d: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The scheduler's post-processing of a data prediction: dynamic thresholding or clipping, then
        LCM's boundary condition. Where it clips or thresholds, the prediction before it is kept as
        `unclipped_output` (DDIM's step moves along the ε of the unclipped prediction: `solvers.ddim`)."""
        self.unclipped_output = d.detach() if (self.thresholding or self.clip_sample) else None
        if self.thresholding:  # as the schedulers do: thresholding first, clipping otherwise
            d = _dynamic_threshold(d, self.threshold_ratio, self.threshold_max)
        elif self.clip_sample:
            d = d.clamp(-self.clip_range, self.clip_range)
        if self.lcm_scaling is not None:  # the consistency boundary condition (Luo et al. 2023)
            col = sigma.reshape(-1, *([1] * (x.dim() - 1)))
            st = (self.timestep(sigma).to(x.dtype) * self.lcm_scaling).reshape(col.shape)
            c_skip, c_out = 0.25 / (st**2 + 0.25), st * (st**2 + 0.25).rsqrt()
            d = c_skip * (1 + col**2).rsqrt() * x + c_out * d
        return d

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        return self.from_native(x, sigma, self.native_prediction(x, sigma, **(cond or {})))

    def _c_in(self, col: torch.Tensor) -> torch.Tensor:
        """The scaling of the network's input at noise level σ (a column)."""
        if self.schedule in ("discrete", "ratio"):
            return (1 + col**2).rsqrt()
        if self.schedule == "ve":
            return torch.ones_like(col)
        return (col**2 + self.sigma_data**2).rsqrt()

    def native_prediction(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        """The network's output at (x, σ) as its scheduler reads it: ε, v, x_0 or the score, by
        `prediction_type` (the `noise_pred` that diffusers' pipelines and guiders combine)."""
        col = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        inputs = model_inputs(self.model, self.model_kwargs, len(x), cond)
        net_input = with_concat(self._c_in(col) * x, inputs, self.concat_dim)
        full = network_output(self.model, net_input, self.timestep(sigma), **inputs)
        if self.learned_variance:  # the variance channels of this call, for the `ddpm` solver (IDDPM)
            self.variance_output = full[:, x.shape[1] :].to(x.dtype).detach()
        return full[:, : x.shape[1]].to(x.dtype)

    def _native_coefficients(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[Any, Any]:
        """(a, b) with D(x; σ) = a x + b · out for the network's native prediction `out` (a None: 1),
        as columns for the batch's σ's: the one place the prediction types are converted."""
        col = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        c_in = self._c_in(col)
        p = self.prediction_type
        if self.schedule == "cm":  # the consistency boundary condition
            sd, lo = self.sigma_data, self.sigma_min
            return sd**2 / ((col - lo) ** 2 + sd**2), (col - lo) * sd * (col**2 + sd**2).rsqrt()
        if p == "sample":
            return 0.0, 1.0
        if p == "score":  # Tweedie: D = x + σ² ∇log p_σ(x) in the VE variable (c_in x for VP schedules)
            return None, col**2 * c_in
        if self.schedule == "ve" or p == "epsilon" and self.schedule in ("discrete", "ratio"):
            return None, -col  # ε prediction of x = x_0 + σ ε (a VE score model's v is refused at construction)
        if self.schedule in ("discrete", "ratio"):  # v = √ᾱ ε − √(1−ᾱ) x_0
            a, b = c_in**2, -col * c_in
            if self.zero_terminal_snr:  # at ᾱ = 0 exactly: x_0 = −v (the clamped ᾱ would leave 2⁻¹² x_vp)
                top = col >= self._pure_noise_level()
                a, b = torch.where(top, 0.0, a), torch.where(top, -1.0, b)
            return a, b
        sd = self.sigma_data
        c_out = col * sd * (col**2 + sd**2).rsqrt()
        return sd**2 / (col**2 + sd**2), (c_out if p == "epsilon" else -c_out)

    def from_native(self, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """D(x; σ) from the network's native prediction `out` (before `finish_denoised`)."""
        if self.prediction_type == "sample" and self.schedule != "cm":
            return out
        a, b = self._native_coefficients(x, sigma)
        return (x if a is None else a * x) + b * out

    def to_native(self, x: torch.Tensor, sigma: torch.Tensor, d: torch.Tensor) -> torch.Tensor | None:
        """The network output that `from_native` turns into D (its inverse): what diffusers' pipelines
        call noise_pred, e.g. for guidance rescale; None for consistency models (no inverse at σ_min)."""
        if self.schedule == "cm":
            return None
        a, b = self._native_coefficients(x, sigma)
        return (d - (x if a is None else a * x)) / b

    def noise_at(self, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The noise ε̂ that the network's output `out` says x holds when read at level σ (what DDIM's
        step calls pred_epsilon): ε itself; for v, √ᾱ v + √(1 − ᾱ) x_VP (finite at σ = 0, where it is v);
        otherwise (x − D)/σ."""
        p = self.prediction_type
        if p == "epsilon" and self.schedule != "cm":
            return out
        col = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        if p == "v_prediction" and self.schedule in ("discrete", "ratio"):
            c = self._c_in(col)
            return c * out + col * c**2 * x
        return (x - self.from_native(x, sigma, out)) / col

    @property
    def kind(self) -> str:  # the name before 0.2
        return self.schedule

    def extra_repr(self) -> str:
        return (
            f"schedule={self.schedule}, prediction_type={self.prediction_type}, scheduler={self.scheduler_class}, "
            f"sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g}"
        )


@functools.lru_cache(maxsize=None)
def _applies(cls: type, option: str) -> bool:
    """Whether a scheduler class acts on the boolean config `option` (`if self.config.<option>` in its
    code), not merely takes it; where its source cannot be read, whether its constructor takes it."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return option in inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    return re.search(rf"\b(?:if|elif)\s+self\.config\.{option}\b", source) is not None


def knot_timesteps(sched, sigmas: torch.Tensor) -> dict[float, float]:
    """The timestep a scheduler set to its steps gives each of its σ knots (where it is not the
    log-σ interpolation: log-linear σ's, timesteps rounded or cast to integers, flow σ's), so that
    the model sees there what the scheduler's loop feeds it. KDPM2 interleaves its midpoints'
    timesteps with its knots'; a σ given two timesteps is left out."""
    times = torch.as_tensor(sched.timesteps).double().tolist()
    if hasattr(sched, "sigmas_interpol"):  # KDPM2: [t_0, t_{1/2}, t_1, t_{3/2}, t_2, ...]
        pairs = list(zip(_distinct_knots(sigmas).tolist(), times[0::2]))
    else:
        pairs = list(zip(sigmas.tolist(), times))
    seen: dict[float, float | None] = {}
    for s, t in pairs:
        seen[s] = t if seen.get(s, t) == t else None
    return {s: t for s, t in seen.items() if t is not None}


class KnotTable:
    """A scheduler's σ (or flow time) knots and the timestep its loop feeds the network at each, as
    `knot_timesteps` reads them; looked up with the knot in the solver's dtype (a float32 or bfloat16
    knot is the float64 one rounded, so the keys are rounded alike). Emptied when it outgrows `limit`
    (many different grids)."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self.exact: dict[float, float] = {}
        self._rounded: dict[torch.dtype, dict[float, float]] = {}

    def learn(self, knots: dict[float, float]) -> None:
        if len(self.exact) > self.limit:
            self.exact.clear()
        self.exact.update(knots)
        self._rounded.clear()

    def get(self, value: float, dtype: torch.dtype = torch.float64) -> float | None:
        own = self.exact.get(value)
        if own is not None or dtype == torch.float64 or not self.exact:
            return own
        table = self._rounded.get(dtype)
        if table is None:
            keys = torch.tensor(list(self.exact), dtype=torch.float64).to(dtype).tolist()
            table = self._rounded[dtype] = dict(zip(keys, self.exact.values()))
        return table.get(value)


def _one_value(t: torch.Tensor) -> float | None:
    """The value of a 1-D CPU tensor that holds one value for the whole batch (a solver's knot,
    expanded or concatenated by guidance), else None; a device tensor is never read (no sync)."""
    if t.dim() != 1 or len(t) == 0 or t.device.type != "cpu":
        return None
    if t.stride(0) == 0 or torch.equal(t, t[:1].expand_as(t)):
        return float(t[0])
    return None


def _dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Imagen): s = the `ratio` quantile of |x_0| per
    sample, kept within [1, max_value]; x_0 is clamped to [−s, s] and divided by s."""
    flat = x0.reshape(len(x0), -1)
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()  # quantile needs a float type
    s = torch.quantile(work.abs(), ratio, dim=1).clamp(1.0, max_value).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.dim() - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def _repeats_final(model, t_end: float) -> bool:
    """Whether the diffusers scheduler behind `model` ended a schedule whose last knot is t_end with a
    step from that knot to itself (a `final_sigmas_type="sigma_min"` σ equal to the last knot): that
    step moves nothing and flowsolve drops it, but the scheduler counts it in its step-dependent
    rules (the order of its last steps: `solvers.base.scheduler_steps`)."""
    t = float(t_end)  # the grid may hold the knot recomputed from the scheduler's float32 σ's: a relative match
    return t > 0 and any(abs(t - end) <= 1e-6 * end for end in getattr(model, "_repeated_ends", ()))


def _distinct_knots(grid: torch.Tensor, repeated_ends: set[float] | None = None) -> torch.Tensor:
    """A scheduler's σ knots with each repeat dropped: second-order schedulers list every σ twice
    (Heun, KDPM2: one entry per stage), PLMS repeats its first timestep, a `sigma_min` final σ may
    equal the last knot, KDPM2 pads with zeros. The grid of steps is the distinct knots in order.
    An inverse scheduler's knots run from the data up (DDIMInverseScheduler's timesteps); they are
    given in sampling order, from the largest to the smallest and then 0, so that `fs.sample` walks
    them down and `fs.invert` up. A repeated last knot above 0 is noted in `repeated_ends`."""
    if repeated_ends is not None and len(grid) > 2 and float(grid[-1]) > 0:
        last, before = float(grid[-1]), float(grid[-2])
        if abs(last - before) <= 1e-9 * max(abs(before), 1.0):
            repeated_ends.add(last)
    keep = torch.ones(len(grid), dtype=torch.bool)
    keep[1:] = (grid[1:] - grid[:-1]).abs() > 1e-9 * grid[:-1].abs().clamp(min=1.0)
    grid = grid[keep]
    inner = grid[grid > 0]
    if len(inner) > 1 and bool(inner[0] < inner[-1]):  # from the data up: an inverse scheduler's
        return torch.cat([inner.flip(0), grid.new_zeros(1)])
    return grid


def custom_steps(scheduler) -> int | None:
    """N where the scheduler was set to a schedule of its own (`set_timesteps(timesteps=...)` or
    `sigmas=...`: Align Your Steps, a hand-made list) that `set_timesteps(N)` would not make; else None
    (not set, set to N of its own steps, or not remade without arguments, such as a dynamic shift's mu)."""
    if getattr(scheduler, "custom_timesteps", False) is True:  # DDPM, LCM, TCD say so themselves
        return len(scheduler.timesteps)
    n = getattr(scheduler, "num_inference_steps", None)
    if not isinstance(n, int) or n < 1:
        return None
    ref = copy.deepcopy(scheduler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref.set_timesteps(n)
    except Exception:  # noqa: BLE001 - a schedule that needs arguments to be made: not taken as custom
        return None
    return None if _same_schedule(scheduler, ref) else n


_LINEAR_SIGMAS_RULE = "np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)"


def _linear_sigmas_pipeline(pipeline_class: Any) -> bool:
    """Whether a pipeline class (or its diffusers name) sets its scheduler with sigmas = linspace(1, 1/N,
    N), as its source says (Flux, Flux 2, Chroma, Qwen-Image, LTX and the other Flux-family pipelines).
    The source is read from the class, or found by its name among diffusers' pipeline files (a pipeline
    whose optional dependencies are missing is a placeholder without its code)."""
    if pipeline_class is None:
        return False
    name = pipeline_class if isinstance(pipeline_class, str) else getattr(pipeline_class, "__name__", "")
    call = vars(pipeline_class).get("__call__") if isinstance(pipeline_class, type) else None
    if call is not None:
        try:
            return _LINEAR_SIGMAS_RULE in inspect.getsource(inspect.unwrap(call))
        except (OSError, TypeError):
            pass
    return _LINEAR_SIGMAS_RULE in pipeline_source(name)


# scheduler settings that a diffusers model reads from its own scheduler (its conversions and noise levels)
_MODEL_READS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
    "prediction_type",
    "clip_sample",
    "clip_sample_range",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "timestep_scaling",
    "timestep_type",
    "variance_type",
    "sigma_min",
    "sigma_max",
    "sigma_data",
    "shift",
    "flow_shift",
    "use_flow_sigmas",
    "use_dynamic_shifting",
)


def _same_schedule(a, b) -> bool:
    """Whether two set schedulers list the same timesteps and σ's (a list only one of them has: not compared)."""
    for k in ("timesteps", "sigmas"):
        x, y = getattr(a, k, None), getattr(b, k, None)
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or not torch.allclose(x.double().cpu(), y.double().cpu(), rtol=1e-6, atol=1e-9):
                return False
    return True


def _custom_default_steps(scheduler) -> int | None:
    """The steps of a scheduler's custom schedule, as a sampler counts them (a field's `default_steps`)."""
    n = custom_steps(scheduler)
    return None if n is None else n - 1 if type(scheduler).__name__ in _POINT_COUNTING_SCHEDULERS else n


def scheduler_at(scheduler, steps: int, **kw):
    """A copy of the scheduler set to `steps` steps. Where diffusers cannot make that schedule (PNDM's
    Runge–Kutta warm-up needs 4 steps or more), the error names the budget and says what to do. A
    scheduler set to a custom schedule (`custom_steps`) gives that schedule, at its own step count."""
    custom = custom_steps(scheduler) if not kw else None
    if custom is not None:
        if steps != custom:
            raise ArgumentError(
                f"steps: the model's {type(scheduler).__name__} carries a custom schedule of {custom} steps "
                f"(set_timesteps(timesteps=...) or sigmas=...), asked for {steps}; sample with steps={custom} "
                f"(or no nfe / steps), or pass grid="
            )
        return copy.deepcopy(scheduler)
    sched = copy.deepcopy(scheduler)
    try:
        sched.set_timesteps(steps, **kw)
    except Exception as err:  # diffusers' own refusal, in its words
        given = "".join(f", {k}={v!r}" for k, v in kw.items() if v is not None)
        raise ArgumentError(
            f"nfe: {type(scheduler).__name__} cannot make a schedule of {steps} steps{given} "
            f"({type(err).__name__}: {err}); ask for another nfe, or pass grid= (e.g. grid='karras')"
        ) from err
    return sched


# -- loading ---------------------------------------------------------------------------------
def _is_local(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and Path(path).exists()


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _hub_disabled() -> str | None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    return None


def _hub_reachable(timeout: float = 2.0) -> bool:
    import socket

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = endpoint.partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_source(path, what: str = "path") -> str:
    """'local' for an existing file or folder, 'hub' for a Hugging Face Hub id, or a clear error now.

    Offline by default for paths: a string that names nothing here is a Hub id only when it has the
    exact owner/name form, its owner is not a local folder (then it is a mistyped local path), and
    the Hub is neither disabled (HF_HUB_OFFLINE=1) nor unreachable (a 2 s connection probe)."""
    p = Path(path)
    if p.exists():
        return "local"
    text = str(path)
    near = ""
    if p.parent.is_dir():
        near = nearest(p.name, [c.name for c in p.parent.iterdir()])
    local_form = (
        not _HUB_ID.match(text) or text.startswith(".") or os.path.isabs(text) or Path(text.split("/")[0]).is_dir()
    )
    if local_form:
        raise PathError(f"{what}: the local path {text!r} does not exist{near}")
    disabled = _hub_disabled()
    if disabled:
        raise PathError(
            f"{what}: {text!r} is not a local folder{near}, and as a Hugging Face Hub id it cannot be "
            f"fetched: the Hub is disabled ({disabled})"
        )
    if not _hub_reachable():
        raise PathError(
            f"{what}: {text!r} is not a local folder{near}, and as a Hugging Face Hub id it cannot be "
            f"fetched: the Hub is unreachable (no network)"
        )
    return "hub"


def load_diffusers_component(path, subfolder: str | None, role: str, torch_dtype: torch.dtype | None = None):
    """Load a diffusers model or scheduler from a local folder (never the network) or a Hub id
    (diffusers' normal loading), a model's weights in `torch_dtype` (default: as saved). Only
    diffusers' own classes are instantiated: no remote code."""
    import diffusers

    local = resolve_source(path, role) == "local"
    if local:
        folder = Path(path) / (subfolder or "")
        name = "scheduler_config.json" if role == "scheduler" else "config.json"
        if not (folder / name).is_file():
            raise PathError(f"{role}: {str(folder / name)!r} does not exist")
        try:
            cfg = json.loads((folder / name).read_text())
        except json.JSONDecodeError as e:
            raise ArgumentError(f"{role}: {str(folder / name)!r} is not valid JSON ({e})") from None
        cls_name = cfg.get("_class_name")
    else:
        reader = diffusers.DDPMScheduler if role == "scheduler" else diffusers.UNet2DModel  # picks the file name
        try:
            cfg = reader.load_config(path, subfolder=subfolder)
        except OSError as e:
            raise PathError(
                f"{role}: could not load {str(path)!r}{'/' + subfolder if subfolder else ''} from the "
                f"Hugging Face Hub (no such repository, or no network: flowsolve never downloads "
                f"offline; use a local folder). {str(e).splitlines()[0][:200]}"
            ) from None
        cls_name = cfg.get("_class_name")
    if role == "scheduler":
        ok = isinstance(cls_name, str) and cls_name.endswith("Scheduler") and hasattr(diffusers, cls_name)
    else:  # any of diffusers' own model classes (UNets, transformers, VAEs); never remote code
        found = getattr(diffusers, cls_name, None) if isinstance(cls_name, str) else None
        ok = isinstance(found, type) and issubclass(found, diffusers.ModelMixin)
    if not ok:
        expected = "a diffusers scheduler" if role == "scheduler" else "a diffusers model class such as "
        expected += "" if role == "scheduler" else ", ".join(_MODEL_CLASSES)
        raise ArgumentError(f"{role}: unsupported class {cls_name!r} in {path}/{subfolder or ''} (expected {expected})")
    cls = getattr(diffusers, cls_name)
    kwargs: dict[str, Any] = {"subfolder": subfolder} if subfolder else {}
    if role == "scheduler":
        return cls.from_pretrained(path, **kwargs)
    if local:
        _check_weights(Path(path) / (subfolder or ""))
        kwargs["local_files_only"] = True
    # fully materialised weights, except for classes that keep modules in float32 (Wan's and AnyFlow's
    # transformers), which diffusers loads only through its low-memory path
    if not getattr(cls, "_keep_in_fp32_modules", None):
        kwargs["low_cpu_mem_usage"] = False
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    return cls.from_pretrained(path, use_safetensors=True, **kwargs)


def _check_weights(folder: Path) -> None:
    """A clear error for a missing or corrupt safetensors file (no pickle is ever loaded)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PathError(f"weights: no .safetensors file in {str(folder)!r} (flowsolve loads only safetensors)")
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    h.get_slice(k)
        except Exception as e:  # noqa: BLE001 - name the file
            raise ArgumentError(f"weights: {str(f)!r} is corrupt or truncated ({type(e).__name__}: {e})") from None


_DENOISER_PARTS = ("unet", "transformer")
# schedulers whose timesteps are cast to integers after their σ's are spaced (Karras, Lu, ...)
_INTEGER_TIMESTEP_SCHEDULERS = frozenset(
    {
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "UniPCMultistepScheduler",
        "DEISMultistepScheduler",
        "SASolverScheduler",
    }
)
_VAE_PARTS = ("vae", "vqvae")


def _check_scheduler(scheduler) -> None:
    """Refuse up front schedulers that are not one noise schedule: multi-stage (pyramid) schedulers run
    each stage at its own resolution with its own schedule (Helios)."""
    stages = _config(scheduler).get("stages")
    if isinstance(stages, int) and stages > 1:
        raise ArgumentError(
            f"scheduler: {type(scheduler).__name__} is a multi-stage (pyramid) scheduler ({stages} stages, each at "
            f"its own resolution and schedule); flowsolve samples one Gaussian path at one resolution"
        )


def _check_denoiser(model) -> None:
    """Refuse up front what is not a denoiser (a VAE, a text encoder), saying what to pass instead."""
    name = type(model).__name__
    if not isinstance(model, nn.Module) or not callable(model):
        raise ArgumentTypeError(f"model: expected a diffusers UNet or transformer, got {name}")
    params = list(inspect.signature(model.forward).parameters)
    if len(params) < 2 or not any("timestep" in p or p == "t" for p in params):
        kind = (
            "a VAE"
            if hasattr(model, "decode") and hasattr(model, "encode")
            else "a text encoder"
            if "input_ids" in params
            else "not a denoiser"
        )
        raise ArgumentTypeError(
            f"model: {name} is {kind} (its forward takes no timestep); pass the UNet or "
            f"transformer with its scheduler, or the whole pipeline (its VAE then decodes "
            f"the latents: model.decode(latents))"
        )


def from_diffusers(
    model_or_pipeline_or_path,
    scheduler=None,
    *,
    prediction_type: str | None = None,
    clip_sample: bool | None = None,
    subfolder: str | None = None,
    vae=None,
    controlnet=None,
    controlnet_scale: float | dict[str, float] = 1.0,
    controlnet_window: tuple[float, float] | dict[str, tuple[float, float]] | None = None,
    torch_dtype: torch.dtype | None = None,
    **model_kwargs,
):
    """A diffusers model as a flowsolve particle model: `DiffusersDenoiser` (D(x; σ), for DDPM/DDIM/
    Euler/DPM/EDM-style schedulers: eps, v or sample prediction) or `DiffusersFlow` (a velocity, for
    FlowMatch schedulers).

    Accepts a model (with `scheduler=`), a pipeline (its `.unet` or `.transformer`, `.scheduler`, and
    `.vae` / `.vqvae` for latent pipelines), or a local folder / Hub id laid out as a pipeline
    (model_index.json, unet/ or transformer/, scheduler/, vae/) or as a single model folder (then
    `scheduler=` may be a scheduler object or a folder). A local folder never touches the network.
    With a VAE, `model.decode(latents)` turns samples into images as the pipeline does.
    `clip_sample` (default: the scheduler's own setting) clamps D to the scheduler's clip range, as
    DDPM/DDIM do to their predicted x_0. A VAE or text encoder passed as the model is refused at once.
    `controlnet` (a ControlNetModel, a list or dict of them, or a ControlNet pipeline's own) steers the
    UNet (`ControlledModel`): its image goes in `cond={"controlnet_cond": image}` (a dict by name for
    several), each scaled by `controlnet_scale` and active in `controlnet_window`, the (low, high)
    network timesteps of the steps it acts on (diffusers' control_guidance_start / end).
    `torch_dtype` loads the weights of a folder or Hub id in that dtype (diffusers' `torch_dtype`:
    float16 / bfloat16 for large models); model objects keep theirs (cast them with `.to`).
    `strength_rule` ("walked" or "skipped", `Field.strength_rule`) is how img2img counts the steps of a
    strength; by default the pipeline's own rule, else the rule of the img2img pipelines of the model's
    class (SD3, Flux, Qwen-Image skip; SD and most others walk).
    Flow schedulers with dynamic shifting take `mu=`, or compute μ as the pipeline's class does
    (`mu_rule=`, read off it by default) from `image_seq_len=` latent tokens or the count the inputs
    give (`img_ids`, ...); `pipeline_sigmas=` overrides the Flux-family linspace(1, 1/N, N) rule.
    """
    obj = model_or_pipeline_or_path
    pipeline_class: Any = None  # the pipeline's class (or its name in model_index.json), whose rules apply
    if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
        raise ArgumentTypeError(f"torch_dtype: expected a torch.dtype (e.g. torch.bfloat16), got {torch_dtype!r}")
    if torch_dtype is not None and not isinstance(obj, (str, os.PathLike)):
        raise ArgumentError(
            f"torch_dtype: applies to folders and Hub ids, whose weights it loads; this is a "
            f"{type(obj).__name__} object: cast it with .to({torch_dtype})"
        )
    if isinstance(obj, (str, os.PathLike)):
        path = obj
        local = resolve_source(path, "model_or_pipeline_or_path") == "local"
        index = Path(path) / "model_index.json" if local else None
        if local and not Path(path).is_dir():
            raise ArgumentError(f"model_or_pipeline_or_path: {str(path)!r} is a file; expected a folder or a Hub id")
        is_pipeline = index.is_file() if index is not None else subfolder is None
        if is_pipeline and subfolder is None:
            parts = json.loads(index.read_text()) if index is not None else {}
            pipeline_class = parts.get("_class_name")
            part = next((k for k in _DENOISER_PARTS if k in parts), "unet")
            model = load_diffusers_component(path, part, "model", torch_dtype)
            if scheduler is None:
                scheduler = load_diffusers_component(path, "scheduler", "scheduler")
            vae_part = next((k for k in _VAE_PARTS if k in parts), None)
            if vae is None and vae_part is not None:
                vae = load_diffusers_component(path, vae_part, "model", torch_dtype).eval()
            if controlnet is None and "controlnet" in parts:  # a ControlNet pipeline's folder
                controlnet = load_diffusers_component(path, "controlnet", "model", torch_dtype).eval()
        else:
            model = load_diffusers_component(path, subfolder, "model", torch_dtype)
            if scheduler is None and local:
                for cand in (Path(path) / (subfolder or "") / "scheduler_config.json", Path(path) / "scheduler"):
                    if cand.exists():
                        scheduler = load_diffusers_component(cand.parent if cand.is_file() else cand, None, "scheduler")
                        break
        model.eval()
    elif hasattr(obj, "scheduler") and any(getattr(obj, k, None) is not None for k in _DENOISER_PARTS):
        model = next(getattr(obj, k) for k in _DENOISER_PARTS if getattr(obj, k, None) is not None)
        scheduler = scheduler or obj.scheduler
        pipeline_class = type(obj)
        controlnet = controlnet if controlnet is not None else getattr(obj, "controlnet", None)
        vae = vae or next((getattr(obj, k) for k in _VAE_PARTS if getattr(obj, k, None) is not None), None)
    else:
        model = obj
    if isinstance(scheduler, (str, os.PathLike)):
        scheduler = load_diffusers_component(scheduler, None, "scheduler")
    if scheduler is None:
        raise ArgumentError(
            "scheduler: a diffusers scheduler (or its folder) is needed to know the model's noise schedule; got None"
        )
    _check_denoiser(model)
    _check_scheduler(scheduler)
    if controlnet is not None:
        from .controlnet import ControlledModel

        model = ControlledModel(model, controlnet, controlnet_scale, controlnet_window)
    out: DiffusersDenoiser | DiffusersFlow | DiffusersTrigFlow | DiffusersAngle
    again = dict(prediction_type=prediction_type, clip_sample=clip_sample, **model_kwargs)  # (with_scheduler)
    given = model_kwargs.pop("pipeline_sigmas", None)
    strength_given = model_kwargs.pop("strength_rule", None)
    if strength_given is not None and strength_given not in STRENGTH_RULES:
        raise ArgumentError(f"strength_rule: expected one of {', '.join(STRENGTH_RULES)}, got {strength_given!r}")
    pipeline_name = getattr(pipeline_class, "__name__", pipeline_class)  # a class, or its name in model_index.json
    rule = model_kwargs.pop("mu_rule", None) or mu_rule_of(pipeline_name)  # how its pipeline computes μ
    flow = is_flow_scheduler(scheduler)
    linear = (flow and _linear_sigmas_pipeline(pipeline_class)) if given is None else bool(given)
    if given and not flow:
        raise ArgumentError(
            f"pipeline_sigmas: the linspace(1, 1/N, N) sigmas of Flux-family pipelines are for flow-matching "
            f"schedulers; {type(scheduler).__name__} is not one"
        )
    if flow and "concat_dim" not in model_kwargs and token_concat(pipeline_name):
        model_kwargs["concat_dim"] = again["concat_dim"] = 1  # a reference image's tokens follow the sample's
    if flow:
        out = DiffusersFlow(
            model, scheduler, mu=model_kwargs.pop("mu", None), pipeline_sigmas=linear, mu_rule=rule, **model_kwargs
        )
    elif scheduler is not None and type(scheduler).__name__ == "SCMScheduler":
        out = DiffusersTrigFlow(model, scheduler, **model_kwargs)
    elif scheduler is not None and type(scheduler).__name__ == "IPNDMScheduler":
        out = DiffusersAngle(model, scheduler, **model_kwargs)
    else:
        out = DiffusersDenoiser(
            model, scheduler, prediction_type=prediction_type, clip_sample=clip_sample, **model_kwargs
        )  # integer_timesteps= travels in model_kwargs to whichever adapter takes it
    if vae is not None:
        out.vae = vae
    # how img2img counts steps: the pipeline's own rule, else that of the img2img pipelines of this model's class
    out.strength_rule = strength_given or strength_rule_of(pipeline_name, base_class_name(model))
    again["strength_rule"] = out.strength_rule
    if flow:
        again["pipeline_sigmas"] = linear  # (what the pipeline's class said, kept for another flow scheduler)
        again["mu_rule"] = rule
    object.__setattr__(out, "_rebuild", (model, vae, again))
    return out
