"""The library's own exceptions. Every error flowsolve raises on purpose derives from
`FlowsolveError`, so a caller (and the CLI) can tell a user mistake or a detected failure
from a genuine bug. Each also derives from the builtin it used to be (ValueError, TypeError,
...), so `except ValueError` keeps working."""

from __future__ import annotations

__all__ = [
    "FlowsolveError",
    "ArgumentError",
    "ArgumentTypeError",
    "PathError",
    "NonFiniteError",
    "NFEBudgetExceeded",
    "CheckpointError",
    "MissingDependency",
]


class FlowsolveError(Exception):
    """Base class: a mistake in the input, or a failure flowsolve detected and explains."""


class ArgumentError(FlowsolveError, ValueError):
    """A value out of its range or of the wrong form; the message names the argument."""


class ArgumentTypeError(FlowsolveError, TypeError):
    """A value of the wrong type; the message names the argument."""


class PathError(FlowsolveError, FileNotFoundError):
    """A file or folder that does not exist where the argument points."""


class NonFiniteError(FlowsolveError, FloatingPointError):
    """The field (or a training loss) returned NaN or inf; the message names the step and time."""


class NFEBudgetExceeded(FlowsolveError, RuntimeError):
    """An adaptive solver needed more field evaluations than the `nfe` budget."""


class CheckpointError(FlowsolveError, ValueError):
    """A checkpoint that cannot be read (missing, truncated, corrupt or from another model)."""


class MissingDependency(FlowsolveError, RuntimeError):
    """An optional package that the requested feature needs is not installed; says how to install it."""
