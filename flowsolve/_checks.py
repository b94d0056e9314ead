"""The small checks and helpers that every layer shares, written once: integers and numbers by
name, σ / t broadcasting, generators from seeds, atomic writes, JSON reads, did-you-mean, and
deprecated spellings of renamed arguments."""

from __future__ import annotations

import difflib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import ArgumentError, ArgumentTypeError, PathError

__all__ = [
    "check_int",
    "model_dtype",
    "check_number",
    "check_choice",
    "check_device",
    "check_dtype",
    "nearest",
    "batch_time",
    "as_column",
    "sigma_column",
    "seeded_generator",
    "atomic_write_text",
    "atomic_save",
    "read_json",
    "renamed",
    "deprecated",
    "check_output",
    "available_memory",
    "check_memory",
    "check_disk",
    "write_folder_atomically",
]


# -- models --------------------------------------------------------------------------------------
def model_dtype(model, default: torch.dtype | None = None) -> torch.dtype | None:
    """The dtype of a model's first floating-point parameter, as diffusers' `.dtype` reports it
    (that property walks every submodule: about 0.6 ms a call on a small UNet, per evaluation);
    else the model's own `dtype` attribute, else `default`."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return getattr(model, "dtype", default)


# -- numbers -------------------------------------------------------------------------------------
def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """`value` as an int in [lo, hi]; bools and floats (even 3.0) are refused, naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    if lo is not None and value < lo:
        raise ArgumentError(f"{name}: expected an integer >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ArgumentError(f"{name}: expected an integer <= {hi}, got {value}")
    return value


_DTYPE_NAMES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


def check_dtype(name: str, value: Any) -> torch.dtype:
    """A floating-point torch.dtype, also given by name ('float64', 'torch.bfloat16', 'half')."""
    if isinstance(value, str):
        key = value.removeprefix("torch.")
        if key not in _DTYPE_NAMES:
            raise ArgumentTypeError(
                f"{name}: expected a floating-point torch.dtype or one of {sorted(_DTYPE_NAMES)}, got {value!r}"
            )
        return _DTYPE_NAMES[key]
    if not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise ArgumentTypeError(f"{name}: expected a floating-point torch.dtype, got {value!r}")
    return value


def check_device(name: str, value: Any) -> torch.device:
    """`value` as a torch.device that this machine has: a malformed name or an absent accelerator
    ('cuda' without CUDA, 'cuda:3' on a 2-GPU host, 'mps' off Apple) is refused before any work."""
    try:
        dev = value if isinstance(value, torch.device) else torch.device(value)
    except (RuntimeError, TypeError):
        raise ArgumentError(
            f"{name}: expected 'cpu', 'cuda', 'cuda:N', 'mps' or a torch.device, got {value!r}"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentError(f"{name}: {str(dev)!r} asked for, but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ArgumentError(
                f"{name}: {str(dev)!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)"
            )
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ArgumentError(f"{name}: 'mps' asked for, but the MPS backend is not available here")
    return dev


def check_number(
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """`value` as a finite float within [lo, hi] (open ends on request), naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ArgumentError(f"{name}: expected a finite number, got {value!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ArgumentError(f"{name}: expected a number {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (v >= hi if hi_open else v > hi):
        raise ArgumentError(f"{name}: expected a number {'<' if hi_open else '<='} {hi}, got {value!r}")
    return v


def nearest(name: str, valid: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid name, or ''."""
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(name: str, value: Any, valid: Iterable[str]) -> str:
    """`value` if it is one of `valid`, else an error listing them with a did-you-mean."""
    valid = tuple(valid)
    if value not in valid:
        raise ArgumentError(
            f"{name}: expected one of {', '.join(map(repr, valid))}, got {value!r}"
            f"{nearest(value, valid) if isinstance(value, str) else ''}"
        )
    return value


# -- time / σ broadcasting -----------------------------------------------------------------------
def batch_time(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """t (a number, a 0-d or a (batch,) tensor) as a (batch,) tensor on x's device and dtype."""
    if not (isinstance(t, torch.Tensor) and t.dtype == x.dtype and t.device == x.device):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ArgumentError(f"t: expected a scalar or shape ({x.shape[0]},), got shape {tuple(t.shape)}")
    return t


def sigma_column(sigma: Any, x: torch.Tensor) -> torch.Tensor:
    """σ as a (batch,) tensor of x's dtype/device, from a float, a 0-d, a (1,) or a (batch,) tensor."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
    if s.numel() == 1:
        s = s.expand(len(x))
    if s.numel() != len(x):
        raise ArgumentError(f"sigma: expected a scalar or {len(x)} values (one per sample), got {s.numel()}")
    return s


def as_column(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (batch,) tensor reshaped to broadcast against x of shape (batch, *data_shape)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


# -- randomness ----------------------------------------------------------------------------------
def seeded_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator seeded with `seed` (None: fresh OS entropy); the global RNG is never used."""
    if seed is None:
        from .noise import fresh_seed

        seed = fresh_seed()
    check_int("seed", seed, 0, 2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


# -- files ---------------------------------------------------------------------------------------
def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, fsync, then rename over it: readers see the
    old file or the new one, never half of either."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def atomic_save(obj: Any, path: str | os.PathLike, keep_previous: str | None = None) -> Path:
    """torch.save through a temporary file and a rename; the file it replaces is kept under the
    name `keep_previous` (in the same folder) when given. `path` exists at every instant once it has
    been written: the previous version is hard-linked (or copied) aside before the new one is renamed
    over it, so a kill at any moment leaves a whole `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and path.exists():
        aside = path.with_name(keep_previous + ".tmp")
        aside.unlink(missing_ok=True)
        try:
            os.link(path, aside)
        except OSError:  # no hard links here: copy
            import shutil

            shutil.copy2(path, aside)
        os.replace(aside, path.with_name(keep_previous))
    os.replace(tmp, path)
    return path


def write_folder_atomically(folder: str | os.PathLike, write: Any) -> Path:
    """Call write(tmp) to fill a temporary folder beside `folder`, then move each file into `folder`
    with an atomic rename: a kill at any moment leaves every file whole (old or new), never half-written."""
    import shutil
    import tempfile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-save-", dir=folder))
    try:
        write(tmp)
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                target = folder / f.relative_to(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(f, "rb") as h:
                    os.fsync(h.fileno())
                os.replace(f, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_json(path: str | os.PathLike, what: str = "path") -> dict:
    """A JSON object from `path`, with errors that name `what` and the file."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except FileNotFoundError:
        raise PathError(f"{what}: {str(p)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArgumentError(f"{what}: {str(p)!r} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ArgumentError(f"{what}: {str(p)!r} must hold a JSON object, got {type(obj).__name__}")
    return obj


def check_output(path: str | os.PathLike, suffixes: Iterable[str] | None, what: str = "out") -> Path:
    """Check an output path before any work: its suffix is one of `suffixes` (None: a folder), and its
    folder exists (it is made here if needed) and takes a file."""
    p = Path(path)
    if suffixes is not None:
        suffixes = tuple(suffixes)
        if p.suffix.lower() not in suffixes:
            raise ArgumentError(f"{what}: expected a file ending in {' or '.join(suffixes)}, got {str(p)!r}")
        if p.is_dir():
            raise ArgumentError(f"{what}: {str(p)!r} is a folder; expected a file name")
    elif p.exists() and not p.is_dir():
        raise ArgumentError(f"{what}: {str(p)!r} is a file; expected a folder")
    folder = p.parent if suffixes is not None else p
    try:  # make the folder now and prove it takes a file
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".flowsolve-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ArgumentError(f"{what}: cannot write into {str(folder)!r} ({e.strerror or e})") from None
    return p


def available_memory() -> int:
    """Bytes of memory this machine has available now (MemAvailable), or its physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def check_disk(name: str, folder: str | os.PathLike, nbytes: int) -> None:
    """Refuse, before any work, an output that the disk under `folder` cannot hold."""
    import shutil

    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise ArgumentError(
            f"{name}: the output needs about {nbytes / 2**30:.1f} GiB, more than the "
            f"{free / 2**30:.1f} GiB free under {str(folder)!r}"
        )


def check_memory(name: str, nbytes: int, hint: str, share: float = 0.8) -> None:
    """Refuse, before any work, a request whose tensors would not fit in memory (naming `name`)."""
    have = available_memory()
    if nbytes > share * have:
        raise ArgumentError(
            f"{name}: needs about {nbytes / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB "
            f"this machine has available; {hint}"
        )


# -- renames -------------------------------------------------------------------------------------
def deprecated(old: str, new: str, where: str) -> None:
    """Warn that the keyword `old` of `where` is now spelt `new` (accepted for one release)."""
    warnings.warn(
        f"{where}: {old!r} is renamed {new!r}; the old name goes in the next release", DeprecationWarning, stacklevel=3
    )


def renamed(kwargs: dict, old: str, new: str, where: str) -> dict:
    """Accept the old spelling `old` of a keyword for one release, with a DeprecationWarning;
    both at once is an error. Returns kwargs with `new` set."""
    if old in kwargs:
        if new in kwargs:
            raise ArgumentTypeError(f"{where}: got both {old!r} and its new name {new!r}; pass {new!r} only")
        warnings.warn(
            f"{where}: {old!r} is renamed {new!r}; the old name goes in the next release",
            DeprecationWarning,
            stacklevel=3,
        )
        kwargs[new] = kwargs.pop(old)
    return kwargs
