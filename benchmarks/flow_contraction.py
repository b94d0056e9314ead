"""How a sampler's flow treats a small perturbation of its starting noise: the median over samples
of (‖Δx_end‖ / ‖x_end‖) / (‖Δx_0‖ / ‖x_0‖), the relative change of the sample per relative change of
the noise. A flow that carries noise onto the data must contract the directions off the data (a
ratio well below 1): pixel noise that the flow keeps or amplifies stays in the samples.

Measured for Discriminator Flows (Alg. 3): a leaky-ReLU discriminator is piecewise linear, so the
velocity η∇f is piecewise constant in x and a perturbation is only moved, never shrunk, inside a
linear region (and torn apart across region boundaries); a smooth (SiLU) discriminator can contract.

    python benchmarks/flow_contraction.py [--model pretrained/digits-df --model pretrained/digits-edm ...]
"""

from __future__ import annotations

import argparse

import torch

import flowsolve as fs


def contraction(field, solver: str, nfe: int, x0: torch.Tensor, rel: float = 1e-3, seed: int = 1) -> float:
    """Median relative response of the flow's endpoint to a random perturbation of relative size `rel`."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(x0.shape, generator=g)
    norms = lambda t: t.flatten(1).norm(dim=1)  # noqa: E731
    d = d * (rel * norms(x0) / norms(d)).view(-1, *([1] * (x0.dim() - 1)))
    a = fs.sample(field, solver, nfe=nfe, x_init=x0)
    b = fs.sample(field, solver, nfe=nfe, x_init=x0 + d)
    return float(((norms(a - b) / norms(a)) / rel).median())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", default=None, help="model folders (repeatable)")
    ap.add_argument("--n", type=int, default=128)
    args = ap.parse_args()
    models = args.model or ["pretrained/digits-df", "pretrained/digits-edm", "pretrained/digits-flow"]
    print("| model | solver | NFE | relative response (median) |\n|---|---|---:|---:|")
    for path in models:
        m = fs.from_pretrained(path)
        field = m.field()
        is_df = isinstance(m, fs.models.DiscriminatorFlowModel)
        solver, nfe = ("euler", m.N) if is_df else ("heun", 31)
        z = torch.randn(args.n, *field.data_shape, generator=torch.Generator().manual_seed(0))
        x0 = field.from_normal(z, float(field.grid(nfe)[0]))  # the solver's starting particles
        name = f"{path} ({m.f.config.get('activation', 'leaky_relu')})" if is_df else path
        print(f"| {name} | {solver} | {nfe} | {contraction(field, solver, nfe, x0):.3f} |")


if __name__ == "__main__":
    main()
