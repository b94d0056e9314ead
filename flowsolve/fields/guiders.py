"""diffusers' modular guiders (`diffusers.guiders`) as the guidance of any flowsolve solver.

A guider is a rule that combines a network's predictions under several conditionings into one
(Eq. 26's weighting of scores, generalised): CFG, CFG-Zero*, APG, tangential CFG, frequency-decoupled
guidance, MagnitudeAware guidance, and the ones that change the network itself for one branch
(perturbed-attention, skip-layer and smoothed-energy guidance, autoguidance by layer dropout).
`m.field(guidance=guider, uncond=...)` runs it as diffusers' modular pipelines run it, at every
field evaluation:

1. `guider.set_state(step=i, num_inference_steps=N, timestep=t)`: i is the index of the evaluation
   in the solve and N the solve's steps as its scheduler counts them (`fields.base.solve_position`,
   what a pipeline's loop gives: for a one-evaluation-per-step solver, the step index);
2. `guider.prepare_inputs({name: (conditional, unconditional)})` splits the inputs into batches;
3. for each batch, `guider.prepare_models(network)` (hooks for PAG, SLG, SEG), the network's
   native prediction (ε, v, x_0 or a flow velocity: what the pipeline calls `noise_pred`), then
   `guider.cleanup_models(network)`;
4. `guider(batches).pred` is the guided native prediction, turned into the data prediction D (or
   kept as the velocity) by the model's own conversion, then post-processed as the scheduler does
   (clipping, thresholding).

The guided prediction is still a σ-time field (or a flow velocity), so every solver applies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from .._cond import map_leaves, merge_leaves, row_lists
from ..errors import ArgumentError, ArgumentTypeError
from .base import solve_position
from .guidance import Guided, GuidedDenoiser, _flat, _rows, checked_prediction, same_structure

__all__ = ["GuiderDenoiser", "is_guider", "load_guider", "guided"]

_PROTOCOL = ("set_state", "prepare_inputs", "prepare_models", "cleanup_models")
_UNCOND = "pred_uncond"  # the batch name of the unconditional branch in diffusers' guiders


def is_guider(obj: Any) -> bool:
    """Whether obj is a diffusers guider (the `BaseGuidance` protocol)."""
    return callable(obj) and all(callable(getattr(obj, name, None)) for name in _PROTOCOL)


def load_guider(path: str | Path) -> Any:
    """A diffusers guider from a folder with its `guider_config.json` (a modular pipeline's `guider/`),
    of the class that file names."""
    folder = Path(path)
    config = folder / "guider_config.json"
    if not config.is_file():
        raise ArgumentError(f"guider: expected a folder with guider_config.json, got {str(path)!r}")
    name = json.loads(config.read_text()).get("_class_name")
    import diffusers.guiders

    cls: Any = getattr(diffusers.guiders, str(name), None)
    if not callable(getattr(cls, "from_pretrained", None)):
        known = sorted(n for n in dir(diffusers.guiders) if n.endswith("Guidance"))
        raise ArgumentError(f"guider: {config} names class {name!r}; diffusers' guiders are {', '.join(known)}")
    return cls.from_pretrained(folder)


def guided(
    denoiser: Callable, guidance: Any, uncond: dict | list | None = None, prediction: str = "data", **options
) -> Guided:
    """The guided prediction of `denoiser`: a `GuidedDenoiser` for a scale (numbers, a schedule, the
    chained scales), a `GuiderDenoiser` for a diffusers guider, which takes no other option."""
    if is_guider(guidance):
        given = sorted(k for k, v in options.items() if v is not None and v is not False and v != 0.0)
        if given:
            raise ArgumentError(
                f"{given[0]}: a diffusers guider ({type(guidance).__name__}) does its own combination; set "
                f"it on the guider (guidance_rescale, start/stop, ...) rather than as {given[0]}="
            )
        return GuiderDenoiser(denoiser, guidance, uncond, prediction)
    return GuidedDenoiser(denoiser, guidance, uncond, prediction=prediction, **options)


class GuiderDenoiser(Guided):
    """D(x, σ, **cond) (or a velocity v(x, t, **cond)) from a denoiser, guided by a diffusers guider
    on the network's native prediction."""

    def __init__(
        self, denoiser: Callable, guider: Any, uncond: dict | list | None = None, prediction: str = "data"
    ) -> None:
        if not is_guider(guider):
            raise ArgumentTypeError(
                f"guidance: expected a diffusers guider (diffusers.guiders), got {type(guider).__name__}"
            )
        if uncond is not None and not isinstance(uncond, dict):
            raise ArgumentTypeError(
                f"uncond: a guider takes a dict of unconditional inputs such as {{'class_labels': 10}}, got "
                f"{type(uncond).__name__}"
            )
        self.prediction = checked_prediction(prediction)
        self.guider = guider
        self.uncond = row_lists(dict(uncond or {}))
        self._has_uncond = uncond is not None
        self._bind_model(denoiser)
        owner = getattr(denoiser, "__self__", denoiser)  # a model's bound method (`m.velocity`): the model
        native = getattr(owner, "native_prediction", None) if prediction == "data" else None
        # the network's own output (diffusers' `noise_pred`) and its conversion to D; a model without
        # one (flowsolve's denoisers, flow velocities) is guided on its prediction itself
        self._native: Callable = native if native is not None else self._branch
        self._from_native: Callable | None = getattr(owner, "from_native", None) if native is not None else None
        net = getattr(owner, "model", None)  # the network a guider may hook (PAG, SLG): the model's, or the model
        self.network = (
            net if isinstance(net, torch.nn.Module) else owner if isinstance(owner, torch.nn.Module) else None
        )
        self._timestep = getattr(owner, "scheduler_timestep", None) or getattr(owner, "timestep", None)

    def _batches(self, cond: dict, n: int) -> tuple[list, dict, list[str]]:
        """The guider's batches of inputs, the conditional tree and its leaves' paths."""
        unc = self._uncond_inputs(cond, n) if self._has_uncond else cond
        con = merge_leaves(unc, cond)  # an input only uncond names is the same in the conditional branch
        flats = [_flat(con), _flat(unc)]
        same_structure(flats)
        paths = list(flats[0])
        pairs = {}
        for j, path in enumerate(paths):
            c = _rows(flats[0][path], n, path)
            pairs[f"input{j}"] = (c, _rows(flats[1][path], n, path, c).to(c.dtype))
        batches = self.guider.prepare_inputs(pairs)
        names = [getattr(b, getattr(self.guider, "_identifier_key", ""), None) for b in batches]
        if _UNCOND in names and paths and not self._has_uncond:
            raise ArgumentError(
                f"uncond: {type(self.guider).__name__} asks for an unconditional prediction; pass uncond= "
                f"(the inputs that replace cond's, e.g. {{'class_labels': 10}})"
            )
        return batches, con, paths

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        g, n = self.guider, len(x)
        step, steps = solve_position()
        g.set_state(step=step, num_inference_steps=steps, timestep=self._timestep(sigma) if self._timestep else sigma)
        batches, con, paths = self._batches(cond, n)
        index = {path: f"input{j}" for j, path in enumerate(paths)}
        for batch in batches:  # one network call per batch: a guider may change the network for one

            def leaf(path: str, _value: Any, batch: Any = batch) -> Any:
                return getattr(batch, index[path])

            inputs = map_leaves(leaf, con)
            g.prepare_models(self.network)
            try:
                batch.noise_pred = self._native(x, sigma, **inputs)
            finally:
                g.cleanup_models(self.network)
        self.last_passes = len(batches)
        out = g(batches)
        pred = out.pred if hasattr(out, "pred") else out[0]
        uncond = getattr(out, "pred_uncond", None)
        self.last_uncond = self._data(x, sigma, uncond) if isinstance(uncond, torch.Tensor) else None
        d = self._data(x, sigma, pred)
        return self._finish(d, x, sigma) if self._finish is not None else d

    def _data(self, x: torch.Tensor, sigma: torch.Tensor, native: torch.Tensor) -> torch.Tensor:
        """The model's prediction (D before its post-processing, or the velocity) from a native one."""
        return self._from_native(x, sigma, native) if self._from_native is not None else native
