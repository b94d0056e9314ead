"""Sample the paper's 2-D mixture (App. D.1) with several solvers and check the result against the
exact density: mode coverage, share within 3 std of a mode, mean NLL and energy distance.

    python examples/sample_gmm.py
"""
import torch

import flowsolve as fs


def main():
    gmm = fs.data.GaussianMixture.paper()
    field = fs.fields.EDM(gmm.denoiser)
    truth = gmm.sample(3000, generator=torch.Generator().manual_seed(1))
    runs = [("heun", 13, {}), ("heun", 55, {}), ("euler", 16, {}), ("dpmpp_2m_pc", 16, {}),
            ("sde", 256, {"alpha": 0.5}), ("sde", 256, {"alpha": 1.0}), ("edm", 55, {"S_churn": 10.0})]
    print(f"{'solver':12s} {'nfe':>4s} {'modes':>20s} {'<3std':>6s} {'NLL':>6s} {'energy':>7s}")
    for solver, nfe, opts in runs:
        x, info = fs.sample(field, solver, nfe=nfe, n=3000, seed=0, return_info=True, **opts)
        k = gmm.assign(x)
        share = torch.bincount(k, minlength=5).double() / len(x)
        near = ((x.double() - gmm.means[k]).norm(dim=1) < 3 * 0.5).double().mean()
        nll = -gmm.log_prob(x.double()).mean()
        print(f"{solver:12s} {info.nfe:4d} {' '.join(f'{s:.2f}' for s in share.tolist()):>20s} "
              f"{near:6.3f} {nll:6.3f} {fs.metrics.energy_distance(x, truth):7.4f}  {opts or ''}")
    print(f"{'true samples':12s} {'':4s} {'':20s} {'':6s} {-gmm.log_prob(truth.double()).mean():6.3f} "
          f"{fs.metrics.energy_distance(gmm.sample(3000, generator=torch.Generator().manual_seed(2)), truth):7.4f}")


if __name__ == "__main__":
    main()
