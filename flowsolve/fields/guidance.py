"""Guidance: a weighting of scores (Eq. 26), so a guided field is still a σ-time field.

In the paper's terms classifier-free guidance is h = μ_data log p(x | c) − μ_ρ log p(x) with
μ_data = w, μ_ρ = w − 1 (Eq. 26): the ScoreDifference of a conditional and an unconditional score.
In denoiser form, with the guidance scale w of diffusers' pipelines (w = 1: the conditional model,
w = 0: the unconditional one),

    D_w(x; σ, c) = D(x; σ, ∅) + w (D(x; σ, c) − D(x; σ, ∅)),

and every solver integrates dx/dσ = (x − D_w)/σ. The variants of the last years change D_w only:

- rescale φ (Lin et al. 2023, §3.4): the guided noise prediction is rescaled to the conditional one's
  standard deviation per sample, mixed with weight φ (a diffusers model's own output, ε, v or x_0, as
  its pipelines' `rescale_noise_cfg` takes it);
- interval (Kynkäänniemi et al. 2024): guidance only for σ in (low, high], the conditional model elsewhere;
- autoguidance (Karras et al. 2024): the unconditional branch is a weaker model `guide` given the same
  condition;
- chained guidance (Brooks et al. 2023, InstructPix2Pix, Eq. 3): `uncond` a list of K
  less-conditioned inputs from the unconditional one up and `scale` K scales,
  D = D_0 + Σ_k w_k (D_k − D_{k−1}), D_K the conditional prediction, all branches in one pass;
  with K = 1 it is CFG;
- a schedule: `scale` may be a function w(level) of the noise level (σ, or t for velocity models)
  instead of a number, as CogVideoX's dynamic CFG or a guidance ramp;
- APG (Sadat et al. 2024): the update D_c − D_u, with momentum and a norm threshold, split into the
  components parallel and orthogonal to D_c; the parallel one is weighted by η (0 by default).

The conditional and unconditional branches go through the network as one batch of 2n when they use
the same network (CFG); `last_passes` says how many network passes the last call made.

Flow-matching models guide their velocity v(x, t) on x_t = (1 − t) x_0 + t ε (`prediction="velocity"`).
CFG is linear and D = x − t v, ε = x + (1 − t) v are affine in v, so CFG on v is CFG on D and on ε.
Rescale acts on ε = x + (1 − t) v as it does for denoisers, APG on D = x − t v; `interval` is given
in σ = t / (1 − t), the noise level of the same path in VE coordinates.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from .._checks import as_column, check_number
from .._cond import map_leaves, merge_leaves, row_lists, zip_leaves
from ..errors import ArgumentError, ArgumentTypeError

__all__ = ["Guided", "GuidedDenoiser", "APG_DEFAULTS"]

APG_DEFAULTS = {"eta": 0.0, "norm_threshold": None, "momentum": 0.0}


def _rows(value: Any, n: int, key: str, like: torch.Tensor | None = None) -> torch.Tensor:
    """A conditioning value with n rows: numbers are filled, leading size 1 is expanded."""
    if not isinstance(value, torch.Tensor):
        if like is not None and not like.is_floating_point():
            value = torch.full((n,), int(value), dtype=like.dtype, device=like.device)
        else:
            value = torch.as_tensor(value, device=like.device if like is not None else None)
    if value.dim() == 0:
        value = value.expand(n)
    if value.shape[0] == 1 and n != 1:
        value = value.expand(n, *value.shape[1:])
    if value.shape[0] != n:
        raise ArgumentError(f"uncond: key {key!r} has leading size {value.shape[0]}; expected {n} or 1")
    return value


def _flat(tree: dict) -> dict[str, Any]:
    """The leaves of a (nested) conditioning dict by their dotted path."""
    out: dict[str, Any] = {}

    def keep(path: str, v: Any) -> Any:
        out[path] = v
        return v

    map_leaves(keep, tree)
    return out


def _keywords(fn: Callable) -> set[str] | None:
    """The keyword names fn accepts (None: any, it takes **kwargs), read once: an unconditional guide
    is given none of the conditioning."""
    import inspect

    try:
        params = inspect.signature(fn.forward if hasattr(fn, "forward") else fn).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


PREDICTIONS = ("data", "velocity")


def checked_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ArgumentError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")
    return prediction


class Guided:
    """What every guided prediction shares: the model it wraps (its declarations passed through),
    the unconditional inputs, and what the last call did (`last_passes`, `last_uncond`)."""

    prediction = "data"
    uncond: dict = {}
    last_passes = 0
    # the unconditional (least-conditioned, or guide) prediction of the last call, for solvers that
    # re-noise with it (CFG++); None where that call ran the conditional model alone
    last_uncond: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        raise NotImplementedError

    def _bind_model(self, denoiser: Callable, guide: Callable | None = None) -> None:
        self.denoiser, self.guide = denoiser, guide
        # a model that post-processes its D nonlinearly (clipping, dynamic thresholding: diffusers'
        # schedulers do it to the guided x_0) gives its raw D for the branches and finishes the guided one
        raw = getattr(denoiser, "denoise_raw", None)
        self._finish = getattr(denoiser, "finish_denoised", None) if raw is not None else None
        self._branch: Callable = raw if raw is not None and self._finish is not None else denoiser
        self._guide_branch: Callable | None = (
            getattr(guide, "denoise_raw", guide) if self._finish is not None else guide
        )
        for name in ("sigma_min", "sigma_max", "data_shape", "prior_std_at"):  # the model's declarations pass through
            if hasattr(denoiser, name):
                setattr(self, name, getattr(denoiser, name))

    def fresh(self) -> "Guided":
        """A copy for one solve (its own per-solve state)."""
        return copy.copy(self)

    def _uncond_inputs(self, cond: dict, n: int, uncond: dict | None = None) -> dict:
        """cond with the unconditional inputs in place (nested dict inputs merged leaf by leaf)."""
        u = self.uncond if uncond is None else uncond
        return merge_leaves(cond, zip_leaves(lambda path, c, v: _rows(v, n, path, c), cond, u))


def same_structure(flats: list[dict[str, Any]]) -> None:
    """Refuse input trees whose leaves differ from the first's (a list input whose unconditional
    value has another length, or other keys)."""
    for f in flats[1:]:
        odd = sorted(set(flats[0]) ^ set(f))
        if odd:
            key = odd[0].rsplit(".", 1)[0]
            raise ArgumentError(
                f"uncond: input {key!r} does not match cond's in structure (a list of another length, or "
                f"other keys); each unconditional entry replaces the conditional one at the same place"
            )


class GuidedDenoiser(Guided):
    """D_w(x, σ, **cond) from a denoiser D(x, σ, **cond): CFG, rescale, interval, autoguidance, APG.
    With `prediction="velocity"`, the model is a flow velocity v(x, t, **cond) and so is the result."""

    def __init__(
        self,
        denoiser: Callable,
        scale: float,
        uncond: dict | list | None = None,
        guide: Callable | None = None,
        rescale: float = 0.0,
        interval: tuple[float, float] | None = None,
        apg: dict | bool | None = None,
        prediction: str = "data",
    ) -> None:
        self.prediction = checked_prediction(prediction)
        # a number; a tensor of weights broadcast against the sample (Stable Video Diffusion's per-frame
        # scale, shape (1, frames, 1, 1, 1)); or a schedule w(level) of the model's noise level (σ of a
        # denoiser, t of a velocity model; a (batch,) tensor), e.g. CogVideoX's dynamic CFG or a ramp
        # chained guidance (InstructPix2Pix, Eq. 3): K less-conditioned inputs, from the unconditional
        # one up, and K scales, D = D_0 + Σ_k w_k (D_k − D_{k−1}) with D_K the conditional prediction
        self.chain: list[dict] | None = None
        self.scales: list[float | torch.Tensor | Callable] = []
        if isinstance(uncond, (list, tuple)):
            if not isinstance(scale, (list, tuple)) or len(scale) != len(uncond) or not uncond:
                raise ArgumentError(
                    f"guidance: chained guidance takes one scale per entry of uncond ({len(uncond)}), got {scale!r}"
                )
            if any(not isinstance(u, dict) for u in uncond):
                raise ArgumentTypeError("uncond: expected a list of dicts of less-conditioned inputs")
            if guide is not None or apg:
                raise ArgumentError("guidance: chained guidance (a list of uncond) takes no guide= or apg=")
            self.chain = [row_lists(dict(u)) for u in uncond]
            self.scales = [self._checked_scale(w) for w in scale]
            uncond = self.chain[0]
        elif isinstance(scale, (list, tuple)):
            raise ArgumentError(f"guidance: a list of scales needs a list of uncond of the same length, got {uncond!r}")
        self.scale: float | torch.Tensor | Callable = self._checked_scale(scale) if self.chain is None else 1.0
        if uncond is not None and not isinstance(uncond, dict):
            raise ArgumentTypeError(
                f"uncond: expected a dict of unconditional inputs such as "
                f"{{'class_labels': 10}}, got {type(uncond).__name__}"
            )
        if guide is not None and not callable(guide):
            raise ArgumentTypeError(f"guide: expected a denoiser D(x, sigma, **cond), got {type(guide).__name__}")
        if guide is None and uncond is None:
            raise ArgumentError(
                "uncond: guidance needs the unconditional inputs (e.g. uncond={'class_labels': 10} "
                "for a model trained with label dropout) or a weaker model guide="
            )
        self.uncond = row_lists(dict(uncond or {}))
        self._guide_keys = _keywords(guide) if guide is not None else None
        self.rescale = check_number("rescale", rescale, 0.0, 1.0)
        if interval is not None:
            if not (isinstance(interval, (tuple, list)) and len(interval) == 2):
                raise ArgumentError(f"interval: expected (sigma_low, sigma_high), got {interval!r}")
            lo, hi = (check_number("interval", v, 0.0) for v in interval)
            if not lo < hi:
                raise ArgumentError(f"interval: expected sigma_low < sigma_high, got {interval!r}")
            interval = (lo, hi)
        self.interval = interval
        if apg is True:
            apg = dict(APG_DEFAULTS)
        if apg is not None and apg is not False:
            if not isinstance(apg, dict) or set(apg) - set(APG_DEFAULTS):
                raise ArgumentError(f"apg: expected True or a dict with keys {sorted(APG_DEFAULTS)}, got {apg!r}")
            apg = {**APG_DEFAULTS, **apg}
        self.apg = apg or None
        self._momentum: torch.Tensor | None = None
        self._bind_model(denoiser, guide)

    @staticmethod
    def _checked_scale(scale: Any) -> float | torch.Tensor | Callable:
        return scale if callable(scale) or isinstance(scale, torch.Tensor) else check_number("guidance", scale)

    def fresh(self) -> "GuidedDenoiser":
        """A copy with its own APG momentum (one per solve)."""
        other = copy.copy(self)
        other._momentum = None
        return other

    # -- the two branches ---------------------------------------------------------------------
    def _one_pass(self, x: torch.Tensor, sigma: torch.Tensor, trees: list[dict]) -> list[torch.Tensor]:
        """D for each input tree (all of the first's structure), as one network batch of len(trees) · n
        rows: [tree_0 rows; tree_1 rows; ...], every row in the first tree's dtype."""
        n, k = len(x), len(trees)
        flats = [_flat(t) for t in trees]
        same_structure(flats)

        def stack(path: str, _value):
            rows = [_rows(f[path], n, path) for f in flats]
            return torch.cat([r.to(rows[0].dtype) for r in rows])

        d = self._branch(torch.cat([x] * k), torch.cat([sigma] * k), **map_leaves(stack, trees[0]))
        self.last_passes = 1
        return list(d.split(n))

    def _chain_branches(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> list[torch.Tensor]:
        """D_0 (the least conditioned), ..., D_K (the conditional prediction), in one network pass."""
        assert self.chain is not None
        trees = [self._uncond_inputs(cond, len(x), u) for u in self.chain]
        extra = set().union(*(_flat(t) for t in trees)) - set(_flat(cond))
        if extra:
            raise ArgumentError(
                f"uncond: key {sorted(extra)[0]!r} is not in cond; chained guidance replaces inputs that cond holds"
            )
        d_c, *less = self._one_pass(x, sigma, [cond, *trees])
        return [*less, d_c]

    def _branches(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(x)
        if self._guide_branch is not None:  # autoguidance: a weaker model, the same condition
            d_c = self._branch(x, sigma, **cond)
            g_cond = self._uncond_inputs(cond, n) if self.uncond else cond
            keys = self._guide_keys
            d_u = self._guide_branch(x, sigma, **{k: v for k, v in g_cond.items() if keys is None or k in keys})
            self.last_passes = 2
            return d_c, d_u
        unc = self._uncond_inputs(cond, n)
        # an input only uncond names is the same in the conditional branch
        d_c, d_u = self._one_pass(x, sigma, [merge_leaves(unc, cond), unc])
        return d_c, d_u

    # -- the guided prediction ----------------------------------------------------------------
    def _apg_update(self, d_c: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
        p = self.apg
        assert p is not None
        if p["momentum"]:
            self._momentum = diff if self._momentum is None else diff + p["momentum"] * self._momentum
            diff = self._momentum
        flat = diff.reshape(len(diff), -1)
        if p["norm_threshold"] is not None:
            norm = flat.norm(dim=1, keepdim=True).clamp(min=1e-12)
            flat = flat * (p["norm_threshold"] / norm).clamp(max=1.0)
        unit = d_c.reshape(len(d_c), -1)
        unit = unit / unit.norm(dim=1, keepdim=True).clamp(min=1e-12)
        parallel = (flat * unit).sum(1, keepdim=True) * unit
        return ((flat - parallel) + p["eta"] * parallel).reshape(diff.shape)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        velocity = self.prediction == "velocity"
        if self.interval is not None:
            lo, hi = self.interval
            level = sigma / (1 - sigma) if velocity else sigma  # the path's σ in VE coordinates
            inside = (level > lo) & (level <= hi)
            if not bool(inside.any()):  # outside the interval: the conditional model alone
                self.last_passes, self.last_uncond = 1, None
                return self.denoiser(x, sigma, **cond)
        t = as_column(sigma.to(x.dtype), x) if velocity else None
        if self.chain is not None:  # D_0 + Σ_k w_k (D_k − D_{k−1})
            ds = self._chain_branches(x, sigma, cond)
            d_c, d = ds[-1], ds[0]
            self.last_uncond = ds[0]
            for k, scale in enumerate(self.scales, start=1):
                d = d + self._scale_at(sigma, x, scale) * (ds[k] - ds[k - 1])
            return self._finished(x, sigma, d, d_c, t, inside if self.interval is not None else None)
        d_c, d_u = self._branches(x, sigma, cond)
        self.last_uncond = d_u
        w = self._scale_at(sigma, x)
        if self.apg is not None:
            if t is not None:  # APG on the data predictions D = x − t v; back to v = (x − D)/t (t > 0 here)
                update = self._apg_update(x - t * d_c, -t * (d_c - d_u))
                d = d_c - (w - 1.0) * update / t
            else:
                d = d_c + (w - 1.0) * self._apg_update(d_c, d_c - d_u)
        else:
            d = d_u + w * (d_c - d_u)
        return self._finished(x, sigma, d, d_c, t, inside if self.interval is not None else None)

    def _finished(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        d: torch.Tensor,
        d_c: torch.Tensor,
        t: torch.Tensor | None,
        inside: torch.Tensor | None,
    ) -> torch.Tensor:
        """The guided prediction rescaled, kept to the interval, then post-processed by the model."""
        if self.rescale:  # Lin et al. 2023 on the noise prediction: std ratio per sample
            d = self._rescaled(x, sigma, d, d_c, t)
        if inside is not None:
            d = torch.where(as_column(inside, x), d, d_c)
        return self._finish(d, x, sigma) if self._finish is not None else d

    def _scale_at(self, sigma: torch.Tensor, x: torch.Tensor, scale: Any = None) -> float | torch.Tensor:
        """The guidance scale at these noise levels: the number, the weights, or the schedule's value
        (one, one per sample, or weights broadcast against the sample)."""
        scale = self.scale if scale is None else scale
        w = scale(sigma) if callable(scale) else scale
        if not isinstance(w, torch.Tensor):
            return check_number("guidance", w)
        w = w.to(device=x.device, dtype=x.dtype)
        if w.dim() == x.dim() and all(a in (1, b) for a, b in zip(w.shape, x.shape)):
            return w  # per-element weights (per frame, per channel)
        if w.numel() not in (1, len(x)):
            raise ArgumentError(
                f"guidance: expected one scale, one per sample ({len(x)}) or weights broadcast against the "
                f"sample {tuple(x.shape)}, got shape {tuple(w.shape)}"
            )
        return as_column(w.reshape(-1).expand(len(x)), x)

    def _rescaled(
        self, x: torch.Tensor, sigma: torch.Tensor, d: torch.Tensor, d_c: torch.Tensor, t: torch.Tensor | None
    ) -> torch.Tensor:
        """The guided prediction with its noise prediction's per-sample std moved towards the
        conditional one's: ε ∝ x − D for denoisers, ε = x + (1 − t) v for velocities. A diffusers model
        rescales its own output (ε, v or x_0: `to_native`), as its pipelines' `rescale_noise_cfg` does."""
        to_native = getattr(self.denoiser, "to_native", None) if t is None else None
        native = to_native(x, sigma, d) if callable(to_native) else None
        if native is not None:
            r_g, r_c = native, to_native(x, sigma, d_c)  # type: ignore[misc]
        elif t is None:
            r_g, r_c = x - d, x - d_c
        else:
            r_g, r_c = x + (1 - t) * d, x + (1 - t) * d_c
        std_g = r_g.reshape(len(x), -1).std(1).clamp(min=1e-12)
        factor = as_column(self.rescale * r_c.reshape(len(x), -1).std(1) / std_g + (1.0 - self.rescale), x)
        if native is not None:
            return self.denoiser.from_native(x, sigma, factor * native)  # type: ignore[attr-defined]
        if t is None:
            return x - r_g * factor
        # ε' = m ε_g, so v' = (m ε_g − x)/(1 − t) = m v + (m − 1) x/(1 − t); at t = 1, ε = x and v stays
        at_prior = t >= 1
        return torch.where(at_prior, d, factor * d + (factor - 1) * x / torch.where(at_prior, 1.0, 1 - t))
