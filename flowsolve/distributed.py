"""Multi-process runs on an existing engine: Hugging Face Accelerate when the process was started
by `accelerate launch` (or FLOWSOLVE_ENGINE=accelerate), torch.distributed otherwise (`torchrun`).
Both launchers set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT.

The rest of flowsolve uses only the collectives below (`world`, `reduce_mean`, `gather_rows`,
`gather_ranges`, `barrier`, `finish`), so training (gradient averaging over the global batch),
sharded sampling (`fs.sample_sharded`: per-sample seeds make the gathered result identical to one
process) and `compare` run unchanged on either engine. This module knows nothing of sampling."""

from __future__ import annotations

import os

import torch
from .errors import ArgumentError, MissingDependency

__all__ = [
    "world",
    "is_launched",
    "engine",
    "accelerator",
    "reduce_mean",
    "gather_rows",
    "barrier",
    "finish",
    "shard_range",
    "gather_ranges",
]

_STATE: dict = {"accelerator": None}
ENGINES = ("torch", "accelerate")


def is_launched() -> bool:
    """True when started by a distributed launcher with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def engine() -> str:
    """'accelerate' under `accelerate launch` (it sets ACCELERATE_* variables) or with
    FLOWSOLVE_ENGINE=accelerate; 'torch' otherwise (or with FLOWSOLVE_ENGINE=torch)."""
    chosen = os.environ.get("FLOWSOLVE_ENGINE", "").strip().lower()
    if chosen and chosen not in ENGINES:
        raise ArgumentError(f"FLOWSOLVE_ENGINE: expected one of {ENGINES}, got {chosen!r}")
    if not chosen:
        chosen = "accelerate" if any(k.startswith("ACCELERATE_") for k in os.environ) else "torch"
    return chosen


def accelerator():
    """The process's `accelerate.Accelerator` (created once; it initialises the process group)."""
    if _STATE["accelerator"] is None:
        try:
            from accelerate import Accelerator
        except ImportError:
            raise MissingDependency(
                "engine: 'accelerate' needs Hugging Face Accelerate; pip install 'flowsolve[distributed]' "
                "or launch with torchrun"
            ) from None
        _STATE["accelerator"] = Accelerator(cpu=not torch.cuda.is_available())
    return _STATE["accelerator"]


def world() -> tuple[int, int]:
    """(rank, world size), initialising the engine from the launcher's environment when needed
    (Accelerate's state, or a torch.distributed group: gloo on CPU, nccl on GPU)."""
    import torch.distributed as dist

    if not is_launched():
        return 0, 1
    if engine() == "accelerate":
        acc = accelerator()
        return acc.process_index, acc.num_processes
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average `tensors` in place over the processes, as one flattened message (gradients)."""
    if not tensors or not is_launched():
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if engine() == "accelerate":
        flat = accelerator().reduce(flat, reduction="mean")
    else:
        import torch.distributed as dist

        dist.all_reduce(flat)
        flat /= world()[1]
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def gather_rows(part: torch.Tensor) -> list[torch.Tensor]:
    """Every process's equally shaped `part`, in rank order ([part] in one process)."""
    if not is_launched():
        return [part]
    if engine() == "accelerate":
        size = world()[1]
        return list(accelerator().gather(part.contiguous()).chunk(size))
    import torch.distributed as dist

    bufs = [torch.empty_like(part) for _ in range(world()[1])]
    dist.all_gather(bufs, part.contiguous())
    return bufs


def barrier() -> None:
    if not is_launched():
        return
    if engine() == "accelerate":
        accelerator().wait_for_everyone()
    else:
        import torch.distributed as dist

        dist.barrier()


def finish() -> bool:
    """Wait for every process and close the engine; True on the main process (always in one)."""
    if not is_launched():
        return True
    rank = world()[0]
    barrier()
    import torch.distributed as dist

    if engine() == "accelerate":
        accelerator().end_training()
        _STATE["accelerator"] = None
    if dist.is_initialized():
        dist.destroy_process_group()
    return rank == 0


def shard_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """Contiguous [start, end) of the n samples for `rank` (sizes differ by at most one)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def gather_ranges(
    part: torch.Tensor | None, n: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Concatenate every process's rows `shard_range(n, rank, size)` in order (padded to one size
    for the collective, trimmed after); a process without rows sends `dtype` padding."""
    rank, size = world()
    width = -(-n // size)
    buf = torch.zeros((width, *shape), dtype=part.dtype if part is not None else dtype)
    if part is not None:
        buf[: len(part)] = part.cpu()
    bufs = gather_rows(buf)
    sizes = [end - start for start, end in (shard_range(n, r, size) for r in range(size))]
    return torch.cat([b[:k] for b, k in zip(bufs, sizes)])
