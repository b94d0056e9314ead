"""The shape of the code base: the subpackage import graph (module-level and function-level
imports), its back-edges against the layer order of DESIGN.md, and the longest functions.

    python benchmarks/code_shape.py [--root flowsolve] [--top 10]

`tests/test_architecture.py` asserts on the same graph; this script prints it for the notes.
"""
from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from pathlib import Path

# layers from the bottom up (DESIGN.md): a unit may import only units of its own layer or below
LAYERS: list[set[str]] = [
    {"errors", "_checks", "_cond", "noise", "grids", "latent", "distributed"},
    {"fields"},
    {"solvers"},
    {"sample", "calibrate", "inpainting"},
    {"data", "metrics"},
    {"models"},
    {"train", "evaluate", "comparison", "viz"},
    {"cli", "__main__", "__init__"},
]


def unit_of(module: str) -> str:
    """'flowsolve.fields.score' → 'fields'; 'flowsolve' → '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise KeyError(f"unit {unit!r} is in no layer of LAYERS; add it")


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    if node.module is None:                  # from . import a, b
        return [f"{base}.{a.name}" for a in node.names]
    return [base]


def imports(root: Path) -> dict[str, set[tuple[str, int, bool]]]:
    """module → {(imported flowsolve module, line, at module level)}."""
    out: dict[str, set[tuple[str, int, bool]]] = defaultdict(set)
    pkg = root.name
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        tree = ast.parse(path.read_text(), str(path))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = _resolve(node, module, path.name == "__init__.py")
            else:
                continue
            for name in names:
                if name == pkg or name.startswith(pkg + "."):
                    out[module].add((name, node.lineno, id(node) in top))
    return out


def unit_graph(root: Path) -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) → ['module:line', ...] for imports across units."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, targets in imports(root).items():
        a = unit_of(module)
        for target, line, _ in targets:
            b = unit_of(target)
            if a != b and b != "__init__":
                edges[(a, b)].append(f"{module}:{line}")
    return edges


def back_edges(root: Path) -> list[tuple[str, str, list[str]]]:
    """Imports from a lower layer to a higher one (the edges that make cycles possible)."""
    return [(a, b, where) for (a, b), where in sorted(unit_graph(root).items()) if layer_of(b) > layer_of(a)]


def cycles(root: Path) -> list[list[str]]:
    """Strongly connected components of more than one unit in the unit graph (Tarjan)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in unit_graph(root):
        graph[a].add(b)
        graph.setdefault(b, set())
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def longest_functions(root: Path, top: int = 10) -> list[tuple[int, str]]:
    rows = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1,
                             f"{path.relative_to(root.parent)}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[1] / "flowsolve"))
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args()
    root = Path(args.root)
    print("## unit import graph (importer -> imported: count)")
    for (a, b), where in sorted(unit_graph(root).items()):
        print(f"  {a:>10} -> {b:<10} {len(where)}")
    print("## back-edges (lower layer importing a higher one)")
    for a, b, where in back_edges(root) or [("none", "", [])]:
        print(f"  {a} -> {b}: {', '.join(where)}")
    print("## cycles between units:", cycles(root) or "none")
    print(f"## the {args.top} longest functions (lines)")
    for n, name in longest_functions(root, args.top):
        print(f"  {n:4d} {name}")


if __name__ == "__main__":
    main()
