"""Evaluation: metrics against closed forms, the PF-ODE likelihood against the exact density,
`compare` files, animations."""
import csv
import math

import pytest
import torch
from PIL import Image

import flowsolve as fs
from flowsolve.cli import main


def gaussians(n, d, mu, s, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * s + mu


def test_mmd_closed_form_between_gaussians():
    d, s1, s2, h = 2, 1.0, 1.5, 1.3
    mu2 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    x, y = gaussians(4000, d, 0.0, s1, 0), gaussians(4000, d, mu2, s2, 1)
    def ek(a2, b2, delta2):
        v = h * h + a2 + b2
        return (h * h / v) ** (d / 2) * math.exp(-delta2 / (2 * v))
    want = ek(s1 ** 2, s1 ** 2, 0) + ek(s2 ** 2, s2 ** 2, 0) - 2 * ek(s1 ** 2, s2 ** 2, 1.0)
    assert fs.metrics.mmd(x, y, bandwidth=h) == pytest.approx(want, abs=0.01)
    assert abs(fs.metrics.mmd(x, gaussians(4000, d, 0.0, s1, 2))) < 0.005
    assert fs.metrics.median_bandwidth(x, y) > 0


def test_energy_distance_closed_form_1d():
    delta, s1, s2 = 1.0, 1.0, 2.0
    def e_abs(mu, var):       # E|Z| for Z ~ N(mu, var)
        t = math.sqrt(var)
        return t * math.sqrt(2 / math.pi) * math.exp(-mu * mu / (2 * var)) + mu * (1 - 2 * 0.5 * math.erfc(mu / (t * math.sqrt(2))))
    want = 2 * e_abs(delta, s1 ** 2 + s2 ** 2) - e_abs(0, 2 * s1 ** 2) - e_abs(0, 2 * s2 ** 2)
    got = sum(fs.metrics.energy_distance(gaussians(6000, 1, 0.0, s1, 2 * k), gaussians(6000, 1, delta, s2, 2 * k + 1))
              for k in range(3)) / 3
    assert got == pytest.approx(want, abs=0.03)


def test_sliced_wasserstein_of_a_shift():
    d = 4
    shift = torch.tensor([2.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    x = gaussians(5000, d, 0.0, 1.0, 0)
    sw = fs.metrics.sliced_wasserstein(x, x + shift, projections=2000)
    assert sw == pytest.approx(2.0 / math.sqrt(d), rel=0.05)     # E(θ·δ)² = ‖δ‖²/d on the sphere


def test_mode_coverage_and_nll(gmm):
    x = gmm.sample(5000, torch.Generator().manual_seed(0))
    cov = fs.metrics.mode_coverage(x, gmm)
    assert cov["modes_covered"] == 5 and all(abs(s - 0.2) < 0.03 for s in cov["share"])
    assert cov["within"] == pytest.approx(1 - math.exp(-4.5), abs=0.01)          # χ²₂ mass below 9
    assert fs.metrics.nll(x, gmm) == pytest.approx(float(-gmm.log_prob(x.double()).mean()))
    far = fs.metrics.mode_coverage(x * 3, gmm)
    assert far["within"] < 0.1


def test_pf_ode_likelihood_matches_the_exact_density(gmm):
    x = gmm.sample(100, torch.Generator().manual_seed(0), dtype=torch.float64)
    ll = fs.metrics.pf_ode_log_likelihood(gmm.denoiser, x)
    exact = gmm.log_prob(x)
    assert ((ll - exact).abs() / exact.abs()).max() < 0.02
    g16 = fs.data.GaussianMixture.random(16, 4, 0.5, seed=0)
    y = g16.sample(100, torch.Generator().manual_seed(0), dtype=torch.float64)
    est = fs.metrics.pf_ode_log_likelihood(g16.denoiser, y)                        # Hutchinson in 16-D
    assert float(est.mean()) == pytest.approx(float(g16.log_prob(y).mean()), rel=0.04)


def test_compare_writes_consistent_files(tmp_path, gmm):
    field = fs.fields.EDM(gmm.denoiser)
    table = fs.compare(field, ["euler", "heun"], [4, 8], "energy", n=300, seeds=2, reference=gmm, model_name="gmm2d")
    files = table.save(tmp_path)
    rows = list(csv.DictReader(open(files["csv"])))
    assert [r["solver"] for r in rows] == ["euler", "euler", "heun", "heun"]
    assert {"solver", "nfe_budget", "nfe_used", "metric", "value", "std", "seconds"} <= set(rows[0])
    for r, t in zip(rows, table.rows):
        assert float(r["value"]) == pytest.approx(t["value"]) and int(r["nfe_used"]) == t["nfe_used"]
        assert f"{t['value']:.4g}" in files["md"].read_text()
    assert [r["nfe_used"] for r in table.rows] == [4, 8, 3, 7]
    assert files["png"].read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="metric"):
        fs.compare(field, ["euler"], [4], "fid")
    with pytest.raises((ValueError, KeyError), match="heun"):
        fs.compare(field, ["no-such"], [4], "energy", reference=gmm)


def test_compare_ranks_like_the_exact_rmse(gmm):
    """At NFE 8 on the mixture, energy distance to true samples orders the solvers as the endpoint
    RMSE against an accurate solve does."""
    field = fs.fields.EDM(gmm.denoiser)
    solvers = ["heun", "euler", "ipndm"]
    e = fs.compare(field, solvers, [8], "energy", n=1000, seeds=2, reference=gmm)
    r = fs.compare(field, solvers, [8], "rmse", n=300, seeds=1)
    order = lambda t: [row["solver"] for row in sorted(t.rows, key=lambda row: row["value"])]  # noqa: E731
    assert order(e) == order(r)


def test_animation_frames(tmp_path, gmm):
    n = fs.viz.animate(fs.fields.EDM(gmm.denoiser), tmp_path / "g.gif", solver="euler", nfe=6, n=50, reference=gmm)
    img = Image.open(tmp_path / "g.gif")
    assert n == 7 and img.n_frames == 7
    assert main(["animate", "--model", "pretrained/digits-edm", "--solver", "heun", "--nfe", "8", "--n", "4",
                 "--every", "2", "--out", str(tmp_path / "d.gif")]) == 0
    d = Image.open(tmp_path / "d.gif")
    assert d.n_frames == 3 and d.size == (2 * 33 + 1, 2 * 33 + 1)     # 4 steps, every 2: t0, t2, t4; 2×2 grid of 32 px
    with pytest.raises(ValueError, match="gif"):
        fs.viz.animate(fs.fields.EDM(gmm.denoiser), tmp_path / "g.mp4", nfe=4, n=4)


def test_cli_compare(tmp_path):
    assert main(["compare", "--model", "gmm2d", "--solvers", "euler,dpmpp_2m", "--nfe", "4,8", "--metric", "nll",
                 "--n", "200", "--seeds", "2", "--out", str(tmp_path), "--quiet"]) == 0
    assert (tmp_path / "compare.csv").is_file() and (tmp_path / "compare.png").is_file()
    assert main(["compare", "--model", "gmm2d", "--nfe", "4,x", "--out", str(tmp_path)]) == 2


def test_latent_interpolations_keep_the_prior():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20000, 8, generator=g, dtype=torch.float64), torch.randn(20000, 8, generator=g, dtype=torch.float64)
    mid = {m: fs.latent.interpolate(a, b, 3, m)[1] for m in fs.latent.METHODS}
    assert mid["linear"].var().item() == pytest.approx(0.5, abs=0.02)        # linear shrinks: var (1/2)² · 2
    assert mid["cauchy_linear"].var().item() == pytest.approx(1.0, abs=0.03)  # distribution-preserving
    r = mid["spherical_cauchy_linear"].norm(dim=1).square().mean().item()
    assert r == pytest.approx(8.0, rel=0.03)                                  # E‖z‖² = d
    for m in fs.latent.METHODS:
        path = fs.latent.interpolate(a[:3], b[:3], 5, m)
        assert path.shape == (5, 3, 8)
        assert torch.allclose(path[0], a[:3], atol=1e-5) and torch.allclose(path[-1], b[:3], atol=1e-5)
    with pytest.raises(ValueError, match="method"):
        fs.latent.interpolate(a[0], b[0], 4, "bezier")


def test_interpolation_grid(tmp_path):
    from flowsolve.models.gan import Generator
    g = Generator((2,), latent=8, width=16, depth=1)
    x = fs.viz.interpolation_grid(g, tmp_path / "i.png", rows=3, steps=5)
    assert x.shape == (15, 2) and (tmp_path / "i.png").read_bytes()[:4] == b"\x89PNG"
    gi = Generator((1, 8, 8), latent=8, width=16, depth=1, tanh=True)
    assert fs.viz.interpolation_grid(gi, tmp_path / "j.png", method="linear", rows=2, steps=4).shape == (8, 1, 8, 8)


def test_inception_unavailable_offline_is_a_clear_error():
    try:
        import torch_fidelity  # noqa: F401
        pytest.skip("torch-fidelity is installed; the Inception weights may be cached")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="Inception features are not available offline"):
        fs.metrics.frechet_distance(torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8), "inception")
    with pytest.raises(ValueError, match="num_features"):
        fs.metrics.frechet_distance(torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8), torch.nn.Identity())


def test_compare_over_grids_names_them_and_leaves_out_missing_calibrations(gmm):
    from flowsolve.comparison import compare
    field = fs.fields.EDM(gmm.denoiser)
    g5 = fs.grids.loglinear(5, 0.002, 80.0)
    field.calibrated = {"ipndm:5": g5.tolist()}
    with pytest.warns(UserWarning, match="no calibrated grid"):
        table = compare(field, ["ipndm"], [5, 8], "rmse", n=40, seeds=1,
                                      grids=["karras", "calibrated"])
    names = {(r["solver"], r["nfe_budget"]) for r in table.rows}
    assert names == {("ipndm [karras]", 5), ("ipndm [karras]", 8), ("ipndm [calibrated]", 5)}
    # the calibrated cell is exactly the sample on that grid
    cal = [r for r in table.rows if r["solver"] == "ipndm [calibrated]"][0]["value"]
    lin = compare(field, ["ipndm"], [5], "rmse", n=40, seeds=1, grids=["loglinear"]).rows[0]["value"]
    assert cal == pytest.approx(lin, rel=1e-9)


def test_kernel_distance_matches_torchmetrics_kid_and_the_linear_closed_form():
    """KID against torchmetrics' own estimator (one subset of all n = m samples), and with degree 1
    against its closed form E = ‖μa − μb‖² / d; unbiased: same-distribution sets of very different sizes
    average to 0 (FD's bias would not)."""
    from torchmetrics.image.kid import poly_mmd

    from flowsolve.metrics import kernel_distance_features

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 6, generator=g), 0.8 * torch.randn(300, 6, generator=g) + 0.3
    peer = float(poly_mmd(a.double(), b.double(), degree=3, gamma=1 / 6, coef=1.0))
    assert kernel_distance_features(a, b) == pytest.approx(peer, rel=1e-9)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 0.0])
    est = [
        kernel_distance_features(torch.randn(400, 6, generator=g), torch.randn(900, 6, generator=g) + shift, degree=1)
        for _ in range(20)
    ]
    assert sum(est) / len(est) == pytest.approx(float(shift.square().sum()) / 6, rel=0.03)
    same = torch.tensor(
        [kernel_distance_features(torch.randn(40, 6, generator=g), torch.randn(2000, 6, generator=g)) for _ in range(300)]
    )
    assert abs(float(same.mean())) < 3 * float(same.std()) / math.sqrt(len(same))
    assert fs.metrics.frechet_distance_features(torch.randn(40, 6, generator=g), torch.randn(2000, 6, generator=g)) > 0.3


def test_kernel_distance_of_images_uses_the_feature_network_and_refuses_bad_input():
    from flowsolve.metrics import kernel_distance, kernel_distance_features

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(30, 1, 8, 8, generator=g) * 2 - 1, torch.rand(40, 1, 8, 8, generator=g) - 0.5
    with torch.no_grad():
        want = kernel_distance_features(net(x), net(y))
    assert kernel_distance(x, y, net, batch_size=7) == pytest.approx(want, rel=1e-6)
    with pytest.raises(fs.errors.ArgumentError, match="x: expected images"):
        kernel_distance(x[:, 0], y, net)
    with pytest.raises(fs.errors.ArgumentError, match="features: expected a feature network"):
        kernel_distance(x, y, "inception")
