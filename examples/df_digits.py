"""The paper's Figure 7 on digits: FD against NFE for a Discriminator Flow (Alg. 3) with early
stopping (App. C.5: the flow run on [0, t_end] with its own step size, NFE = N·t_end) and for EDM
(heun and euler on its Karras grid). FD on the shipped digits features and in pixel space, against
the 400 held-out digits, over several sampling seeds (mean ± std).

    python examples/df_digits.py [--df pretrained/digits-df] [--edm pretrained/digits-edm] [--seeds 3] [--n 500]

Writes examples/figures/df_digits_fig7.png and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import flowsolve as fs

ROOT = Path(__file__).resolve().parents[1]


def measure(field, solver: str, nfe: int, n: int, seeds: int, feats) -> tuple[list[float], list[float]]:
    fd, pix = [], []
    for seed in range(seeds):
        x = fs.sample(field, solver, nfe=nfe, n=n, seed=seed)
        r = fs.evaluate.digits_quality(x, feats, seed=seed)
        fd.append(r.fd)
        pix.append(r.pixel_fd)
    return fd, pix


def stats(v: list[float]) -> str:
    return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--df", default=str(ROOT / "pretrained" / "digits-df"))
    ap.add_argument("--edm", default=str(ROOT / "pretrained" / "digits-edm"))
    ap.add_argument("--t-ends", default="0.125,0.25,0.375,0.5,0.75,1.0")
    ap.add_argument("--edm-nfe", default="7,11,15,23,31,63")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--out", default=str(ROOT / "examples" / "figures" / "df_digits_fig7.png"))
    args = ap.parse_args()
    feats = fs.from_pretrained(ROOT / "pretrained" / "digits-features")
    df, edm = fs.from_pretrained(args.df), fs.from_pretrained(args.edm)
    rows = []  # (model, solver, nfe, fds, pixel fds)
    for t_end in (float(v) for v in args.t_ends.split(",")):
        nfe = max(1, round(df.N * t_end))
        fd, pix = measure(df.field(t_end=t_end), "euler", nfe, args.n, args.seeds, feats)
        rows.append((f"DF, t_end = {t_end:g}", "euler", nfe, fd, pix))
    for solver in ("heun", "euler"):
        for nfe in (int(v) for v in args.edm_nfe.split(",")):
            fd, pix = measure(edm.field(), solver, nfe, args.n, args.seeds, feats)
            rows.append(("EDM", solver, nfe, fd, pix))
    print(f"n = {args.n}, seeds 0..{args.seeds - 1}; FD on the shipped features and in pixel space against the "
          f"400 held-out digits\n")
    print("| model | solver | NFE | FD | pixel FD |")
    print("|---|---|---:|---:|---:|")
    for model, solver, nfe, fd, pix in rows:
        print(f"| {model} | {solver} | {nfe} | {stats(fd)} | {stats(pix)} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, pick in (("Discriminator Flow (early stopping)", lambda r: r[0].startswith("DF")),
                        ("EDM, heun", lambda r: r[0] == "EDM" and r[1] == "heun"),
                        ("EDM, euler", lambda r: r[0] == "EDM" and r[1] == "euler")):
        sel = sorted((r for r in rows if pick(r)), key=lambda r: r[2])
        ax.errorbar([r[2] for r in sel], [statistics.mean(r[3]) for r in sel],
                    yerr=[statistics.stdev(r[3]) if len(r[3]) > 1 else 0 for r in sel], marker="o", label=label,
                    capsize=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("FD (digits features, held-out digits)")
    ax.set_title("Figure 7 on digits: FD against NFE")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
