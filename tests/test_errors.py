"""Bad input gets a clear error naming the argument, what was expected and what came."""
import pytest
import torch

import flowsolve as fs


@pytest.fixture(scope="module")
def field(gmm):
    return fs.fields.EDM(gmm.denoiser)


def test_unknown_solver_lists_valid_names(field):
    with pytest.raises(ValueError, match="did you mean 'heun'") as e:
        fs.sample(field, "hune", nfe=8, n=2)
    for name in ("euler", "heun", "edm", "sde", "torchdiffeq:rk4", "torchsde:euler"):
        assert name in str(e.value)


@pytest.mark.parametrize("nfe,exc,match", [(0, ValueError, "nfe: expected an integer >= 1, got 0"), (2.5, TypeError, "nfe: expected an integer"),
                                           (8.0, TypeError, "nfe: expected an integer"), (True, TypeError, "nfe"),
                                           ("8", TypeError, "nfe")])
def test_bad_nfe(field, nfe, exc, match):
    with pytest.raises(exc, match=match):
        fs.sample(field, "heun", nfe=nfe, n=2)


def test_nfe_below_solver_minimum(field):
    with pytest.raises(ValueError, match="torchdiffeq:rk4.*at least 4.*nfe=3"):
        fs.sample(field, "torchdiffeq:rk4", nfe=3, n=2)


def test_grid_too_small_for_budget(field):
    with pytest.raises(ValueError, match="nfe: the grid of 10 steps needs 19"):
        fs.sample(field, "heun", grid=field.grid(10), nfe=8, n=2)


@pytest.mark.parametrize("grid,match", [
    ([80.0, 10.0, 20.0, 0.0], "strictly monotone.*grid\\[1\\]=10"),
    ([80.0], "at least 2 times"),
    ([[80.0, 0.0]], "1-D"),
    ([80.0, float("nan"), 0.0], "finite"),
    ([0.0, 80.0], "from t_start=80"),
])
def test_bad_grids(field, grid, match):
    with pytest.raises(ValueError, match=match):
        fs.sample(field, "euler", grid=torch.tensor(grid), n=2)


def test_unknown_grid_kind(field):
    with pytest.raises(ValueError, match="unknown spacing 'karas'"):
        fs.sample(field, "euler", grid="karas", nfe=8, n=2)


def test_x_init_not_finite(field):
    z = torch.zeros(4, 2)
    z[2, 1] = float("nan")
    with pytest.raises(ValueError, match="x_init: expected finite values, but row 2"):
        fs.sample(field, "euler", nfe=4, x_init=z)


def test_x_init_disagrees_with_n_or_shape(field):
    with pytest.raises(ValueError, match="n: x_init holds 4 particles but n=5"):
        fs.sample(field, "euler", nfe=4, x_init=torch.zeros(4, 2), n=5)
    with pytest.raises(ValueError, match="shape: x_init has data shape \\(2,\\) but shape=\\(3,\\)"):
        fs.sample(field, "euler", nfe=4, x_init=torch.zeros(4, 2), shape=(3,))
    with pytest.raises(ValueError, match="x_init: expected shape \\(n, \\*data_shape\\)"):
        fs.sample(field, "euler", nfe=4, x_init=torch.zeros(4))
    with pytest.raises(TypeError, match="x_init: expected a floating-point"):
        fs.sample(field, "euler", nfe=4, x_init=torch.zeros(4, 2, dtype=torch.long))


def test_missing_n_or_shape(gmm):
    with pytest.raises(ValueError, match="n: expected the number of particles"):
        fs.sample(fs.fields.EDM(gmm.denoiser), "euler", nfe=4)
    with pytest.raises(ValueError, match="shape: EDM does not know its data shape; say it once"):
        fs.sample(fs.fields.EDM(lambda x, s: x), "euler", nfe=4, n=3)
    with pytest.raises(ValueError, match="n: expected an integer >= 1, got 0"):
        fs.sample(fs.fields.EDM(gmm.denoiser), "euler", nfe=4, n=0)


def test_non_finite_field_output_names_step_and_time():
    def den(x, s):
        return torch.where(s[:, None] < 5, torch.full_like(x, float("nan")), x * 0.9)
    field = fs.fields.EDM(den, shape=(2,))
    g = torch.tensor([80.0, 20.0, 10.0, 4.0, 1.0, 0.0])
    with pytest.raises(fs.solvers.NonFiniteError, match="step 3 \\(t=4\\)"):
        fs.sample(field, "euler", grid=g, n=3, seed=0)


def test_unknown_solver_option_rejected(field):
    with pytest.raises(TypeError, match="unknown option 'alpa'.*did you mean 'alpha'"):
        fs.sample(field, "sde", nfe=8, n=2, alpa=0.5)
    with pytest.raises(TypeError, match="solver 'heun' got an unknown option 'S_churn'"):
        fs.sample(field, "heun", nfe=8, n=2, S_churn=1.0)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "half"])
def test_bad_alpha(field, alpha):
    with pytest.raises(ValueError, match="alpha: expected a number in \\[0, 1\\]"):
        fs.sample(field, "sde", nfe=8, n=2, alpha=alpha)


def test_sigma_solvers_need_sigma_fields():
    f = fs.fields.Function(lambda x, t: -x, 0.0, 1.0, shape=(2,))
    with pytest.raises(ValueError, match="dpmpp_2m.*noise level"):
        fs.sample(f, "dpmpp_2m", nfe=8, n=2)
    with pytest.raises(TypeError, match="no stochastic form"):
        fs.sample(f, "sde", nfe=8, n=2)


def test_not_a_field():
    with pytest.raises(TypeError, match="field: expected a flowsolve.fields.Field"):
        fs.sample(lambda x, t: x, "euler", nfe=4, n=2)


def test_bad_field_construction(gmm):
    with pytest.raises(ValueError, match="sigma_min, sigma_max"):
        fs.fields.EDM(gmm.denoiser, sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(TypeError, match="data: expected a callable"):
        fs.fields.EDM(3.0)
    with pytest.raises(ValueError, match="prediction"):
        fs.fields.EDM(gmm.denoiser, prediction="eps")


def test_bad_edm_churn_options(field):
    with pytest.raises(ValueError, match="S_churn"):
        fs.sample(field, "edm", nfe=8, n=2, S_churn=-1.0)


def test_bad_seed_and_batch(field):
    with pytest.raises(ValueError, match="seed"):
        fs.sample(field, "euler", nfe=4, n=2, seed=-1)
    with pytest.raises(ValueError, match="batch_size"):
        fs.sample(field, "euler", nfe=4, n=2, batch_size=0)
