"""Time grids (computed in float64, cast by the caller).

Conventions (DESIGN.md): EDM time is σ, decreasing from σ_max to a final 0; other
fields use their own [t_start, t_end] domain, e.g. Discriminator Flows t ∈ [0, 1].
A grid is a 1-D tensor of times from start to end, strictly monotone.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ._checks import check_int, deprecated, nearest
from .errors import ArgumentError

__all__ = [
    "COMFYUI_SCHEDULERS",
    "ComfyUIDenoise",
    "karras",
    "uniform",
    "loglinear",
    "polyexponential",
    "vp",
    "beta",
    "kl_optimal",
    "align_your_steps",
    "make",
    "check",
    "SPACINGS",
    "SIGMA_SPACINGS",
    "KINDS",
    "MAX_STEPS",
]


MAX_STEPS = 1_000_000  # a grid longer than this is a mistake (nfe=10**12), refused before it is built


def _steps_ok(steps: int) -> int:
    return check_int("steps", steps, 1, MAX_STEPS)


def _spaced(
    steps: int, sigma_min: float, sigma_max: float, final_zero: bool, level: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """The noise levels σ = level(r) for r uniform from 0 (σ_max) to 1 (σ_min), `steps` of them with a
    final σ = 0 (or steps + 1 without): the one frame every σ spacing fills in."""
    n = steps if final_zero else steps + 1
    r = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    s = level(r)
    return torch.cat([s, s.new_zeros(1)]) if final_zero else s


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not 0 < sigma_min < sigma_max:
        raise ArgumentError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")


def _positive(name: str, *values: float) -> None:
    if not all(v > 0 for v in values):
        raise ArgumentError(f"{name}: expected positive numbers, got {', '.join(str(v) for v in values)}")


def karras(
    steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho_grid: float = 7.0,
    final_zero: bool = True,
    *,
    rho: float | None = None,
) -> torch.Tensor:
    """EDM's grid σ_i = (σ_max^{1/ρ} + i/(N-1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ (Karras et al. 2022,
    Eq. 5; the same interpolation as the paper's Eq. 28), followed by σ = 0. The exponent is
    `rho_grid` (ρ alone is the generated distribution in flowsolve)."""
    if rho is not None:  # the name before 0.2
        deprecated("rho", "rho_grid", "karras")
        rho_grid = rho
    steps = _steps_ok(steps)
    _check_range(sigma_min, sigma_max)
    _positive("rho_grid", rho_grid)
    lo, hi = sigma_min ** (1 / rho_grid), sigma_max ** (1 / rho_grid)
    return _spaced(steps, sigma_min, sigma_max, final_zero, lambda r: (hi + r * (lo - hi)) ** rho_grid)


def loglinear(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, final_zero: bool = True) -> torch.Tensor:
    """σ uniform in log σ from σ_max to σ_min (the DPM-Solver 'logSNR' grid), then σ = 0."""
    steps = _steps_ok(steps)
    _check_range(sigma_min, sigma_max)
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return _spaced(steps, sigma_min, sigma_max, final_zero, lambda r: torch.exp(hi + r * (lo - hi)))


def polyexponential(
    steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho_grid: float = 1.0, final_zero: bool = True
) -> torch.Tensor:
    """log σ = log σ_min + (1 − r)^ρ (log σ_max − log σ_min) with r uniform from 0 to 1, then σ = 0
    (k-diffusion's `get_sigmas_polyexponential`); ρ = 1 is `loglinear`, ρ > 1 packs the steps at low σ."""
    steps = _steps_ok(steps)
    _check_range(sigma_min, sigma_max)
    _positive("rho_grid", rho_grid)
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return _spaced(steps, sigma_min, sigma_max, final_zero, lambda r: torch.exp(lo + (1 - r) ** rho_grid * (hi - lo)))


def vp(
    steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    beta_d: float = 19.9,
    beta_min: float = 0.1,
    final_zero: bool = True,
) -> torch.Tensor:
    """Uniform in the time of the VP SDE (Song et al. 2021), σ(t) = √(exp(β_d t²/2 + β_min t) − 1),
    between the times of σ_max and σ_min, then σ = 0. k-diffusion's `get_sigmas_vp(n)` is this grid
    with σ_max = σ(1) ≈ 151.9 and σ_min = σ(10⁻³) ≈ 0.01."""
    steps = _steps_ok(steps)
    _check_range(sigma_min, sigma_max)
    if not (beta_d > 0 and beta_min >= 0):
        raise ArgumentError(f"beta_d, beta_min: expected beta_d > 0 and beta_min >= 0, got {beta_d}, {beta_min}")

    def time_of(sigma: float) -> float:  # the inverse of σ(t): β_d t²/2 + β_min t = log(1 + σ²)
        return (math.sqrt(beta_min**2 + 2 * beta_d * math.log1p(sigma**2)) - beta_min) / beta_d

    t_lo, t_hi = time_of(sigma_min), time_of(sigma_max)

    def level(r: torch.Tensor) -> torch.Tensor:
        t = t_hi + r * (t_lo - t_hi)
        return torch.sqrt(torch.expm1(beta_d * t**2 / 2 + beta_min * t))

    return _spaced(steps, sigma_min, sigma_max, final_zero, level)


def beta(
    steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    a: float = 0.6,
    b: float = 0.6,
    final_zero: bool = True,
) -> torch.Tensor:
    """σ = σ_min + F⁻¹(1 − r)(σ_max − σ_min) with r uniform from 0 to 1 and F the Beta(a, b) CDF (Lee et
    al. 2024, "Beta sampling is all you need"; diffusers' `use_beta_sigmas`), then σ = 0: for a, b < 1
    the steps gather at both ends of the range."""
    from scipy import stats  # type: ignore[import-untyped]  # a dependency of scikit-learn

    steps = _steps_ok(steps)
    _check_range(sigma_min, sigma_max)
    _positive("a, b", a, b)

    def level(r: torch.Tensor) -> torch.Tensor:
        quantile = torch.as_tensor(stats.beta.ppf((1 - r).numpy(), a, b), dtype=torch.float64)
        return sigma_min + quantile * (sigma_max - sigma_min)

    return _spaced(steps, sigma_min, sigma_max, final_zero, level)


def kl_optimal(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, final_zero: bool = True) -> torch.Tensor:
    """σ uniform in arctan σ from σ_max to σ_min, then σ = 0: the "KL-optimal" schedule (Sabour et al.
    2024, Align Your Steps, from the bound on the KL divergence of the Euler step; ComfyUI's and
    AUTOMATIC1111's `kl_optimal`). arctan σ is the angle of the path x = cos θ x_0 + sin θ ε, so the
    grid is uniform in θ as a TrigFlow grid with σ_d = 1 is."""
    steps = _steps_ok(steps)
    _check_range(sigma_min, sigma_max)
    lo, hi = math.atan(sigma_min), math.atan(sigma_max)
    return _spaced(steps, sigma_min, sigma_max, final_zero, lambda r: torch.tan(hi + r * (lo - hi)))


# Align Your Steps' optimised 10-step noise levels (Sabour, Fidler & Kreis 2024; NVIDIA's published
# tables for Stable Diffusion 1.x, SDXL and Stable Video Diffusion), from σ_max to σ_min
_AYS_LEVELS = {
    "sd1": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
            0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
             0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
    "svd": (700.0, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}  # fmt: skip


def align_your_steps(steps: int, model: str = "sd1") -> torch.Tensor:
    """Align Your Steps (Sabour et al. 2024): the optimised noise levels of `model` ("sd1", "sdxl",
    "svd"; for those models' σ ranges), log-linearly interpolated to `steps` + 1 knots whose last is set
    to σ = 0, as the authors' guide, ComfyUI and diffusers' `AysSchedules` (10 steps) use them."""
    steps = _steps_ok(steps)
    if model not in _AYS_LEVELS:
        raise ArgumentError(
            f"model: expected one of {sorted(_AYS_LEVELS)}, got {model!r}{nearest(str(model), _AYS_LEVELS)}"
        )
    logs = torch.tensor(_AYS_LEVELS[model], dtype=torch.float64).log()
    u = torch.linspace(0, 1, steps + 1, dtype=torch.float64) * (len(logs) - 1)  # positions on the table
    lo = u.floor().long().clamp(max=len(logs) - 2)
    out = torch.exp(logs[lo] + (u - lo) * (logs[lo + 1] - logs[lo]))
    out[-1] = 0.0
    return out


def uniform(steps: int, t_start: float = 0.0, t_end: float = 1.0) -> torch.Tensor:
    """`steps` equal intervals from t_start to t_end (Discriminator Flows, Alg. 3)."""
    steps = _steps_ok(steps)
    if t_start == t_end:
        raise ArgumentError(f"t_start, t_end: expected different times, got {t_start} twice")
    return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)


# ComfyUI's schedulers that read a model's table of discrete noise levels (its comfy/samplers.py)
TABLE_SCHEDULERS = ("normal", "sgm_uniform", "simple", "ddim_uniform")
# ComfyUI's scheduler names, as `grid="comfyui:<name>"`: its own "beta" (Beta quantiles of the model's
# table of timesteps, not diffusers' and AUTOMATIC1111's beta over σ) and its σ spacings on the table's range
COMFYUI_SCHEDULERS = (*TABLE_SCHEDULERS, "beta", "karras", "exponential", "kl_optimal", "linear_quadratic")
COMFYUI_PREFIX = "comfyui:"


class ComfyUIDenoise:
    """ComfyUI's KSampler `denoise` < 1 as a grid rule: for `steps` steps, the last steps + 1 levels of
    the `scheduler`'s grid of ⌊steps/denoise⌋ steps. With image-to-image from strength 1
    (`fs.sample(field, solver, steps=20, grid=fs.grids.ComfyUIDenoise("karras", 0.6), init=x0,
    strength=1.0)`) it is KSampler(steps=20, denoise=0.6) on the latent x0: the data noised to the
    first of those levels, x0 + σ ε (a flow's (1 − t) x0 + t ε), and every step walked."""

    def __init__(self, scheduler: str, denoise: float) -> None:
        if isinstance(denoise, bool) or not isinstance(denoise, (int, float)) or not 0 < denoise <= 1:
            raise ArgumentError(f"denoise: expected a number in (0, 1], got {denoise!r}")
        self.scheduler, self.denoise = scheduler, float(denoise)

    def __call__(self, field, steps: int) -> torch.Tensor:
        full = field.grid(int(steps / self.denoise), self.scheduler)
        return full[-(steps + 1) :]

    def __repr__(self) -> str:
        return f"ComfyUIDenoise({self.scheduler!r}, {self.denoise:g})"


def comfyui_name(spacing: str) -> str:
    """The ComfyUI scheduler that `grid="comfyui:<name>"` names, checked."""
    name = spacing[len(COMFYUI_PREFIX) :]
    if name not in COMFYUI_SCHEDULERS:
        raise ArgumentError(
            f"grid: ComfyUI has no scheduler {name!r}{nearest(name, COMFYUI_SCHEDULERS)}; its schedulers: "
            f"{', '.join(COMFYUI_SCHEDULERS)}"
        )
    return name


def comfyui_spaced(spacing: str, steps: int, table: Sequence[float]) -> torch.Tensor | None:
    """`grid="comfyui:<name>"` where ComfyUI computes it from the model's ascending `table` alone (a σ
    table, or a flow's table of times, whose t ComfyUI spaces as σ): its beta (the table's entries at
    Beta quantiles) and its karras (ρ = 7), exponential and kl_optimal on the table's range. None for
    the table schedulers and linear_quadratic, which each field makes in its own time."""
    name = comfyui_name(spacing)
    if name == "beta":
        return from_table("beta", steps, table)
    if name in ("karras", "exponential", "kl_optimal"):
        extra = {"rho_grid": 7.0} if name == "karras" else {}
        return make(name, steps, sigma_min=float(table[0]), sigma_max=float(table[-1]), **extra)
    return None


def _beta_indices(steps: int, n: int, alpha: float = 0.6, beta: float = 0.6) -> list[int]:
    """ComfyUI's beta scheduler (Lee et al. 2024): the table indices at the Beta(α, β) quantiles of
    1, 1 − 1/steps, ..., 1/steps, rounded, repeats dropped."""
    from scipy import stats

    u = [1.0 - k / steps for k in range(steps)]
    picked: list[int] = []
    for q in stats.beta.ppf(u, alpha, beta):
        i = int(round(float(q) * (n - 1)))
        if not picked or picked[-1] != i:
            picked.append(i)
    return picked


def table_sigma(log_table: list[float], t: float) -> float:
    """σ at a fractional index t of an ascending log-σ table, linear in log σ between its entries."""
    lo = min(int(math.floor(t)), len(log_table) - 1)
    hi = min(lo + 1, len(log_table) - 1)
    w = t - lo
    return math.exp((1 - w) * log_table[lo] + w * log_table[hi])


def from_table(kind: str, steps: int, table: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """ComfyUI's scheduler `kind` on a model's ascending table of noise levels (entry i: σ at the
    model's timestep i), as a decreasing float64 σ-grid ending at 0:

    - "normal": timesteps uniform from the last to the first, σ log-linear between entries (k-diffusion's
      `get_sigmas` on a discrete model), then 0;
    - "sgm_uniform": steps + 1 such timesteps with the last dropped, then 0;
    - "simple": every (len/steps)-th entry from the top, then 0;
    - "ddim_uniform": every ⌊len/steps⌋-th entry from index 1 upwards, then 0;
    - "beta": ComfyUI's beta, the entries at the Beta(0.6, 0.6) quantiles of 1, 1 − 1/steps, ...,
      1/steps (rounded, repeats dropped, so it may take fewer steps), then 0.

    A table whose bottom entry is 0 takes the extra step ComfyUI takes there."""
    check_int("steps", steps, 1)
    if kind not in (*TABLE_SCHEDULERS, "beta"):
        raise ArgumentError(f"grid: expected one of {', '.join(map(repr, TABLE_SCHEDULERS))}, got {kind!r}")
    tab = torch.as_tensor(table, dtype=torch.float64).flatten()
    n = len(tab)
    if n < 2 or bool((tab[1:] < tab[:-1]).any()) or float(tab[0]) < 0 or not bool(torch.isfinite(tab).all()):
        raise ArgumentError("table: expected an ascending table of at least two finite noise levels >= 0")
    values = tab.tolist()
    out: list[float]
    if kind in ("normal", "sgm_uniform"):
        logs = [math.log(v) if v > 0 else -math.inf for v in values]
        count, append_zero = steps, True
        if kind == "sgm_uniform":
            ts = torch.linspace(n - 1, 0, steps + 1, dtype=torch.float64)[:-1].tolist()
        else:
            if math.isclose(values[0], 0.0, abs_tol=1e-5):  # σ at the first timestep already 0
                count, append_zero = steps + 1, False
            ts = torch.linspace(n - 1, 0, count, dtype=torch.float64).tolist()
        out = [table_sigma(logs, t) for t in ts] + ([0.0] if append_zero else [])
    elif kind == "beta":
        out = [values[i] for i in _beta_indices(steps, n)] + [0.0]
    elif kind == "simple":
        stride = n / steps
        out = [values[-(1 + int(x * stride))] for x in range(steps)] + [0.0]
    else:  # ddim_uniform
        zero = math.isclose(values[1], 0.0, abs_tol=1e-5)
        stride = max(n // (steps + 1 if zero else steps), 1)
        out = ([] if zero else [0.0]) + values[1::stride]
        out = out[::-1]
    return torch.tensor(out, dtype=torch.float64)


def flow_table(shift: Callable[[float], float] | None = None, entries: int = 1000) -> list[float]:
    """ComfyUI's table of a flow model's times (its discrete-flow sampling): t_i = shift((i + 1)/entries),
    ascending; `shift` the model's time shift (none by default)."""
    warp = shift or (lambda t: t)
    return [float(warp((i + 1) / entries)) for i in range(entries)]


def from_flow(
    kind: str, steps: int, shift: Callable[[float], float] | None = None, entries: int = 1000
) -> torch.Tensor:
    """ComfyUI's scheduler `kind` on a flow model (its discrete-flow sampling: the table
    t_i = shift((i + 1)/entries), the timestep of t being t itself), as a decreasing float64 grid of
    flow times ending at 0. "simple" and "ddim_uniform" pick the table's entries as on a σ table;
    "normal" is shift(u) for u uniform from the table's top to its bottom entry (`sgm_uniform`: steps + 1
    of them, the last dropped), so a shifted table's bottom is shifted twice, as ComfyUI's is.
    `shift`: the model's time shift (SD3's s t/(1 + (s − 1) t), Flux's from mu), default none."""
    check_int("steps", steps, 1)
    if kind not in TABLE_SCHEDULERS:
        raise ArgumentError(f"grid: expected one of {', '.join(map(repr, TABLE_SCHEDULERS))}, got {kind!r}")
    warp = shift or (lambda t: t)
    table = flow_table(shift, entries)
    if kind in ("simple", "ddim_uniform"):
        return from_table(kind, steps, table)
    top, bottom = table[-1], table[0]
    us = torch.linspace(top, bottom, steps + 1 if kind == "sgm_uniform" else steps, dtype=torch.float64).tolist()
    if kind == "sgm_uniform":
        us = us[:-1]
    return torch.tensor([float(warp(u)) for u in us] + [0.0], dtype=torch.float64)


def linear_quadratic(
    steps: int, sigma_max: float = 1.0, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> torch.Tensor:
    """Mochi's linear-quadratic schedule (ComfyUI's "linear_quadratic", LTX's and Mochi's default):
    1 − σ/σ_max rises linearly to `threshold_noise` over the first `linear_steps` (default half the)
    steps, then quadratically to 1, so σ runs from σ_max to 0. On a flow field σ_max = 1 and σ is t."""
    check_int("steps", steps, 1)
    if steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    lin = steps // 2 if linear_steps is None else int(linear_steps)
    if not 1 <= lin < steps:
        raise ArgumentError(f"linear_steps: expected 1 <= linear_steps < steps={steps}, got {linear_steps}")
    if not 0 < threshold_noise < 1:
        raise ArgumentError(f"threshold_noise: expected a number in (0, 1), got {threshold_noise!r}")
    quad = steps - lin
    excess = lin - threshold_noise * steps  # what the quadratic part must add over the linear rate
    a = excess / (lin * quad**2)
    b = threshold_noise / lin - 2 * excess / quad**2
    c = a * lin**2
    done = [k * threshold_noise / lin for k in range(lin)] + [a * k * k + b * k + c for k in range(lin, steps)] + [1.0]
    return torch.tensor([sigma_max * (1.0 - v) for v in done], dtype=torch.float64)


def continuous_table(sigma_min: float, sigma_max: float, entries: int = 1000) -> torch.Tensor:
    """The table of noise levels ComfyUI gives a continuous-σ (EDM) model: `entries` levels uniform in
    log σ from σ_min to σ_max, for `from_table`."""
    return torch.linspace(math.log(sigma_min), math.log(sigma_max), entries, dtype=torch.float64).exp()


SPACINGS: dict[str, Callable[..., torch.Tensor]] = {
    "karras": karras,
    "loglinear": loglinear,
    "polyexponential": polyexponential,
    "vp": vp,
    "beta": beta,
    "kl_optimal": kl_optimal,
    "exponential": loglinear,  # k-diffusion's get_sigmas_exponential, ComfyUI's and diffusers' name
    "uniform": uniform,
}
# the spacings of noise levels σ in [σ_min, σ_max] (then 0), which any Gaussian path maps to its time
SIGMA_SPACINGS = frozenset(SPACINGS) - {"uniform"}
KINDS = SPACINGS  # the name before 0.2


def make(spacing: str, steps: int, **kw) -> torch.Tensor:
    """A grid by spacing name: 'karras', 'loglinear', 'polyexponential', 'vp', 'beta', 'kl_optimal' or
    'uniform'."""
    if spacing in TABLE_SCHEDULERS:
        raise ArgumentError(
            f"grid: ComfyUI's {spacing!r} reads a model's table of noise levels; σ-time fields (fields.EDM, "
            f"diffusers DDPM-type models) and flow fields have one (field.grid(steps, {spacing!r})), this "
            f"field does not"
        )
    if spacing not in SPACINGS:
        raise ArgumentError(
            f"grid: unknown spacing {spacing!r}{nearest(str(spacing), SPACINGS)}; expected one of "
            f"{sorted(SPACINGS)} or a 1-D tensor of times"
        )
    return SPACINGS[spacing](steps, **kw)


def check(grid: torch.Tensor | Sequence[float], name: str = "grid") -> torch.Tensor:
    """Validate a user grid: 1-D, finite, at least two times, strictly monotone. Returns float64 on CPU."""
    g = torch.as_tensor(grid).detach()
    if g.dim() != 1:
        raise ArgumentError(f"{name}: expected a 1-D tensor of times, got shape {tuple(g.shape)}")
    g = g.to(device="cpu", dtype=torch.float64)
    if g.numel() < 2:
        raise ArgumentError(f"{name}: expected at least 2 times (start and end), got {g.numel()}")
    if not torch.isfinite(g).all():
        raise ArgumentError(f"{name}: expected finite times, got {g.tolist()}")
    d = g[1:] - g[:-1]
    if not ((d > 0).all() or (d < 0).all()):
        bad = int(torch.nonzero(d * torch.sign(d[0]) <= 0)[0]) if d[0] != 0 else 0
        raise ArgumentError(
            f"{name}: expected strictly monotone times, but {name}[{bad}]={g[bad].item():g} "
            f"and {name}[{bad + 1}]={g[bad + 1].item():g}"
        )
    return g
