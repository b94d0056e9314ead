"""Score fields: diffusion models as particle models (paper Section 2.2, Eq. 6–9, 19, 21, 26).

All take denoisers D(x, σ) (σ a (batch,) tensor) or scores s(x, σ) = ∇log[p ⋆ k_σ](x);
they are related by Tweedie's formula s = (D − x)/σ².
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .._checks import as_column, batch_time, check_choice, deprecated
from .. import grids
from .base import Field, field_model
from .guidance import Guided
from .guiders import guided
from .paths import VE
from ..errors import ArgumentError, ArgumentTypeError

__all__ = ["ScoreDifference", "EDM", "Langevin"]

Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_PREDICTIONS = ("denoiser", "score")  # what the callable returns: D(x; σ) or ∇log p_σ


def declared_shape(fn, shape: Sequence[int] | None) -> tuple[int, ...] | None:
    """The data shape, said once and explicitly: `shape=`, else the `data_shape` the model declares
    (a `Denoiser`, or the object a bound method belongs to, e.g. `GaussianMixture.denoiser`).
    Nothing is searched for; a plain callable without `shape=` has None, and sampling it without
    x_init= then asks for shape=."""
    if shape is not None:
        if isinstance(shape, int) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape):
            raise ArgumentError(
                f"shape: expected a tuple of positive integers such as (2,) or (3, 32, 32), got {shape!r}"
            )
        return tuple(shape)
    for obj in (fn, getattr(fn, "__self__", None)):
        known = getattr(obj, "data_shape", None)
        if known is not None and not callable(known):
            return tuple(known)
    return None


def _prediction(prediction: str, kind: str | None, where: str) -> str:
    if kind is not None:  # the name before 0.2
        deprecated("kind", "prediction", where)
        prediction = kind
    return check_choice("prediction", prediction, _PREDICTIONS)


def _attr(fn, name):
    for obj in (fn, getattr(fn, "__self__", None)):
        v = getattr(obj, name, None)
        if v is not None:
            return float(v)
    return None


class ScoreDifference(Field):
    """h = μ_data log[p_data ⋆ k_σ] − μ_ρ log[ρ ⋆ k_σ] (Eq. 19, 26) in EDM time σ(t) = t.

    The particle flow is dx/dσ = −σ ∇h (Eq. 9 right for μ = (2, 1), NCSN-like for (1, 1)),
    integrated from σ_max down to 0. `rho=None` assumes ρ_σ = p_data ⋆ k_σ (the usual
    diffusion-model assumption), so ∇log ρ is the data score itself.

    Stochastic form (Eq. 21, with the roles of α written so that α = 0 is the ODE and α = 1
    the reverse SDE of Eq. 7): the share α of the −μ_ρ ∇log ρ term is traded for Brownian
    noise of variance 2 α μ_ρ σ |dσ| (Fokker–Planck), which leaves every marginal unchanged.

    `mu_data` and `mu_rho` may also be functions of σ (tensor in, tensor out): the DiffFlow family
    of weighted real/generated scores, e.g. a learned-ρ correction only below some σ. Such fields
    integrate their SDE by Euler–Maruyama (`method="em"`).
    """

    time_is_sigma = True
    finite_at_end = False
    default_grid = "karras"
    default_nfe = 32
    path = VE
    takes_cond = True

    def __init__(
        self,
        data: Fn,
        rho: Fn | None = None,
        *,
        mu_data: float = 1.0,
        mu_rho: float = 1.0,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        rho_grid: float = 7.0,
        prediction: str = "denoiser",
        shape: Sequence[int] | None = None,
        kind: str | None = None,
        guidance: float | None = None,
        uncond: dict | None = None,
        guide: Fn | None = None,
        rescale: float = 0.0,
        interval: tuple[float, float] | None = None,
        apg: dict | bool | None = None,
        schedule: Callable[[int], torch.Tensor] | None = None,
    ) -> None:
        if not callable(data):
            raise ArgumentTypeError(f"data: expected a callable D(x, sigma), got {type(data).__name__}")
        if rho is not None and not callable(rho):
            raise ArgumentTypeError(f"rho: expected a callable D(x, sigma) or None, got {type(rho).__name__}")
        prediction = _prediction(prediction, kind, type(self).__name__)
        lo_model, hi_model = _attr(data, "sigma_min"), _attr(data, "sigma_max")
        lo = 0.002 if sigma_min is None else float(sigma_min)
        hi = 80.0 if sigma_max is None else float(sigma_max)
        if sigma_min is None and lo_model is not None:  # clamp the default grid to the model's range
            lo = max(lo, lo_model)
        if sigma_max is None and hi_model is not None:
            hi = min(hi, hi_model)
        if not 0 < lo < hi < float("inf"):
            raise ArgumentError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max < inf, got {lo}, {hi}")
        self.data_shape = declared_shape(data, shape)
        self._domain_hi = hi_model
        if guidance is not None:  # Eq. 26 with μ_data = w, μ_ρ = w − 1 (fields.guidance)
            if prediction != "denoiser":
                raise ArgumentError("guidance: needs a denoiser (prediction='denoiser')")
            data = guided(data, guidance, uncond, guide=guide, rescale=rescale, interval=interval, apg=apg)
        elif any(v not in (None, 0.0) for v in (uncond, guide, rescale, interval, apg)):
            raise ArgumentError("guidance: uncond=, guide=, rescale=, interval= and apg= need guidance=<scale>")
        self.data, self.rho, self.prediction = data, rho, prediction
        self.schedule = schedule  # steps ↦ σ-grid (a diffusers scheduler's own), the default
        if schedule is not None:
            self.default_grid = "schedule"
        for name, mu in (("mu_data", mu_data), ("mu_rho", mu_rho)):
            if not callable(mu) and (isinstance(mu, bool) or not isinstance(mu, (int, float))):
                raise ArgumentTypeError(f"{name}: expected a number or a function of sigma, got {type(mu).__name__}")
        self.weighted = callable(mu_data) or callable(mu_rho)
        self.mu_data = mu_data if callable(mu_data) else float(mu_data)
        self.mu_rho = mu_rho if callable(mu_rho) else float(mu_rho)
        self.sigma_min, self.sigma_max, self.rho_grid = lo, hi, float(rho_grid)
        self.t_start, self.t_end, self.prior_std = hi, 0.0, hi

    def from_normal(self, z: torch.Tensor, t_start: float | None = None) -> torch.Tensor:
        """x ~ N(0, s²) at the first noise level σ_0 of the grid: s = σ_0, or what the denoiser says its
        noise is there (`prior_std_at(σ)`: √(1 + σ²) for a discrete VP model, as its scheduler starts)."""
        sigma0 = self.prior_std if t_start is None else float(t_start)
        at = getattr(self.data, "prior_std_at", None)
        return z * (at(sigma0) if at is not None else sigma0)

    # -- pieces --------------------------------------------------------------------------
    def bind(self, cond: dict) -> "ScoreDifference":
        """`Field.bind`; a guided copy also keeps its own APG momentum."""
        bound = super().bind(cond)
        assert isinstance(bound, ScoreDifference)
        if isinstance(self.data, Guided):
            bound.data = self.data.fresh()
        return bound

    def _denoise(self, fn: Fn, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = self.call_model(fn, x, sigma, self.prediction)
        if self.prediction == "denoiser":
            return out
        return x + as_column(sigma, x) ** 2 * out

    def domain(self) -> tuple[float, float]:
        """σ ∈ [0, σ_max of the denoiser] when the denoiser declares the range it was trained on
        (a `Denoiser`'s sigma_max), else [0, ∞)."""
        declared = self._domain_hi
        return 0.0, declared if declared is not None else float("inf")

    def _residuals(self, x, t):
        """(x − D_data, x − D_ρ or None, σ as a column)."""
        sigma = batch_time(t, x)
        r_data = x - self._denoise(self.data, x, sigma)
        r_rho = None if self.rho is None else x - self._denoise(self.rho, x, sigma)
        return r_data, r_rho, as_column(sigma, x)

    def _weights(self, s: torch.Tensor):
        """(μ_data, μ_ρ) as numbers, or as columns when they are functions of σ."""
        if not self.weighted:
            return self.mu_data, self.mu_rho
        flat = s.reshape(-1)

        def at(mu):
            return mu(flat).to(s.dtype).reshape(s.shape) if callable(mu) else mu

        return at(self.mu_data), at(self.mu_rho)

    def grad_h(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """∇h = μ_data ∇log[p ⋆ k_σ] − μ_ρ ∇log[ρ ⋆ k_σ] (Eq. 19, 26) at noise level σ."""
        return self.grad_h_and_denoised(x, sigma)[0]

    def grad_h_and_denoised(self, x: torch.Tensor, sigma: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """(∇h, D_data(x, σ)) from one evaluation of the data denoiser: for trainers that also weigh
        by the teacher's denoising (DMD's weighting in the Score GAN)."""
        r_data, r_rho, s = self._residuals(x, sigma)
        mu_d, mu_r = self._weights(s)
        if r_rho is None:
            grad = -(mu_d - mu_r) * r_data / s**2
        else:
            grad = -(mu_d * r_data - mu_r * r_rho) / s**2
        return grad, x - r_data

    # -- the flow ------------------------------------------------------------------------
    def _velocity(self, r_data, r_rho, s, rho_share: float):
        mu_d, mu_r = self._weights(s)
        if r_rho is None:
            c = mu_d - rho_share * mu_r
            return r_data / s if (isinstance(c, float) and c == 1.0) else c * r_data / s
        return (mu_d * r_data - rho_share * mu_r * r_rho) / s

    def __call__(self, x, t):
        """dx/dσ = −σ ∇h = (μ_data (x − D_data) − μ_ρ (x − D_ρ)) / σ (Eq. 8, 9)."""
        r_data, r_rho, s = self._residuals(x, t)
        return self._velocity(r_data, r_rho, s, 1.0)

    def sde(self, x, t, alpha):
        r_data, r_rho, s = self._residuals(x, t)
        return self._velocity(r_data, r_rho, s, 1.0 - alpha), self.diffusion(batch_time(t, x), alpha)

    def diffusion(self, t, alpha=1.0):
        _, mu_r = self._weights(torch.as_tensor(t))
        return 2.0 * alpha * mu_r * t

    def sde_coefficients(self, alpha: float) -> tuple[float, float]:
        """(c, κ) with drift_α = c (x − D_α)/σ and noise rate 2κσ: c = μ_data − (1 − α) μ_ρ, κ = α μ_ρ."""
        if self.weighted:
            raise ArgumentError(
                "method: 'exp' needs constant mu_data and mu_rho; this field weights them by σ, use method='em'"
            )
        c = self.mu_data - (1.0 - alpha) * self.mu_rho
        if c <= 0:
            raise ArgumentError(
                f"alpha: the drift of Eq. 21 vanishes or reverses for mu_data={self.mu_data}, "
                f"mu_rho={self.mu_rho}, alpha={alpha}; use method='em'"
            )
        return c, alpha * self.mu_rho

    def grid(self, steps, spacing=None, **kw):
        spacing = spacing or self.default_grid
        if spacing == "schedule":
            if self.schedule is None:
                raise ArgumentError("grid: 'schedule' needs a field made with schedule= (a diffusers model's field)")
            return grids.check(self.schedule(steps, **kw) if kw else self.schedule(steps))
        if isinstance(spacing, str) and spacing.startswith(grids.COMFYUI_PREFIX):  # "comfyui:beta", ...
            g = grids.comfyui_spaced(spacing, steps, self.sigma_table().tolist())
            if g is not None:
                return g
            spacing = grids.comfyui_name(spacing)  # a table scheduler, or linear_quadratic
        if spacing in grids.TABLE_SCHEDULERS:  # ComfyUI's schedulers on the model's table of σ's
            return grids.from_table(spacing, steps, self.sigma_table())
        if spacing == "linear_quadratic":  # ComfyUI's (Mochi's), from the field's σ_max
            return grids.linear_quadratic(steps, self.sigma_max, **kw)
        kw.setdefault("sigma_min", self.sigma_min)
        kw.setdefault("sigma_max", self.sigma_max)
        if spacing == "karras":
            kw.setdefault("rho_grid", self.rho_grid)
        if spacing == "uniform":
            return super().grid(steps, spacing, t_start=kw["sigma_max"], t_end=0.0)
        return super().grid(steps, spacing, **kw)

    def sigma_table(self) -> torch.Tensor:
        """The model's ascending table of noise levels, one per timestep, as ComfyUI reads it: a
        diffusers DDPM-type model's σ_t = √((1 − ᾱ_t)/ᾱ_t), else 1000 levels uniform in log σ over the
        field's range (ComfyUI's continuous EDM sampling)."""
        model = field_model(
            self,
            lambda m: (
                isinstance(getattr(m, "log_sigmas", None), torch.Tensor)
                and getattr(m, "schedule", "discrete") == "discrete"
            ),
        )
        if model is not None:
            return model.log_sigmas.double().exp()
        return grids.continuous_table(self.sigma_min, self.sigma_max)

    @property
    def kind(self) -> str:  # the name before 0.2
        return self.prediction


class EDM(ScoreDifference):
    """The probability-flow ODE of EDM (Eq. 8 with σ(t) = t): dx/dσ = (x − D(x; σ))/σ,
    from σ_max to 0, prior N(0, σ_max² I), default grid Karras ρ = 7.

    It is `ScoreDifference` with μ = (2, 1) and ρ assumed equal to p ⋆ k_σ; its stochastic
    form at alpha = 1 is the reverse SDE of Eq. 7.

    Guidance (`fields.guidance`): guidance=w with uncond= (classifier-free, one batched network call),
    or guide= (autoguidance with a weaker model); rescale=φ, interval=(σ_lo, σ_hi), apg=True or a
    dict. The guided field is still σ-time, so every solver runs on it. Conditioning comes per
    sample through `fs.sample(cond=)`.
    """

    def __init__(
        self,
        denoiser: Fn,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        *,
        rho_grid: float = 7.0,
        prediction: str = "denoiser",
        shape: Sequence[int] | None = None,
        rho: float | None = None,
        kind: str | None = None,
        guidance: float | None = None,
        uncond: dict | None = None,
        guide: Fn | None = None,
        rescale: float = 0.0,
        interval: tuple[float, float] | None = None,
        apg: dict | bool | None = None,
        schedule: Callable[[int], torch.Tensor] | None = None,
    ) -> None:
        if rho is not None:  # the name before 0.2 (ρ is the generated distribution)
            deprecated("rho", "rho_grid", "EDM")
            rho_grid = rho
        super().__init__(
            denoiser,
            None,
            mu_data=2.0,
            mu_rho=1.0,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            rho_grid=rho_grid,
            prediction=prediction,
            shape=shape,
            kind=kind,
            guidance=guidance,
            uncond=uncond,
            guide=guide,
            rescale=rescale,
            interval=interval,
            apg=apg,
            schedule=schedule,
        )

    @property
    def denoiser(self) -> Fn:
        return self.data

    def __call__(self, x, t):
        sigma = batch_time(t, x)
        s = t if (isinstance(t, torch.Tensor) and t.dim() == 0 and t.dtype == x.dtype) else as_column(sigma, x)
        out = self.call_model(self.data, x, sigma, self.prediction)
        if self.prediction == "denoiser":
            return (x - out) / s
        return -s * out


class Langevin(Field):
    """Langevin / NCSN dynamics (Eq. 6 and 9 left) in training-free time t ∈ [0, T]:
    dx = λ(t) μ_data ∇log[p ⋆ k_σ(t)] dt + sqrt(2 λ(t)) dW, with step scale λ(t) = σ(t)²
    (NCSN's annealing). With a generated-distribution score `rho` it also has the
    deterministic equivalent dx/dt = λ ∇log[(p ⋆ k_σ)/ρ] (Eq. 9 left) and every alpha of Eq. 21;
    without one, only alpha = 1 (plain Langevin) is defined.

    sigma: a float (fixed σ, Eq. 6) or a callable t ↦ σ(t) on (batch,) tensors (annealing).
    """

    default_grid = "uniform"
    default_nfe = 100

    def __init__(
        self,
        data: Fn,
        sigma: float | Callable[[torch.Tensor], torch.Tensor],
        T: float = 1.0,
        *,
        rho: Fn | None = None,
        mu_data: float = 1.0,
        mu_rho: float = 1.0,
        scale_by_sigma2: bool = True,
        prior_std: float | None = None,
        prediction: str = "denoiser",
        shape: Sequence[int] | None = None,
        kind: str | None = None,
    ) -> None:
        if not callable(data):
            raise ArgumentTypeError(f"data: expected a callable D(x, sigma), got {type(data).__name__}")
        prediction = _prediction(prediction, kind, "Langevin")
        if not callable(sigma):
            if not float(sigma) > 0:
                raise ArgumentError(f"sigma: expected a positive number or a callable, got {sigma}")
        if not T > 0:
            raise ArgumentError(f"T: expected a positive duration, got {T}")
        self.data, self.rho, self.prediction, self.sigma = data, rho, prediction, sigma
        self.mu_data, self.mu_rho, self.scale_by_sigma2 = float(mu_data), float(mu_rho), scale_by_sigma2
        self.t_start, self.t_end = 0.0, float(T)
        if prior_std is None:
            prior_std = float(sigma(torch.zeros(1, dtype=torch.float64))[0]) if callable(sigma) else float(sigma)
        self.prior_std = float(prior_std)
        self.data_shape = declared_shape(data, shape)

    def _sigma(self, t, x):
        t = batch_time(t, x)
        return self.sigma(t).to(x.dtype) if callable(self.sigma) else torch.full_like(t, float(self.sigma))

    def _score(self, fn, x, sigma):
        out = self.check_output(fn(x, sigma), x, "score" if self.prediction == "score" else "denoiser")
        if self.prediction == "score":
            return out
        return (out - x) / as_column(sigma, x) ** 2

    def _drift(self, x, t, rho_share):
        sigma = self._sigma(t, x)
        lam = as_column(sigma, x) ** 2 if self.scale_by_sigma2 else 1.0
        out = self.mu_data * self._score(self.data, x, sigma)
        if rho_share:
            if self.rho is None:
                raise ArgumentError(
                    "alpha: Langevin without a generated-distribution score `rho` is only "
                    "defined for alpha = 1 (Eq. 6); pass rho= for the deterministic Eq. 9 (left)"
                )
            out = out - rho_share * self.mu_rho * self._score(self.rho, x, sigma)
        return lam * out, sigma

    def grad_h(self, x: torch.Tensor, t) -> torch.Tensor:
        """∇h = μ_data ∇log[p ⋆ k_σ(t)] − μ_ρ ∇log ρ (Eq. 9 left; the second term only with `rho`)."""
        sigma = self._sigma(t, x)
        out = self.mu_data * self._score(self.data, x, sigma)
        return out if self.rho is None else out - self.mu_rho * self._score(self.rho, x, sigma)

    def __call__(self, x, t):
        return self._drift(x, t, 1.0)[0]

    def sde(self, x, t, alpha):
        drift, sigma = self._drift(x, t, 1.0 - alpha)
        lam = sigma**2 if self.scale_by_sigma2 else 1.0
        return drift, 2.0 * alpha * self.mu_rho * lam

    def diffusion(self, t, alpha=1.0):
        t = torch.as_tensor(t)
        lam = (self.sigma(t) ** 2 if callable(self.sigma) else float(self.sigma) ** 2) if self.scale_by_sigma2 else 1.0
        return 2.0 * alpha * self.mu_rho * lam
