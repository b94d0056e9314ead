"""Students: generators that are their teacher's own denoiser network evaluated at a few fixed σ
(SiD, Zhou et al. 2024; DMD2, Yin et al. 2024), the Int-PM generator (Definition 2) that distils best.

A k-step student draws x = σ_1 z_1 and applies x_0 = G(x, σ_1), then for each further σ_j re-noises
x = x_0 + σ_j z_j and applies x_0 = G(x, σ_j) (DMD2's multi-step generator). One step is SiD's
G(σ_init z, σ_init). `G` starts as a copy of the teacher D(x, σ, **cond), so conditioning (class
labels, text embeddings) passes through unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .._checks import seeded_generator
from .shared_parts import trained_state
from ..errors import ArgumentError
from .protocol import GeneratorModel

__all__ = ["DenoiserGenerator", "STUDENT_FILE"]

STUDENT_FILE = "student.safetensors"


class DenoiserGenerator(GeneratorModel, nn.Module):
    """g_θ(z) = the chain of `sigmas` through the denoiser `net` (see the module docstring). Latents
    are (n, k, *data_shape): one Gaussian draw per step. `conditioning` is the teacher's (e.g.
    {"class_labels": {"classes": 10, ...}}); a conditional student samples class-balanced labels
    (i mod classes) when `sample` is given no `cond`."""

    def __init__(self, net: nn.Module, sigmas, data_shape, conditioning: dict | None = None) -> None:
        super().__init__()
        sig = [float(s) for s in (sigmas if isinstance(sigmas, (list, tuple)) else [sigmas])]
        if not sig or any(not s > 0 for s in sig) or any(a <= b for a, b in zip(sig, sig[1:])):
            raise ArgumentError(f"sigmas: expected positive, strictly decreasing noise levels, got {sig}")
        self.net, self.sigmas = net, tuple(sig)
        self.data_shape: tuple[int, ...] = tuple(data_shape)
        self.conditioning = dict(conditioning or getattr(net, "conditioning", {}) or {})
        self.metadata: dict = {}

    @property
    def steps(self) -> int:
        return len(self.sigmas)

    def latents(self, n: int, seed: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.steps, *self.data_shape, generator=generator or seeded_generator(seed))

    def chain(self, z: torch.Tensor, upto: int | None = None, **cond) -> torch.Tensor:
        """x_0 after steps 1..upto (default: all) of the chain; gradients flow only through the last."""
        k = self.steps if upto is None else upto
        x0: torch.Tensor | None = None
        for j in range(k):
            s = self.sigmas[j]
            x = s * z[:, j] if x0 is None else x0 + s * z[:, j]
            sig = torch.full((len(z),), s, dtype=z.dtype, device=z.device)
            if j < k - 1:
                with torch.no_grad():
                    x0 = self.net(x, sig, **cond)
            else:
                x0 = self.net(x, sig, **cond)
        assert x0 is not None
        return x0

    def forward(self, z: torch.Tensor, **cond) -> torch.Tensor:
        return self.chain(z, **cond)

    def decode(self, latents: torch.Tensor, **kw) -> torch.Tensor:
        """Images of a latent student's samples, through its teacher's VAE (`LatentDecoding.decode`)."""
        dec = getattr(self.net, "decode", None)
        if not callable(dec):
            raise ArgumentError("decode: this student's teacher has no VAE (it samples in data space)")
        return dec(latents, **kw)

    # -- folders -----------------------------------------------------------------------------
    def save(self, out: str | os.PathLike, teacher_source: str | None = None, **metadata) -> Path:
        """A student folder: self-contained for flowsolve denoisers (EDMPrecond); for other teachers
        (diffusers pipelines, flow models) the trained weights in student.safetensors plus the
        teacher's folder it loads its architecture from (`teacher_source`)."""
        from .io import save_pretrained, write_metadata
        from .precond import EDMPrecond

        info = {
            "student": {"sigmas": list(self.sigmas), "teacher": teacher_source},
            "data_shape": list(self.data_shape),
            "conditioning": self.conditioning,
            **metadata,
        }
        if isinstance(self.net, EDMPrecond):
            return save_pretrained(self.net, out, **{**info, "type": "student"})
        if teacher_source is None:
            raise ArgumentError(
                "out: this student's teacher is not a flowsolve denoiser folder, so its folder must "
                "name the teacher's folder it loads the architecture from; the teacher has no "
                "metadata['source'] (load it with fs.from_pretrained(path))"
            )
        from safetensors.torch import save_file

        p = Path(out)
        p.mkdir(parents=True, exist_ok=True)
        # the trained weights only: a latent teacher's VAE loads with the teacher's folder
        state = {k: v.detach().contiguous().cpu() for k, v in trained_state(self.net).items()}
        save_file(state, str(p / STUDENT_FILE))
        write_metadata(p, {"format": "flowsolve", "version": 1, "type": "student", "network": "teacher", **info})
        return p


def teacher_denoiser(teacher) -> nn.Module:
    """D(x, σ, **cond) of any model the library loads: a denoiser as itself, a flow model through
    `as_denoiser()` (the same PF-ODE, Eq. 8)."""
    to_den = getattr(teacher, "as_denoiser", None)
    return to_den() if callable(to_den) else teacher
