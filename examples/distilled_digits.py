"""Students against their teachers on digits, several seeds, three judges.

For each model and seed (n = 1000 unless --n): FD on the shipped digits features against the 400
held-out digits (which no training run or checkpoint selection saw); the kernel distance KID on the
same features (unbiased: no bias that falls with n, so runs at different n compare); FD against the
1397 training digits (the convention of CIFAR-10 FIDs, which are computed against the training set;
checkpoint selection used it at n = 1000, seed 1); FD on raw pixels (a judge the project did not
shape); the spread (tr Cov of the samples' features over the held-out digits': below 1, less varied
than the data); and class coverage by the features' classifier and by a scikit-learn SVC. For
conditional models, the share of samples whose class (by each judge) is the label asked for.
The first row is a perfect memoriser (the training digits drawn with replacement): the held-out FD
that reproducing the training set exactly would score at the same n.

The 400 held-out digits are not balanced (class shares 0.078 to 0.115), so the held-out FD also
rewards a generator whose class shares drift toward theirs. The column "FD at the held-out class mix"
scores the largest subset of each model's samples whose SVC classes have the held-out shares
(`DigitsReport.fd_mix`): within-class quality; "class-mix TV" is the total variation between the
model's class shares and the held-out digits' (training digits: 0.052).

    python examples/distilled_digits.py --student runs/sg --teacher pretrained/digits-edm [--cond-student runs/sgc]
"""
from __future__ import annotations

import argparse
import statistics

import torch

import flowsolve as fs
from flowsolve.evaluate import digits_quality, svc_predict
from flowsolve.metrics import frechet_distance

SEEDS = (0, 1, 2, 3, 4)


def rows_for(name: str, draw, feats, labels=None, seeds=SEEDS) -> dict:
    fds, pix, cover, acc_f, acc_s, spread, kid, fd_train, fd_mix, tv = [], [], [], [], [], [], [], [], [], []
    train = fs.data.digits("train").x
    for seed in seeds:
        x = draw(seed)
        r = digits_quality(x, feats, seed=seed)
        fds.append(r.fd)
        fd_mix.append(r.fd_mix if r.fd_mix is not None else float("nan"))
        tv.append(r.mix_tv)
        fd_train.append(frechet_distance(x, train, feats))
        pix.append(r.pixel_fd)
        spread.append(r.spread)
        kid.append(r.kid)
        cover.append(sum(s > 0.02 for s in r.svc_class_share))
        if labels is not None:
            with torch.no_grad():
                acc_f.append(float((feats(x.float().clamp(-1, 1)).argmax(1) == labels).float().mean()))
            acc_s.append(float((torch.as_tensor(svc_predict(x)) == labels).float().mean()))
    out = {"model": name, "fd": fds, "pixel_fd": pix, "spread": spread, "kid": kid, "fd_train": fd_train,
           "classes": min(cover), "floor": r.floor, "fd_mix": fd_mix, "mix_tv": tv, "floor_mix": r.floor_mix,
           "pixel_floor": r.pixel_floor}
    if labels is not None:
        out["acc_features"], out["acc_svc"] = acc_f, acc_s
    return out


def fmt(v: list[float]) -> str:
    return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="pretrained/digits-edm")
    p.add_argument("--student", action="append", default=[], help="student folder(s); repeatable")
    p.add_argument("--cond-teacher", default="pretrained/digits-cond-edm")
    p.add_argument("--cond-student", default=None)
    p.add_argument("--guidance", type=float, default=1.5, help="the conditional teacher's guidance scale")
    p.add_argument("--n", type=int, default=1000, help="samples per seed (10000: a spread of 1-3 across seeds)")
    p.add_argument("--seeds", type=int, default=len(SEEDS), choices=range(2, len(SEEDS) + 1),
                   help="use the first this many of the seeds 0-4")
    p.add_argument("--no-teacher", action="store_true", help="skip the teacher's rows (deterministic: the same each run)")
    args = p.parse_args()
    seeds = SEEDS[: args.seeds]
    feats = fs.from_pretrained("pretrained/digits-features")
    teacher = None if args.no_teacher else fs.from_pretrained(args.teacher)
    rows = []
    train = fs.data.digits("train").x  # a perfect memoriser: its n samples are training digits drawn with replacement
    rows.append(rows_for("the 1397 training digits, drawn with replacement (a perfect memoriser)",
                         lambda s: train[torch.randint(len(train), (args.n,), generator=torch.Generator().manual_seed(s))],
                         feats, seeds=seeds))
    print(rows[-1], flush=True)
    for solver, nfe in () if teacher is None else (("heun", 31), ("dpmpp_2m", 16), ("unipc", 16)):
        rows.append(rows_for(f"teacher {args.teacher}, {solver} {nfe} NFE",
                             lambda s, solver=solver, nfe=nfe: fs.sample(teacher.field(), solver, nfe=nfe, n=args.n,
                                                                       seed=s), feats, seeds=seeds))
        print(rows[-1], flush=True)
    for path in args.student:
        g = fs.from_pretrained(path)
        rows.append(rows_for(f"student {path} ({g.steps} NFE)", lambda s, g=g: g.sample(args.n, seed=s),
                             feats, seeds=seeds))
        print(rows[-1], flush=True)
    if args.cond_student:
        y = torch.arange(args.n) % 10
        ct = None if args.no_teacher else fs.from_pretrained(args.cond_teacher)
        for w in () if ct is None else (1.0, args.guidance):
            rows.append(rows_for(f"teacher {args.cond_teacher}, dpmpp_2m 16 NFE, guidance {w}",
                                 lambda s, w=w: fs.sample(ct.field(guidance=w), "dpmpp_2m", nfe=16, n=args.n, seed=s,
                                                          cond={"class_labels": y}), feats, labels=y, seeds=seeds))
            print(rows[-1], flush=True)
        g = fs.from_pretrained(args.cond_student)
        rows.append(rows_for(f"student {args.cond_student} (1 NFE)",
                             lambda s: g.sample(args.n, seed=s, cond={"class_labels": y}), feats, labels=y, seeds=seeds))
        print(rows[-1], flush=True)
    print("\n| model | FD (features) | FD at the held-out class mix | class-mix TV | KID | FD against the training "
          "digits | pixel FD | spread | SVC classes > 2% | accuracy (features / SVC) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        acc = (f"{statistics.mean(r['acc_features']):.3f} / {statistics.mean(r['acc_svc']):.3f}"
               if "acc_svc" in r else "")
        print(f"| {r['model']} | {fmt(r['fd'])} | {fmt(r['fd_mix'])} | {statistics.mean(r['mix_tv']):.3f} | {fmt(r['kid'])} | {fmt(r['fd_train'])} | {statistics.mean(r['pixel_fd']):.3f} | "
              f"{statistics.mean(r['spread']):.3f} | {r['classes']}/10 | {acc} |")
    print(f"\nreal floors (training digits vs held-out, n = {min(args.n, 1397)}): features "
          f"{rows[0]['floor']:.1f} (at the held-out class mix {rows[0]['floor_mix']:.1f}), pixels "
          f"{rows[0]['pixel_floor']:.3f}; mean ± std over seeds {seeds}")


if __name__ == "__main__":
    main()
