"""Per-sample reproducible Gaussian noise.

Sample i's k-th draw depends only on (seed, i, k, stream), never on n, on the chunk
it falls in, on the dtype or on the global RNG (EDM's per-sample generators). To keep the cost
of a draw low, samples are grouped in fixed blocks of BLOCK rows, each block with
its own generator; a chunk that cuts a block draws the whole block and keeps its rows.
"""

from __future__ import annotations

import secrets

import torch

BLOCK = 32
_MASK = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed mixed from `seed` and integer keys (block index, stream...)."""
    z = _splitmix64(seed & _MASK)
    for k in keys:
        z = _splitmix64(z ^ (k & _MASK))
    return z >> 1


def fresh_seed() -> int:
    """Entropy from the OS, for seed=None (the global torch RNG is never touched)."""
    return secrets.randbits(63)


class SampleNoise:
    """Standard normal draws of shape (count, *shape) for samples start .. start+count-1.

    Every call returns the next draw of each sample's stream.
    """

    def __init__(
        self,
        seed: int,
        start: int,
        count: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str,
        stream: int = 0,
    ) -> None:
        self.shape = tuple(shape)
        self.dtype, self.device = dtype, torch.device(device)
        # drawn in float32 whatever the dtype (as EDM does), so seed=s in float64 is the float32 run
        # more precisely, not another run, and bf16 / fp16 are rounded float32 draws
        self._draw_dtype = torch.float32
        first, last = start // BLOCK, (start + count - 1) // BLOCK
        self._gens = [
            torch.Generator(device=self.device).manual_seed(derive_seed(seed, b, stream))
            for b in range(first, last + 1)
        ]
        self._lo = start - first * BLOCK
        self._hi = self._lo + count

    def __call__(self) -> torch.Tensor:
        blocks = [
            torch.randn((BLOCK, *self.shape), generator=g, dtype=self._draw_dtype, device=self.device)
            for g in self._gens
        ]
        z = (blocks[0] if len(blocks) == 1 else torch.cat(blocks))[self._lo : self._hi]
        return z if z.dtype == self.dtype else z.to(self.dtype)
