"""The paper's models on the one training loop: Discriminator Flows (Alg. 3), GANs (Finding 5),
Score GANs (Alg. 1) and the MMD generator (the Int-PM twin of the MMD flow, Table 2).

Every generator model is trained by the same Int-PM step (Eq. 11, 25, 27): minimise
−Σ g_θ(z) · stopgrad(v(g_θ(z))), where v is the particle field ∇h_ρ the generated particles would
follow as a PM. Defaults are the paper's Tables 4, 6, 7 for the 2-D Gaussian mixture.
"""
from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from .. import data as fsdata
from .loop import (LoopConfig, fit, is_main_process, merge_config, resolve_device, seeded, shard, shard_all,
                   sync_gradients, training_record)

__all__ = ["int_pm_loss", "noisy_direction", "p_sigma", "DFConfig", "GANConfig", "ScoreGANConfig",
           "SCORE_GAN_IMAGE_DEFAULTS", "MMDConfig", "DiscriminatorFlowModel", "discriminator_flow", "gan", "score_gan", "mmd_generator"]


# -- the Int-PM generator step ------------------------------------------------------------------
def int_pm_loss(x: torch.Tensor, direction: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """−mean_b g_θ(z_b) · stopgrad(v_b) (Eq. 25, 27): its θ-gradient is −E[∇_θ g^T v], so a gradient
    step moves every generated particle along v through the generator's NTK (Eq. 12–13).
    `normalize` rescales each v_b to unit RMS (per-sample gradient normalisation)."""
    v = direction.detach()
    if normalize:
        v = v / v.reshape(len(v), -1).square().mean(1).sqrt().clamp(min=1e-12).view(-1, *([1] * (v.dim() - 1)))
    return -(x * v).reshape(len(x), -1).sum(1).mean()


def noisy_direction(direction: torch.Tensor, gamma: float, dt: float, noise: torch.Tensor) -> torch.Tensor:
    """The particle direction of the noisy Int-PM (Eq. 22), dg = A(∇h dt + γ dW): ∇h + γ ξ/√dt with
    ξ ~ N(0, I), so that a generator step of size dt moves free particles by ∇h dt + γ √dt ξ, the
    Euler–Maruyama step. For the mean loss of `int_pm_loss` under SGD, dt = lr / batch size."""
    if not dt > 0:
        raise ValueError(f"dt: expected a positive step, got {dt!r}")
    return direction + gamma * noise / dt ** 0.5


def p_sigma(n: int, sigma_min: float, sigma_max: float, rho: float, generator: torch.Generator) -> torch.Tensor:
    """σ = (σ_max^{1/ρ} + u (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, u ~ U[0, 1] (Eq. 28)."""
    u = torch.rand(n, generator=generator)
    return (sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _generator(shape: tuple[int, ...], cfg, activation: str = "relu", init_gain: float | None = None) -> nn.Module:
    """The generator of Tables 6–7: an MLP for vectors, DCGAN (batch norm, tanh, normal init 0.02)
    for images (C, H, W)."""
    from ..models.gan import DCGANGenerator, Generator
    if len(shape) == 3:
        return DCGANGenerator(shape, cfg.latent, cfg.conv_width, init_gain=0.02)
    return Generator(shape, cfg.latent, cfg.width, cfg.depth, activation, init_gain=init_gain)


def _discriminator(shape: tuple[int, ...], cfg, time_conditioned: bool) -> nn.Module:
    """The discriminator of Tables 4, 6: an MLP for vectors, a DCGAN-style conv net (FiLM time
    modulation when time-conditioned) for images."""
    from ..models.gan import ConvDiscriminator, Discriminator
    emb = dict(emb_size=getattr(cfg, "emb_size", 128), emb_scale=getattr(cfg, "emb_scale", 16.0))
    if len(shape) == 3:
        return ConvDiscriminator(shape, cfg.conv_width, time_conditioned, init_gain=cfg.init_gain, seed=cfg.seed, **emb)
    if len(shape) != 1:
        raise ValueError(f"data: expected vectors (d,) or images (C, H, W), got samples of shape {shape}")
    return Discriminator(shape[0], cfg.width, cfg.depth, time_conditioned, init_gain=cfg.init_gain, seed=cfg.seed,
                         **emb)


def _source(data, size=None):
    name = data if isinstance(data, str) else "custom"
    src = fsdata.load(data, size=size) if isinstance(data, str) else fsdata.as_source(data)
    return src, name, fsdata.shape_of(src)


# -- Discriminator Flow (Alg. 3, Table 4) ---------------------------------------------------------
@dataclasses.dataclass
class DFConfig(LoopConfig):
    steps: int = 4000
    batch_size: int = 128
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    warmup: int = 0
    ema_decay: float = 0.0           # the flow must use the discriminator it was trained with
    grad_clip: float | None = None
    checkpoint_every: int = 500
    N: int = 56                      # generation steps (Alg. 3)
    eta: float = 20.0                # gradient strength η
    loss: str = "vanilla"            # a, b, c of Eq. 15–16 (models.gan.LOSSES)
    gp: float = 0.0                  # gradient-penalty strength R (Table 4: 0 for Gaussians, 0.04 MNIST)
    gp_center: float = 0.0
    width: int = 512                 # MLP discriminator (vectors)
    depth: int = 4
    conv_width: int = 64             # conv discriminator with FiLM (images; Table 4, MNIST: DCGAN width 64)
    emb_size: int = 128
    emb_scale: float = 16.0
    init_gain: float = 0.02
    solver: str = "euler"            # the library solver that simulates the partial trajectories
    segments: int = 8                # trajectory pieces: particles stop once past their training step
    sim_dtype: str | None = None     # e.g. "bfloat16": simulate the particles with a low-precision copy of f
    data_size: int | None = None


DF_IMAGE_DEFAULTS = dict(
    # Table 4, MNIST: IPM loss with a gradient penalty of strength 0.04 (center 0), η = 2, N = 64,
    # DCGAN-style discriminator of width 64 (here with FiLM time modulation, normal init).
    loss="ipm", gp=0.04, gp_center=0.0, eta=2.0, N=64)


class DiscriminatorFlowModel(nn.Module):
    """A trained Discriminator Flow: the time-conditioned discriminator f(x, t) and its flow settings.
    `field(t_end=...)` is the PM of Eq. 20 for `fs.sample` with any solver and grid."""

    def __init__(self, discriminator: nn.Module, eta: float, loss: str, steps: int,
                 data_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.f, self.eta, self.loss, self.steps = discriminator, float(eta), loss, int(steps)
        self.data_shape = data_shape
        self.metadata: dict = {}

    def field(self, t_end: float = 1.0, compute_dtype: torch.dtype | str | None = None):
        from ..fields import DiscriminatorFlow
        return DiscriminatorFlow(self.f, self.eta, self.loss, self.steps, t_end=t_end, shape=self.data_shape,
                                 compute_dtype=compute_dtype)

    def forward(self, x, t):
        return self.f(x, t)


def discriminator_flow(data="gmm2d", *, out: str | os.PathLike | None = None, config: dict | None = None,
                       resume: bool = False, progress: bool = True, command: str | None = None,
                       **overrides) -> DiscriminatorFlowModel:
    """Train a Discriminator Flow (Alg. 3): each iteration draws x_0 ~ π, simulates Eq. 20 over the
    uniform N-step grid with the library's solver, picks a random step i_b per sample and trains
    f(·, i_b/N) to separate those particles from data (Eq. 15)."""
    from ..fields import DiscriminatorFlow
    from ..models.gan import GANLoss, gradient_penalty
    from ..sample import sample

    cfg = merge_config(DFConfig, {}, config, overrides)
    src, name, shape = _source(data, cfg.data_size)
    if len(shape) == 3:                                  # Table 4, MNIST column
        cfg = merge_config(DFConfig, DF_IMAGE_DEFAULTS, config, overrides)
    loss = GANLoss(cfg.loss)
    disc = seeded(cfg.seed, lambda: _discriminator(shape, cfg, time_conditioned=True))
    model = DiscriminatorFlowModel(disc, cfg.eta, cfg.loss, cfg.N, shape)
    opt = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=cfg.betas)
    grid = torch.linspace(0, 1, cfg.N + 1, dtype=torch.float64)

    bounds = sorted({round(cfg.N * k / cfg.segments) for k in range(cfg.segments + 1)})

    def partial_trajectories(field, x0: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """x_{i_b/N} for every sample b (Alg. 3, lines 3–5), simulating each particle only as far as
        its own i_b needs, in `segments` pieces of the uniform grid: about half the evaluations of
        running every particle to t = 1, with the same result."""
        state, fake = x0.clone(), x0.clone()
        for a, e in zip(bounds[:-1], bounds[1:]):
            sim = (i > a).nonzero().squeeze(1)
            if len(sim) == 0:
                break
            _, info = sample(field, cfg.solver, grid=grid[a:e + 1], x_init=state[sim], return_info=True,
                             trajectory_every=1, nfe=10 ** 6)
            traj = info.trajectory                                     # (e − a + 1, |sim|, d)
            inside = i[sim] < e
            fake[sim[inside]] = traj[i[sim[inside]] - a, inside.nonzero().squeeze(1)]
            state[sim] = traj[-1]
        return fake

    def step_fn(m: DiscriminatorFlowModel, g: torch.Generator, _step: int) -> float:
        # every draw is global-sized (the random stream stays in step across processes), then sharded
        x0 = torch.randn(cfg.batch_size, *shape, generator=g)
        field = DiscriminatorFlow(m.f, cfg.eta, cfg.loss, cfg.N, shape=shape, compute_dtype=cfg.sim_dtype)
        i = torch.randint(cfg.N, (cfg.batch_size,), generator=g)
        real = fsdata.batches(src, cfg.batch_size, g)
        u = torch.rand(cfg.batch_size, generator=g)
        x0, i, real, u = shard(x0), shard(i), shard(real), shard(u)
        fake = partial_trajectories(field, x0, i)
        t = i.to(fake.dtype) / cfg.N
        objective = loss.discriminator_objective(m.f(fake, t), m.f(real, t))
        if cfg.gp:
            objective = objective - cfg.gp * gradient_penalty(m.f, fake, real, t, cfg.gp_center, u=u)
        opt.zero_grad(set_to_none=True)
        (-objective).backward()
        sync_gradients(m.parameters())
        opt.step()
        return -objective.item()

    ema, history = fit(model, None, cfg, out=out, resume=resume, progress=progress, optimizers={"d": opt},
                       step_fn=step_fn, extra={"objective": "discriminator-flow", "data": name})
    ema.metadata = training_record(cfg, name, "discriminator-flow", history, command)
    if out is not None and is_main_process():
        from ..models import save_pretrained
        save_pretrained(ema.f, out, type="discriminator-flow", data=name, data_shape=list(shape),
                        flow={"eta": cfg.eta, "loss": cfg.loss, "steps": cfg.N}, **ema.metadata)
    return ema


# -- generator models --------------------------------------------------------------------------
class _GenPair(nn.Module):
    """Generator plus its auxiliary network (discriminator or generated-distribution score)."""

    def __init__(self, g: nn.Module, aux: nn.Module | None) -> None:
        super().__init__()
        self.g, self.aux = g, aux


def _selection(select, every, pair: bool = True) -> dict:
    """fit's model selection (Table 7: best validation FID) for a generator model: `select(generator)`
    is scored on the EMA generator (lower is better)."""
    if select is None:
        return {}
    return {"select": (lambda m: select(m.g)) if pair else select, "select_every": every}


def _save_generator(gen, out, objective: str, name: str, metadata: dict) -> None:
    if not is_main_process():
        return
    from ..models import save_pretrained
    save_pretrained(gen, out, type="generator", objective=objective, data=name, **metadata)


@dataclasses.dataclass
class GANConfig(LoopConfig):
    steps: int = 1900                 # Table 6, Gaussians
    batch_size: int = 128
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    warmup: int = 0
    ema_decay: float = 0.0
    grad_clip: float | None = None
    checkpoint_every: int = 500
    loss: str = "vanilla"
    d_steps: int = 1
    gp: float = 0.0
    gp_center: float = 0.0
    latent: int = 128
    width: int = 512
    depth: int = 4
    conv_width: int = 64              # DCGAN generator and discriminator for images (Table 6)
    init_gain: float = 0.02
    normalize: bool = False
    data_size: int | None = None


def gan(data="gmm2d", *, out: str | os.PathLike | None = None, config: dict | None = None, resume: bool = False,
        progress: bool = True, command: str | None = None, select=None, select_every: int | None = None,
        **overrides):
    """A GAN as an Int-PM (Finding 5): h = −c∘f, pushed through the generator by `int_pm_loss`."""
    from ..models.gan import GANLoss, gradient_penalty

    cfg = merge_config(GANConfig, {}, config, overrides)
    src, name, shape = _source(data, cfg.data_size)
    loss = GANLoss(cfg.loss)
    pair = seeded(cfg.seed, lambda: _GenPair(_generator(shape, cfg, "leaky_relu", cfg.init_gain),
                                             _discriminator(shape, cfg, time_conditioned=False)))
    opt_g = torch.optim.Adam(pair.g.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(pair.aux.parameters(), lr=cfg.lr, betas=cfg.betas)

    def step_fn(m: _GenPair, g: torch.Generator, _step: int) -> float:
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
        xd = x.detach().requires_grad_(True)
        (grad_c,) = torch.autograd.grad(loss.c(m.aux(xd)).sum(), xd)
        opt_g.zero_grad(set_to_none=True)
        int_pm_loss(x, -grad_c, cfg.normalize).backward()               # ∇h = −∇(c∘f)
        sync_gradients(m.g.parameters())
        opt_g.step()
        return -obj.item()

    ema, history = fit(pair, None, cfg, out=out, resume=resume, progress=progress,
                       optimizers={"g": opt_g, "d": opt_d}, step_fn=step_fn, extra={"objective": "gan", "data": name},
                       **_selection(select, select_every))
    gen = ema.g
    gen.metadata = training_record(cfg, name, "gan", history, command)
    if out is not None:
        _save_generator(gen, out, "gan", name, gen.metadata)
    return gen


@dataclasses.dataclass
class ScoreGANConfig(LoopConfig):
    steps: int = 3150                 # generator steps (Table 7, Gaussians)
    batch_size: int = 128
    lr: float = 2e-4                  # generator learning rate
    betas: tuple[float, float] = (0.9, 0.999)
    score_lr: float = 2e-4
    score_betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 0
    ema_decay: float = 0.0
    grad_clip: float | None = None
    checkpoint_every: int = 500
    K: int = 10                       # score steps per generator step (Alg. 1)
    sigma_min: float = 0.1            # p_σ of Eq. 28
    sigma_max: float = 10.0
    rho: float = 3.0
    mu_data: float = 1.0              # Eq. 26–27 (NCSN: 1, 1; EDM: 2, 1)
    mu_rho: float = 1.0
    latent: int = 128
    width: int = 512
    depth: int = 4
    conv_width: int = 64              # DCGAN generator for images (Table 7, MNIST: width 64, batch norm)
    score_width: int = 512
    score_depth: int = 4
    score_preset: str = "tiny"        # UNet preset of a fresh generated score for images
    sigma_data: float = 0.5
    gamma: float = 0.0                # Eq. 22: Brownian share γ added to the particle direction (noisy Int-PM)
    init_from_teacher: bool = False   # start the generated score from the teacher's weights
    normalize: bool = False           # per-sample gradient normalisation
    data_size: int | None = None


SCORE_GAN_IMAGE_DEFAULTS = dict(
    # Table 7, MNIST: σ ∈ [0.32, 40], K = 1, score lr 1e-3 (ratio 5), generated score initialised from
    # the teacher, DCGAN generator; β1 = 0 for both networks (distillation practice: at 1000 steps on
    # digits, FD 348 against 469 with β1 = 0.9). Batch 128 instead of 256 (CPU).
    steps=8000, sigma_min=0.32, sigma_max=40.0, K=1, score_lr=1e-3, init_from_teacher=True,
    betas=(0.0, 0.999), score_betas=(0.0, 0.999), checkpoint_every=500)


def score_gan(teacher, data_shape: tuple[int, ...] | None = None, *, out: str | os.PathLike | None = None,
              config: dict | None = None, resume: bool = False, progress: bool = True, command: str | None = None,
              data_name: str = "teacher", select=None, select_every: int | None = None, **overrides):
    """A Score GAN (Alg. 1, App. B.1): a generator distilled from a data denoiser `teacher`
    (D(x, σ), e.g. `fs.from_pretrained(...)`, `from_diffusers(...)` or an exact mixture denoiser),
    with the generated-distribution score learned online by denoising score matching (K steps per
    generator step), and the generator step of Eq. 27."""
    import copy

    from ..models import MLP, EDMPrecond, unet

    shape = tuple(data_shape or getattr(teacher, "data_shape", None) or ())
    if not shape:
        raise ValueError("data_shape: the teacher does not say its data shape; pass data_shape=")
    cfg = merge_config(ScoreGANConfig, SCORE_GAN_IMAGE_DEFAULTS if len(shape) == 3 else {}, config, overrides)
    dim = int(torch.tensor(shape).prod())
    if cfg.init_from_teacher:
        if not isinstance(teacher, nn.Module):
            raise ValueError(f"init_from_teacher: needs a network teacher (an nn.Module denoiser), got "
                             f"{type(teacher).__name__}")
        score = copy.deepcopy(teacher).train().requires_grad_(True)
    elif len(shape) == 3:
        score = seeded(cfg.seed + 1, lambda: EDMPrecond(unet(shape, cfg.score_preset), cfg.sigma_data, cfg.sigma_min,
                                                         cfg.sigma_max, 250.0, shape))
    else:
        score = seeded(cfg.seed + 1, lambda: EDMPrecond(MLP(dim, cfg.score_width, cfg.score_depth, seed=cfg.seed),
                                                         cfg.sigma_data, cfg.sigma_min, cfg.sigma_max, 0.25, shape))
    gen = seeded(cfg.seed, lambda: _generator(shape, cfg))
    pair = _GenPair(gen, score)
    if isinstance(teacher, nn.Module):
        teacher.eval().requires_grad_(False).to(resolve_device(cfg))
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_s = torch.optim.Adam(score.parameters(), lr=cfg.score_lr, betas=cfg.score_betas)

    def col(s, x):
        return s.view(-1, *([1] * (x.dim() - 1)))

    def step_fn(m: _GenPair, g: torch.Generator, _step: int) -> float:
        for _ in range(cfg.K):                                  # Alg. 1, lines 1–3 (Eq. 23)
            z = torch.randn(cfg.batch_size, cfg.latent, generator=g)
            sigma = p_sigma(cfg.batch_size, cfg.sigma_min, cfg.sigma_max, cfg.rho, g)
            eps = torch.randn(cfg.batch_size, *shape, generator=g)
            z, sigma, eps = shard(z), shard(sigma), shard(eps)
            with torch.no_grad():
                x = m.g(z)
            xs = x + col(sigma, x) * eps
            per = (m.aux(xs, sigma) - x).square().reshape(len(x), -1).mean(1)
            weight = m.aux.loss_weight(sigma) if hasattr(m.aux, "loss_weight") else 1.0 / sigma ** 2
            s_loss = (weight * per).mean()
            opt_s.zero_grad(set_to_none=True)
            s_loss.backward()
            sync_gradients(m.aux.parameters())
            opt_s.step()
        z = torch.randn(cfg.batch_size, cfg.latent, generator=g)        # Alg. 1, lines 4–5 (Eq. 27)
        sigma = p_sigma(cfg.batch_size, cfg.sigma_min, cfg.sigma_max, cfg.rho, g)
        eps = torch.randn(cfg.batch_size, *shape, generator=g)
        gam = torch.randn(cfg.batch_size, *shape, generator=g) if cfg.gamma else None
        z, sigma, eps = shard(z), shard(sigma), shard(eps)
        x = m.g(z)
        xt = x.detach() + col(sigma, x) * eps
        with torch.no_grad():
            d_data, d_rho = teacher(xt, sigma), m.aux(xt, sigma)
            s = col(sigma, x)
            direction = s * (cfg.mu_data * (d_data - xt) - cfg.mu_rho * (d_rho - xt)) / s ** 2   # σ · ∇h
            if cfg.gamma:                                       # Eq. 22: A(∇h dt + γ dW), dt = lr / B
                direction = noisy_direction(direction, cfg.gamma, cfg.lr / cfg.batch_size, shard(gam))
        opt_g.zero_grad(set_to_none=True)
        int_pm_loss(x, direction, cfg.normalize).backward()
        sync_gradients(m.g.parameters())
        opt_g.step()
        return s_loss.item()

    ema, history = fit(pair, None, cfg, out=out, resume=resume, progress=progress,
                       optimizers={"g": opt_g, "s": opt_s}, step_fn=step_fn,
                       extra={"objective": "score-gan", "data": data_name}, **_selection(select, select_every))
    g_out = ema.g
    g_out.metadata = training_record(cfg, data_name, "score-gan", history, command)
    object.__setattr__(g_out, "generated_score", ema.aux)   # kept for inspection, not saved with the generator
    if out is not None:
        _save_generator(g_out, out, "score-gan", data_name, g_out.metadata)
    return g_out


@dataclasses.dataclass
class MMDConfig(LoopConfig):
    # not in the paper's tables (Table 2 gives the flow only): measured on the mixture, 2000 steps
    # without EMA leave 10% of the mass between modes, 4000 steps with EMA 0.999 leave 6%
    steps: int = 4000
    batch_size: int = 256
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 0
    ema_decay: float = 0.999
    grad_clip: float | None = None
    checkpoint_every: int = 500
    bandwidths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    latent: int = 128
    width: int = 512
    depth: int = 4
    conv_width: int = 64              # DCGAN generator for images
    normalize: bool = False
    data_size: int | None = None


def mmd_generator(data="gmm2d", *, out: str | os.PathLike | None = None, config: dict | None = None,
                  resume: bool = False, progress: bool = True, command: str | None = None, select=None,
                  select_every: int | None = None, **overrides):
    """The Int-PM twin of the MMD gradient flow (Table 2): the generator follows
    ∇h = ∇(E_data k(x, ·) − E_ρ k(x, ·)) with ρ the current generated batch (a moment-matching
    generator, no discriminator). On several processes each generates its rows of the global batch
    and gathers everyone's, so ρ is the same global batch as in one process."""
    from ..distributed import gather_rows
    from ..fields.particles import rbf_kernel_grad

    cfg = merge_config(MMDConfig, {}, config, overrides)
    src, name, shape = _source(data, cfg.data_size)
    gen = seeded(cfg.seed, lambda: _generator(shape, cfg))
    opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=cfg.betas)

    def step_fn(m, g, _step):
        x = m(shard(torch.randn(cfg.batch_size, cfg.latent, generator=g)))     # this process's generated rows
        real = shard_all(fsdata.batches(src, cfg.batch_size, g)).reshape(cfg.batch_size, -1)
        xf = x.detach().reshape(len(x), -1)
        everyone = torch.cat(gather_rows(xf))                # ρ is the whole generated batch, on every process
        _, g_data = rbf_kernel_grad(xf, real, cfg.bandwidths)
        _, g_self = rbf_kernel_grad(xf, everyone, cfg.bandwidths)
        direction = (g_data.mean(1) - g_self.mean(1)).reshape(x.shape)
        opt.zero_grad(set_to_none=True)
        int_pm_loss(x, direction, cfg.normalize).backward()
        sync_gradients(m.parameters())
        opt.step()
        return float(direction.square().sum(-1).mean().sqrt())

    ema, history = fit(gen, None, cfg, out=out, resume=resume, progress=progress, optimizers={"g": opt},
                       step_fn=step_fn, extra={"objective": "mmd", "data": name},
                       **_selection(select, select_every, pair=False))
    ema.metadata = training_record(cfg, name, "mmd", history, command)
    if out is not None:
        _save_generator(ema, out, "mmd", name, ema.metadata)
    return ema
