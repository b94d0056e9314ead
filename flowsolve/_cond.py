"""Per-sample conditioning as a tree: a dict of tensors whose values may themselves be dicts of
tensors, for models with a dict-valued input (SDXL's `added_cond_kwargs = {"text_embeds": ...,
"time_ids": ...}`), or lists of tensors (`RowList`: T2I-Adapter's residuals, IP-Adapter's image
embeddings). Every row operation (checking, chunking, guidance's branches, the model's batch) maps
over the leaves, keeping the structure. A tuple is not a branch: it is a leaf passed as it is (the
position tables of a model's fixed inputs, such as rotary embeddings)."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["RowList", "row_lists", "map_leaves", "merge_leaves", "zip_leaves"]


class RowList(list):
    """A list of per-sample tensors in `cond` (each one row per sample, or one for all), as a model
    input that is a list (T2I-Adapter's `down_intrablock_additional_residuals`)."""


def row_lists(tree: dict) -> dict:
    """`tree` with its lists of tensors made row lists (guidance's `uncond` as the user wrote it)."""
    out: dict = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out[k] = row_lists(v)
        elif isinstance(v, list) and v and all(hasattr(e, "shape") for e in v):
            out[k] = RowList(v)
        else:
            out[k] = v
    return out


def _branch(v: Any) -> bool:
    return isinstance(v, (dict, RowList))


def _items(v: dict | RowList):
    return v.items() if isinstance(v, dict) else enumerate(v)


def _rebuild(like: dict | RowList, pairs) -> dict | RowList:
    return dict(pairs) if isinstance(like, dict) else RowList(value for _, value in pairs)


def map_leaves(fn: Callable[[str, Any], Any], cond: dict, prefix: str = "") -> dict:
    """{key: fn("outer.inner", leaf)} with nested dicts kept as dicts and row lists as row lists
    (their entries named "key.0", "key.1", ...)."""
    return _map(fn, cond, prefix)  # type: ignore[return-value]


def _map(fn: Callable[[str, Any], Any], tree: dict | RowList, prefix: str) -> dict | RowList:
    return _rebuild(
        tree,
        ((k, _map(fn, v, f"{prefix}{k}.") if _branch(v) else fn(f"{prefix}{k}", v)) for k, v in _items(tree)),
    )


def merge_leaves(base: dict, over: dict) -> dict:
    """`base` with the leaves of `over` put in its place (nested dicts merged key by key; a row list
    replaces the whole entry)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_leaves(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def zip_leaves(fn: Callable[[str, Any, Any], Any], a: dict, b: dict, prefix: str = "") -> dict:
    """{key: fn(path, a_leaf, b_leaf)} over the structure of b (a lacking a key gives None)."""
    return _zip(fn, a, b, prefix)  # type: ignore[return-value]


def _zip(fn: Callable[[str, Any, Any], Any], a: Any, b: dict | RowList, prefix: str) -> dict | RowList:
    def get(k):
        if isinstance(a, dict):
            return a.get(k)
        if isinstance(a, RowList) and isinstance(k, int) and k < len(a):
            return a[k]
        return None

    return _rebuild(
        b,
        (
            (k, _zip(fn, get(k) if _branch(get(k)) else ({} if isinstance(v, dict) else RowList()), v, f"{prefix}{k}."))
            if _branch(v)
            else (k, fn(f"{prefix}{k}", get(k), v))
            for k, v in _items(b)
        ),
    )
