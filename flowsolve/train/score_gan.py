"""Score GANs (Alg. 1, App. B.1, Table 7): a generator distilled from a pretrained data score, with the
generated distribution's score learned online; the generator follows ScoreDifference's ∇h (Eq. 27)."""
from __future__ import annotations

import copy
import dataclasses
import os

import torch
from torch import nn

from .._checks import as_column
from ..errors import ArgumentError
from ..fields import ScoreDifference
from ..models import MLP, EDMPrecond, unet
from .int_pm import PaperLoopConfig, GeneratorPair, generator_network, int_pm_loss, noisy_direction, p_sigma, save_generator, selection
from .loop import fit, merge_config, resolve_device, seeded, shard, sync_gradients, training_record

__all__ = ["ScoreGANConfig", "SCORE_GAN_IMAGE_DEFAULTS", "score_gan"]


@dataclasses.dataclass
class ScoreGANConfig(PaperLoopConfig):
    steps: int = 3150                 # generator steps (Table 7, Gaussians)
    lr: float = 2e-4                  # generator learning rate
    betas: tuple[float, float] = (0.9, 0.999)
    score_lr: float = 2e-4
    score_betas: tuple[float, float] = (0.9, 0.999)
    K: int = 10                       # score steps per generator step (Alg. 1)
    sigma_min: float = 0.1            # p_σ of Eq. 28
    sigma_max: float = 10.0
    rho_grid: float = 3.0              # the exponent of Eq. 28
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

    RENAMED = {"rho": "rho_grid"}   # old config keys, accepted for one release


SCORE_GAN_IMAGE_DEFAULTS = dict(
    # Table 7, MNIST: σ ∈ [0.32, 40], K = 1, score lr 1e-3 (ratio 5), generated score initialised from
    # the teacher, DCGAN generator; β1 = 0 for both networks (distillation practice: at 1000 steps on
    # digits, FD 348 against 469 with β1 = 0.9). Batch 128 instead of 256 (CPU).
    steps=8000, sigma_min=0.32, sigma_max=40.0, K=1, score_lr=1e-3, init_from_teacher=True,
    betas=(0.0, 0.999), score_betas=(0.0, 0.999), checkpoint_every=500)


def _generated_score(teacher, shape: tuple[int, ...], cfg: ScoreGANConfig) -> nn.Module:
    """The generated distribution's denoiser (Alg. 1's s_ρ): a copy of the teacher (Table 7), or a
    fresh EDM-preconditioned UNet (images) / MLP (vectors) seeded from cfg.seed + 1."""
    if cfg.init_from_teacher:
        if not isinstance(teacher, nn.Module):
            raise ArgumentError(f"init_from_teacher: needs a network teacher (an nn.Module denoiser), got "
                                f"{type(teacher).__name__}")
        return copy.deepcopy(teacher).train().requires_grad_(True)
    if len(shape) == 3:
        return seeded(cfg.seed + 1, lambda: EDMPrecond(unet(shape, cfg.score_preset), cfg.sigma_data, cfg.sigma_min,
                                                        cfg.sigma_max, 250.0, shape))
    dim = int(torch.tensor(shape).prod())
    return seeded(cfg.seed + 1, lambda: EDMPrecond(MLP(dim, cfg.score_width, cfg.score_depth, seed=cfg.seed),
                                                    cfg.sigma_data, cfg.sigma_min, cfg.sigma_max, 0.25, shape))


def score_gan(teacher, data_shape: tuple[int, ...] | None = None, *, out: str | os.PathLike | None = None,
              config: dict | None = None, resume: bool = False, allow_changes: bool = False, progress: bool = True, command: str | None = None,
              data_name: str = "teacher", select=None, select_every: int | None = None, **overrides):
    """A Score GAN (Alg. 1, App. B.1): a generator distilled from a data denoiser `teacher`
    (D(x, σ), e.g. `fs.from_pretrained(...)`, `from_diffusers(...)` or an exact mixture denoiser),
    with the generated-distribution score learned online by denoising score matching (K steps per
    generator step), and the generator step of Eq. 27.

    The generator is pushed along the field of Eq. 19/26, `ScoreDifference(teacher, generated score)`,
    asked for its `grad_h`; the trained generator keeps that field as `score_field` (a learned-ρ PM
    for `fs.sample`, Eq. 19).
    """
    shape = tuple(data_shape or getattr(teacher, "data_shape", None) or ())
    if not shape:
        raise ArgumentError("data_shape: the teacher does not say its data shape; pass data_shape=")
    cfg = merge_config(ScoreGANConfig, SCORE_GAN_IMAGE_DEFAULTS if len(shape) == 3 else {}, config, overrides)
    score = _generated_score(teacher, shape, cfg)
    gen = seeded(cfg.seed, lambda: generator_network(shape, cfg))
    pair = GeneratorPair(gen, score)
    field = ScoreDifference(teacher, score, mu_data=cfg.mu_data, mu_rho=cfg.mu_rho, sigma_min=cfg.sigma_min,
                            sigma_max=cfg.sigma_max, rho_grid=cfg.rho_grid, shape=shape)   # ∇h of Eq. 19, 26
    if isinstance(teacher, nn.Module):
        teacher.eval().requires_grad_(False).to(resolve_device(cfg))
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_s = torch.optim.Adam(score.parameters(), lr=cfg.score_lr, betas=cfg.score_betas)

    def step_fn(m: GeneratorPair, g: torch.Generator, _step: int) -> float:
        for _ in range(cfg.K):                                  # Alg. 1, lines 1–3 (Eq. 23)
            z = torch.randn(cfg.batch_size, cfg.latent, generator=g)
            sigma = p_sigma(cfg.batch_size, cfg.sigma_min, cfg.sigma_max, cfg.rho_grid, g)
            eps = torch.randn(cfg.batch_size, *shape, generator=g)
            z, sigma, eps = shard(z), shard(sigma), shard(eps)
            with torch.no_grad():
                x = m.g(z)
            xs = x + as_column(sigma, x) * eps
            per = (m.aux(xs, sigma) - x).square().reshape(len(x), -1).mean(1)
            weight = m.aux.loss_weight(sigma) if hasattr(m.aux, "loss_weight") else 1.0 / sigma ** 2
            s_loss = (weight * per).mean()
            opt_s.zero_grad(set_to_none=True)
            s_loss.backward()
            sync_gradients(m.aux.parameters())
            opt_s.step()
        z = torch.randn(cfg.batch_size, cfg.latent, generator=g)        # Alg. 1, lines 4–5 (Eq. 27)
        sigma = p_sigma(cfg.batch_size, cfg.sigma_min, cfg.sigma_max, cfg.rho_grid, g)
        eps = torch.randn(cfg.batch_size, *shape, generator=g)
        gam = torch.randn(cfg.batch_size, *shape, generator=g) if cfg.gamma else None
        z, sigma, eps = shard(z), shard(sigma), shard(eps)
        x = m.g(z)
        xt = x.detach() + as_column(sigma, x) * eps
        with torch.no_grad():
            direction = as_column(sigma, x) * field.grad_h(xt, sigma)    # σ ∇h (Eq. 27), asked of the field
            if cfg.gamma:                                       # Eq. 22: A(∇h dt + γ dW), dt = lr / B
                direction = noisy_direction(direction, cfg.gamma, cfg.lr / cfg.batch_size, shard(gam))
        opt_g.zero_grad(set_to_none=True)
        int_pm_loss(x, direction, cfg.normalize).backward()
        sync_gradients(m.g.parameters())
        opt_g.step()
        return s_loss.item()

    ema, history = fit(pair, None, cfg, out=out, resume=resume, allow_changes=allow_changes, progress=progress,
                       optimizers={"g": opt_g, "s": opt_s}, step_fn=step_fn,
                       extra={"objective": "score-gan", "data": data_name}, **selection(select, select_every))
    g_out = ema.g
    g_out.metadata = training_record(cfg, data_name, "score-gan", history, command)
    object.__setattr__(g_out, "generated_score", ema.aux)   # kept for inspection, not saved with the generator
    object.__setattr__(g_out, "score_field", ScoreDifference(teacher, ema.aux, mu_data=cfg.mu_data, mu_rho=cfg.mu_rho,
                                                             sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max,
                                                             rho_grid=cfg.rho_grid, shape=shape))
    if out is not None:
        save_generator(g_out, out, "score-gan", data_name, g_out.metadata)
    return g_out
