"""Sharded sampling on torch.distributed, as started by `accelerate launch` or `torchrun`
(both set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT): each process draws its own contiguous
range of sample indices, and per-sample seeds make the gathered result identical to one process."""
from __future__ import annotations

import os

import torch

__all__ = ["world", "is_launched", "sample_sharded", "shard_range"]


def is_launched() -> bool:
    """True when started by a distributed launcher with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> tuple[int, int]:
    """(rank, world size), initialising the default process group (gloo on CPU, nccl on GPU) from the
    launcher's environment when needed."""
    import torch.distributed as dist
    if not is_launched():
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shard_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """Contiguous [start, end) of the n samples for `rank` (sizes differ by at most one)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def sample_sharded(field, solver: str = "heun", nfe: int | None = None, *, n: int | None = None, seed: int,
                   x_init: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """`flowsolve.sample` split over the launched processes; every process returns all n samples
    (with `x_init`, each process integrates its rows of it)."""
    import torch.distributed as dist

    from .sample import sample

    if seed is None:
        raise ValueError("seed: sharded sampling needs an explicit seed shared by every process")
    if x_init is not None:
        n = len(x_init)
    rank, size = world()
    if size == 1:
        return sample(field, solver, nfe, n=None if x_init is not None else n, seed=seed, x_init=x_init, **kwargs)
    start, end = shard_range(n, rank, size)
    if end > start:
        if x_init is not None:
            part = sample(field, solver, nfe, x_init=x_init[start:end], seed=seed, index_offset=start, **kwargs)
        else:
            part = sample(field, solver, nfe, n=end - start, seed=seed, index_offset=start, **kwargs)
    else:
        part = None
    shape = (tuple(part.shape[1:]) if part is not None else
             tuple(x_init.shape[1:]) if x_init is not None else tuple(kwargs.get("shape") or field.data_shape))
    width = -(-n // size)
    buf = torch.zeros((width, *shape), dtype=part.dtype if part is not None else torch.float32)
    if part is not None:
        buf[: len(part)] = part.cpu()
    bufs = [torch.empty_like(buf) for _ in range(size)]
    dist.all_gather(bufs, buf)
    sizes = [end - start for start, end in (shard_range(n, r, size) for r in range(size))]
    return torch.cat([b[:k] for b, k in zip(bufs, sizes)])
