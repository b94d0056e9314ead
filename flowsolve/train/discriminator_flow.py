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
from .._checks import check_int
from ..errors import ArgumentError

__all__ = [
    "DFConfig",
    "DF_IMAGE_DEFAULTS",
    "DF_RECIPES",
    "discriminator_flow",
    "partial_trajectories",
    "update_particles",
]


def partial_trajectories(
    field, x0: torch.Tensor, i: torch.Tensor, solver: str, grid: torch.Tensor, bounds: list[int], cond: dict
) -> torch.Tensor:
    """The particles x_{i_kb} of each starting point x0_b on `grid` (Alg. 3, lines 3–5), for a
    (K, B) tensor of step indices: (K, B, ...) particles. Each particle is simulated only as far as
    its largest i_kb needs, in pieces of the grid between `bounds` (knot indices, from 0 to the
    last): about half the evaluations of running every particle to the end when K = 1, with the
    same result (tested against a full trajectory)."""
    state, fake = x0.clone(), x0.unsqueeze(0).repeat(len(i), *([1] * x0.dim())).clone()
    last = i.max(0).values
    for a, e in zip(bounds[:-1], bounds[1:]):
        sim = (last > a).nonzero().squeeze(1)  # particles still needed beyond knot a
        if len(sim) == 0:
            break
        _, info = sample(
            field,
            solver,
            grid=grid[a : e + 1],
            x_init=state[sim],
            return_info=True,
            trajectory_every=1,
            nfe=10**6,
            cond={k: v[sim] for k, v in cond.items()},
        )
        traj = info.trajectory  # (e − a + 1, |sim|, ...): knots a .. e
        for k in range(len(i)):
            ik = i[k, sim]
            inside = (ik > a) & (ik <= e)  # knot a itself was set by the previous piece (or is x0)
            fake[k, sim[inside]] = traj[ik[inside] - a, inside.nonzero().squeeze(1)]
        state[sim] = traj[-1]
    return fake


def update_particles(
    field,
    x0: torch.Tensor,
    i: torch.Tensor,
    updates: int,
    solver: str,
    grid: torch.Tensor,
    bounds: list[int],
    cond: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The particles of `updates` discriminator updates from one simulation of the T starting points
    x0 (Alg. 3, lines 3–5, shared): `i` is a (updates·per, T) tensor of step indices, each x_0 gives
    `per` particles to every update. Returns (particles, step indices), (updates, T·per, ...), x_0-major:
    particle b·per + r of an update is x_0 number b at its r-th step of that update."""
    per = len(i) // updates
    if per < 1 or per * updates != len(i):
        raise ArgumentError(f"i: expected a multiple of updates={updates} rows, got {len(i)}")
    fake = partial_trajectories(field, x0, i, solver, grid, bounds, cond)

    def group(a: torch.Tensor) -> torch.Tensor:  # (updates·per, T, ...) → (updates, T·per, ...)
        return a.reshape(updates, per, *a.shape[1:]).transpose(1, 2).reshape(updates, -1, *a.shape[2:])

    return group(fake), group(i)


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
    activation: str = "leaky_relu"  # of the conv discriminator (Table 4: leaky ReLU 0.2); "silu": a smooth f
    emb_size: int = 128
    emb_scale: float = 16.0
    init_gain: float = 0.02
    solver: str = "euler"  # the library solver that simulates the partial trajectories
    segments: int = 8  # trajectory pieces: particles stop once past their training step
    compute_dtype: str | None = None  # e.g. "bfloat16": simulate the particles with a low-precision copy of f
    data_size: int | None = None
    d_steps: int = 1  # discriminator updates per simulation: each x_0's particles at d_steps random times
    trajectories: int | None = None  # x_0 simulated per step (default batch_size); fewer: more times of each
    gp_every: int = 1  # lazy gradient penalty (StyleGAN2): every k-th update, with weight k·gp
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

DF_RECIPES: dict[str, dict] = {
    "paper": {},  # Alg. 3 with Table 4's settings (DF_IMAGE_DEFAULTS on images)
    # Measured on digits to reach a good image model in 90 minutes of 2 CPU cores
    # (pretrained/digits-df's card, docs/results/paper-models.md): each simulation serves four
    # updates; a smooth (SiLU) discriminator, so that the flow contracts its starting noise; half
    # Table 4's batch; the saved flow is the mean of the last two checkpoints, 250 steps apart.
    # (trajectories=32 runs ~1.2 steps/s against ~1.1 but its 90-minute run came out worse on the
    # held-out digits, so it is an option, not part of the recipe.) For images only.
    "fast": dict(d_steps=4, activation="silu", batch_size=64, tail_average=2, checkpoint_every=250),
}


def discriminator_flow(
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
    recipe: str = "paper",
    **overrides,
) -> DiscriminatorFlowModel:
    """Train a Discriminator Flow (Alg. 3): each iteration draws x_0 ~ π, simulates Eq. 20 over the
    uniform N-step grid with the library's solver, picks a random step i_b per sample and trains
    f(·, i_b/N) to separate those particles from data (Eq. 15). With `d_steps=K`, each simulation
    serves K discriminator updates (the particles of each x_0 at K random steps), which cuts the
    simulation cost per update about K/2-fold. With `trajectories=T` (a divisor of batch_size B),
    only T starting points are simulated and each gives B/T particles, at independent random steps,
    to every update: the simulation's sequential network passes are the same, on a smaller batch.
    With `select` (e.g. `fs.evaluate.validation_fd()`, scored on the flow at its own N Euler steps
    against the training digits), the EMA flow is scored every `select_every` steps and the best is
    returned and saved (Table 7's "best validation FID"). `recipe` picks the defaults (DF_RECIPES):
    "paper" is Alg. 3 with Table 4 (the default), "fast" the settings measured to reach a good image
    model in 90 minutes of CPU; `config` and keywords override either."""
    if recipe not in DF_RECIPES:
        raise ArgumentError(f"recipe: expected one of {sorted(DF_RECIPES)}, got {recipe!r}")
    cfg = merge_config(DFConfig, {}, config, overrides)
    src, name, shape = data_source(data, cfg.data_size)
    if len(shape) == 3:  # Table 4, MNIST column, then the recipe's settings
        cfg = merge_config(DFConfig, {**DF_IMAGE_DEFAULTS, **DF_RECIPES[recipe]}, config, overrides)
    elif DF_RECIPES[recipe]:
        raise ArgumentError(
            f"recipe: {recipe!r} is measured on images (data of shape (C, H, W)), got {name!r} of shape "
            f"{tuple(shape)}; use recipe='paper' (Table 4's Gaussian settings) on vector data"
        )
    check_int("d_steps", cfg.d_steps, 1)
    check_int("gp_every", cfg.gp_every, 1)
    check_int("segments", cfg.segments, 1)
    n_traj = cfg.batch_size if cfg.trajectories is None else cfg.trajectories
    check_int("trajectories", n_traj, 1)
    if cfg.batch_size % n_traj:
        raise ArgumentError(
            f"trajectories: expected a divisor of batch_size={cfg.batch_size} (each x_0 gives the same "
            f"number of particles to every update), got {n_traj}"
        )
    per = cfg.batch_size // n_traj  # particles of each x_0 in one update
    loss = GANLoss(cfg.loss)
    classes = fsdata.num_classes(src) if cfg.conditional else 0
    disc = seeded(cfg.seed, lambda: discriminator_network(shape, cfg, time_conditioned=True, num_classes=classes))
    model = DiscriminatorFlowModel(disc, cfg.eta, cfg.loss, cfg.N, shape)
    if classes:
        model.conditioning = {"class_labels": {"classes": classes}}
    opt = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=cfg.betas)
    grid = torch.linspace(0, 1, cfg.N + 1, dtype=torch.float64)

    bounds = sorted({round(cfg.N * k / cfg.segments) for k in range(cfg.segments + 1)})

    def step_fn(m: DiscriminatorFlowModel, g: torch.Generator, step: int) -> float:
        # every draw is global-sized (the random stream stays in step across processes), then sharded
        x0 = torch.randn(n_traj, *shape, generator=g)
        field = DiscriminatorFlow(m.f, cfg.eta, cfg.loss, cfg.N, shape=shape, compute_dtype=cfg.compute_dtype)
        i = torch.randint(cfg.N, (cfg.d_steps * per, n_traj), generator=g)
        if classes:  # particles carry the labels of the real batches they are compared with
            real, y_traj = fsdata.labelled_batches(src, n_traj, g)
            y = y_traj.repeat_interleave(per)  # particle b·per + r of an update comes from x_0 number b
            if per > 1:  # the first real batch must match the repeated labels too
                real = fsdata.batch_with_labels(src, y, g)
            reals = [real] + [fsdata.batch_with_labels(src, y, g) for _ in range(cfg.d_steps - 1)]
            cond, traj_cond = {"class_labels": shard(y)}, {"class_labels": shard(y_traj)}
        else:
            reals, cond, traj_cond = [fsdata.batches(src, cfg.batch_size, g) for _ in range(cfg.d_steps)], {}, {}
        us = [torch.rand(cfg.batch_size, generator=g) for _ in range(cfg.d_steps)]
        x0, i = shard(x0), torch.stack([shard(r) for r in i])
        # one simulation of each x_0 serves all d_steps updates: its particles at d_steps·per times
        fakes, i = update_particles(field, x0, i, cfg.d_steps, cfg.solver, grid, bounds, traj_cond)
        total = 0.0
        for k, (fake, ik, real, u) in enumerate(zip(fakes, i, reals, us)):
            real, u, t = shard(real), shard(u), ik.to(fake.dtype) / cfg.N
            objective = loss.discriminator_objective(m.f(fake, t, **cond), m.f(real, t, **cond))
            if cfg.gp and (step * cfg.d_steps + k) % cfg.gp_every == 0:
                f = (lambda x, tt: m.f(x, tt, **cond)) if cond else m.f
                penalty = gradient_penalty(f, fake, real, t, cfg.gp_center, u=u)
                objective = objective - cfg.gp * cfg.gp_every * penalty
            opt.zero_grad(set_to_none=True)
            (-objective).backward()
            sync_gradients(m.parameters())
            opt.step()
            total += -objective.item()
        return total / cfg.d_steps

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
        **({"select": select, "select_every": select_every} if select is not None else {}),
    )
    ema.metadata = training_record(cfg, name, "discriminator-flow", history, command, recipe=recipe)
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
