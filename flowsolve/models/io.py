"""Saving and loading flowsolve models in diffusers format.

A flowsolve model folder is a diffusers model folder (config.json + diffusion_pytorch_model.safetensors,
readable by the network class's own `from_pretrained`) plus `flowsolve.json`, which says what the
network is for (a preconditioned denoiser, a feature network, ...) and how it was trained.
A folder laid out as a diffusers pipeline (model_index.json, unet/, scheduler/) loads through
`from_diffusers`. Weights are read only from safetensors.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .diffusers_adapter import _check_weights, from_diffusers
from .nets import MLP, DigitsFeatures
from .precond import EDMPrecond

__all__ = ["save_pretrained", "from_pretrained", "read_metadata", "NETWORKS", "FORMAT_FILE"]

FORMAT_FILE = "flowsolve.json"
FORMAT_VERSION = 1


def _networks() -> dict:
    from diffusers import UNet2DConditionModel, UNet2DModel

    from .gan import ConvDiscriminator, DCGANGenerator, Discriminator, Generator
    return {"MLP": MLP, "DigitsFeatures": DigitsFeatures, "UNet2DModel": UNet2DModel,
            "UNet2DConditionModel": UNet2DConditionModel, "Discriminator": Discriminator, "Generator": Generator,
            "ConvDiscriminator": ConvDiscriminator, "DCGANGenerator": DCGANGenerator}


NETWORKS = ("MLP", "DigitsFeatures", "UNet2DModel", "UNet2DConditionModel", "Discriminator", "Generator",
            "ConvDiscriminator", "DCGANGenerator")


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def save_pretrained(model: nn.Module, path: str | os.PathLike, **metadata) -> Path:
    """Write `model` (an `EDMPrecond` denoiser or a bare network such as `DigitsFeatures`) to `path`
    in diffusers format plus flowsolve.json with `metadata` (training settings, data, measured quality)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    net = model.net if isinstance(model, EDMPrecond) else model
    name = type(net).__name__
    if name not in NETWORKS:
        raise TypeError(f"model: cannot save a {name}; expected a network among {NETWORKS} or an EDMPrecond of one")
    net.save_pretrained(str(out), safe_serialization=True)
    info: dict = {"format": "flowsolve", "version": FORMAT_VERSION, "network": name}
    if isinstance(model, EDMPrecond):
        info["type"] = "denoiser"
        info["preconditioning"] = {"kind": "edm", "sigma_data": model.sigma_data, "sigma_min": model.sigma_min,
                                   "sigma_max": model.sigma_max, "noise_scale": model.noise_scale}
        info["data_shape"] = list(model.data_shape) if model.data_shape is not None else None
    else:
        info["type"] = "features" if isinstance(model, DigitsFeatures) else "network"
    info.update(metadata)
    _write_json(out / FORMAT_FILE, info)
    return out


def read_metadata(path: str | os.PathLike) -> dict:
    f = Path(path) / FORMAT_FILE
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"path: {str(f)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"path: {str(f)!r} is not valid JSON ({e})") from None


def from_pretrained(path: str | os.PathLike, *, device: str | torch.device | None = None) -> nn.Module:
    """Load a model folder: a flowsolve-trained model (flowsolve.json) → a `Denoiser` (or the
    feature network), a diffusers pipeline folder or Hub id → `from_diffusers(...)`. Returned in eval mode."""
    p = Path(path)
    if p.is_dir() and (p / FORMAT_FILE).is_file():
        meta = read_metadata(p)
        name = meta.get("network")
        nets = _networks()
        if name not in nets:
            raise ValueError(f"path: {str(p / FORMAT_FILE)!r} names network {name!r}; expected one of {NETWORKS}")
        _check_weights(p)
        net = nets[name].from_pretrained(str(p), use_safetensors=True, local_files_only=True,
                                       low_cpu_mem_usage=False)
        kind = meta.get("type")
        if kind == "denoiser":
            pre = meta.get("preconditioning") or {}
            if pre.get("kind") != "edm":
                raise ValueError(f"path: unknown preconditioning {pre.get('kind')!r} in {str(p / FORMAT_FILE)!r}")
            shape = meta.get("data_shape")
            model = EDMPrecond(net, sigma_data=pre["sigma_data"], sigma_min=pre["sigma_min"],
                               sigma_max=pre["sigma_max"], noise_scale=pre["noise_scale"],
                               data_shape=tuple(shape) if shape else None)
        elif kind == "discriminator-flow":
            from ..train.paper import DiscriminatorFlowModel
            flow = meta.get("flow") or {}
            shape = meta.get("data_shape")
            model = DiscriminatorFlowModel(net, flow.get("eta", 20.0), flow.get("loss", "vanilla"),
                                           flow.get("steps", 56), tuple(shape) if shape else None)
        else:
            model = net
        model.metadata = meta
    elif p.is_dir() and not (p / "model_index.json").is_file() and not (p / "config.json").is_file():
        raise FileNotFoundError(f"path: {str(p)!r} holds neither {FORMAT_FILE} (a flowsolve model), model_index.json "
                                f"(a diffusers pipeline) nor config.json (a diffusers model)")
    elif p.exists() and not p.is_dir():
        raise ValueError(f"path: expected a model folder, got the file {str(p)!r}")
    elif not p.exists() and (os.path.isabs(str(path)) or str(path).startswith(".") or str(path).count("/") != 1):
        raise FileNotFoundError(f"path: {str(path)!r} does not exist (and is not a Hub id of the form owner/name)")
    else:
        model = from_diffusers(path)
    if device is not None:
        model = model.to(device)
    return model.eval()
