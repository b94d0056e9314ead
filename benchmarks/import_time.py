"""`import flowsolve` cost: torch's own import, and what flowsolve adds on top (diffusers, the
trainers, torchdiffeq/torchsde and scipy load on first use). Medians of fresh interpreters.

    python benchmarks/import_time.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CODE = ("import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); {extra}"
        "t2 = time.perf_counter(); print(t1 - t0, t2 - t1)")


def measure(extra: str, repeats: int) -> tuple[float, float]:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", CODE.format(extra=extra)], capture_output=True, text=True,
                             check=True).stdout.split()
        runs.append((float(out[0]), float(out[1])))
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rows = [("import flowsolve", "import flowsolve; "),
            ("import flowsolve; fs.models (diffusers)", "import flowsolve as fs; fs.models; "),
            ("import diffusers", "import diffusers; "),
            ("import torchdiffeq", "import torchdiffeq; ")]
    print("| what | torch (s) | on top of torch (s) |\n|---|---:|---:|")
    for label, extra in rows:
        t_torch, t_more = measure(extra, args.repeats)
        print(f"| {label} | {t_torch:.2f} | {t_more:.3f} |")


if __name__ == "__main__":
    main()
