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
from typing import Any

import torch
from torch import nn

from .._checks import atomic_write_text, check_device, nearest, read_json, write_folder_atomically
from .diffusers_adapter import _check_weights, from_diffusers, resolve_source
from .flows import DiscriminatorFlowModel
from .nets import MLP, DigitsFeatures
from .precond import EDMPrecond
from .protocol import GeneratorModel
from ..errors import ArgumentError, ArgumentTypeError, PathError

__all__ = [
    "save_pretrained",
    "from_pretrained",
    "read_metadata",
    "write_metadata",
    "register_model_type",
    "MODEL_TYPES",
    "read_calibration",
    "save_calibration",
    "CALIBRATION_FILE",
    "shipped_models",
    "resolve_shipped",
    "NETWORKS",
    "FORMAT_FILE",
]

FORMAT_FILE = "flowsolve.json"
FORMAT_VERSION = 1


def _networks() -> dict:
    from diffusers import UNet2DConditionModel, UNet2DModel

    from .gan import ConvDiscriminator, DCGANGenerator, Discriminator, Generator

    return {
        "MLP": MLP,
        "DigitsFeatures": DigitsFeatures,
        "UNet2DModel": UNet2DModel,
        "UNet2DConditionModel": UNet2DConditionModel,
        "Discriminator": Discriminator,
        "Generator": Generator,
        "ConvDiscriminator": ConvDiscriminator,
        "DCGANGenerator": DCGANGenerator,
    }


NETWORKS = (
    "MLP",
    "DigitsFeatures",
    "UNet2DModel",
    "UNet2DConditionModel",
    "Discriminator",
    "Generator",
    "ConvDiscriminator",
    "DCGANGenerator",
)


def save_pretrained(model: nn.Module, path: str | os.PathLike, **metadata) -> Path:
    """Write `model` (an `EDMPrecond` denoiser or a bare network such as `DigitsFeatures`) to `path`
    in diffusers format plus flowsolve.json with `metadata` (training settings, data, measured quality)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    net: Any = model.net if isinstance(model, EDMPrecond) else model  # a diffusers network
    name = type(net).__name__
    if name not in NETWORKS:
        raise ArgumentTypeError(
            f"model: cannot save a {name}; expected a network among {NETWORKS} or an EDMPrecond of one"
        )
    write_folder_atomically(out, lambda tmp: net.save_pretrained(str(tmp), safe_serialization=True))
    info: dict = {"format": "flowsolve", "version": FORMAT_VERSION, "network": name}
    if isinstance(model, EDMPrecond):
        info["type"] = "denoiser"
        info["preconditioning"] = {
            "kind": "edm",
            "sigma_data": model.sigma_data,
            "sigma_min": model.sigma_min,
            "sigma_max": model.sigma_max,
            "noise_scale": model.noise_scale,
        }
        info["data_shape"] = list(model.data_shape) if model.data_shape is not None else None
    else:
        info["type"] = "features" if isinstance(model, DigitsFeatures) else "network"
    info.update(metadata)
    write_metadata(out, info)
    return out


CALIBRATION_FILE = "calibration.json"


def read_calibration(folder: str | os.PathLike) -> dict:
    """{"solver:nfe": [times...] or {"grid": [times...], "coefficients": [[row]...]}} from a model
    folder's calibration.json ({} when absent)."""
    f = Path(folder) / CALIBRATION_FILE
    if not f.is_file():
        return {}
    data = read_json(f, "path")

    def numbers(v) -> bool:
        return isinstance(v, list) and all(isinstance(t, (int, float)) for t in v)

    for k, v in data.items():
        rows = v.get("coefficients") if isinstance(v, dict) else None
        ok = numbers(v) or (
            isinstance(v, dict)
            and numbers(v.get("grid"))
            and (rows is None or (isinstance(rows, list) and all(numbers(r) for r in rows)))
        )
        if ":" not in k or not ok:
            raise ArgumentError(
                f"path: {str(f)!r} key {k!r}: expected 'solver:nfe' with a list of times or "
                f"{{'grid': times, 'coefficients': rows}}"
            )
    return data


def save_calibration(folder: str | os.PathLike, solver: str, nfe: int, grid) -> Path:
    """Store a calibrated grid (and its solver `coefficients`, if it carries them) in the model
    folder (calibration.json, keyed "solver:nfe", atomic)."""
    data = read_calibration(folder)
    times = [float(t) for t in grid]
    rows = getattr(grid, "coefficients", None)
    data[f"{solver}:{nfe}"] = (
        times if rows is None else {"grid": times, "coefficients": [[float(c) for c in r] for r in rows]}
    )
    return atomic_write_text(Path(folder) / CALIBRATION_FILE, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_metadata(folder: str | os.PathLike, info: dict) -> Path:
    """Write flowsolve.json into `folder` atomically."""
    return atomic_write_text(Path(folder) / FORMAT_FILE, json.dumps(info, indent=2, sort_keys=True) + "\n")


def read_metadata(path: str | os.PathLike) -> dict:
    """The flowsolve.json of a model folder, checked against the schema of its type (errors name the
    file and the key)."""
    f = Path(path) / FORMAT_FILE
    meta = read_json(f, "path")
    kind = meta.get("type")
    if kind not in MODEL_TYPES:
        raise ArgumentError(
            f"path: {str(f)!r} has type {kind!r}; expected one of {sorted(MODEL_TYPES)}"
            f"{nearest(str(kind), MODEL_TYPES)}"
        )
    for key, want in MODEL_TYPES[kind].schema.items():
        if key not in meta:
            raise ArgumentError(f"path: {str(f)!r} lacks the key {key!r} that a {kind!r} folder needs")
        if not isinstance(meta[key], want):
            raise ArgumentError(
                f"path: {str(f)!r} key {key!r}: expected {_type_names(want)}, got "
                f"{type(meta[key]).__name__} {meta[key]!r}"
            )
    return meta


def _type_names(want) -> str:
    return " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))


# -- one registry: flowsolve.json "type" -> how to build the model -------------------------------
class ModelType:
    """How a folder of one `type` loads: `schema` (key -> expected JSON type) and `build(folder, meta)`."""

    def __init__(self, name: str, schema: dict, build) -> None:
        self.name, self.schema, self.build = name, schema, build


MODEL_TYPES: dict[str, ModelType] = {}


def register_model_type(name: str, schema: dict):
    """Decorator: register `build(folder, meta) -> model` for flowsolve.json files of type `name`."""

    def wrap(build):
        MODEL_TYPES[name] = ModelType(name, {"network": str, **schema} if name != "pipeline" else schema, build)
        return build

    return wrap


def _network(folder: Path, meta: dict) -> nn.Module:
    name = meta["network"]
    nets = _networks()
    if name not in nets:
        raise ArgumentError(f"path: {str(folder / FORMAT_FILE)!r} names network {name!r}; expected one of {NETWORKS}")
    _check_weights(folder)
    return nets[name].from_pretrained(str(folder), use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False)


def _shape(meta: dict):
    shape = meta.get("data_shape")
    return tuple(shape) if shape else None


@register_model_type("denoiser", {"preconditioning": dict})
def _denoiser(folder: Path, meta: dict) -> EDMPrecond:
    pre = meta["preconditioning"]
    where = f"path: {str(folder / FORMAT_FILE)!r} key 'preconditioning'"
    if pre.get("kind") != "edm":
        raise ArgumentError(f"{where}: unknown preconditioning {pre.get('kind')!r}; expected 'edm'")
    missing = [k for k in ("sigma_data", "sigma_min", "sigma_max", "noise_scale") if k not in pre]
    if missing:
        raise ArgumentError(f"{where}: lacks {', '.join(map(repr, missing))}")
    model = EDMPrecond(
        _network(folder, meta),
        sigma_data=pre["sigma_data"],
        sigma_min=pre["sigma_min"],
        sigma_max=pre["sigma_max"],
        noise_scale=pre["noise_scale"],
        data_shape=_shape(meta),
    )
    if isinstance(meta.get("conditioning"), dict):
        model.conditioning = meta["conditioning"]
    return model


@register_model_type("discriminator-flow", {"flow": dict})
def _discriminator_flow(folder: Path, meta: dict) -> DiscriminatorFlowModel:
    flow = meta["flow"]
    model = DiscriminatorFlowModel(
        _network(folder, meta),
        flow.get("eta", 20.0),
        flow.get("loss", "vanilla"),
        flow.get("N", flow.get("steps", 56)),
        _shape(meta),
    )
    if isinstance(meta.get("conditioning"), dict):
        model.conditioning = meta["conditioning"]
    return model


@register_model_type("generator", {})
def _generator(folder: Path, meta: dict) -> nn.Module:
    net = _network(folder, meta)
    if not isinstance(net, GeneratorModel):
        raise ArgumentError(
            f"path: {str(folder / FORMAT_FILE)!r} is a 'generator' folder but holds a {type(net).__name__}"
        )
    return net


@register_model_type("student", {"student": dict})
def _student(folder: Path, meta: dict) -> nn.Module:
    """A distilled student (`models.student`): the denoiser it was trained as, at its σ chain."""
    from .student import STUDENT_FILE, DenoiserGenerator, teacher_denoiser

    info = meta["student"]
    if "preconditioning" in meta:
        net = _denoiser(folder, meta)
    else:
        src = info.get("teacher")
        where = f"path: {str(folder / FORMAT_FILE)!r} key 'student'"
        if not isinstance(src, str):
            raise ArgumentError(f"{where}: lacks 'teacher', the folder its architecture loads from")
        candidates = [Path(src), folder.parent / src, folder / src]
        found = next((c for c in candidates if c.is_dir()), None)
        if found is None:
            raise PathError(
                f"{where}: the teacher folder {src!r} is not found (looked in the working directory "
                f"and beside {str(folder)!r})"
            )
        net = teacher_denoiser(from_pretrained(found))
        from safetensors.torch import load_file

        from .shared_parts import load_trained_state

        load_trained_state(net, load_file(str(folder / STUDENT_FILE)))  # the VAE stays the teacher's
    cond = meta.get("conditioning") if isinstance(meta.get("conditioning"), dict) else None
    return DenoiserGenerator(net, info["sigmas"], _shape(meta) or net.data_shape, cond)


@register_model_type("features", {})
def _features(folder: Path, meta: dict) -> nn.Module:
    return _network(folder, meta)


@register_model_type("network", {})
def _plain_network(folder: Path, meta: dict) -> nn.Module:
    return _network(folder, meta)


@register_model_type("pipeline", {})
def _pipeline(folder: Path, meta: dict) -> nn.Module:
    """A diffusers pipeline folder (model_index.json, unet/, scheduler/) that flowsolve trained (DDPM)."""
    return from_diffusers(folder)


SHIPPED = Path(__file__).resolve().parent.parent / "pretrained"


def shipped_models() -> list[str]:
    """Names of the models shipped inside the package (flowsolve/pretrained), e.g. 'digits-edm'."""
    return sorted(p.name for p in SHIPPED.iterdir() if (p / FORMAT_FILE).is_file()) if SHIPPED.is_dir() else []


def resolve_shipped(path: str | os.PathLike) -> str | os.PathLike:
    """`path` itself when it exists; else a shipped model named by it ('digits-edm', or the checkout
    form 'pretrained/digits-edm' from anywhere an installed wheel runs); else `path` unchanged."""
    p = Path(path)
    if p.exists():
        return path
    parts = p.parts
    name = parts[-1] if len(parts) == 1 or (len(parts) == 2 and parts[0] == "pretrained") else None
    if name is not None and (SHIPPED / name / FORMAT_FILE).is_file():
        return SHIPPED / name
    return path


def from_pretrained(
    path: str | os.PathLike, *, device: str | torch.device | None = None, torch_dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a model folder. A flowsolve folder (flowsolve.json) becomes the class its `type` names in
    `MODEL_TYPES`: a `ParticleModel` (`.field()`: denoisers, Discriminator Flows, flowsolve-trained
    pipelines) or a `GeneratorModel` (`.sample(n, seed=)`), or a feature network. A diffusers pipeline
    folder or Hub id goes through `from_diffusers`. A shipped model is found by its name
    ('digits-edm', see `shipped_models()`). Returned in eval mode, with `.metadata`. `torch_dtype` loads a
    diffusers folder's weights in that dtype (`from_diffusers`) and casts a flowsolve folder's model."""
    if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
        raise ArgumentTypeError(f"torch_dtype: expected a torch.dtype (e.g. torch.bfloat16), got {torch_dtype!r}")
    if device is not None:
        device = check_device("device", device)  # before any weights are read
    path = resolve_shipped(path)
    p = Path(path)
    legacy = p / "training.json"  # DDPM folders written before 0.2
    if p.is_dir() and ((p / FORMAT_FILE).is_file() or legacy.is_file()):
        if (p / FORMAT_FILE).is_file():
            meta = read_metadata(p)
        else:
            meta = {"format": "flowsolve", "type": "pipeline", **read_json(legacy, "path")}
        model = MODEL_TYPES[meta["type"]].build(p, meta)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        model.metadata = meta
        model.metadata.setdefault("source", str(path))
        calibrated = read_calibration(p)
        if calibrated:
            model.calibrated = calibrated
    elif p.is_dir() and not (p / "model_index.json").is_file() and not (p / "config.json").is_file():
        raise PathError(
            f"path: {str(p)!r} holds neither {FORMAT_FILE} (a flowsolve model), model_index.json "
            f"(a diffusers pipeline) nor config.json (a diffusers model)"
        )
    elif p.exists() and not p.is_dir():
        raise ArgumentError(f"path: expected a model folder, got the file {str(p)!r}")
    else:
        resolve_source(path, "path")  # a mistyped local path or an unreachable Hub: fail now
        model = from_diffusers(path, torch_dtype=torch_dtype)
        if isinstance(getattr(model, "metadata", None), dict):
            model.metadata.setdefault("source", str(path))
    if device is not None:
        model = model.to(device)
    return model.eval()
