"""Flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2023) on the linear / CondOT path
x_t = (1 − t) x_0 + t ε: the network v_θ(x_t, t) regresses the velocity ε − x_0, on the same loop,
checkpoints, resume and Accelerate as EDM. t ~ logit-normal(0, 1) (SD3) or uniform.

The model is saved as a diffusers pipeline folder (model_index.json, unet/, scheduler/ with a
FlowMatchEulerDiscreteScheduler) plus flowsolve.json, so it loads with diffusers' own classes and,
in flowsolve, as a `DiffusersFlow` whose field every solver runs on (a PM, Definition 1).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from .. import data as fsdata
from .._checks import check_choice, write_folder_atomically
from .edm import EDMConfig, defaults_for
from .loop import fit, is_main_process, merge_config, seeded, shard, training_record

__all__ = ["FlowMatchingConfig", "flow_matching", "T_SAMPLING"]

T_SAMPLING = ("logit_normal", "uniform")


@dataclasses.dataclass
class FlowMatchingConfig(EDMConfig):
    t_sampling: str = "logit_normal"  # t = sigmoid(N(0, 1)) (SD3), or "uniform"
    shift: float = 1.0  # the saved FlowMatchEulerDiscreteScheduler's shift (sampling only)


def flow_matching(
    data="digits",
    *,
    out: str | os.PathLike | None = None,
    config: dict | None = None,
    resume: bool = False,
    allow_changes: bool = False,
    progress: bool = True,
    command: str | None = None,
    **overrides,
):
    """Train a flow-matching UNet on image `data` and return it as a `models.DiffusersFlow` (EMA weights)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..models import DiffusersFlow, unet
    from ..models.io import FORMAT_VERSION, write_metadata

    data_name = data if isinstance(data, str) else "custom"
    cfg = merge_config(FlowMatchingConfig, defaults_for(data_name, "flow"), config, overrides)
    check_choice("t_sampling", cfg.t_sampling, T_SAMPLING)
    source = fsdata.load(data, size=cfg.data_size) if isinstance(data, str) else fsdata.as_source(data)
    shape = fsdata.shape_of(source)
    if len(shape) != 3:
        from ..errors import ArgumentError

        raise ArgumentError(f"data: flow-matching training needs image data (C, H, W), got shape {shape}")
    net = seeded(cfg.seed, lambda: unet(shape, cfg.unet_preset))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)
    model = DiffusersFlow(net, scheduler)

    def loss_fn(m: DiffusersFlow, g: torch.Generator) -> torch.Tensor:
        x0 = fsdata.batches(source, cfg.batch_size, g)
        u = torch.randn(len(x0), generator=g) if cfg.t_sampling == "logit_normal" else torch.rand(len(x0), generator=g)
        t = torch.sigmoid(u) if cfg.t_sampling == "logit_normal" else u
        eps = torch.randn(x0.shape, generator=g)
        x0, t, eps = shard(x0), shard(t), shard(eps)
        tc = t.view(-1, 1, 1, 1)
        v = m.velocity((1 - tc) * x0 + tc * eps, t)
        return (v - (eps - x0)).square().mean()  # regress the CondOT velocity ε − x_0

    ema, history = fit(
        model,
        loss_fn,
        cfg,
        out=out,
        resume=resume,
        allow_changes=allow_changes,
        progress=progress,
        extra={"objective": "flow-matching", "data": data_name},
    )
    ema.metadata = training_record(cfg, data_name, "flow-matching", history, command)
    if out is not None and is_main_process():

        def write(tmp: Path) -> None:
            net_out: Any = ema.model  # the trained diffusers network
            net_out.save_pretrained(str(tmp / "unet"), safe_serialization=True)
            scheduler.save_pretrained(str(tmp / "scheduler"))
            (tmp / "model_index.json").write_text(
                json.dumps(
                    {
                        "_class_name": "DiffusionPipeline",
                        "unet": ["diffusers", "UNet2DModel"],
                        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                    },
                    indent=2,
                )
                + "\n"
            )

        write_folder_atomically(out, write)
        write_metadata(
            out,
            {
                "format": "flowsolve",
                "version": FORMAT_VERSION,
                "type": "pipeline",
                "data": data_name,
                "data_shape": list(shape),
                **ema.metadata,
            },
        )
    return ema
