"""What a new user meets first: shipped models by name from anywhere, the training log and its plot,
the per-solver default grids, and that `import flowsolve` stays light."""
import json
import subprocess
import sys

import pytest
import torch

import flowsolve as fs
from flowsolve.cli import main
from flowsolve.models.io import SHIPPED, resolve_shipped, shipped_models


def test_shipped_models_are_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # no pretrained/ here: only the package's own copy
    names = shipped_models()
    assert {"digits-edm", "digits-features", "digits-scoregan"} <= set(names)
    m = fs.from_pretrained("digits-edm")
    assert isinstance(m, fs.models.Denoiser) and m.data_shape == (1, 8, 8)
    assert resolve_shipped("pretrained/digits-features") == SHIPPED / "digits-features"
    assert str(resolve_shipped("no-such-model")) == "no-such-model"
    assert main(["sample", "--model", "digits-edm", "--solver", "euler", "--nfe", "4", "--n", "4",
                 "--out", str(tmp_path / "x.png"), "--quiet"]) == 0


def test_training_log_is_one_run_across_resume_and_plots(tmp_path):
    """log.jsonl after an interrupted-and-resumed run equals the uninterrupted run's (the lines past
    the checkpoint are dropped on resume), and `flowsolve plot` draws it."""
    cfg = {"log_every": 10, "checkpoint_every": 20, "width": 32, "depth": 2, "batch_size": 64}
    fs.train.edm("gmm2d", steps=60, out=tmp_path / "one", progress=False, config=cfg)
    fs.train.edm("gmm2d", steps=40, out=tmp_path / "two", progress=False, config=cfg)
    log = tmp_path / "two" / "log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines + [json.dumps({"step": 50, "loss": 1e9, "last_loss": 1e9})]) + "\n")  # a crash
    fs.train.edm("gmm2d", steps=60, out=tmp_path / "two", progress=False, config=cfg, resume=True)
    strip = [{k: v for k, v in json.loads(ln).items() if k != "seconds"}
             for ln in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    again = [{k: v for k, v in json.loads(ln).items() if k != "seconds"}
             for ln in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [10, 20, 30, 40, 50, 60]
    assert again == strip
    assert main(["plot", str(tmp_path / "two")]) == 0
    assert (tmp_path / "two" / "curves.png").stat().st_size > 1000


def test_training_logs_to_tensorboard_and_draws_samples_as_it_goes(tmp_path):
    """`log_with="tensorboard"` writes the log's losses as TensorBoard scalars under their steps
    (read back with TensorBoard's own reader, equal to log.jsonl); `sample_every` draws a 2-D scatter
    (mixture) or an image grid (digits, from the CLI) every N steps and at the end."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = {"log_every": 10, "checkpoint_every": 20, "width": 32, "depth": 2, "batch_size": 64}
    fs.train.edm("gmm2d", steps=30, out=tmp_path / "run", progress=False, config=cfg, log_with="tensorboard",
                 sample_every=15)
    events = list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    scalars = {(e.step, round(e.value, 5)) for e in acc.Scalars("loss")}
    logged = {(r["step"], round(r["loss"], 5)) for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text()
                                                             .splitlines()) if "loss" in r}
    assert scalars == logged and len(logged) == 3
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["step_000015.png", "step_000030.png"]
    assert main(["train", "edm", "--data", "digits", "--out", str(tmp_path / "dig"), "--steps", "2", "--sample-every",
                 "2", "--quiet", "--config", str(_small_unet(tmp_path))]) == 0
    assert (tmp_path / "dig" / "samples" / "step_000002.png").stat().st_size > 500
    with pytest.raises(ValueError, match="log_with.*output folder"):
        fs.train.edm("gmm2d", steps=2, progress=False, config=cfg, log_with="tensorboard")
    with pytest.raises(ValueError, match="sample_every"):
        fs.train.edm("gmm2d", steps=2, progress=False, config=cfg, sample_every=0)


def _small_unet(tmp_path):
    f = tmp_path / "small.json"
    f.write_text(json.dumps({"batch_size": 16}))
    return f


def test_plot_refuses_a_folder_without_a_log(tmp_path):
    assert main(["plot", str(tmp_path)]) != 0


def test_solvers_with_a_measured_default_grid_use_it_on_karras_fields(gmm):
    field = fs.fields.EDM(gmm.denoiser)
    z = torch.randn(20, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    chosen = [n for n in fs.solvers.available() if fs.solvers.get(n).default_grid]
    assert {"unipc", "dpmpp_3m"} <= set(chosen)
    for name in chosen:
        spec = fs.solvers.get(name)
        steps = spec.steps_for(8, True)
        want = field.grid(steps, spec.default_grid)
        _, info = fs.sample(field, name, nfe=8, x_init=z * float(want[0]), return_info=True, seed=0)
        assert torch.allclose(info.grid, want), name


def test_import_is_light():
    """`import flowsolve` does not import diffusers, torchvision or the trainers (they load on use)."""
    code = ("import sys, flowsolve; bad = [m for m in ('diffusers', 'flowsolve.train', 'flowsolve.models', 'torchdiffeq', 'torchsde', 'scipy') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


@pytest.mark.parametrize("name", ["unipc", "dpmpp_3m"])
def test_measured_default_grid_beats_karras_on_the_mixture(gmm, name):
    """The reason for the default: at NFE 6 on the exact mixture, the solver's default grid lands
    closer to a converged solve than Karras ρ = 7 from the same start."""
    field = fs.fields.EDM(gmm.denoiser)
    z = torch.randn(400, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 80
    ref = fs.sample(field, "heun", grid=fs.grids.karras(256, 0.002, 80.0), x_init=z)
    err = {g: float((fs.sample(field, name, nfe=6, grid=g, x_init=z) - ref).norm(dim=1).mean())
           for g in (None, "karras")}
    assert err[None] < err["karras"], err
