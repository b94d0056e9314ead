"""The digits feature network for Fréchet distance: a small classifier trained on the digits
training split (the 400 held-out images are never seen), with shift augmentation."""

from __future__ import annotations

import dataclasses
import os

import torch

from .. import data as fsdata
from .loop import LoopConfig, device, fit, merge_config, seeded, shard, training_record

__all__ = ["FeaturesConfig", "digits_features"]


@dataclasses.dataclass
class FeaturesConfig(LoopConfig):
    steps: int = 3000
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.99
    checkpoint_every: int = 1000
    width: int = 32
    features: int = 64


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel (padding with the background value −1)."""
    pad = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    i, j = torch.randint(3, (2,), generator=g).tolist()
    return pad[..., i : i + x.shape[-2], j : j + x.shape[-1]]


def digits_features(
    *,
    out: str | os.PathLike | None = None,
    config: dict | None = None,
    progress: bool = True,
    command: str | None = None,
    **overrides,
):
    """Train `models.DigitsFeatures` on the digits training split; returns it with its held-out accuracy
    in `.metadata`."""
    from ..models import DigitsFeatures, save_pretrained

    cfg = merge_config(FeaturesConfig, {}, config, overrides)
    train, test = fsdata.digits("train"), fsdata.digits("test")
    net = seeded(cfg.seed, lambda: DigitsFeatures(width=cfg.width, features=cfg.features))

    def loss_fn(m, g):
        idx = torch.randint(len(train), (cfg.batch_size,), generator=g)
        x, y = shard(_shift(train.x[idx], g)), shard(train.labels[idx])  # this process's rows
        return torch.nn.functional.cross_entropy(m(x), y)

    ema, history = fit(net, loss_fn, cfg, out=out, progress=progress, extra={"objective": "features"})
    with torch.no_grad():
        acc = (ema(test.x.to(device())).argmax(1).cpu() == test.labels).float().mean().item()
    ema.metadata = {
        **training_record(cfg, "digits-train", "classifier", history, command),
        "held_out_accuracy": round(acc, 4),
    }
    if out is not None:
        save_pretrained(ema, out, **ema.metadata)
    return ema
