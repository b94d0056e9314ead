"""Score GANs (Alg. 1, App. B.1, Table 7): a generator distilled from a pretrained data score, with the
generated distribution's score learned online; the generator follows ScoreDifference's ∇h (Eq. 27).

Alg. 1 with Table 7's settings is the default (`recipe="paper"`). The distillation options of the
methods that now let one-step students pass their teachers sit behind the same step:

- `init="teacher"`: the generator is the teacher's own denoiser evaluated at σ_init (SiD: G(σ_init z,
  σ_init)); `student_steps=k` chains it over k noise levels (DMD2's multi-step generator, trained
  by backward simulation: a random step of the student's own chain gets the gradient;
  `student_train="last"` trains only the chain's output, so that the generated score learns the
  distribution the student samples and not a mixture of its intermediate steps);
- two time-scale updates: `K` generated-score steps per generator step, at `score_lr`;
- `gan_weight`: a GAN on real data whose discriminator is a head on the generated score's features
  (SiDA, DMD2), trained with the a/b/c losses of Eq. 15–16 (`gan_loss`); the generator's Int-PM
  direction becomes σ∇h_score − gan_weight ∇(c∘f) (Eq. 20 added to Eq. 27); `gan_sigma_max` gives
  the GAN its own, lower noise levels (a head on noised features separates samples from data only
  at low σ); `gan_r1` adds the R1 penalty on real data (Mescheder et al. 2018) to the head's
  objective, a smoother discriminator on small data sets; `gan_augment` ("translation,cutout", ...)
  shows the head real and generated images through the same differentiable augmentations
  (DiffAugment), so that it cannot memorise a small training set;
- `normalize`: the score direction per sample at unit RMS (True, "rms"), or weighted as DMD weights
  it, over the teacher's denoising error ("dmd", `dmd_scaled`);
- `generator_loss="sid"`: Score identity Distillation's generator loss (Zhou et al. 2024, `sid_loss`)
  in place of Eq. 27's Int-PM step: the same direction D_data − D_ρ, plus the gradients that flow through
  both denoisers at x_t = x + σε and SiD's α term −α‖D_data − D_ρ‖² (`sid_alpha`, SiD's 1.2);
- conditional teachers: each training sample draws one entry of a condition pool (`cond=`: class
  labels by default for a class-conditional teacher, uniformly; any inputs the teacher takes, such as
  the text embeddings of a prompt set, DMD2's prompt-conditioned distillation), and the generator,
  the generated score and the teacher all see it; the teacher may be guided (`guidance=`, CFG on
  Eq. 26's μ_data, with `uncond=` or the teacher's own null input).

`recipe="beyond-teacher"` bundles the settings measured to work (RECIPES; on vector data, RECIPE_VECTOR_OVERRIDES);
`recipe="sid"` is the same with SiD's loss (the best multi-step digits student).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from typing import Any

import torch
from torch import nn

from .._checks import as_column
from ..models.shared_parts import trainable_copy
from .._cond import map_leaves
from ..errors import ArgumentError, ArgumentTypeError
from ..fields import GANLoss, ScoreDifference
from ..models import MLP, EDMPrecond, unet
from ..models.student import DenoiserGenerator, teacher_denoiser
from .. import data as fsdata
from .augment import check_policy, diff_augment
from .int_pm import (
    PaperLoopConfig,
    GeneratorPair,
    data_source,
    generator_network,
    int_pm_loss,
    noisy_direction,
    p_sigma,
    save_generator,
    selection,
    unit_rms,
)
from .loop import fit, merge_config, resolve_device, seeded, shard, sync_gradients, training_record

__all__ = [
    "ScoreGANConfig",
    "SCORE_GAN_IMAGE_DEFAULTS",
    "RECIPES",
    "RECIPE_VECTOR_OVERRIDES",
    "score_gan",
    "dmd_scaled",
]


@dataclasses.dataclass
class ScoreGANConfig(PaperLoopConfig):
    steps: int = 3150  # generator steps (Table 7, Gaussians)
    lr: float = 2e-4  # generator learning rate
    betas: tuple[float, float] = (0.9, 0.999)
    score_lr: float = 2e-4
    score_betas: tuple[float, float] = (0.9, 0.999)
    K: int = 10  # score steps per generator step (Alg. 1)
    sigma_min: float = 0.1  # p_σ of Eq. 28
    sigma_max: float = 10.0
    rho_grid: float = 3.0  # the exponent of Eq. 28
    mu_data: float = 1.0  # Eq. 26–27 (NCSN: 1, 1; EDM: 2, 1)
    mu_rho: float = 1.0
    latent: int = 128
    width: int = 512
    depth: int = 4
    conv_width: int = 64  # DCGAN generator for images (Table 7, MNIST: width 64, batch norm)
    score_width: int = 512
    score_depth: int = 4
    score_preset: str = "tiny"  # UNet preset of a fresh generated score for images
    sigma_data: float = 0.5
    gamma: float = 0.0  # Eq. 22: Brownian share γ added to the particle direction (noisy Int-PM)
    init_from_teacher: bool = False  # start the generated score from the teacher's weights
    normalize: bool | str = False  # per-sample: True/"rms" unit RMS; "dmd" over the teacher's denoising error
    data_size: int | None = None
    # -- distillation options (module docstring); the defaults are Alg. 1 -------------------------
    init: str = "paper"  # "paper": a fresh generator (Table 7); "teacher": the teacher's denoiser
    init_sigma: float = 2.5  # σ_init of a teacher-initialised generator (SiD: 2.5)
    student_steps: int = 1  # evaluations of a teacher-initialised student (1, 2, 4, ...)
    student_sigma_min: float = 0.5  # last σ of a multi-step student's chain (Karras ρ = 7 from init_sigma)
    student_train: str = "random"  # chain step that gets the gradient: "random" (DMD2) or "last" (the output)
    gan_weight: float = 0.0  # weight of the real-data GAN direction in the generator step
    gan_loss: str = "vanilla"  # a, b, c of Eq. 15–16
    gan_features: str | None = None  # module of the generated score read by the head (default: mid_block)
    gan_d_weight: float = 1.0  # weight of the discriminator objective in the generated score's loss
    gan_sigma_max: float | None = None  # the GAN's own noise levels, p_σ on [sigma_min, this] (None: the score's σ)
    gan_r1: float = 0.0  # R1 penalty γ/2·E‖∇f(x_real)‖² on the noised real data (Mescheder et al. 2018)
    gan_augment: str = ""  # DiffAugment policy of the head's inputs, real and generated (augment.AUGMENTS)
    gan_shared: bool = True  # the head's objective trains the generated score's features too (False: the head only)
    guidance: float | None = None  # CFG scale of a conditional teacher (Eq. 26 with μ_data = w)
    generator_loss: str = "int-pm"  # "int-pm": Eq. 27 (Alg. 1); "sid": SiD's loss through both denoisers
    sid_alpha: float = 1.2  # SiD's α (Zhou et al. 2024: 1.2; α = 0 keeps only the cross term)
    cond_pool: str = ""  # SHA-256 of the `cond=` pool (set by score_gan): a resumed run draws from the same pool

    RENAMED = {"rho": "rho_grid"}  # old config keys, accepted for one release


STUDENT_TRAIN = ("random", "last")  # which step of a multi-step student's chain is trained
GENERATOR_LOSSES = ("int-pm", "sid")  # the generator's objective: Eq. 27's Int-PM step, or SiD's loss

SCORE_GAN_IMAGE_DEFAULTS = dict(
    # Table 7, MNIST: σ ∈ [0.32, 40], K = 1, score lr 1e-3 (ratio 5), generated score initialised from
    # the teacher, DCGAN generator; β1 = 0 for both networks (distillation practice: at 1000 steps on
    # digits, FD 348 against 469 with β1 = 0.9). Batch 128 instead of 256 (CPU).
    steps=8000,
    sigma_min=0.32,
    sigma_max=40.0,
    K=1,
    score_lr=1e-3,
    init_from_teacher=True,
    betas=(0.0, 0.999),
    score_betas=(0.0, 0.999),
    checkpoint_every=500,
)

RECIPES: dict[str, dict] = {
    "paper": {},
    # SiD/DMD2/SiDA on the library's terms: the teacher's network as the student, the generated score
    # trained faster (two time scales), a GAN on real data read off the generated score's features,
    # β1 = 0, an EMA of the student. Measured on digits (pretrained/digits-scoregan's card).
    # Tuned on digits by validation FD against the training digits only (runs of 600 steps): per-sample
    # normalised directions and Table 7's σ range (FD 49 at step 400, against 98–144 without them).
    # The directions are weighted as DMD weights them ("dmd"): on held-out digits at n = 10000 it beat
    # the unit-RMS normalisation (True) for the one-step student (48.9 against 52.5), the conditional
    # one (52.9 against 54.6) and the 4-step one (n = 1000: 71.3 against 73.9).
    "beyond-teacher": dict(
        init="teacher",
        init_from_teacher=True,
        init_sigma=2.5,
        K=2,
        lr=5e-5,
        score_lr=2e-4,
        betas=(0.0, 0.999),
        score_betas=(0.0, 0.999),
        gan_weight=0.01,
        gan_loss="vanilla",
        normalize="dmd",
        sigma_min=0.32,
        sigma_max=40.0,
        rho_grid=3.0,
        ema_decay=0.99,
        steps=3000,
        checkpoint_every=250,
    ),
}
# Score identity Distillation's loss on top of "beyond-teacher" (SiD, Zhou et al. 2024: α = 1.2, DMD's
# weight, which is SiD's), training a multi-step chain's output. On digits a 4-step student of it measured
# FD 40.0 ± 1.8 on the held-out digits at n = 10000, 0.83× its teacher's best, where "beyond-teacher" gave
# 46.4 ± 2.6 (docs/results/distillation.md).
RECIPES["sid"] = dict(RECIPES["beyond-teacher"], generator_loss="sid", sid_alpha=1.2, student_train="last")

# Where a recipe tuned on images meets low-dimensional data (vectors), these settings replace its
# image ones. "beyond-teacher" on the paper's 2-D mixture (3150 steps, seed 0, no selection): Table 7's
# σ range for the Gaussians [0.1, 10], the generator at lr 2e-4 with the score 4× faster, and σ_init = 5
# (the mixture spreads over radius 5; the image σ_init 2.5 left 0.79–0.80 of the samples within
# 3 std of a mode, this 0.89–0.90 at energy distance 0.018–0.020), and the real-data GAN at weight 1
# on its own noise levels σ ∈ [0.1, 1] (the modes' scale, std 0.5): 0.908–0.925 within 3 std over
# training seeds 0–2, energy 0.010–0.023 (docs/results/distillation.md), all with the directions at unit
# RMS (normalize=True), with which these figures were measured.
RECIPE_VECTOR_OVERRIDES: dict[str, dict] = {
    "beyond-teacher": dict(
        lr=2e-4,
        score_lr=8e-4,
        sigma_min=0.1,
        sigma_max=10.0,
        init_sigma=5.0,
        gan_weight=1.0,
        gan_sigma_max=1.0,
        normalize=True,
    ),
}
# SiD on the mixture (3150 steps): at beyond-teacher's learning rates it diverges on some training seeds
# (seed 1: energy 28, whatever α or the GAN; seed 0 was spared: 0.88–0.89 within 3 std); at half those
# rates and α = 1, without the GAN, 0.864–0.878 within 3 std at energy 0.014–0.026 over seeds 0–2.
RECIPE_VECTOR_OVERRIDES["sid"] = dict(
    RECIPE_VECTOR_OVERRIDES["beyond-teacher"], lr=1e-4, score_lr=4e-4, gan_weight=0.0, sid_alpha=1.0
)


def _generated_score(teacher, shape: tuple[int, ...], cfg: ScoreGANConfig) -> nn.Module:
    """The generated distribution's denoiser (Alg. 1's s_ρ): a copy of the teacher (Table 7), or a
    fresh EDM-preconditioned UNet (images) / MLP (vectors) seeded from cfg.seed + 1."""
    if cfg.init_from_teacher:
        if not isinstance(teacher, nn.Module):
            raise ArgumentError(
                f"init_from_teacher: needs a network teacher (an nn.Module denoiser), got {type(teacher).__name__}"
            )
        return trainable_copy(teacher)
    if len(shape) == 3:
        return seeded(
            cfg.seed + 1,
            lambda: EDMPrecond(
                unet(shape, cfg.score_preset), cfg.sigma_data, cfg.sigma_min, cfg.sigma_max, 250.0, shape
            ),
        )
    dim = int(torch.tensor(shape).prod())
    return seeded(
        cfg.seed + 1,
        lambda: EDMPrecond(
            MLP(dim, cfg.score_width, cfg.score_depth, seed=cfg.seed),
            cfg.sigma_data,
            cfg.sigma_min,
            cfg.sigma_max,
            0.25,
            shape,
        ),
    )


def _student_sigmas(cfg: ScoreGANConfig) -> list[float]:
    """σ_init alone (one step), or k levels from σ_init down to student_sigma_min (Karras ρ = 7)."""
    k = cfg.student_steps
    if k == 1:
        return [cfg.init_sigma]
    if not 0 < cfg.student_sigma_min < cfg.init_sigma:
        raise ArgumentError(
            f"student_sigma_min: expected 0 < student_sigma_min < init_sigma ({cfg.init_sigma}), "
            f"got {cfg.student_sigma_min}"
        )
    hi, lo = cfg.init_sigma ** (1 / 7), cfg.student_sigma_min ** (1 / 7)
    return [(hi + j / (k - 1) * (lo - hi)) ** 7 for j in range(k)]


def dmd_scaled(direction: torch.Tensor, x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The generator's direction σ∇h (Eq. 27) at x_t = x + σε, weighted as DMD (Yin et al. 2024) weights
    its distribution-matching gradient: σ²∇h over the teacher's mean absolute denoising error
    mean|x − D_data(x_t, σ)| of each sample. For μ = (1, 1), σ²∇h = D_data(x_t) − D_ρ(x_t), so each
    sample moves by the teachers' disagreement relative to how far the teacher's denoising lands
    from it: agreement leaves it in place (unlike unit-RMS normalisation, which moves every sample
    by the same amount), and the large errors of high σ are damped."""
    err = (x - denoised).abs().reshape(len(x), -1).mean(1).clamp(min=1e-8)
    return direction * as_column(sigma / err, x)


def sid_loss(
    field: ScoreDifference,
    x: torch.Tensor,
    eps: torch.Tensor,
    sigma: torch.Tensor,
    normalize: bool | str = "dmd",
    alpha: float = 1.2,
) -> torch.Tensor:
    """Score identity Distillation's generator loss (Zhou et al. 2024) on the field of Eq. 19/26.

    With δ = σ²∇h(x_t) (D_data − D_ρ for μ = (1, 1); the guided teacher's when the field is guided) at
    x_t = x + σε, each sample's loss is w_b [δ·(D_data(x_t) − x) − α‖δ‖²], and its gradient flows through
    x and through both denoisers at x_t (their weights are not trained here). Its explicit part, −w_b δ,
    is the Int-PM direction of Eq. 27 under the same per-sample weight w_b: 1/σ (no normalisation, σ∇h),
    1/mean|x − D_data| ("dmd", SiD's and DMD's weight) or 1/RMS(δ) (unit RMS); the Jacobian terms and α
    are what SiD adds (α = 1.2 in SiD; α = 0 leaves the cross term alone)."""
    s = as_column(sigma, x)
    grad, denoised = field.grad_h_and_denoised(x + s * eps, sigma)
    delta = s**2 * grad
    with torch.no_grad():  # the per-sample weight w_b, a constant of the loss
        if normalize == "dmd":
            weight = 1.0 / (x - denoised).abs().reshape(len(x), -1).mean(1).clamp(min=1e-8)
        elif normalize:
            weight = 1.0 / delta.reshape(len(x), -1).square().mean(1).sqrt().clamp(min=1e-12)
        else:
            weight = 1.0 / s.reshape(-1)
    cross = (delta * (denoised - x)).reshape(len(x), -1).sum(1)
    return (weight * (cross - alpha * delta.square().reshape(len(x), -1).sum(1))).mean()


def _feature_module(net: nn.Module, name: str | None) -> nn.Module:
    """The module whose output the discriminator head reads: `name` (a suffix of a module path), or
    by default a UNet's mid_block, else the last hidden activation of an MLP."""
    mods = dict(net.named_modules())
    if name:
        hits = [k for k in mods if k == name or k.endswith("." + name)]
        if not hits:
            raise ArgumentError(
                f"gan_features: no module named {name!r} in the generated score; some are {[k for k in mods if k][-8:]}"
            )
        return mods[hits[0]]
    hits = [k for k in mods if k.endswith("mid_block")]
    if hits:
        return mods[hits[0]]
    seqs = [m for m in mods.values() if isinstance(m, nn.Sequential) and len(m) >= 2]
    if seqs:
        return seqs[-1][-2]
    raise ArgumentError("gan_features: the generated score has no mid_block; name the module to read (gan_features=)")


def _double_backward_attention(on: bool):
    """R1 differentiates the discriminator's input gradient again; PyTorch's fused attention kernels
    have no second derivative, so the forward pass it differentiates uses the math kernel."""
    if not on:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


class FeatureDiscriminator:
    """f(x, σ) = head(features of the generated score at (x, σ)) (SiDA, DMD2): the discriminator of
    Eq. 15 shares the generated score's network; one forward pass gives both D_ρ(x, σ) and f."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, score: nn.Module, head: nn.Module, x, sigma, cond: dict, detach: bool = False):
        feats: list[torch.Tensor] = []
        hook = self.module.register_forward_hook(lambda _m, _i, o: feats.append(o[0] if isinstance(o, tuple) else o))
        try:
            den = score(x, sigma, **cond)
        finally:
            hook.remove()
        if not feats:
            raise ArgumentError("gan_features: the chosen module did not run in the generated score's forward pass")
        feat = feats[-1].float()
        return head(feat.detach() if detach else feat).reshape(len(x)), den


def _head(score: nn.Module, feature: FeatureDiscriminator, shape, cond: dict, seed: int) -> nn.Module:
    """A linear head on the (flattened) features, its size read from one dry forward pass."""
    p = next(score.parameters())
    out: list[torch.Tensor] = []
    hook = feature.module.register_forward_hook(lambda _m, _i, o: out.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            score(torch.zeros(2, *shape, device=p.device), torch.ones(2, device=p.device), **cond)
    finally:
        hook.remove()
    size = out[-1][0].numel()
    return seeded(seed, lambda: nn.Sequential(nn.SiLU(), nn.Flatten(), nn.Linear(size, 1)))


def score_gan(
    teacher,
    data_shape: tuple[int, ...] | None = None,
    *,
    data=None,
    recipe: str = "paper",
    out: str | os.PathLike | None = None,
    config: dict | None = None,
    resume: bool = False,
    allow_changes: bool = False,
    progress: bool = True,
    command: str | None = None,
    data_name: str | None = None,
    select=None,
    select_every: int | None = None,
    cond: dict | None = None,
    uncond: dict | None = None,
    **overrides,
):
    """A Score GAN (Alg. 1, App. B.1): a generator distilled from a data denoiser `teacher`
    (D(x, σ, **cond): `fs.from_pretrained(...)` or a folder path, `from_diffusers(...)`, a flow model,
    an exact mixture denoiser), with the generated-distribution score learned online by denoising
    score matching (K steps per generator step), and the generator step of Eq. 27.

    The generator is pushed along the field of Eq. 19/26, `ScoreDifference(teacher, generated score)`,
    asked for its `grad_h`; the trained generator keeps that field as `score_field` (a learned-ρ PM
    for `fs.sample`, Eq. 19). `recipe` picks defaults (RECIPES: "paper" is Alg. 1 with Table 7,
    "beyond-teacher" the distillation options of the module docstring); keywords override them.
    `data` (a name such as "digits" or a source) is needed by the GAN option (`gan_weight`).
    `cond` is a pool of conditioning inputs (tensors with one leading size P, e.g. {"encoder_hidden_states":
    the embeddings of P prompts}); every training sample draws one of the P uniformly. A class-conditional
    teacher's default pool is its K labels. `uncond` is the teacher's unconditional input for `guidance`
    (default: the teacher's own null input, e.g. the null class).
    """
    if isinstance(teacher, (str, os.PathLike)):
        from ..models import from_pretrained

        teacher = from_pretrained(teacher)
    teacher = teacher_denoiser(teacher)
    shape = tuple(data_shape or getattr(teacher, "data_shape", None) or ())
    if not shape:
        raise ArgumentError("data_shape: the teacher does not say its data shape; pass data_shape=")
    if recipe not in RECIPES:
        raise ArgumentError(f"recipe: expected one of {sorted(RECIPES)}, got {recipe!r}")
    base = {**(SCORE_GAN_IMAGE_DEFAULTS if len(shape) == 3 else {}), **RECIPES[recipe]}
    if len(shape) == 1:
        base.update(RECIPE_VECTOR_OVERRIDES.get(recipe, {}))
    cfg = merge_config(ScoreGANConfig, base, config, overrides)
    classes = _classes(teacher)
    pool = _cond_pool(cond, classes)
    cfg.cond_pool = _digest(cond) if cond is not None else ""
    null = _null(teacher) if uncond is None else _check_uncond(uncond)
    _check(cfg, teacher, shape, data, out, pool, null)
    _probe_teacher(teacher, shape, pool)
    if cfg.gan_weight:
        src, name, dshape = data_source(data, cfg.data_size)
        if tuple(dshape) != shape:
            raise ArgumentError(f"data: samples of shape {tuple(dshape)}, but the teacher's are {shape}")
        if pool:
            fsdata.num_classes(src)  # labelled, or a clear error now
    else:
        src, name = None, (data if isinstance(data, str) else "custom" if data is not None else "teacher")
    data_name = data_name or name
    score = _generated_score(teacher, shape, cfg)
    gen: Any  # a teacher-initialised DenoiserGenerator or a fresh generator network
    if cfg.init not in ("paper", "teacher"):  # a saved student: its network and σ chain, trained on
        gen = _student_start(cfg.init, cfg, shape)
    elif cfg.init == "teacher":
        if not isinstance(teacher, nn.Module):
            raise ArgumentError(
                f"init: 'teacher' needs a network teacher (an nn.Module denoiser), got {type(teacher).__name__}"
            )
        gen = DenoiserGenerator(
            trainable_copy(teacher),
            _student_sigmas(cfg),
            shape,
            getattr(teacher, "conditioning", None),
        )
    else:
        gen = seeded(cfg.seed, lambda: generator_network(shape, cfg, num_classes=classes))
    feature = FeatureDiscriminator(_feature_module(score, cfg.gan_features)) if cfg.gan_weight else None
    cond_probe = _rows(pool, torch.zeros(2, dtype=torch.long))
    head = _head(score, feature, shape, cond_probe, cfg.seed + 2) if feature is not None else None
    pair = GeneratorPair(gen, score, head)
    guided = dict(guidance=cfg.guidance, uncond=null) if cfg.guidance is not None else {}
    field = ScoreDifference(
        teacher,
        score,
        mu_data=cfg.mu_data,
        mu_rho=cfg.mu_rho,
        sigma_min=cfg.sigma_min,
        sigma_max=cfg.sigma_max,
        rho_grid=cfg.rho_grid,
        shape=shape,
        **guided,
    )  # Eq. 19, 26
    if isinstance(teacher, nn.Module):
        teacher.eval().requires_grad_(False).to(resolve_device(cfg))
    gan = GANLoss(cfg.gan_loss)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=cfg.betas)
    s_params = list(score.parameters()) + (list(head.parameters()) if head is not None else [])
    opt_s = torch.optim.Adam(s_params, lr=cfg.score_lr, betas=cfg.score_betas)
    multi = isinstance(gen, DenoiserGenerator)
    latent = (gen.steps, *shape) if multi else (cfg.latent,)

    pool_size = len(_leaves(pool)[0][1]) if pool else 0

    def labels(g: torch.Generator) -> dict:
        """One entry of the condition pool per sample, drawn uniformly (the class labels: uniform labels)."""
        if not pool:
            return {}
        return _rows(pool, torch.randint(pool_size, (cfg.batch_size,), generator=g), shard)

    gan_top = cfg.sigma_max if cfg.gan_sigma_max is None else cfg.gan_sigma_max

    def gan_noised(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """x noised at the GAN's levels (Eq. 28 on [σ_min, gan_top]), and those σ."""
        sig = shard(p_sigma(cfg.batch_size, cfg.sigma_min, gan_top, cfg.rho_grid, g))
        return x + as_column(sig, x) * shard(torch.randn(cfg.batch_size, *shape, generator=g)), sig

    def chain_depth(g: torch.Generator) -> int | None:
        """How many of the chain's steps to run: a random number (backward simulation), or all of them."""
        if not multi:
            return None
        depth = int(torch.randint(gen.steps, (1,), generator=g)) + 1  # drawn either way: one random stream
        return gen.steps if cfg.student_train == "last" else depth

    def generate(m: GeneratorPair, z: torch.Tensor, cond: dict, upto: int | None) -> torch.Tensor:
        return m.g.chain(z, upto=upto, **cond) if multi else m.g(z, **cond)

    def step_fn(m: GeneratorPair, g: torch.Generator, _step: int) -> float:
        for _ in range(cfg.K):  # Alg. 1, lines 1–3 (Eq. 23)
            z = torch.randn(cfg.batch_size, *latent, generator=g)
            sigma = p_sigma(cfg.batch_size, cfg.sigma_min, cfg.sigma_max, cfg.rho_grid, g)
            eps = torch.randn(cfg.batch_size, *shape, generator=g)
            upto = chain_depth(g)
            cond = labels(g)
            z, sigma, eps = shard(z), shard(sigma), shard(eps)
            with torch.no_grad():
                x = generate(m, z, cond, upto)
            xs = x + as_column(sigma, x) * eps
            if feature is not None and cfg.gan_sigma_max is None and not cfg.gan_augment:  # one pass: D_ρ and f
                f_fake, pred = feature(m.aux, m.head, xs, sigma, cond, detach=not cfg.gan_shared)
            else:
                pred = m.aux(xs, sigma, **cond)
            per = (pred - x).square().reshape(len(x), -1).mean(1)
            weight = m.aux.loss_weight(sigma) if hasattr(m.aux, "loss_weight") else 1.0 / sigma**2
            s_loss = (weight * per).mean()
            if feature is not None:  # Eq. 15 on real data, noised alike
                if cfg.gan_sigma_max is not None or cfg.gan_augment:  # the fakes again: own σ, augmented
                    xf, sig_f = gan_noised(diff_augment(x, cfg.gan_augment, g), g)
                    f_fake, _ = feature(m.aux, m.head, xf, sig_f, cond, detach=not cfg.gan_shared)
                real, real_cond = _real_batch(src, cfg.batch_size, g, bool(pool))
                real_cond = {k: shard(v) for k, v in real_cond.items()}
                xr, sig_r = gan_noised(diff_augment(shard(real), cfg.gan_augment, g), g)
                xr = xr.requires_grad_(bool(cfg.gan_r1))
                with _double_backward_attention(bool(cfg.gan_r1)):
                    f_real, _ = feature(m.aux, m.head, xr, sig_r, real_cond, detach=not cfg.gan_shared)
                s_loss = s_loss - cfg.gan_d_weight * gan.discriminator_objective(f_fake, f_real)
                if cfg.gan_r1:  # R1: a flat f on the real digits, so the head cannot single them out
                    (gr,) = torch.autograd.grad(f_real.sum(), xr, create_graph=True)
                    s_loss = s_loss + cfg.gan_d_weight * cfg.gan_r1 / 2 * gr.square().reshape(len(xr), -1).sum(1).mean()
            opt_s.zero_grad(set_to_none=True)
            s_loss.backward()
            sync_gradients(s_params)
            opt_s.step()
        z = torch.randn(cfg.batch_size, *latent, generator=g)  # Alg. 1, lines 4–5 (Eq. 27)
        sigma = p_sigma(cfg.batch_size, cfg.sigma_min, cfg.sigma_max, cfg.rho_grid, g)
        eps = torch.randn(cfg.batch_size, *shape, generator=g)
        gam = torch.randn(cfg.batch_size, *shape, generator=g) if cfg.gamma else None
        upto = chain_depth(g)
        cond = labels(g)
        z, sigma, eps = shard(z), shard(sigma), shard(eps)
        x = generate(m, z, cond, upto)
        xt = x.detach() + as_column(sigma, x) * eps
        bound = field.bind(cond)
        direction: torch.Tensor | None = None  # the particles' direction (Eq. 27, plus Eq. 20's GAN term)
        if cfg.generator_loss == "sid":  # SiD: the loss through both denoisers, their weights left alone
            with _frozen(m.aux):
                g_loss = sid_loss(bound, x, eps, sigma, cfg.normalize, cfg.sid_alpha)
        else:
            with torch.no_grad():  # σ ∇h (Eq. 27), asked of the field; for DMD, D_data(x_t) from the same teacher call
                if cfg.normalize == "dmd":
                    grad, denoised = bound.grad_h_and_denoised(xt, sigma)
                else:
                    grad = bound.grad_h(xt, sigma)
                direction = as_column(sigma, x) * grad
                if cfg.gamma:  # Eq. 22: A(∇h dt + γ dW), dt = lr / B
                    assert gam is not None
                    direction = noisy_direction(direction, cfg.gamma, cfg.lr / cfg.batch_size, shard(gam))
            if cfg.normalize == "dmd":  # DMD's weighting of σ²∇h = D_data − D_ρ
                direction = dmd_scaled(direction, x.detach(), denoised, sigma)
            elif cfg.normalize:  # the score part at unit RMS, before any GAN term
                direction = unit_rms(direction)
            g_loss = torch.zeros(())
        if feature is not None:  # + gan_weight · ∇h of Eq. 20: −∇(c∘f)
            with torch.enable_grad():
                if cfg.gan_augment:  # the samples through the augmentations, noised at the GAN's levels
                    xg = x.detach().requires_grad_(True)  # ∇ taken back through the augmentation
                    f, _ = feature(m.aux, m.head, *gan_noised(diff_augment(xg, cfg.gan_augment, g), g), cond)
                else:  # the generator's noised samples: the score's, or noised anew at the GAN's own levels
                    xg, sig_g = (xt.detach(), sigma) if cfg.gan_sigma_max is None else gan_noised(x.detach(), g)
                    xg = xg.requires_grad_(True)
                    f, _ = feature(m.aux, m.head, xg, sig_g, cond)
                (dc,) = torch.autograd.grad(gan.c(f).sum(), xg)
            gan_direction = -cfg.gan_weight * dc.detach()
            direction = gan_direction if direction is None else direction + gan_direction
        opt_g.zero_grad(set_to_none=True)
        (g_loss if direction is None else g_loss + int_pm_loss(x, direction)).backward()
        sync_gradients(m.g.parameters())
        opt_g.step()
        return s_loss.item()

    ema, history = fit(
        pair,
        None,
        cfg,
        out=out,
        resume=resume,
        allow_changes=allow_changes,
        progress=progress,
        optimizers={"g": opt_g, "s": opt_s},
        step_fn=step_fn,
        extra={"objective": "score-gan", "data": data_name},
        **selection(select, select_every),
    )
    g_out = ema.g
    g_out.metadata = training_record(cfg, data_name, "score-gan", history, command)
    g_out.metadata["recipe"] = recipe
    object.__setattr__(g_out, "generated_score", ema.aux)  # kept for inspection, not saved with the generator
    object.__setattr__(
        g_out,
        "score_field",
        ScoreDifference(
            teacher,
            ema.aux,
            mu_data=cfg.mu_data,
            mu_rho=cfg.mu_rho,
            sigma_min=cfg.sigma_min,
            sigma_max=cfg.sigma_max,
            rho_grid=cfg.rho_grid,
            shape=shape,
            **guided,
        ),
    )
    if out is not None:
        from .loop import is_main_process

        if isinstance(g_out, DenoiserGenerator):
            if is_main_process():
                g_out.save(
                    out, teacher_source=_source(teacher), objective="score-gan", data=data_name, **g_out.metadata
                )
        else:
            save_generator(g_out, out, "score-gan", data_name, g_out.metadata)
    return g_out


@contextlib.contextmanager
def _frozen(net: nn.Module):
    """The network's weights out of autograd for a while (gradients still flow through its inputs)."""
    flags = [p.requires_grad for p in net.parameters()]
    net.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(net.parameters(), flags):
            p.requires_grad_(flag)


def _student_start(path: str, cfg: ScoreGANConfig, shape: tuple[int, ...]) -> DenoiserGenerator:
    """init=<folder>: a saved teacher-initialised student (`DenoiserGenerator`), whose network and σ chain
    the run trains on (for instance a student of the Int-PM step trained on with SiD's loss)."""
    from ..models import from_pretrained

    try:
        student = from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - any failure to load is the argument's fault here
        raise ArgumentError(
            f"init: expected 'paper', 'teacher' or the folder of a saved student, got {path!r} ({err})"
        ) from err
    if not isinstance(student, DenoiserGenerator):
        raise ArgumentError(
            f"init: the folder {path!r} holds a {type(student).__name__}, not a teacher-initialised student "
            "(a score-gan run with init='teacher')"
        )
    if tuple(student.data_shape) != shape:
        raise ArgumentError(
            f"init: the student at {path!r} draws samples of shape {student.data_shape}, the teacher's are {shape}"
        )
    if cfg.student_steps not in (1, student.steps):
        raise ArgumentError(
            f"student_steps: the student at {path!r} has a chain of {student.steps} steps, got student_steps="
            f"{cfg.student_steps}"
        )
    return student.train().requires_grad_(True)  # a fresh load: trained in place


def _classes(teacher) -> int:
    spec = (getattr(teacher, "conditioning", None) or {}).get("class_labels")
    return int(spec["classes"]) if isinstance(spec, dict) and spec.get("classes") else 0


def _null(teacher) -> dict | None:
    """The teacher's declared unconditional inputs (its "null" values), or None if it declares none."""
    fn = getattr(teacher, "default_uncond", None)
    return (fn() or None) if callable(fn) else None


def _source(teacher) -> str | None:
    for obj in (teacher, getattr(teacher, "flow", None)):
        src = (getattr(obj, "metadata", None) or {}).get("source") if obj is not None else None
        if src:
            return src
    return None


def _real_batch(src, n: int, g: torch.Generator, labelled: bool) -> tuple[torch.Tensor, dict]:
    if labelled:
        x, y = fsdata.labelled_batches(src, n, g)
        return x, {"class_labels": y}
    return fsdata.batches(src, n, g), {}


def _leaves(tree: dict) -> list[tuple[str, Any]]:
    """(dotted name, value) of every leaf of a tree of inputs (SDXL's added_cond_kwargs nest)."""
    out: list[tuple[str, Any]] = []
    map_leaves(lambda k, v: out.append((k, v)), tree)
    return out


def _rows(tree: dict, idx: torch.Tensor, move=lambda t: t) -> dict:
    """The rows `idx` of every tensor of a tree of inputs (through `move`, e.g. `shard`)."""
    return map_leaves(lambda _k, v: move(v[idx]), tree)


def _cond_pool(cond, classes: int) -> dict:
    """The conditions the training samples draw from: `cond` (tensors with one leading size P, nested
    dicts allowed) or, for a class-conditional teacher, its labels 0..K−1 (so a draw is a uniform label);
    {} if neither."""
    if cond is None:
        return {"class_labels": torch.arange(classes)} if classes else {}
    if not isinstance(cond, dict) or not cond:
        raise ArgumentTypeError(
            f"cond: expected a dict of conditioning tensors with one leading size (a pool to draw from), got {cond!r}"
        )
    sizes = {}
    for k, v in _leaves(cond):
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            raise ArgumentTypeError(f"cond: entry {k!r} must be a tensor with a leading pool dimension, got {v!r}")
        sizes[k] = len(v)
    size = max(sizes.values())
    if any(n not in (1, size) for n in sizes.values()) or size == 0:
        raise ArgumentError(f"cond: every entry needs the pool's leading size P (or 1: one input for all), got {sizes}")
    if classes and isinstance(cond.get("class_labels"), torch.Tensor):
        labels = cond["class_labels"]
        if labels.dtype.is_floating_point or labels.min() < 0 or labels.max() >= classes:
            raise ArgumentError(f"cond: class_labels must be integers in [0, {classes}), got {labels.tolist()[:8]}...")
    return map_leaves(lambda _k, t: t.detach().expand(size, *t.shape[1:]) if len(t) == 1 else t.detach(), cond)


def _digest(tensors: dict) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and values; nested dicts by dotted name), to tell
    one condition pool from another."""
    h = hashlib.sha256()
    for k, v in sorted(_leaves(tensors), key=lambda kv: kv[0]):
        v = v.detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def _check_uncond(uncond) -> dict:
    """The teacher's unconditional inputs as guidance takes them: tensors (leading size 1 or the
    batch's) or numbers (a null label, {"class_labels": 10})."""
    ok = isinstance(uncond, dict) and all(
        isinstance(v, torch.Tensor) or (isinstance(v, (int, float)) and not isinstance(v, bool))
        for _, v in _leaves(uncond)
    )
    if not ok:
        raise ArgumentTypeError(
            f"uncond: expected a dict of the teacher's unconditional inputs (tensors, or a null label such as "
            f"{{'class_labels': 10}}), got {uncond!r}"
        )
    return uncond


def _probe_teacher(teacher, shape: tuple[int, ...], pool: dict) -> None:
    """One evaluation of the teacher on two samples with the pool's first condition, so that a teacher
    that needs inputs the run does not give (a text model without `cond=`) fails now, by name."""
    p = next(teacher.parameters(), None) if isinstance(teacher, nn.Module) else None
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.dtype.is_floating_point else torch.get_default_dtype()
    x = torch.zeros(2, *shape, device=device, dtype=dtype)
    probe = _rows(pool, torch.zeros(2, dtype=torch.long), lambda t: t.to(device))
    try:
        with torch.no_grad():
            teacher(x, torch.ones(2, device=device, dtype=dtype), **probe)
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError) as err:
        given = ", ".join(k for k, _ in _leaves(pool)) or "none"
        raise ArgumentError(
            f"cond: the teacher cannot be evaluated with the conditioning inputs given ({given}): {err}. A "
            "conditional teacher needs a pool of its inputs, e.g. cond={'encoder_hidden_states': embeddings "
            "of P prompts} (leading size P; each sample draws one)"
        ) from err


def _check(cfg: ScoreGANConfig, teacher, shape: tuple[int, ...], data, out, pool: dict, null: dict | None) -> None:
    """Refuse bad distillation settings before any work."""
    if not isinstance(cfg.init, str) or (cfg.init not in ("paper", "teacher") and not os.path.isdir(cfg.init)):
        raise ArgumentError(
            f"init: expected 'paper' (a fresh generator, Alg. 1), 'teacher' (the teacher's network) or the folder "
            f"of a saved student, got {cfg.init!r}"
        )
    if not isinstance(cfg.student_steps, int) or cfg.student_steps < 1:
        raise ArgumentError(f"student_steps: expected a positive number of evaluations, got {cfg.student_steps!r}")
    if cfg.student_steps > 1 and cfg.init == "paper":
        raise ArgumentError("student_steps: a multi-step student is the teacher's network; use init='teacher'")
    if cfg.student_train not in STUDENT_TRAIN:
        raise ArgumentError(
            "student_train: expected 'random' (a random step of the chain gets the gradient, DMD2) or 'last' "
            f"(the chain's output), got {cfg.student_train!r}"
        )
    if not cfg.init_sigma > 0:
        raise ArgumentError(f"init_sigma: expected a positive noise level, got {cfg.init_sigma!r}")
    if cfg.normalize not in (False, True, "rms", "dmd"):
        raise ArgumentError(
            "normalize: expected False, True or 'rms' (each sample's direction at unit RMS) or 'dmd' (over the "
            f"teacher's denoising error, DMD), got {cfg.normalize!r}"
        )
    if cfg.generator_loss not in GENERATOR_LOSSES:
        raise ArgumentError(
            "generator_loss: expected 'int-pm' (Eq. 27, Alg. 1) or 'sid' (Score identity Distillation), "
            f"got {cfg.generator_loss!r}"
        )
    if isinstance(cfg.sid_alpha, bool) or not isinstance(cfg.sid_alpha, (int, float)):
        raise ArgumentError(f"sid_alpha: expected a number (SiD: 1.2), got {cfg.sid_alpha!r}")
    if cfg.generator_loss == "sid" and cfg.gamma:
        raise ArgumentError(
            f"gamma: the noisy Int-PM direction (Eq. 22) is for generator_loss='int-pm', "
            f"got gamma={cfg.gamma} with 'sid'"
        )
    if cfg.gan_weight < 0:
        raise ArgumentError(f"gan_weight: expected a non-negative weight, got {cfg.gan_weight!r}")
    if cfg.gan_r1 < 0:
        raise ArgumentError(f"gan_r1: expected a non-negative R1 weight, got {cfg.gan_r1!r}")
    if cfg.gan_r1 and not cfg.gan_shared:
        raise ArgumentError("gan_r1: differentiates the head through the features; it needs gan_shared=True")
    if cfg.gan_sigma_max is not None and not cfg.sigma_min < cfg.gan_sigma_max <= cfg.sigma_max:
        raise ArgumentError(
            f"gan_sigma_max: expected sigma_min ({cfg.sigma_min}) < gan_sigma_max <= sigma_max ({cfg.sigma_max}), "
            f"got {cfg.gan_sigma_max!r}"
        )
    if cfg.guidance is not None and null is None:
        raise ArgumentError(
            "guidance: needs the teacher's unconditional input; pass uncond= (e.g. the empty prompt's "
            "embeddings), or use a teacher that declares a null input (class labels)"
        )
    if cfg.guidance is not None and not pool:
        raise ArgumentError("guidance: the run has no conditions to guide toward; pass cond= (a pool of inputs)")
    if cfg.init == "paper" and pool and set(pool) != {"class_labels"}:
        raise ArgumentError(
            f"cond: a fresh generator (init='paper', Alg. 1) takes class labels only, got {sorted(pool)}; "
            "init='teacher' makes the student the teacher's network, which takes the teacher's inputs"
        )
    if cfg.gan_weight and pool and set(pool) != {"class_labels"}:
        raise ArgumentError(
            f"gan_weight: the real-data GAN pairs each real sample with its condition, which the data has for class "
            f"labels only; a pool of {sorted(pool)} needs gan_weight=0 (the recipes' GAN is 0.01; data-free "
            "distillation, as SiD)"
        )
    if cfg.gan_weight and data is None:
        raise ArgumentError(
            "data: the GAN option (gan_weight > 0) trains a discriminator on real data; pass data= (e.g. 'digits')"
        )
    GANLoss(cfg.gan_loss)
    if check_policy(cfg.gan_augment) and not cfg.gan_weight:
        raise ArgumentError("gan_augment: augments the real-data GAN's head; set gan_weight > 0 as well")
    if cfg.gan_augment and len(shape) != 3:
        raise ArgumentError(f"gan_augment: augmentations are for images (C, H, W), got data of shape {shape}")
    if out is not None and cfg.init != "paper" and not isinstance(teacher, EDMPrecond) and _source(teacher) is None:
        raise ArgumentError(
            "out: a student of this teacher is saved as weights beside a reference to the teacher's "
            "folder; load the teacher with fs.from_pretrained(path) so that its folder is known"
        )
