"""The one training loop: Adam, learning-rate warm-up, EMA, atomic checkpoints, resume, progress.

Objectives give a loss from a torch.Generator (all randomness of a step flows through it, so a
seeded run is reproducible and a resumed run continues the same random stream).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from torch import nn
from ..models.shared_parts import frozen_copy, is_trained, load_trained_state, trained_state
from .._checks import atomic_save, check_choice, check_device, check_int, nearest, read_json, renamed
from ..errors import ArgumentError, CheckpointError, NonFiniteError

M = TypeVar("M", bound=nn.Module)

__all__ = [
    "LoopConfig",
    "EMA",
    "fit",
    "shard",
    "shard_all",
    "device",
    "resolve_device",
    "device_for",
    "is_main_process",
    "sync_gradients",
    "check_keys",
    "merge_config",
    "seeded",
    "training_record",
    "load_config_file",
    "save_checkpoint",
    "average_states",
    "load_checkpoint",
    "CheckpointError",
]


_WORLD: dict[str, Any] = {"rank": 0, "size": 1, "device": torch.device("cpu")}


def shard(t: torch.Tensor) -> torch.Tensor:
    """This process's slice of a global batch (data-parallel training under torchrun / accelerate
    launch): every process draws the same global batch from the shared seed and keeps its rows, so
    the averaged gradient equals the one-process gradient of the whole batch."""
    size = _WORLD["size"]
    if size > 1:
        if len(t) % size:
            raise ArgumentError(f"batch_size: {len(t)} does not split over {size} processes; use a multiple of {size}")
        k = len(t) // size
        t = t[_WORLD["rank"] * k : (_WORLD["rank"] + 1) * k]
    return t.to(_WORLD["device"])


LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The learning-rate multiplier at `step` of `steps`: 1, ½(1 + cos πu) or 1 − u with u = step/steps."""
    u = min(1.0, step / max(1, steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * u))
    if schedule == "linear":
        return 1.0 - u
    return 1.0


def resolve_device(cfg) -> torch.device:
    """The training device: cfg.device (`device_for`)."""
    return device_for(getattr(cfg, "device", "auto") or "auto")


def device_for(want: str | torch.device, name: str = "device") -> torch.device:
    """`want` as a device: for "auto" Accelerate's device under `accelerate launch`, else
    cuda:LOCAL_RANK (cuda when alone) when CUDA is available, else the CPU; any other value must
    name a device this machine has (an error naming `name` otherwise)."""
    if want == "auto":
        from ..distributed import accelerator, engine, is_launched

        if is_launched() and engine() == "accelerate":
            return torch.device(accelerator().device)
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if is_launched() else 0)
        return torch.device("cpu")
    return check_device(name, want)


def device() -> torch.device:
    """The device of the running training loop (where `shard` puts the batch)."""
    return _WORLD["device"]


def shard_all(t: torch.Tensor) -> torch.Tensor:
    """The whole global batch on this process's device (for terms every process needs in full)."""
    return t.to(_WORLD["device"])


def is_main_process() -> bool:
    return _WORLD["rank"] == 0


def sync_gradients(params) -> None:
    """Average gradients over the processes (no-op in one process); call between backward and step."""
    if _WORLD["size"] == 1:
        return
    from ..distributed import reduce_mean

    reduce_mean([p.grad for p in params if p.grad is not None])


@dataclasses.dataclass
class LoopConfig:
    steps: int = 10_000
    batch_size: int = 128
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 100  # linear learning-rate warm-up steps
    lr_schedule: str = "constant"  # after warm-up: "constant", "cosine" or "linear" decay to 0 at `steps`
    ema_decay: float = 0.999  # EMA of the weights, with the usual (1 + k)/(10 + k) ramp
    grad_clip: float | None = 1.0
    checkpoint_every: int = 1000
    log_every: int = 100
    seed: int = 0
    minutes: float | None = None  # a wall-clock budget: stop (checkpoint, select) once training has taken this long
    log_with: str | None = None  # also log to an Accelerate tracker: "tensorboard", "wandb", ... (needs out)
    sample_every: int | None = None  # write out/samples/step_NNNNNN.png (image grid or 2-D scatter) every N steps
    device: str = "auto"  # "auto" (Accelerate's / cuda:LOCAL_RANK / cpu), "cpu", "cuda", "cuda:N"
    tail_average: int = 0  # k > 1: the returned model is the mean of the EMA weights at the last k checkpoints


def check_keys(given: dict, cls, what: str = "config") -> None:
    """Reject unknown keys, naming the nearest valid one."""
    valid = [f.name for f in dataclasses.fields(cls)]
    for k in given:
        if k not in valid:
            hint = nearest(k, valid).replace(" (did you mean", "; did you mean").rstrip(")")
            raise ArgumentError(f"{what}: unknown key {k!r}{hint} (valid keys: {', '.join(valid)})")


def _fits(value, annotation: str) -> bool:
    """Whether a config value matches its dataclass annotation ('int', 'float | None', 'tuple[float, float]', ...)."""
    for part in (a.strip() for a in annotation.split("|")):
        if part == "None" and value is None:
            return True
        if part == "bool" and isinstance(value, bool):
            return True
        if part == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if part == "float" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return True
        if part == "str" and isinstance(value, str):
            return True
        if part.startswith("tuple[") and isinstance(value, (list, tuple)):
            inner = [a.strip() for a in part[6:-1].split(",")]
            if inner[-1] == "...":
                return all(_fits(v, inner[0]) for v in value)
            return len(value) == len(inner) and all(_fits(v, a) for v, a in zip(value, inner))
    return False


def check_types(values: dict, cls, what: str = "config") -> None:
    """Reject values of the wrong type, naming the key and the expected type."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for k, v in values.items():
        if k in types and not _fits(v, types[k]):
            raise ArgumentError(f"{what}: key {k!r} expects {types[k]}, got {type(v).__name__} {v!r}")


def merge_config(cls, defaults: dict, config: dict | None, overrides: dict):
    """cls(**defaults ← config file ← non-None overrides), rejecting unknown keys at each layer;
    old key names in `cls.RENAMED` are accepted for one release with a DeprecationWarning."""
    merged = dict(defaults)
    for src in (config or {}, {k: v for k, v in overrides.items() if v is not None}):
        src = dict(src)
        for old, new in getattr(cls, "RENAMED", {}).items():
            renamed(src, old, new, f"{cls.__name__}")
        check_keys(src, cls)
        check_types(src, cls)
        merged.update(src)
    if "betas" in merged:
        merged["betas"] = tuple(merged["betas"])
    return cls(**merged)


def seeded(seed: int, build: Callable[[], M]) -> M:
    """build() with the global RNG seeded (network initialisation), leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def training_record(cfg, data: str, objective: str, history: dict, command: str | None, **extra) -> dict:
    """The `training` block saved in flowsolve.json: settings, wall time, speed, final loss, command."""
    seconds = history["seconds"]
    done = history["stopped"]["step"] if "stopped" in history else cfg.steps
    return {
        "training": {
            "objective": objective,
            "data": data,
            "config": dataclasses.asdict(cfg),
            "seconds": round(seconds, 1),
            "steps_done": done,
            "iterations_per_second": round(done / max(seconds, 1e-9), 2),
            "final_loss": history["loss"][-1] if history["loss"] else None,
            "command": command,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            **({"selected": history["selected"]} if "selected" in history else {}),
            **({"tail_average": history["tail_average"]} if "tail_average" in history else {}),
            **({"stopped": history["stopped"]} if "stopped" in history else {}),
            **({"changes": history["changes"]} if history.get("changes") else {}),
            **extra,
        }
    }


def load_config_file(path: str | os.PathLike) -> dict:
    return read_json(path, "config")


class EMA:
    """Exponential moving average of a module's parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ArgumentError(f"ema_decay: expected a value in [0, 1), got {decay}")
        self.decay = decay
        self.model = frozen_copy(model)  # a latent model's VAE is shared, not copied nor averaged
        self._trained = is_trained(model)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for (name, e), p in zip(self.model.named_parameters(), model.parameters()):
            if self._trained(name):
                e.lerp_(p.detach(), 1 - d)
        for (name, eb), b in zip(self.model.named_buffers(), model.buffers()):
            if self._trained(name):
                eb.copy_(b)


def save_checkpoint(
    path: Path,
    step: int,
    model: nn.Module,
    ema: EMA,
    opts: dict[str, torch.optim.Optimizer],
    gen: torch.Generator,
    extra: dict,
    best: dict | None = None,
    tail: list | None = None,
    best_scheduled: dict | None = None,
) -> None:
    """Write `path` atomically (temp file, fsync, rename); the checkpoint it replaces becomes previous.pt.
    `best` (model selection) holds the selected weights with their step and score."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ck = {
        "step": step,
        "model": trained_state(model),
        "ema": trained_state(ema.model),
        "optimizer": {k: o.state_dict() for k, o in opts.items()},
        "generator": gen.get_state(),
        "extra": json.dumps(extra),
    }
    if best is not None:
        ck["best"] = best
    if best_scheduled is not None:
        ck["best_scheduled"] = best_scheduled
    if tail:
        ck["tail"] = tail
    atomic_save(ck, path, keep_previous="previous.pt")


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint with torch.load(weights_only=True): tensors and plain containers only."""
    if not path.is_file():
        raise CheckpointError(f"resume: checkpoint {str(path)!r} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the file
        prev = path.with_name("previous.pt")
        hint = (
            f"; the checkpoint before it is kept at {str(prev)!r}: move it to {path.name!r} to resume from it"
            if prev.is_file()
            else ""
        )
        raise CheckpointError(
            f"resume: checkpoint {str(path)!r} is corrupt or truncated "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}){hint}"
        ) from None
    for key in ("step", "model", "ema", "optimizer", "generator"):
        if key not in ck:
            raise CheckpointError(f"resume: checkpoint {str(path)!r} lacks {key!r}")
    return ck


def _check_loop_config(cfg: LoopConfig) -> str:
    """Validate the settings every loop uses before any work starts; returns the lr schedule."""
    for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
        check_int(name, getattr(cfg, name), 1)
    if not cfg.lr > 0:
        raise ArgumentError(f"lr: expected a positive learning rate, got {cfg.lr!r}")
    if getattr(cfg, "sample_every", None) is not None:
        check_int("sample_every", cfg.sample_every, 1)
    check_int("tail_average", getattr(cfg, "tail_average", 0) or 0, 0)
    minutes = getattr(cfg, "minutes", None)
    if minutes is not None and not (isinstance(minutes, (int, float)) and minutes > 0):
        raise ArgumentError(f"minutes: expected a positive wall-clock budget in minutes, got {minutes!r}")
    return check_choice("lr_schedule", getattr(cfg, "lr_schedule", "constant"), LR_SCHEDULES)


@dataclasses.dataclass
class _State:
    """What a checkpoint holds besides the weights: the step, the logged history, the selected best."""

    step: int = 0
    history: dict = dataclasses.field(default_factory=lambda: {"loss": [], "step": [], "seconds": 0.0})
    best: dict | None = None
    tail: list = dataclasses.field(default_factory=list)  # [{"step", "state"}]: EMA weights for tail_average
    best_scheduled: dict | None = None  # the best among the select_every steps (not a shorter run's end)


# settings that do not change the weights a run produces (steps and the time budget may grow: an
# extended run is the same run)
_NEUTRAL_KEYS = ("steps", "minutes", "checkpoint_every", "log_every", "log_with", "sample_every")


def _differences(stored: dict, current: dict) -> dict:
    """{key: [checkpoint's value, this run's value]} for the settings that change the result."""
    out = {}
    for k in sorted(set(stored) | set(current)):
        if k in _NEUTRAL_KEYS:
            continue
        a, b = stored.get(k, "<absent>"), current.get(k, "<absent>")
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out[k] = [a, b]
    return out


def _check_same_run(ck_path: Path, stored: dict, meta: dict, cfg: LoopConfig, step: int, allow_changes: bool) -> dict:
    """A resumed run is the same run or an error (issue 17): the checkpoint's objective, data and
    resolved settings must equal this run's, unless `allow_changes`; `steps` may only grow.
    Returns the differences accepted."""
    if cfg.steps < step:
        raise CheckpointError(
            f"steps: the checkpoint {str(ck_path)!r} has already done {step} steps; ask for "
            f"steps >= {step} to continue it (got {cfg.steps})"
        )
    if "config" not in stored:  # checkpoints written before 0.2 recorded no settings
        return {}

    def settings(record: dict) -> dict:  # the checkpoint's record and this run's have one form
        return {**{k: record[k] for k in ("objective", "data") if k in record}, **record["config"]}

    diff = _differences(settings(stored), settings(meta))
    if diff and not allow_changes:
        listed = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"resume: this run differs from the checkpoint {str(ck_path)!r} in {listed}. Resume "
            f"with the same settings, or pass allow_changes=True (CLI: --allow-changes) to change "
            f"them on purpose (recorded in the training history)"
        )
    return diff


def _restore(
    ck_path: Path | None,
    model: nn.Module,
    ema: EMA,
    opts: dict,
    gen: torch.Generator,
    keep_best: bool,
    meta: dict,
    cfg: LoopConfig,
    allow_changes: bool,
    select_every: int = 1,
) -> _State:
    """Load model, EMA, optimizers, RNG, step, history (and the selection) from the last checkpoint,
    after checking that this run is the checkpoint's run. A shorter run's off-schedule last step
    leaves the selection: a resumed run chooses among the steps a straight run scores."""
    if ck_path is None:
        raise ArgumentError("resume: needs an output folder (out=) that holds checkpoints/last.pt")
    for stale in ck_path.parent.glob("*.tmp"):  # a write cut short by a kill: never read, removed
        stale.unlink()
    ck = load_checkpoint(ck_path)
    stored = json.loads(ck["extra"])
    diff = _check_same_run(ck_path, stored, meta, cfg, int(ck["step"]), allow_changes)
    try:
        load_trained_state(model, ck["model"])
        load_trained_state(ema.model, ck["ema"])
        for k, o in opts.items():
            o.load_state_dict(ck["optimizer"][k])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"resume: checkpoint {str(ck_path)!r} does not fit this model ({str(e).splitlines()[0][:200]})"
        ) from None
    gen.set_state(ck["generator"])
    history = stored.get("history") or _State().history
    if diff:
        history.setdefault("changes", []).append({"step": int(ck["step"]), "changed": diff})
    state = _State(int(ck["step"]), history, ck.get("best") if keep_best else None, list(ck.get("tail", [])))
    if keep_best:
        state.best_scheduled = ck.get("best_scheduled")
        past_end = cfg.steps > state.step and state.step % select_every  # this run goes past a shorter run's end
        if past_end and "best_scheduled" in ck:  # that end is not a candidate of this run
            state.best = state.best_scheduled
            history["selection"] = [e for e in history.get("selection", []) if e[0] % select_every == 0]
    return state


def _set_lr(opts: dict, base_lr: dict, cfg: LoopConfig, schedule: str, step: int) -> None:
    """Linear warm-up, then the schedule's factor, applied to every optimizer's base rates."""
    ramp = min(1.0, (step + 1) / max(1, cfg.warmup)) * lr_factor(schedule, step, cfg.steps)
    for k, o in opts.items():
        for g, lr in zip(o.param_groups, base_lr[k]):
            g["lr"] = lr * ramp


def _loss_step(model: nn.Module, loss_fn, opt: torch.optim.Optimizer, gen: torch.Generator, cfg: LoopConfig) -> float:
    """One step of a plain objective: backward, gradients averaged over the processes, clip, update."""
    loss = loss_fn(model, gen)
    value = loss.item()
    if not math.isfinite(value):
        return value
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if _WORLD["size"] > 1:  # data parallel: average the gradients and the logged loss
        from ..distributed import reduce_mean

        sync_gradients(model.parameters())
        t_loss = torch.tensor([value])
        reduce_mean([t_loss])
        value = float(t_loss)
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return value


class _Signals:
    """SIGINT / SIGTERM set a flag (the loop checkpoints and stops); the old handlers come back on exit."""

    def __enter__(self) -> "_Signals":
        self.received, self._old = None, {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._on)
            except ValueError:  # not the main thread
                pass
        return self

    def _on(self, signum, _frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def average_states(states: list[dict]) -> dict:
    """The mean of several state dicts of one network (tail / checkpoint averaging, Izmailov et al.
    2018): floating tensors averaged in float64, others (counters) taken from the last."""
    out = {}
    for k, v in states[-1].items():
        if v.is_floating_point():
            out[k] = (sum(s[k].double() for s in states) / len(states)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def _keep_tail(tail: list, step: int, ema: EMA, k: int, every: int) -> list:
    """The last k checkpoints' EMA weights with this step's added. The last step of a shorter run
    that this one extends is off the checkpoint schedule and leaves: a resumed run is the same run."""
    kept = [t for t in tail if t["step"] % every == 0 and t["step"] != step]
    kept.append({"step": step, "state": {n: v.detach().clone() for n, v in trained_state(ema.model).items()}})
    return kept[-k:]


def _select(state: _State, select, ema: EMA, tail: list | None, scheduled: bool) -> None:
    """Score the EMA model (lower is better) and keep its weights when it is the best so far; with a
    `tail` (tail_average), score and keep the mean of the tail's weights instead (a scratch copy).
    `scheduled`: a select_every step, a candidate of any longer run too (not a shorter run's end)."""
    model, weights = ema.model, None
    if tail:
        weights = average_states([t["state"] for t in tail])
        model = frozen_copy(ema.model)
        load_trained_state(model, weights)
    with torch.no_grad():
        value = float(select(model))
    state.history.setdefault("selection", []).append([state.step, value])
    best = state.best is None or value < state.best["value"]
    best_scheduled = scheduled and (state.best_scheduled is None or value < state.best_scheduled["value"])
    if not (best or best_scheduled):
        return
    entry: dict[str, Any] = {"step": state.step, "value": value}
    if tail:  # the averaged weights are already a fresh copy
        entry.update(state=weights, tail=[t["step"] for t in tail])
    else:
        entry["state"] = {k: v.detach().clone() for k, v in trained_state(model).items()}
    if best:
        state.best = entry
    if best_scheduled:
        state.best_scheduled = entry


LOG_FILE = "log.jsonl"


class TrainingLog:
    """One JSON line per logged step in the run folder (`log.jsonl`: step, smoothed and last loss,
    seconds, learning rate; `select` for model-selection scores), for `flowsolve plot RUN`. A resumed
    run first drops the lines past its checkpoint's step, so the log is the one run's."""

    def __init__(self, path: Path | None, resumed_step: int, trackers: "Trackers | None" = None) -> None:
        self.path, self.trackers = path, trackers
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            keep = (
                [
                    ln
                    for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resumed_step
                ]
                if resumed_step
                else []
            )
            path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, **record) -> None:
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(record)


class Trackers:
    """Accelerate's experiment trackers (`log_with="tensorboard"`, "wandb", ...): every TrainingLog
    record goes to them too, under its step; the run's settings are the tracker's hyperparameters.
    TensorBoard writes its event files to out/tensorboard/."""

    def __init__(self, log_with: str, out: Path, config: dict) -> None:
        import importlib.util

        from accelerate import Accelerator

        if log_with == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ArgumentError(
                "log_with: 'tensorboard' needs the tensorboard package (pip install tensorboard, or "
                "flowsolve's [dev] extra)"
            )
        self.accelerator = Accelerator(log_with=log_with, project_dir=str(out))
        if not self.accelerator.trackers and not self.accelerator.log_with:
            raise ArgumentError(f"log_with: Accelerate found no tracker {log_with!r} (is its package installed?)")
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}
        self.accelerator.init_trackers("tensorboard" if log_with == "tensorboard" else "flowsolve", config=flat)

    def log(self, record: dict) -> None:
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if values and "step" in record:
            self.accelerator.log(values, step=int(record["step"]))

    def close(self) -> None:
        self.accelerator.end_training()


def preview(model: nn.Module, n: int = 64, seed: int = 0) -> torch.Tensor | None:
    """Samples of a model under training for a progress picture: a generator's (its `g` for a
    generator and auxiliary pair) or a particle model's field (Euler for Discriminator Flows, Heun
    otherwise, at the field's default NFE); None for a model that draws none (a feature network)."""
    from ..models import GeneratorModel, ParticleModel
    from ..sample import sample

    m = getattr(model, "g", model)
    with torch.no_grad():
        if isinstance(m, GeneratorModel):
            return m.sample(n, seed=seed)
        if isinstance(m, ParticleModel):
            field = m.field()
            solver = "euler" if type(field).__name__ == "DiscriminatorFlow" else "heun"
            cond = {}
            classes = (getattr(m, "conditioning", None) or {}).get("class_labels", {}).get("classes")
            if classes:
                cond = {"class_labels": torch.arange(n) % int(classes)}
            return sample(field, solver, n=n, seed=seed, cond=cond or None)
    return None


def read_log(run: str | os.PathLike) -> list[dict]:
    """The records of a run folder's log.jsonl."""
    p = Path(run) / LOG_FILE
    if not p.is_file():
        raise ArgumentError(f"run: {str(p)!r} not found; training runs with an output folder write it")
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


def fit(
    model: M,
    loss_fn: Callable[[M, torch.Generator], torch.Tensor] | None,
    cfg: LoopConfig,
    *,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    extra: dict | None = None,
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    step_fn: Callable[[M, torch.Generator, int], float] | None = None,
    select: Callable[[M], float] | None = None,
    select_every: int | None = None,
    allow_changes: bool = False,
) -> tuple[M, dict]:
    """Minimise loss_fn(model, generator) with Adam for cfg.steps steps; returns (EMA model, history).

    Adversarial objectives pass their own `optimizers` (a dict) and a `step_fn(model, generator, step)`
    that updates them and returns the loss to log. With `out`, checkpoints go to
    out/checkpoints/last.pt every cfg.checkpoint_every steps and on SIGINT/SIGTERM, and
    `resume=True` continues from the last one (model, EMA, optimizers, step, RNG), and only if this
    run's objective, data and resolved settings equal the checkpoint's (`steps` may grow); with
    `allow_changes=True` the differences are accepted and recorded in history["changes"].

    With `cfg.minutes`, training also stops once it has taken that many minutes in all (resumed
    runs count the time before the checkpoint): the last step is checkpointed and scored like the
    last of `steps`, and history["stopped"] records the step and the reason.

    Model selection (Table 7: "best validation FID"): with `select`, the EMA model is scored every
    `select_every` steps (default: cfg.checkpoint_every) and at the end, lower is better; the best
    weights are returned (and kept in the checkpoints, so a resumed run selects the same way).
    `select` must not touch the training RNG (use its own seeds). With `cfg.tail_average` k as well,
    each score is of the mean of the last k checkpoints' EMA weights, and the best such mean is returned.
    """
    from tqdm.auto import tqdm

    from ..distributed import is_launched, reduce_mean, world

    schedule = _check_loop_config(cfg)
    tail_k = int(getattr(cfg, "tail_average", 0) or 0)
    every = check_int("select_every", select_every or cfg.checkpoint_every, 1)
    if tail_k > 1 and select is not None and every % cfg.checkpoint_every:
        raise ArgumentError(
            f"select_every: with tail_average each score is of a checkpoint average, so it must be a multiple of "
            f"checkpoint_every={cfg.checkpoint_every}; got {every}"
        )
    rank, size = world() if is_launched() else (0, 1)
    _WORLD.update(rank=rank, size=size, device=resolve_device(cfg))
    model.to(_WORLD["device"]).train()
    opts = optimizers or {"model": torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]))}
    base_lr = {k: [g["lr"] for g in o.param_groups] for k, o in opts.items()}
    ema = EMA(model, cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    ck_path = Path(out) / "checkpoints" / "last.pt" if out is not None else None
    meta = {**(extra or {}), "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str))}
    state = (
        _restore(ck_path, model, ema, opts, gen, select is not None, meta, cfg, allow_changes, every)
        if resume
        else _State()
    )
    log_with = getattr(cfg, "log_with", None)
    if log_with is not None and out is None:
        raise ArgumentError(f"log_with: {log_with!r} needs an output folder (out=) for its files")
    folder = Path(out) if out is not None else None
    trackers = None
    if folder is not None and log_with is not None and rank == 0:
        trackers = Trackers(log_with, folder, meta["config"])
    log = TrainingLog(folder / LOG_FILE if folder is not None and rank == 0 else None, state.step, trackers)
    sample_every = getattr(cfg, "sample_every", None)
    if sample_every is not None and out is None:
        raise ArgumentError("sample_every: sample pictures need an output folder (out=)")

    def write_preview() -> None:
        """An image grid or a 2-D scatter of the EMA model's samples (other shapes draw nothing)."""
        from ..viz import save_png

        x = preview(ema.model)
        if folder is not None and x is not None and (x.dim() == 4 or (x.dim() == 2 and x.shape[1] == 2)):
            path = folder / "samples" / f"step_{state.step:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_png(x, path, title=f"step {state.step}")

    t0, running = time.perf_counter(), state.history.get("running")  # the smoothed loss, kept across resume

    def checkpoint() -> None:
        nonlocal t0
        state.history["seconds"] += time.perf_counter() - t0
        state.history["running"] = running
        t0 = time.perf_counter()
        if ck_path is not None and rank == 0:
            save_checkpoint(
                ck_path,
                state.step,
                model,
                ema,
                opts,
                gen,
                {**meta, "history": state.history},
                state.best,
                state.tail,
                state.best_scheduled,
            )

    bar = tqdm(total=cfg.steps, initial=state.step, disable=not progress or rank != 0, desc="train", dynamic_ncols=True)
    minutes = getattr(cfg, "minutes", None)
    budget = None if minutes is None else 60.0 * minutes

    def out_of_time() -> bool:
        """Whether the budget is spent; every process decides alike (any one's clock stops all)."""
        if budget is None:
            return False
        over = torch.tensor([float(state.history["seconds"] + time.perf_counter() - t0 >= budget)])
        reduce_mean([over])
        return bool(over.item() > 0)

    with _Signals() as signals:
        try:
            done = state.step >= cfg.steps or out_of_time()  # a resumed run whose budget is spent
            if state.step >= cfg.steps or not done:  # resumed to completion: an earlier budget stop is stale
                state.history.pop("stopped", None)
            while not done:
                _set_lr(opts, base_lr, cfg, schedule, state.step)
                value = (
                    float(step_fn(model, gen, state.step))
                    if step_fn is not None
                    else _loss_step(model, loss_fn, opts["model"], gen, cfg)
                )
                if not math.isfinite(value):
                    raise NonFiniteError(
                        f"training: the loss became {value} at step {state.step}; the last good "
                        f"checkpoint is kept" + (f" at {str(ck_path)!r}" if ck_path else "")
                    )
                ema.update(model, state.step)
                state.step += 1
                running = value if running is None else 0.98 * running + 0.02 * value
                bar.update(1)
                timed_out = state.step < cfg.steps and out_of_time()
                done = state.step == cfg.steps or timed_out
                if timed_out:
                    state.history["stopped"] = {"step": state.step, "reason": f"minutes={cfg.minutes} spent"}
                if state.step % cfg.log_every == 0 or done:
                    state.history["loss"].append(running)
                    state.history["step"].append(state.step)
                    bar.set_postfix(loss=f"{running:.4f}")
                    log.write(
                        step=state.step,
                        loss=running,
                        last_loss=value,
                        seconds=state.history["seconds"] + time.perf_counter() - t0,
                        lr=next(iter(opts.values())).param_groups[0]["lr"],
                    )
                if tail_k > 1 and (state.step % cfg.checkpoint_every == 0 or done):
                    state.tail = _keep_tail(state.tail, state.step, ema, tail_k, cfg.checkpoint_every)
                if select is not None and (state.step % every == 0 or done):
                    _select(state, select, ema, state.tail if tail_k > 1 else None, state.step % every == 0)
                    log.write(step=state.step, select=state.history["selection"][-1][1])
                if sample_every is not None and rank == 0 and (state.step % sample_every == 0 or done):
                    was_training = ema.model.training
                    ema.model.eval()
                    write_preview()
                    ema.model.train(was_training)
                if state.step % cfg.checkpoint_every == 0 or done or signals.received:
                    checkpoint()
                if signals.received is not None:
                    raise KeyboardInterrupt(
                        f"stopped by signal {signals.received} at step {state.step}; checkpoint "
                        f"written" + (f" to {str(ck_path)!r}; continue with resume" if ck_path else "")
                    )
        finally:
            bar.close()
            if trackers is not None:
                trackers.close()
    state.history["seconds"] += time.perf_counter() - t0
    model.eval()
    if state.best is not None:  # the selected weights (with tail_average: the selected checkpoint average)
        load_trained_state(ema.model, state.best["state"])
        state.history["selected"] = {"step": state.best["step"], "value": state.best["value"]}
        if "tail" in state.best:
            state.history["tail_average"] = state.best["tail"]
    elif tail_k > 1 and state.tail:
        load_trained_state(ema.model, average_states([t["state"] for t in state.tail]))
        state.history["tail_average"] = [t["step"] for t in state.tail]
    return ema.model, state.history  # type: ignore[return-value]  # a deep copy of `model`: an M
