"""Discriminator Flows (Alg. 3, Table 4): a GAN without a generator. Each iteration draws x_0 ~ π,
simulates the discriminator field (Eq. 20) with the library's own solver, and trains f(·, t) to
separate the particles at t from data (Eq. 15). The trained model's `.field()` is the same field."""

from __future__ import annotations

import dataclasses
import os

import torch

from ..fields import DiscriminatorFlow, GANLoss, gradient_penalty
from ..models import DiscriminatorFlowModel, save_pretrained
from ..sample import sample
from .int_pm import PaperLoopConfig, data_source, discriminator_network
from .loop import fit, is_main_process, merge_config, seeded, shard, sync_gradients, training_record
from .. import data as fsdata

__all__ = ["DFConfig", "DF_IMAGE_DEFAULTS", "discriminator_flow"]


@dataclasses.dataclass
class DFConfig(PaperLoopConfig):
    steps: int = 4000
    betas: tuple[float, float] = (0.5, 0.999)
    N: int = 56  # generation steps (Alg. 3)
    eta: float = 20.0  # gradient strength η
    loss: str = "vanilla"  # a, b, c of Eq. 15–16 (models.gan.LOSSES)
    gp: float = 0.0  # gradient-penalty strength R (Table 4: 0 for Gaussians, 0.04 MNIST)
    gp_center: float = 0.0
    width: int = 512  # MLP discriminator (vectors)
    depth: int = 4
    conv_width: int = 64  # conv discriminator with FiLM (images; Table 4, MNIST: DCGAN width 64)
    emb_size: int = 128
    emb_scale: float = 16.0
    init_gain: float = 0.02
    solver: str = "euler"  # the library solver that simulates the partial trajectories
    segments: int = 8  # trajectory pieces: particles stop once past their training step
    compute_dtype: str | None = None  # e.g. "bfloat16": simulate the particles with a low-precision copy of f
    data_size: int | None = None
    conditional: bool = False  # class-conditional f(x, t, y) (projection discriminator), labelled data

    RENAMED = {"sim_dtype": "compute_dtype"}  # old config keys, accepted for one release


DF_IMAGE_DEFAULTS = dict(
    # Table 4, MNIST: IPM loss with a gradient penalty of strength 0.04 (center 0), η = 2, N = 64,
    # DCGAN-style discriminator of width 64 (here with FiLM time modulation, normal init).
    loss="ipm",
    gp=0.04,
    gp_center=0.0,
    eta=2.0,
    N=64,
)


def discriminator_flow(
    data="gmm2d",
    *,
    out: str | os.PathLike | None = None,
    config: dict | None = None,
    resume: bool = False,
    allow_changes: bool = False,
    progress: bool = True,
    command: str | None = None,
    **overrides,
) -> DiscriminatorFlowModel:
    """Train a Discriminator Flow (Alg. 3): each iteration draws x_0 ~ π, simulates Eq. 20 over the
    uniform N-step grid with the library's solver, picks a random step i_b per sample and trains
    f(·, i_b/N) to separate those particles from data (Eq. 15)."""
    cfg = merge_config(DFConfig, {}, config, overrides)
    src, name, shape = data_source(data, cfg.data_size)
    if len(shape) == 3:  # Table 4, MNIST column
        cfg = merge_config(DFConfig, DF_IMAGE_DEFAULTS, config, overrides)
    loss = GANLoss(cfg.loss)
    classes = fsdata.num_classes(src) if cfg.conditional else 0
    disc = seeded(cfg.seed, lambda: discriminator_network(shape, cfg, time_conditioned=True, num_classes=classes))
    model = DiscriminatorFlowModel(disc, cfg.eta, cfg.loss, cfg.N, shape)
    if classes:
        model.conditioning = {"class_labels": {"classes": classes}}
    opt = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=cfg.betas)
    grid = torch.linspace(0, 1, cfg.N + 1, dtype=torch.float64)

    bounds = sorted({round(cfg.N * k / cfg.segments) for k in range(cfg.segments + 1)})

    def partial_trajectories(field, x0: torch.Tensor, i: torch.Tensor, cond: dict) -> torch.Tensor:
        """x_{i_b/N} for every sample b (Alg. 3, lines 3–5), simulating each particle only as far as
        its own i_b needs, in `segments` pieces of the uniform grid: about half the evaluations of
        running every particle to t = 1, with the same result."""
        state, fake = x0.clone(), x0.clone()
        for a, e in zip(bounds[:-1], bounds[1:]):
            sim = (i > a).nonzero().squeeze(1)
            if len(sim) == 0:
                break
            _, info = sample(
                field,
                cfg.solver,
                grid=grid[a : e + 1],
                x_init=state[sim],
                return_info=True,
                trajectory_every=1,
                nfe=10**6,
                cond={k: v[sim] for k, v in cond.items()},
            )
            traj = info.trajectory  # (e − a + 1, |sim|, d)
            inside = i[sim] < e
            fake[sim[inside]] = traj[i[sim[inside]] - a, inside.nonzero().squeeze(1)]
            state[sim] = traj[-1]
        return fake

    def step_fn(m: DiscriminatorFlowModel, g: torch.Generator, _step: int) -> float:
        # every draw is global-sized (the random stream stays in step across processes), then sharded
        x0 = torch.randn(cfg.batch_size, *shape, generator=g)
        field = DiscriminatorFlow(m.f, cfg.eta, cfg.loss, cfg.N, shape=shape, compute_dtype=cfg.compute_dtype)
        i = torch.randint(cfg.N, (cfg.batch_size,), generator=g)
        if classes:  # particles carry the labels of the real batch they are compared with
            real, y = fsdata.labelled_batches(src, cfg.batch_size, g)
            cond = {"class_labels": shard(y)}
        else:
            real, cond = fsdata.batches(src, cfg.batch_size, g), {}
        u = torch.rand(cfg.batch_size, generator=g)
        x0, i, real, u = shard(x0), shard(i), shard(real), shard(u)
        fake = partial_trajectories(field, x0, i, cond)
        t = i.to(fake.dtype) / cfg.N
        objective = loss.discriminator_objective(m.f(fake, t, **cond), m.f(real, t, **cond))
        if cfg.gp:
            f = (lambda x, tt: m.f(x, tt, **cond)) if cond else m.f
            objective = objective - cfg.gp * gradient_penalty(f, fake, real, t, cfg.gp_center, u=u)
        opt.zero_grad(set_to_none=True)
        (-objective).backward()
        sync_gradients(m.parameters())
        opt.step()
        return -objective.item()

    ema, history = fit(
        model,
        None,
        cfg,
        out=out,
        resume=resume,
        allow_changes=allow_changes,
        progress=progress,
        optimizers={"d": opt},
        step_fn=step_fn,
        extra={"objective": "discriminator-flow", "data": name},
    )
    ema.metadata = training_record(cfg, name, "discriminator-flow", history, command)
    if out is not None and is_main_process():
        save_pretrained(
            ema.f,
            out,
            type="discriminator-flow",
            data=name,
            data_shape=list(shape),
            flow={"eta": cfg.eta, "loss": cfg.loss, "N": cfg.N},
            **({"conditioning": model.conditioning} if classes else {}),
            **ema.metadata,
        )
    return ema
