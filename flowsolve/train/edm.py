"""Data-score training: EDM denoisers (the paper's s_ψ, Table 5) and DDPM ε-prediction UNets.

EDM (Karras et al. 2022): ln σ ~ N(P_mean, P_std²), loss λ(σ) ‖D(x + σn; σ) − x‖² with
λ = (σ² + σ_d²)/(σ σ_d)², through the preconditioned network of `models.EDMPrecond`.
DDPM (Ho et al. 2020): t ~ U{0, …, T − 1}, loss ‖ε̂ − ε‖², which in σ-variables is the same
denoising loss with σ = σ_t and λ = 1/σ², through the diffusers adapter itself, so the saved
UNet + DDPMScheduler is a genuine diffusers pipeline.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from .. import data as fsdata
from .loop import LoopConfig, fit, is_main_process, merge_config, seeded, shard, training_record
from ..errors import ArgumentError

__all__ = ["EDMConfig", "edm", "ddpm", "defaults_for"]


@dataclasses.dataclass
class EDMConfig(LoopConfig):
    network: str = "auto"  # "mlp" | "unet" | "auto" (mlp for vectors, unet for images)
    width: int = 512  # MLP width (Table 5, Gaussians)
    depth: int = 4  # MLP hidden layers
    emb_size: int = 128  # Fourier time-embedding size
    emb_scale: float = 16.0  # Fourier frequency scale
    unet_preset: str = "tiny"  # models.UNET_PRESETS
    sigma_data: float = 0.5  # Table 5
    sigma_min: float = 0.002  # Table 5
    sigma_max: float = 40.0  # Table 5
    p_mean: float = -1.2  # ln σ ~ N(p_mean, p_std²) (EDM)
    p_std: float = 1.2
    noise_scale: float | None = None  # c_noise = noise_scale · ln σ; default 1/4 (MLP) or 250 (UNet)
    num_train_timesteps: int = 1000  # DDPM only
    beta_schedule: str = "linear"  # DDPM only: diffusers beta_schedule
    data_size: int | None = None  # image side for upsampled digits / image folders
    conditional: bool = False  # class-conditional (labels as `class_labels`; images: UNet class embedding)
    cond_dropout: float = 0.1  # share of labels replaced by the null label (classifier-free guidance)


def defaults_for(data_name: str, objective: str = "edm") -> dict:
    """Per-dataset defaults: Table 5 for the 2-D data, CPU-sized settings for digits."""
    if data_name in ("gmm2d", "moons"):
        return dict(steps=10_000, batch_size=128, lr=2e-4, betas=(0.9, 0.999))
    return dict(steps=8000, batch_size=128, lr=1e-3, warmup=200, checkpoint_every=500)  # EDM and DDPM alike


def _network(cfg: EDMConfig, shape: tuple[int, ...], classes: int = 0):
    """The network and its c_noise scale, initialised from cfg.seed (the global RNG is left untouched)."""
    return seeded(cfg.seed, lambda: _build_network(cfg, shape, classes))


def _build_network(cfg: EDMConfig, shape: tuple[int, ...], classes: int = 0):
    from ..models import MLP, unet

    kind = cfg.network
    if kind == "auto":
        kind = "unet" if len(shape) == 3 else "mlp"
    if kind == "mlp":
        if classes:
            raise ArgumentError(
                "conditional: class-conditional training is for images (the UNet's class embedding); got vector data"
            )
        dim = int(torch.tensor(shape).prod())
        return MLP(
            dim=dim, width=cfg.width, depth=cfg.depth, emb_size=cfg.emb_size, emb_scale=cfg.emb_scale, seed=cfg.seed
        ), 0.25
    if kind == "unet":
        if len(shape) != 3:
            raise ArgumentError(f"network: 'unet' needs image data (C, H, W), got data of shape {shape}")
        extra = {"num_class_embeds": classes + 1} if classes else {}  # + 1: the null label of CFG
        return unet(shape, cfg.unet_preset, **extra), 250.0
    raise ArgumentError(f"network: expected 'auto', 'mlp' or 'unet', got {cfg.network!r}")


def edm(
    data="gmm2d",
    *,
    out: str | os.PathLike | None = None,
    config: dict | None = None,
    resume: bool = False,
    allow_changes: bool = False,
    progress: bool = True,
    command: str | None = None,
    **overrides,
):
    """Train an EDM denoiser on `data` (a name from `fs.data.BUILTIN`, an image folder, a tensor or a
    sampler) and return it (an `EDMPrecond`, EMA weights, eval mode). With `out`, the model is saved
    there in diffusers format (+ flowsolve.json) and checkpoints go to out/checkpoints."""
    from ..models import EDMPrecond, save_pretrained

    data_name = data if isinstance(data, str) else "custom"
    cfg = merge_config(EDMConfig, defaults_for(data_name, "edm"), config, overrides)
    source = fsdata.load(data, size=cfg.data_size) if isinstance(data, str) else fsdata.as_source(data)
    shape = fsdata.shape_of(source)
    if not 0.0 <= cfg.cond_dropout < 1.0:
        raise ArgumentError(f"cond_dropout: expected a share in [0, 1), got {cfg.cond_dropout!r}")
    classes = fsdata.num_classes(source) if cfg.conditional else 0
    net, default_scale = _network(cfg, shape, classes)
    model = EDMPrecond(
        net,
        cfg.sigma_data,
        cfg.sigma_min,
        cfg.sigma_max,
        cfg.noise_scale if cfg.noise_scale is not None else default_scale,
        data_shape=shape,
    )
    if classes:
        model.conditioning = {"class_labels": {"classes": classes, "null": classes}}

    def loss_fn(m: EDMPrecond, g: torch.Generator) -> torch.Tensor:
        cond = {}
        if classes:  # labels, a share dropped to the null label (CFG training)
            x, y = fsdata.labelled_batches(source, cfg.batch_size, g)
            drop = torch.rand(len(y), generator=g) < cfg.cond_dropout
            cond = {"class_labels": shard(torch.where(drop, torch.full_like(y, classes), y))}
        else:
            x = fsdata.batches(source, cfg.batch_size, g)
        sigma = (cfg.p_mean + cfg.p_std * torch.randn(len(x), generator=g)).exp()
        noise = torch.randn(x.shape, generator=g)
        x, sigma, noise = shard(x), shard(sigma), shard(noise)  # this process's rows of the global batch
        d = m(x + sigma.view(-1, *([1] * (x.dim() - 1))) * noise, sigma, **cond)
        per = (d - x).square().reshape(len(x), -1).mean(1)
        return (m.loss_weight(sigma) * per).mean()

    ema, history = fit(
        model,
        loss_fn,
        cfg,
        out=out,
        resume=resume,
        allow_changes=allow_changes,
        progress=progress,
        extra={"objective": "edm", "data": data_name},
    )
    ema.metadata = training_record(cfg, data_name, "edm", history, command)
    if classes:
        ema.metadata["conditioning"] = model.conditioning
    if out is not None and is_main_process():
        save_pretrained(ema, out, data=data_name, **ema.metadata)
    return ema


def ddpm(
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
    """Train an ε-prediction UNet2DModel with a DDPM schedule (Ho et al. 2020) and save it laid out
    exactly as a Hub pipeline repository (model_index.json, unet/, scheduler/). Returns the
    `DiffusersDenoiser` wrapping the EMA weights."""
    from diffusers import DDPMPipeline, DDPMScheduler

    from ..models import DiffusersDenoiser, unet
    from .._checks import write_folder_atomically
    from ..models.io import FORMAT_VERSION, write_metadata

    data_name = data if isinstance(data, str) else "custom"
    cfg = merge_config(EDMConfig, defaults_for(data_name, "ddpm"), config, overrides)
    source = fsdata.load(data, size=cfg.data_size) if isinstance(data, str) else fsdata.as_source(data)
    shape = fsdata.shape_of(source)
    if len(shape) != 3:
        raise ArgumentError(f"data: DDPM training needs image data (C, H, W), got shape {shape}")
    net = seeded(cfg.seed, lambda: unet(shape, cfg.unet_preset))
    scheduler = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type="epsilon",
        clip_sample=True,
    )
    model = DiffusersDenoiser(net, scheduler, clip_sample=False)  # never clip while training
    sig = model.log_sigmas.exp().float()

    def loss_fn(m: DiffusersDenoiser, g: torch.Generator) -> torch.Tensor:
        x = fsdata.batches(source, cfg.batch_size, g)
        t = torch.randint(len(sig), (len(x),), generator=g)
        sigma = sig[t]
        noise = torch.randn(x.shape, generator=g)
        x, sigma, noise = shard(x), shard(sigma), shard(noise)
        col = sigma.view(-1, 1, 1, 1)
        d = m(x + col * noise, sigma)
        return ((d - x) / col).square().mean()  # = ‖ε̂ − ε‖² (Ho et al. 2020, Eq. 14)

    ema, history = fit(
        model,
        loss_fn,
        cfg,
        out=out,
        resume=resume,
        allow_changes=allow_changes,
        progress=progress,
        extra={"objective": "ddpm", "data": data_name},
    )
    ema.metadata = training_record(cfg, data_name, "ddpm", history, command)
    ema.clip_sample = True  # sample like the scheduler: clip the predicted x_0
    if out is not None and is_main_process():
        pipe = DDPMPipeline(unet=ema.model, scheduler=scheduler)
        write_folder_atomically(out, lambda tmp: pipe.save_pretrained(str(tmp), safe_serialization=True))
        write_metadata(
            out,
            {"format": "flowsolve", "version": FORMAT_VERSION, "type": "pipeline", "data": data_name, **ema.metadata},
        )
    return ema
