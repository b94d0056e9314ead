"""Per-sample conditioning as a tree: a dict of tensors whose values may themselves be dicts of
tensors, for models with a dict-valued input (SDXL's `added_cond_kwargs = {"text_embeds": ...,
"time_ids": ...}`). Every row operation (checking, chunking, guidance's two branches, the model's
batch) maps over the leaves, keeping the structure."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["map_leaves", "merge_leaves", "zip_leaves"]


def map_leaves(fn: Callable[[str, Any], Any], cond: dict, prefix: str = "") -> dict:
    """{key: fn("outer.inner", leaf)} with nested dicts kept as dicts."""
    return {
        k: map_leaves(fn, v, f"{prefix}{k}.") if isinstance(v, dict) else fn(f"{prefix}{k}", v) for k, v in cond.items()
    }


def merge_leaves(base: dict, over: dict) -> dict:
    """`base` with the leaves of `over` put in its place (nested dicts merged key by key)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_leaves(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def zip_leaves(fn: Callable[[str, Any, Any], Any], a: dict, b: dict, prefix: str = "") -> dict:
    """{key: fn(path, a_leaf, b_leaf)} over the keys of b (a lacking a key gives None)."""
    out = {}
    for k, v in b.items():
        if isinstance(v, dict):
            inner: dict = a[k] if isinstance(a.get(k), dict) else {}
            out[k] = zip_leaves(fn, inner, v, f"{prefix}{k}.")
        else:
            out[k] = fn(f"{prefix}{k}", a.get(k), v)
    return out
