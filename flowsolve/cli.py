"""Command line: `flowsolve sample | solvers`.

    flowsolve sample --model gmm2d --solver heun --nfe 32 --n 2000 --out samples.png
    flowsolve solvers
"""
from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

import torch

from . import solvers
from .sample import sample

BUILTIN_MODELS = {
    "gmm2d": "the exact paper mixture (App. D.1: 5 modes on a circle of radius 5, std 0.5) as an EDM field",
}


class UserError(Exception):
    """A mistake in the command line: printed as one line, exit code 2."""


def load_model(name: str):
    """A field from a built-in name (returns (field, reference data or None))."""
    from . import data, fields

    if name == "gmm2d":
        gmm = data.GaussianMixture.paper()
        return fields.EDM(gmm.denoiser), gmm
    raise UserError(f"--model: unknown model {name!r}; built-in models are: {', '.join(BUILTIN_MODELS)}")


def _parse_options(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--option: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def save_samples(x: torch.Tensor, out: Path, reference=None) -> None:
    """.npy / .pt: the raw tensor; .png: a scatter plot (2-D) or an image grid (images)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix == ".pt":
        torch.save(x.cpu(), out)
    elif suffix == ".npy":
        import numpy as np
        np.save(out, x.cpu().numpy())
    elif suffix == ".png":
        from .viz import save_png
        save_png(x, out, reference=reference)
    else:
        raise UserError(f"--out: expected a .png, .npy or .pt file, got {out.name!r}")


def cmd_sample(args) -> int:
    field, ref = load_model(args.model)
    options = _parse_options(args.option)
    if args.alpha is not None:
        options["alpha"] = args.alpha
    t0 = time.perf_counter()
    x, info = sample(field, solver=args.solver, nfe=args.nfe, n=args.n, seed=args.seed,
                     batch_size=args.batch_size, return_info=True, progress=not args.quiet, **options)
    save_samples(x, Path(args.out), reference=ref)
    print(f"wrote {args.out}: {tuple(x.shape)} samples, solver {info.solver}, {info.steps} steps, "
          f"nfe {info.nfe}, {time.perf_counter() - t0:.2f} s")
    return 0


def cmd_solvers(args) -> int:
    print(solvers.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowsolve", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="draw samples from a model with any solver")
    s.add_argument("--model", default="gmm2d", help=f"built-in model ({', '.join(BUILTIN_MODELS)})")
    s.add_argument("--solver", default="heun", help="a name from `flowsolve solvers`")
    s.add_argument("--nfe", type=int, default=None, help="field-evaluation budget per sample")
    s.add_argument("--n", type=int, default=1000, help="number of samples")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--alpha", type=float, default=None, help="Eq. 21 interpolation for the 'sde' solvers")
    s.add_argument("--option", action="append", help="extra solver option KEY=VALUE (repeatable)")
    s.add_argument("--out", required=True, help="output .png, .npy or .pt")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample)
    v = sub.add_parser("solvers", help="list the registered solvers")
    v.set_defaults(func=cmd_solvers)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"flowsolve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowsolve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
