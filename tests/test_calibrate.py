"""Grid calibration (issue 15, first part): a grid fitted to a converged solve of the field itself
lowers the endpoint error at low NFE on fresh starting points the calibration never saw; grids are
stored with the model and picked by grid="calibrated"."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import flowsolve as fs
from flowsolve.calibrate import endpoint_error, reference_solve
from flowsolve.cli import main
from flowsolve.sample import initial_noise

GMM = fs.data.GaussianMixture.paper()
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("solver", ["euler", "ipndm", "dpmpp_2m"])
def test_calibrated_grid_generalises_to_fresh_seeds(solver):
    field = fs.fields.EDM(GMM.denoiser)
    r = fs.grids.calibrate(field, solver, 5, n=256, seed=0, seconds=20, max_trials=400, return_result=True)
    g = r.grid
    assert g.dtype == torch.float64 and g.dim() == 1 and float(g[0]) == pytest.approx(80.0) and float(g[-1]) == 0.0
    assert (g[1:] < g[:-1]).all()
    z = initial_noise(field, 123, 0, 1000, (2,), t_start=80.0)               # seeds the fit never saw
    ref = reference_solve(field, z)
    default = endpoint_error(fs.sample(field, solver, nfe=5, x_init=z), ref)
    calibrated, info = fs.sample(field, solver, nfe=5, grid=g, x_init=z, return_info=True)
    assert info.nfe <= 5
    assert endpoint_error(calibrated, ref) < 0.6 * default, (solver, default, endpoint_error(calibrated, ref))


def test_calibration_works_on_any_field_in_its_own_time():
    flow = fs.fields.FlowMatching(lambda x, t: x - GMM.denoiser(x / (1 - t.clamp(max=1 - 1e-6)).unsqueeze(1) *
                                                               torch.ones_like(x), t / (1 - t.clamp(max=1 - 1e-6)))
                                  / t.clamp(min=1e-6).unsqueeze(1), shape=(2,))
    g = fs.grids.calibrate(flow, "euler", 4, n=64, seconds=3)
    assert float(g[0]) == 1.0 and float(g[-1]) == 0.0 and (g[1:] < g[:-1]).all()


def test_calibrated_grids_are_stored_with_the_model(tmp_path, capsys):
    folder = tmp_path / "gmm2d-edm"
    shutil.copytree(ROOT / "pretrained" / "gmm2d-edm", folder)
    assert main(["calibrate", "--model", str(folder), "--solver", "ipndm", "--nfe", "4,5", "--seconds", "3",
                 "--n", "64"]) == 0
    assert "on fresh points" in capsys.readouterr().out
    stored = json.loads((folder / "calibration.json").read_text())
    assert sorted(stored) == ["ipndm:4", "ipndm:5"]
    m = fs.from_pretrained(folder)
    x, info = fs.sample(m.field(), "ipndm", nfe=5, grid="calibrated", n=8, seed=1, return_info=True)
    entry = stored["ipndm:5"]
    assert torch.equal(info.grid, torch.tensor(entry["grid"] if isinstance(entry, dict) else entry,
                                               dtype=torch.float64))
    with pytest.raises(ValueError, match="no calibrated grid for solver 'heun'.*ipndm:4, ipndm:5"):
        fs.sample(m.field(), "heun", nfe=5, grid="calibrated", n=2)
    assert main(["sample", "--model", str(folder), "--solver", "ipndm", "--nfe", "4", "--grid", "calibrated",
                 "--n", "5", "--out", str(tmp_path / "x.npy"), "--quiet"]) == 0
    # --grid-only: the whole budget to the grid, stored as a plain list of times
    assert main(["calibrate", "--model", str(folder), "--solver", "ipndm", "--nfe", "6", "--seconds", "2",
                 "--n", "32", "--grid-only"]) == 0
    assert isinstance(json.loads((folder / "calibration.json").read_text())["ipndm:6"], list)


def test_calibration_refuses_what_it_cannot_fit():
    field = fs.fields.EDM(GMM.denoiser)
    with pytest.raises(ValueError, match="stochastic"):
        fs.grids.calibrate(field, "sde", 5)
    with pytest.raises(ValueError, match="seconds"):
        fs.grids.calibrate(field, "euler", 5, seconds=0)


def test_solver_coefficients_mix_the_field_outputs_in_order():
    """A grid carrying `coefficients` (lower-triangular rows W) hands the solver Σ_{j≤k} W_kj f_j as
    its k-th evaluation: Euler with coefficients, by hand; identity rows change nothing; malformed
    rows are refused naming the row."""
    field = fs.fields.EDM(GMM.denoiser)
    g = fs.grids.karras(3, 0.002, 80.0).double()
    g.coefficients = [[0.9], [0.2, 1.1], [-0.1, 0.3, 1.05]]
    z = torch.randn(20, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    x, raw = z.clone(), []
    for k in range(3):
        raw.append(field(x, g[k].to(x.dtype)))
        v = sum(w * f for w, f in zip(g.coefficients[k], raw))
        x = x + (g[k + 1] - g[k]) * v
    assert torch.allclose(fs.sample(field, "euler", grid=g, x_init=z), x, atol=1e-10)
    identity = g.clone()
    identity.coefficients = [[1.0], [0.0, 1.0], [0.0, 0.0, 1.0]]
    assert torch.equal(fs.sample(field, "euler", grid=identity, x_init=z),
                       fs.sample(field, "euler", grid=g.clone(), x_init=z))
    for rows, match in (([[1.0], [1.0]], "row 1 must hold 2"), ([[1.0], [0.0, float("nan")]], "row 1"),
                        ("abc", "rows of numbers")):
        bad = g.clone()
        bad.coefficients = rows
        with pytest.raises(ValueError, match=match):
            fs.sample(field, "euler", grid=bad, x_init=z)


def test_learned_coefficients_pay_on_fresh_seeds_and_are_stored(tmp_path):
    """Calibration fits the solver coefficients by gradient after the grid and keeps them only if they
    win on fresh points; on the mixture they lower the fresh-seed error below the grid alone, and the
    stored entry samples exactly as the returned grid."""
    from flowsolve.models.io import read_calibration, save_calibration
    field = fs.fields.EDM(GMM.denoiser)
    kw = dict(n=256, seed=0, seconds=8, max_trials=300)
    g = fs.grids.calibrate(field, "ipndm", 5, **kw)
    alone = fs.grids.calibrate(field, "ipndm", 5, coefficients=False, **kw)
    assert getattr(alone, "coefficients", None) is None
    rows = g.coefficients
    assert [len(r) for r in rows] == [1, 2, 3, 4, 5]
    assert rows != [[float(j == k) for j in range(k + 1)] for k in range(5)]  # not the identity
    z = initial_noise(field, 321, 0, 1000, (2,), t_start=80.0)              # seeds the fit never saw
    ref = reference_solve(field, z)
    default = endpoint_error(fs.sample(field, "ipndm", nfe=5, x_init=z), ref)
    e_alone = endpoint_error(fs.sample(field, "ipndm", nfe=5, grid=alone, x_init=z), ref)
    e_mixed = endpoint_error(fs.sample(field, "ipndm", nfe=5, grid=g, x_init=z), ref)
    assert e_mixed < e_alone < 0.6 * default, (default, e_alone, e_mixed)
    save_calibration(tmp_path, "ipndm", 5, g)
    field.calibrated = read_calibration(tmp_path)
    assert torch.equal(fs.sample(field, "ipndm", nfe=5, grid="calibrated", x_init=z),
                       fs.sample(field, "ipndm", nfe=5, grid=g, x_init=z))


def test_coefficients_are_skipped_on_a_field_without_gradients():
    """A field whose outputs carry no gradient (a black box) is still calibrated: grid only."""
    black_box = fs.fields.EDM(lambda x, s: GMM.denoiser(x.detach(), s).detach(), shape=(2,))
    g = fs.grids.calibrate(black_box, "ipndm", 5, n=64, seconds=2, max_trials=50)
    assert getattr(g, "coefficients", None) is None and float(g[-1]) == 0.0
