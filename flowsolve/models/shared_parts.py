"""Frozen parts that trained copies of a model share rather than copy: the VAE of a latent model.

A Score GAN on a latent teacher trains copies of the teacher's network (the student, the generated
score, their EMAs); its VAE only decodes, so every copy holds the teacher's own VAE, which never
trains, is not averaged, and is not written into a student's weights (its folder loads the VAE
with the teacher it names)."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = [
    "SHARED_PARTS",
    "shared_parts",
    "trainable_copy",
    "frozen_copy",
    "trained_state",
    "is_trained",
    "load_trained_state",
]

# attribute names of the submodules shared by all copies
SHARED_PARTS = frozenset({"vae"})


def shared_parts(module: nn.Module) -> dict[str, nn.Module]:
    """{state-dict prefix: submodule} of the shared parts inside `module`, under every path that reaches
    them (a pair of copies that share one VAE holds it under both)."""
    named = module.named_modules(remove_duplicate=False)
    return {f"{name}.": m for name, m in named if name and name.rsplit(".", 1)[-1] in SHARED_PARTS}


def _copy(module: nn.Module) -> nn.Module:
    memo: dict = {id(m): m for m in shared_parts(module).values()}  # deepcopy keeps these objects as they are
    return copy.deepcopy(module, memo)


def trainable_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` in training mode with trainable parameters, its shared parts the original's
    (frozen, in eval mode)."""
    out = _copy(module).train().requires_grad_(True)
    for part in shared_parts(out).values():
        part.eval().requires_grad_(False)
    return out


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` in eval mode without gradients (an EMA's), its shared parts the original's."""
    return _copy(module).eval().requires_grad_(False)


def trained_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` without its shared parts."""
    skip = tuple(shared_parts(module))
    return {k: v for k, v in module.state_dict().items() if not (skip and k.startswith(skip))}


def is_trained(module: nn.Module):
    """A predicate on `module`'s parameter / buffer names: False for those of its shared parts."""
    skip = tuple(shared_parts(module))
    return lambda name: not (skip and name.startswith(skip))


def load_trained_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`module.load_state_dict(state)` for a state with or without its shared parts (those are never
    loaded: they stay the original's); any other missing or unexpected key is refused as strict loading
    refuses it."""
    keep = is_trained(module)
    result = module.load_state_dict({k: v for k, v in state.items() if keep(k)}, strict=False)
    missing = [k for k in result.missing_keys if keep(k)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"Error(s) in loading state_dict for {type(module).__name__}: missing keys {missing[:5]}, "
            f"unexpected keys {list(result.unexpected_keys)[:5]}"
        )
