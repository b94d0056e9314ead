"""The house along the paper's seam (issue 12): layers without back-edges, Int-PM by composition
(every generator trainer asks its field for ∇h), one model protocol, one base exception, renames
with their deprecation path, and the same per-sample noise in `compare` as in `sample`."""
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

import flowsolve as fs
from flowsolve.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _code_shape():
    spec = importlib.util.spec_from_file_location("code_shape", ROOT / "benchmarks" / "code_shape.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- layers ---------------------------------------------------------------------------------------
def test_import_graph_has_no_back_edges_and_no_cycles():
    shape = _code_shape()
    root = ROOT / "flowsolve"
    graph = shape.unit_graph(root)
    assert ("fields", "grids") in graph and ("train", "models") in graph     # the graph is really read
    assert shape.back_edges(root) == []
    assert shape.cycles(root) == []


def test_the_graph_reader_sees_function_level_back_edges(tmp_path):
    """The check itself can fail: an import hidden inside a function is still an edge."""
    shape = _code_shape()
    pkg = tmp_path / "flowsolve"
    (pkg / "fields").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "fields" / "__init__.py").write_text("def f():\n    from ..train import loop\n")
    (pkg / "train").mkdir()
    (pkg / "train" / "__init__.py").write_text("from ..fields import f\n")
    assert [(a, b) for a, b, _ in shape.back_edges(pkg)] == [("fields", "train")]
    assert shape.cycles(pkg) == [["fields", "train"]]


# -- Int-PM by composition -----------------------------------------------------------------------
def test_every_field_answers_grad_h_with_one_signature(gmm):
    x = gmm.sample(16, torch.Generator().manual_seed(0))
    sigma = torch.full((16,), 0.7)
    other = fs.data.GaussianMixture.random(2, 3, 0.6, scale=3.0, seed=1)
    sd = fs.fields.ScoreDifference(gmm.denoiser, other.denoiser, mu_data=2.0, mu_rho=1.0)
    # Eq. 19/26: μ_data ∇log p_σ − μ_ρ ∇log ρ_σ, against the exact mixture scores
    want = 2.0 * gmm.score(x, 0.7) - other.score(x, 0.7)
    assert torch.allclose(sd.grad_h(x, sigma), want, atol=1e-4)
    # the PM velocity of a σ-time field is −σ ∇h
    assert torch.allclose(sd(x, sigma), -0.7 * want, atol=1e-4)
    lang = fs.fields.Langevin(gmm.denoiser, 0.7, rho=other.denoiser)
    assert torch.allclose(lang.grad_h(x, 0.3), gmm.score(x, 0.7) - other.score(x, 0.7), atol=1e-4)

    # MMD: ∇h(x) = ∇_x [E_data k(x, y) − E_ρ k(x, x')], checked by autograd of h itself
    data, rho = torch.randn(20, 2), torch.randn(12, 2)
    bw = (0.5, 2.0)
    field = fs.fields.MMDFlow(data, bw, rho=rho)

    def h(z):
        def k(a, b):
            d2 = (a[:, None] - b[None]).square().sum(-1)
            return sum(torch.exp(-d2 / (2 * s * s)) for s in bw)
        return k(z, data).mean(1) - k(z, rho).mean(1)
    xg = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(h(xg).sum(), xg)
    assert torch.allclose(field.grad_h(x, None), auto, atol=1e-5)
    assert not field.interacting and fs.fields.MMDFlow(data).interacting

    # discriminator field: ∇h = −∇(c∘f) for a time-free discriminator (a GAN's), by autograd
    disc = fs.models.Discriminator(2, 16, 2, time_conditioned=False)
    df = fs.fields.DiscriminatorFlow(disc, eta=3.0, loss="vanilla", time_conditioned=False)
    xg = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(torch.nn.functional.softplus(-disc(xg)).sum(), xg)
    assert torch.allclose(df.grad_h(x, None), -auto, atol=1e-6)
    assert torch.allclose(df(x, 0.5), -3.0 * auto, atol=1e-5)
    with pytest.raises(TypeError, match="has no ∇h"):
        fs.fields.Function(lambda x, t: x, shape=(2,)).grad_h(x, 0.0)


@pytest.mark.parametrize("trainer, field_cls", [("gan", "DiscriminatorFlow"), ("mmd_generator", "MMDFlow"),
                                                ("score_gan", "ScoreDifference")])
def test_generator_trainers_ask_their_field_for_the_direction(monkeypatch, gmm, trainer, field_cls):
    cls = getattr(fs.fields, field_cls)
    calls = []
    original = cls.grad_h

    def spy(self, x, t):
        calls.append(len(x))
        return original(self, x, t)
    monkeypatch.setattr(cls, "grad_h", spy)
    small = dict(width=16, depth=2, latent=4, batch_size=32, progress=False, steps=2)
    if trainer == "score_gan":
        gen = fs.train.score_gan(gmm.denoiser, (2,), score_width=16, score_depth=2, K=1, **small)
        assert isinstance(gen.score_field, fs.fields.ScoreDifference)          # the same field, for fs.sample
    else:
        gen = getattr(fs.train, trainer)("gmm2d", **small)
    assert calls == [32, 32]                      # one generator step each, the whole batch
    assert isinstance(gen, fs.models.GeneratorModel) and gen.sample(5, seed=0).shape == (5, 2)


# -- one model protocol --------------------------------------------------------------------------
def test_every_shipped_folder_loads_to_its_type():
    want = {"digits-edm": fs.models.ParticleModel, "gmm2d-edm": fs.models.ParticleModel,
            "digits-ddpm": fs.models.ParticleModel, "digits-scoregan": fs.models.GeneratorModel,
            "digits-cond-edm": fs.models.ParticleModel, "digits-flow": fs.models.ParticleModel,
            "digits-cond-scoregan": fs.models.GeneratorModel, "digits-df": fs.models.ParticleModel,
            "digits-scoregan-4step": fs.models.GeneratorModel}
    for folder in sorted((ROOT / "pretrained").iterdir()):
        meta = json.loads((folder / "flowsolve.json").read_text())      # every folder writes flowsolve.json
        assert meta["type"] in fs.models.MODEL_TYPES
        model = fs.from_pretrained(folder)
        assert model.metadata["type"] == meta["type"]
        if folder.name in want:
            assert isinstance(model, want[folder.name]), folder.name
        else:                                       # the feature network generates nothing
            assert not isinstance(model, (fs.models.ParticleModel, fs.models.GeneratorModel))
    f = fs.from_pretrained(ROOT / "pretrained" / "digits-ddpm").field()
    assert isinstance(f, fs.fields.EDM) and f.data_shape == (1, 8, 8)


def test_folder_metadata_is_checked_against_its_schema(tmp_path):
    src = ROOT / "pretrained" / "gmm2d-edm"
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    meta = json.loads((src / "flowsolve.json").read_text())
    for broken, words in ((dict(meta, type="denoisr"), "'denoiser'"),
                          ({k: v for k, v in meta.items() if k != "preconditioning"}, "preconditioning"),
                          (dict(meta, preconditioning=[1, 2]), "expected dict"),
                          (dict(meta, preconditioning={"kind": "edm"}), "sigma_data")):
        (tmp_path / "flowsolve.json").write_text(json.dumps(broken))
        with pytest.raises(fs.FlowsolveError, match=words) as e:
            fs.from_pretrained(tmp_path)
        assert "flowsolve.json" in str(e.value)


# -- errors --------------------------------------------------------------------------------------
def test_library_errors_share_one_base_and_keep_their_builtin():
    with pytest.raises(fs.FlowsolveError):
        fs.sample(fs.fields.EDM(lambda x, s: x), "euler", nfe=4, n=3)
    with pytest.raises(ValueError):
        fs.grids.karras(0)
    assert issubclass(fs.errors.ArgumentTypeError, TypeError)
    assert issubclass(fs.solvers.NonFiniteError, fs.FlowsolveError)
    assert issubclass(fs.train.CheckpointError, fs.FlowsolveError)


def test_cli_prints_user_errors_in_one_line_and_lets_bugs_raise(monkeypatch, capsys, tmp_path):
    assert main(["sample", "--model", "gmm2d", "--solver", "heun", "--nfe", "0", "--n", "4",
                 "--out", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nfe" in err[0]
    import flowsolve.cli as cli

    def bug(_args):
        return 1 // 0
    monkeypatch.setattr(cli, "cmd_solvers", bug)
    with pytest.raises(ZeroDivisionError):
        main(["solvers"])


# -- renames -------------------------------------------------------------------------------------
def test_old_spellings_warn_and_still_work(gmm):
    new = fs.fields.EDM(gmm.denoiser, rho_grid=5.0, prediction="denoiser")
    with pytest.warns(DeprecationWarning, match="rho_grid"):
        old = fs.fields.EDM(gmm.denoiser, rho=5.0)
    assert torch.equal(old.grid(8), new.grid(8))
    with pytest.warns(DeprecationWarning, match="prediction"):
        assert fs.fields.EDM(gmm.score, kind="score").prediction == "score"
    with pytest.warns(DeprecationWarning, match="rho_grid"):
        assert torch.equal(fs.grids.karras(6, rho=5.0), fs.grids.karras(6, rho_grid=5.0))
    with pytest.warns(DeprecationWarning, match="'N'"):
        assert fs.fields.DiscriminatorFlow(lambda x, t: x.sum(1), steps=12).N == 12
    with pytest.warns(DeprecationWarning, match="'nfe'"):
        assert fs.fields.MMDFlow(torch.randn(5, 2), steps=7).default_nfe == 7
    with pytest.warns(DeprecationWarning, match="compute_dtype"):
        cfg = fs.train.loop.merge_config(fs.train.DFConfig, {}, {"sim_dtype": "bfloat16"}, {})
    assert cfg.compute_dtype == "bfloat16"
    with pytest.warns(DeprecationWarning, match="rho_grid"):
        assert fs.train.loop.merge_config(fs.train.ScoreGANConfig, {}, None, {"rho": 5.0}).rho_grid == 5.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fs.fields.EDM(gmm.denoiser, rho_grid=7.0)        # the new names never warn


def test_a_plain_callable_says_its_shape_explicitly(gmm):
    fn = lambda x, s: gmm.denoiser(x, s)  # noqa: E731 - a closure over the mixture: nothing is searched for
    assert fs.fields.EDM(fn).data_shape is None
    with pytest.raises(ValueError, match=r"shape=\(2,\)"):
        fs.sample(fs.fields.EDM(fn), "euler", nfe=4, n=2)
    assert fs.sample(fs.fields.EDM(fn, shape=(2,)), "euler", nfe=4, n=2, seed=0).shape == (2, 2)
    with pytest.raises(ValueError, match="shape"):
        fs.fields.EDM(fn, shape=(2, 0))


# -- one noise for sample and compare ------------------------------------------------------------
def test_compare_starts_from_the_noise_of_sample(monkeypatch, gmm):
    import flowsolve.comparison as comparison

    field = fs.fields.EDM(gmm.denoiser)
    seen = []
    real = comparison.sample

    def spy(*args, **kw):
        seen.append((kw["x_init"].clone(), kw["seed"]))
        return real(*args, **kw)
    monkeypatch.setattr(comparison, "sample", spy)
    fs.compare(field, ["euler"], [6], "energy", n=40, seeds=2, reference=gmm)
    for x0, seed in seen:
        direct = fs.sample(field, "euler", nfe=6, n=40, seed=seed)
        via = fs.sample(field, "euler", nfe=6, x_init=x0, seed=seed)
        assert torch.equal(direct, via)
    assert [s for _, s in seen] == [0, 1]
