"""GANs as Int-PMs (Finding 5, Table 6): a generator trained along the discriminator field."""

from __future__ import annotations

import dataclasses
import os

import torch

from .. import data as fsdata
from ..fields import DiscriminatorFlow, GANLoss, gradient_penalty
from .int_pm import (
    PaperLoopConfig,
    GeneratorPair,
    data_source,
    discriminator_network,
    generator_network,
    int_pm_loss,
    save_generator,
    selection,
)
from .loop import fit, merge_config, seeded, shard, sync_gradients, training_record

__all__ = ["GANConfig", "gan"]


@dataclasses.dataclass
class GANConfig(PaperLoopConfig):
    steps: int = 1900  # Table 6, Gaussians
    betas: tuple[float, float] = (0.5, 0.999)
    loss: str = "vanilla"
    d_steps: int = 1
    gp: float = 0.0
    gp_center: float = 0.0
    latent: int = 128
    width: int = 512
    depth: int = 4
    conv_width: int = 64  # DCGAN generator and discriminator for images (Table 6)
    init_gain: float = 0.02
    normalize: bool = False
    data_size: int | None = None


def gan(
    data="gmm2d",
    *,
    out: str | os.PathLike | None = None,
    config: dict | None = None,
    resume: bool = False,
    allow_changes: bool = False,
    progress: bool = True,
    command: str | None = None,
    select=None,
    select_every: int | None = None,
    **overrides,
):
    """A GAN as an Int-PM (Finding 5): the discriminator's field ∇h = −∇(c∘f) (Eq. 20, the field a
    Discriminator Flow follows) pushed through the generator by `int_pm_loss`."""
    cfg = merge_config(GANConfig, {}, config, overrides)
    src, name, shape = data_source(data, cfg.data_size)
    loss = GANLoss(cfg.loss)
    pair = seeded(
        cfg.seed,
        lambda: GeneratorPair(
            generator_network(shape, cfg, "leaky_relu", cfg.init_gain),
            discriminator_network(shape, cfg, time_conditioned=False),
        ),
    )
    field = DiscriminatorFlow(pair.aux, eta=1.0, loss=cfg.loss, shape=shape, time_conditioned=False)
    opt_g = torch.optim.Adam(pair.g.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(pair.aux.parameters(), lr=cfg.lr, betas=cfg.betas)

    def step_fn(m: GeneratorPair, g: torch.Generator, _step: int) -> float:
        for _ in range(cfg.d_steps):
            z = torch.randn(cfg.batch_size, cfg.latent, generator=g)
            real = fsdata.batches(src, cfg.batch_size, g)
            u = torch.rand(cfg.batch_size, generator=g)
            z, real, u = shard(z), shard(real), shard(u)
            fake = m.g(z).detach()
            obj = loss.discriminator_objective(m.aux(fake), m.aux(real))
            if cfg.gp:
                obj = obj - cfg.gp * gradient_penalty(m.aux, fake, real, None, cfg.gp_center, u=u)
            opt_d.zero_grad(set_to_none=True)
            (-obj).backward()
            sync_gradients(m.aux.parameters())
            opt_d.step()
        x = m.g(shard(torch.randn(cfg.batch_size, cfg.latent, generator=g)))
        opt_g.zero_grad(set_to_none=True)
        int_pm_loss(x, field.grad_h(x.detach(), None), cfg.normalize).backward()  # ∇h = −∇(c∘f), Eq. 11
        sync_gradients(m.g.parameters())
        opt_g.step()
        return -obj.item()

    ema, history = fit(
        pair,
        None,
        cfg,
        out=out,
        resume=resume,
        allow_changes=allow_changes,
        progress=progress,
        optimizers={"g": opt_g, "d": opt_d},
        step_fn=step_fn,
        extra={"objective": "gan", "data": name},
        **selection(select, select_every),
    )
    gen = ema.g
    gen.metadata = training_record(cfg, name, "gan", history, command)
    if out is not None:
        save_generator(gen, out, "gan", name, gen.metadata)
    return gen
