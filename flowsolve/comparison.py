"""Which solver, how many NFE: every (solver, NFE budget, seed) cell sampled and measured
(the paper's Figure 7(b) as a command), written as CSV, Markdown and a log-log plot."""

from __future__ import annotations

import csv
import dataclasses
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch

from . import metrics as M
from .distributed import is_launched
from .sample import check_cond, cond_rows, initial_noise, resolve_grid, sample, sample_sharded
from ._checks import check_choice, check_int
from .errors import ArgumentError

__all__ = ["CompareTable", "compare", "METRICS"]

METRICS = ("energy", "rmse", "nll", "fd", "mmd", "sliced", "accuracy")
HIGHER_IS_BETTER = ("accuracy",)


@dataclasses.dataclass
class CompareTable:
    """One row per (solver, NFE budget, metric): measured NFE, metric mean and std over seeds, wall time."""

    metric: str
    model: str
    rows: list[dict]

    def metrics(self) -> list[str]:
        return list(dict.fromkeys(r["metric"] for r in self.rows))

    def to_csv(self, path: str | os.PathLike) -> None:
        cols = ["solver", "nfe_budget", "nfe_used", "metric", "value", "std", "seconds", "seeds"]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in self.rows:
                w.writerow({c: r[c] for c in cols})

    def to_markdown(self) -> str:
        better = ", ".join(f"{m}: {'higher' if m in HIGHER_IS_BETTER else 'lower'} is better" for m in self.metrics())
        lines = [
            f"{self.metric} on {self.model} (mean ± std over seeds; {better})",
            "",
            "| solver | NFE budget | NFE used | metric | value | std | seconds |",
            "|---|---:|---:|---|---:|---:|---:|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r['solver']} | {r['nfe_budget']} | {r['nfe_used']} | {r['metric']} | {r['value']:.4g} | "
                f"{r['std']:.2g} | {r['seconds']:.3f} |"
            )
        return "\n".join(lines) + "\n"

    def best(self, metric: str | None = None) -> dict:
        metric = metric or self.metrics()[0]
        rows = [r for r in self.rows if r["metric"] == metric]
        return (max if metric in HIGHER_IS_BETTER else min)(rows, key=lambda r: r["value"])

    def plot(self, path: str | os.PathLike) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        metrics = self.metrics()
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), dpi=90, squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            rows = [r for r in self.rows if r["metric"] == metric]
            positive = all(r["value"] > 0 for r in rows)
            for solver in dict.fromkeys(r["solver"] for r in rows):
                rs = [r for r in rows if r["solver"] == solver]
                ax.errorbar(
                    [r["nfe_used"] for r in rs],
                    [r["value"] for r in rs],
                    yerr=[r["std"] for r in rs],
                    marker="o",
                    ms=3,
                    capsize=2,
                    label=solver,
                )
            ax.set_xscale("log")
            ticks = sorted({r["nfe_used"] for r in rows})
            ax.set_xticks(ticks)
            ax.set_xticks([], minor=True)
            ax.set_xticklabels([str(t) for t in ticks])
            if metric not in HIGHER_IS_BETTER:
                ax.set_yscale("log" if positive else "symlog", **({} if positive else {"linthresh": 1e-3}))
            ax.set_xlabel("NFE (measured)")
            ax.set_ylabel(metric)
            ax.set_title(f"{metric} against NFE — {self.model}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files = {"csv": out / "compare.csv", "md": out / "compare.md", "png": out / "compare.png"}
        self.to_csv(files["csv"])
        files["md"].write_text(self.to_markdown())
        self.plot(files["png"])
        return files


def _scorer(metric: str, field, reference, n: int, features, cond: dict | None):
    """metric(x, x0) → float; x0 is the start (for rmse)."""
    if metric == "rmse":

        def rmse(x, x0):
            grid = torch.tensor([field.t_start, field.t_end], dtype=torch.float64)

            def reference(dtype: torch.dtype, tol: float) -> torch.Tensor:
                return sample(
                    field,
                    "torchdiffeq:dopri5",
                    grid=grid,
                    x_init=x0.to(dtype),
                    nfe=10**7,
                    rtol=tol,
                    atol=tol,
                    cond=cond,
                )

            try:  # float64 where the field computes in it (exact densities, closed forms)
                ref = reference(torch.float64, 1e-7)
            except RuntimeError as e:  # a float32 network: the reference in its own precision
                if "type" not in str(e) and "dtype" not in str(e):
                    raise
                ref = reference(torch.float32, 1e-5).double()
            return float((x.double() - ref).reshape(len(x), -1).square().sum(1).mean().sqrt())

        return rmse
    if metric == "nll":
        if reference is None or not hasattr(reference, "log_prob"):
            raise ArgumentError("metric: 'nll' needs an exact density (the gmm2d model)")
        return lambda x, x0: M.nll(x, reference)
    if metric in ("fd", "accuracy"):
        from .data import digits
        from .models import from_pretrained

        feats = from_pretrained(features) if isinstance(features, (str, os.PathLike)) else features
        if feats is None:
            raise ArgumentError(f"metric: {metric!r} needs a feature network (features=)")
        if metric == "fd":
            held = digits("test").x
            return lambda x, x0: M.frechet_distance(x, held, feats)
        labels = (cond or {}).get("class_labels")
        if labels is None:
            raise ArgumentError(
                "metric: 'accuracy' needs the labels the samples were drawn for (cond={'class_labels': y})"
            )

        def accuracy(x, x0):  # the share of samples the classifier puts in their own class
            with torch.no_grad():
                pred = feats(x.float().clamp(-1, 1)).argmax(1)
            return float((pred.cpu() == labels.reshape(-1).expand(len(x)).cpu()).float().mean())

        return accuracy
    if reference is None:
        raise ArgumentError(f"metric: {metric!r} needs reference samples (reference=)")
    ref = reference.sample(n, torch.Generator().manual_seed(10**6)) if hasattr(reference, "sample") else reference
    fn = {"energy": M.energy_distance, "mmd": M.mmd, "sliced": M.sliced_wasserstein}[metric]
    return lambda x, x0: fn(x.reshape(len(x), -1), ref.reshape(len(ref), -1).to(x.dtype))


def compare(
    field,
    solvers: Sequence[str | object],
    nfe: Sequence[int] = (4, 8, 16, 32, 64),
    metric: str | Sequence[str] = "energy",
    *,
    n: int = 2000,
    seeds: int = 3,
    reference=None,
    features=None,
    model_name: str = "model",
    progress: bool = False,
    cond: dict | None = None,
    label: str = "",
    grids: Sequence[str | None] = (None,),
    **options,
) -> CompareTable:
    """Sample every (solver, NFE budget) cell with `seeds` seeds and measure it with each metric.
    `reference`: exact samples or a sampler (energy, mmd, sliced) or the exact density (nll); rmse
    compares endpoints with a dopri5 solve at 1e-7 from the same start; fd uses `features` against the
    held-out digits; accuracy is the share of samples that `features` classifies as their label
    (`cond["class_labels"]`). Seed s draws the starting noise of `fs.sample(seed=s)`. `label` is
    appended to the solver names (e.g. "g=2"). `grids`: grid spacings to compare (None: each solver's
    default; a spacing of `grids.SPACINGS` ("karras", "loglinear", "polyexponential", "vp", "beta", "kl_optimal");
    "calibrated": the model folder's calibrated grid, cells without
    one are left out with a warning); a named grid is shown after the solver, e.g. "ipndm [calibrated]"."""
    from . import solvers as registry
    from .solvers.names import webui_grid

    metrics = [metric] if isinstance(metric, str) else list(metric)
    for m in metrics:
        check_choice("metric", m, METRICS)
    check_int("seeds", seeds, 1)
    # each solver resolved once (unknown names fail here, listing the valid ones): its entry as the
    # options configure it, for the grid's first time
    specs = [base.configured(opts) for base, opts in (registry.resolve(s, options, field) for s in solvers)]
    cond = check_cond(cond, n)
    scores = {m: _scorer(m, field, reference, n, features, cond) for m in metrics}
    shape = field.data_shape
    if shape is None:
        raise ArgumentError(f"field: {type(field).__name__} does not know its data shape; make it with shape=(...)")
    device = field.model_device()  # noise drawn on the CPU (the same on any device), moved to the network's
    rows = []
    for (solver, spec), grid in [(sv, g) for sv in zip(solvers, specs) for g in grids]:
        for budget in nfe:
            values: dict[str, list[float]] = {m: [] for m in metrics}
            secs: list[float] = []
            used = None
            for seed in range(seeds):
                try:
                    # sample i of seed s, drawn at the grid's first time exactly as sample(seed=s) draws it
                    start = float(resolve_grid(field, spec, budget, webui_grid(solver, grid))[0][0])
                    x0 = initial_noise(field, seed, 0, n, shape, t_start=start)
                    x_init = x0 if device is None else x0.to(device)
                    if is_launched():  # torchrun / accelerate launch: split the particles, gather
                        used = sample(
                            field,
                            solver,
                            nfe=budget,
                            x_init=x_init[:1],
                            seed=seed,
                            return_info=True,
                            cond=cond_rows(cond, 0, 1, n),
                            grid=grid,
                            **options,
                        )[1].nfe
                        t0 = time.perf_counter()
                        x = sample_sharded(
                            field, solver, budget, x_init=x_init, seed=seed, cond=cond, grid=grid, **options
                        )
                    else:
                        t0 = time.perf_counter()
                        x, info = sample(
                            field,
                            solver,
                            nfe=budget,
                            x_init=x_init,
                            seed=seed,
                            return_info=True,
                            cond=cond,
                            grid=grid,
                            **options,
                        )
                        used = info.nfe
                except ArgumentError as e:  # budget below the solver's minimum: skip the cell
                    if str(e).startswith("nfe"):
                        break
                    if grid == "calibrated" and str(e).startswith("grid: no calibrated grid"):
                        warnings.warn(f"compare: {e}; cell left out", stacklevel=2)
                        break
                    raise
                secs.append(time.perf_counter() - t0)
                for m in metrics:
                    values[m].append(scores[m](x.cpu(), x0))
            if not secs:
                continue
            shown = solver if isinstance(solver, str) else getattr(solver, "__name__", type(solver).__name__)
            name = f"{shown}{'' if grid is None else f' [{grid}]'} {label}".strip()
            for m in metrics:
                rows.append(
                    {
                        "solver": name,
                        "nfe_budget": budget,
                        "nfe_used": used,
                        "metric": m,
                        "value": statistics.fmean(values[m]),
                        "std": statistics.stdev(values[m]) if len(values[m]) > 1 else 0.0,
                        "seconds": statistics.fmean(secs),
                        "seeds": len(values[m]),
                    }
                )
                if progress:
                    r = rows[-1]
                    print(
                        f"{name:>26} nfe {budget:>4} ({used}) {m}: {r['value']:.4g} ± {r['std']:.2g}  "
                        f"{r['seconds']:.2f} s"
                    )
    if not rows:
        raise ArgumentError("nfe: no (solver, NFE) cell could run; budgets are below every solver's minimum")
    return CompareTable(",".join(metrics), model_name, rows)
