"""Nothing silent (issue 17): the project's own table of misuses, API and CLI, each with the error type
and the word it must name, checked before any long work; property tests over grids, shapes and
sizes; resume that is the same run or an error; kills at random points that lose nothing."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flowsolve as fs
from flowsolve.cli import main

ROOT = Path(__file__).resolve().parents[1]
GMM = fs.data.GaussianMixture.paper()
EDM = fs.fields.EDM(GMM.denoiser)
DIGITS = ROOT / "pretrained" / "digits-edm"
DF = fs.fields.DiscriminatorFlow(lambda x, t: x.sum(1), shape=(2,))

# (id, call, expected type, word the message must contain)
API = [
    ("denoiser-shape", lambda: fs.sample(fs.fields.EDM(lambda x, s: x[:, :1], shape=(2,)), "heun", nfe=8, n=3),
     ValueError, "shape"),
    ("denoiser-dtype", lambda: fs.sample(fs.fields.EDM(lambda x, s: x.double(), shape=(2,)), "heun", nfe=8, n=3),
     TypeError, "dtype"),
    ("velocity-shape", lambda: fs.sample(fs.fields.Function(lambda x, t: x.sum(1), shape=(2,)), "euler", nfe=3, n=2),
     ValueError, "shape"),
    ("grid-above-trained-sigma", lambda: fs.sample(fs.from_pretrained(DIGITS).field(), "euler",
                                                   grid=torch.tensor([200.0, 1.0, 0.0]), n=2), ValueError, "grid"),
    ("grid-negative-sigma", lambda: fs.sample(EDM, "euler", grid=torch.tensor([2.0, 1.0, -0.5]), n=2), ValueError,
     "grid"),
    ("grid-past-t1", lambda: fs.sample(DF, "euler", grid=torch.tensor([0.0, 0.5, 1.5]), n=2), ValueError, "grid"),
    ("seed-too-large", lambda: fs.sample(EDM, "euler", nfe=2, n=2, seed=2 ** 64), ValueError, "seed"),
    ("generator-seed", lambda: fs.models.Generator((2,), latent=4, width=4, depth=1).sample(2, seed=-3), ValueError,
     "seed"),
    ("nfe-huge", lambda: fs.sample(EDM, "euler", nfe=10 ** 12, n=2), ValueError, "nfe"),
    ("n-beyond-memory", lambda: fs.sample(EDM, "euler", nfe=2, n=10 ** 13), ValueError, "n"),
    ("config-type", lambda: fs.train.edm("gmm2d", config={"lr": "fast"}, progress=False), ValueError, "lr"),
    ("config-tuple", lambda: fs.train.edm("gmm2d", config={"betas": [0.9]}, progress=False), ValueError, "betas"),
    ("local-path-typo", lambda: fs.from_pretrained(str(ROOT / "pretrained" / "digits-edn")), FileNotFoundError,
     "digits-edm"),
    ("relative-typo", lambda: fs.from_pretrained("pretrained/digits-edn"), FileNotFoundError, "local path"),
    ("shape-zero", lambda: fs.fields.EDM(GMM.denoiser, shape=(2, 0)), ValueError, "shape"),
    ("animate-every", lambda: fs.viz.animate(EDM, "/tmp/flowsolve-x.gif", nfe=4, n=4, every=0), ValueError, "every"),
    ("animate-suffix", lambda: fs.viz.animate(EDM, "/tmp/flowsolve-x.mp4", nfe=4, n=4), ValueError, "path"),
]


@pytest.mark.parametrize("call,exc,word", [pytest.param(c, e, w, id=i) for i, c, e, w in API])
def test_api_misuse_is_a_clear_error(call, exc, word):
    with pytest.raises(exc) as info:
        call()
    assert isinstance(info.value, fs.FlowsolveError), type(info.value)
    assert word in str(info.value), f"the error does not name {word!r}: {info.value}"


def test_hub_disabled_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="disabled"):
        fs.from_pretrained("nobody/no-such-model")
    with pytest.raises(FileNotFoundError, match="disabled"):
        fs.models.from_diffusers("nobody/no-such-model")


# CLI: (id, argv with {tmp}, word); every case exits 2 with one line naming the word, before any sampling
CLI = [
    ("out-suffix", ["sample", "--model", "gmm2d", "--n", "4", "--out", "{tmp}/x.txt"], ".npy"),
    ("out-unwritable", ["sample", "--model", "gmm2d", "--n", "4", "--out", "/proc/no/x.npy"], "--out"),
    ("out-is-folder", ["sample", "--model", "gmm2d", "--n", "4", "--out", "{tmp}"], "--out"),
    ("n-zero", ["sample", "--model", "gmm2d", "--n", "0", "--out", "{tmp}/x.npy"], "--n"),
    ("png-too-big", ["sample", "--model", "gmm2d", "--n", "100000000000", "--out", "{tmp}/x.png"], ".npy"),
    ("npy-beyond-disk", ["sample", "--model", "gmm2d", "--n", "100000000000000", "--out", "{tmp}/x.npy"], "GiB"),
    ("animate-every", ["animate", "--model", "gmm2d", "--every", "0", "--out", "{tmp}/a.gif"], "--every"),
    ("animate-suffix", ["animate", "--model", "gmm2d", "--out", "{tmp}/a.mp4"], "--out"),
    ("eval-json", ["eval", "--model", "gmm2d", "--json", "{tmp}/r.txt"], "--json"),
    ("model-typo", ["sample", "--model", "pretrained/digits-edn", "--out", "{tmp}/x.npy"], "digits-edm"),
    ("device-absent", ["sample", "--model", "digits-edm", "--device", "cuda:99", "--out", "{tmp}/x.npy"], "--device"),
    ("device-name", ["sample", "--device", "gpu", "--out", "{tmp}/x.npy"], "--device"),
    ("dtype-name", ["sample", "--dtype", "int8", "--out", "{tmp}/x.npy"], "--dtype"),
    ("eval-device", ["eval", "--model", "digits-edm", "--device", "cuda:99"], "--device"),
    ("compare-device", ["compare", "--model", "digits-edm", "--device", "tpu", "--out", "{tmp}/c.csv"], "--device"),
    ("allow-changes-alone", ["train", "edm", "--data", "gmm2d", "--out", "{tmp}/r", "--allow-changes"], "--resume"),
    ("config-type", ["train", "edm", "--data", "gmm2d", "--out", "{tmp}/r", "--config", "{tmp}/bad.json"], "lr"),
    ("train-out-file", ["train", "edm", "--data", "gmm2d", "--out", "{tmp}/bad.json"], "--out"),
]


@pytest.mark.parametrize("argv,word", [pytest.param(a, w, id=i) for i, a, w in CLI])
def test_cli_misuse_is_one_line_before_work(argv, word, tmp_path, capsys, monkeypatch):
    import flowsolve.cli as cli

    def no_work(*a, **k):
        raise AssertionError("sampling started before the input was checked")
    monkeypatch.setattr(cli, "sample", no_work)
    monkeypatch.chdir(ROOT)
    (tmp_path / "bad.json").write_text('{"lr": "fast"}')
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0] and "Traceback" not in err[0], err


def test_cli_streams_large_outputs_to_npy(tmp_path, monkeypatch, capsys):
    """Above the in-memory limit the CLI writes chunk by chunk; the file equals the one-piece sample."""
    import flowsolve.cli as cli
    monkeypatch.setattr(cli, "STREAM_BYTES", 1000)       # force several chunks on a small run
    out = tmp_path / "x.npy"
    assert main(["sample", "--model", "gmm2d", "--solver", "heun", "--nfe", "8", "--n", "301", "--seed", "3",
                 "--out", str(out), "--quiet"]) == 0
    assert "streamed in chunks" in capsys.readouterr().out
    whole = fs.sample(EDM, "heun", nfe=8, n=301, seed=3)
    assert np.allclose(np.load(out), whole.numpy(), atol=1e-6, rtol=0)
    assert not list(tmp_path.glob("*.tmp*"))


# -- properties over grids, shapes and sizes ------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(sig=st.lists(st.floats(1e-3, 80.0), min_size=1, max_size=6, unique=True), over=st.floats(1.01, 100.0))
def test_sigma_grids_inside_the_domain_run_and_outside_are_refused(sig, over):
    den = fs.models.EDMPrecond(fs.models.MLP(dim=2, width=4, depth=1), sigma_max=80.0, data_shape=(2,))
    field = den.field()
    grid = torch.tensor(sorted(sig, reverse=True) + [0.0], dtype=torch.float64)
    assert fs.sample(field, "euler", grid=grid, n=2, seed=0).shape == (2, 2)
    bad = torch.cat([torch.tensor([80.0 * over], dtype=torch.float64), grid])
    with pytest.raises(ValueError, match="domain"):
        fs.sample(field, "euler", grid=bad, n=2, seed=0)


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), n=st.integers(1, 9), batch=st.integers(1, 9))
def test_any_shape_and_chunking_give_the_same_samples(shape, n, batch):
    f = fs.fields.Function(lambda x, t: -x * (1 + t), shape=tuple(shape))
    whole = fs.sample(f, "heun", nfe=5, n=n, seed=11)
    assert whole.shape == (n, *shape)
    assert torch.equal(fs.sample(f, "heun", nfe=5, n=n, seed=11, batch_size=batch), whole)
    wrong = fs.fields.Function(lambda x, t: x.reshape(len(x), -1)[:, :1].expand(len(x), 2), shape=tuple(shape))
    if tuple(shape) != (2,):
        with pytest.raises(ValueError, match="shape"):
            fs.sample(wrong, "euler", nfe=2, n=n)


# -- resume is the same run or an error -----------------------------------------------------------
SMALL = dict(width=16, depth=1, batch_size=32, checkpoint_every=5, progress=False)


def test_resume_refuses_a_different_run_and_records_allowed_changes(tmp_path):
    out = tmp_path / "run"
    fs.train.edm("gmm2d", out=out, steps=10, **SMALL)
    with pytest.raises(fs.train.CheckpointError, match="lr: 0.0002 in the checkpoint, 0.001 now"):
        fs.train.edm("gmm2d", out=out, steps=20, resume=True, lr=1e-3, **SMALL)
    with pytest.raises(fs.train.CheckpointError, match="data: 'gmm2d' in the checkpoint, 'moons' now"):
        fs.train.edm("moons", out=out, steps=20, resume=True, **SMALL)
    with pytest.raises(fs.train.CheckpointError, match="already done 10 steps"):
        fs.train.edm("gmm2d", out=out, steps=5, resume=True, **SMALL)
    assert json.loads((out / "flowsolve.json").read_text())["training"]["config"]["lr"] == 2e-4   # untouched
    model = fs.train.edm("gmm2d", out=out, steps=20, resume=True, allow_changes=True, lr=1e-3, **SMALL)
    record = json.loads((out / "flowsolve.json").read_text())["training"]
    assert record["config"]["lr"] == 1e-3 and record["config"]["steps"] == 20
    assert record["changes"] == [{"step": 10, "changed": {"lr": [2e-4, 1e-3]}}]
    assert model.metadata["training"]["changes"] == record["changes"]
    fs.train.edm("gmm2d", out=out, steps=25, resume=True, lr=1e-3, **SMALL)     # extending stays allowed


def test_cli_resume_lists_the_differences(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"width": 16, "depth": 1, "checkpoint_every": 2}')
    base = ["train", "edm", "--data", "gmm2d", "--out", str(tmp_path / "r"), "--config", str(cfg), "--quiet"]
    assert main(base + ["--steps", "4"]) == 0
    assert main(base + ["--steps", "6", "--resume", "--lr", "0.01"]) == 2
    assert "lr: 0.0002 in the checkpoint, 0.01 now" in capsys.readouterr().err
    assert main(base + ["--steps", "6", "--resume", "--lr", "0.01", "--allow-changes"]) == 0


# -- kills at random points lose nothing ----------------------------------------------------------
def _train_cmd(out: Path, cfg: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "flowsolve", "train", "edm", "--data", "gmm2d", "--out", str(out), "--steps", "400",
            "--config", str(cfg), "--quiet"] + (["--resume"] if resume else [])


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def _readable(folder: Path) -> None:
    """Every file of the run folder (temporary files aside) reads back whole."""
    for f in folder.rglob("*"):
        if f.is_dir() or ".tmp" in f.name:
            continue
        if f.suffix == ".pt":
            torch.load(f, weights_only=True)
        elif f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".safetensors":
            _weights(f.parent)


def test_kill_at_random_points_then_resume_equals_the_uninterrupted_run(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"width": 32, "depth": 2, "checkpoint_every": 1, "batch_size": 64}')
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run(_train_cmd(tmp_path / "whole", cfg, False), check=True, env=env, cwd=ROOT, timeout=300)
    rng = random.Random(0)
    out = tmp_path / "killed"
    codes = []
    for sig in (signal.SIGKILL, signal.SIGINT, signal.SIGKILL):
        proc = subprocess.Popen(_train_cmd(out, cfg, (out / "checkpoints" / "last.pt").exists()), env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = (out / "checkpoints" / "last.pt").stat().st_mtime if (out / "checkpoints" / "last.pt").exists() else 0
        t_end = time.time() + 120
        while time.time() < t_end and proc.poll() is None:     # wait for this process's first checkpoint
            ck = out / "checkpoints" / "last.pt"
            if ck.exists() and ck.stat().st_mtime > start:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.25))
        if proc.poll() is None:
            proc.send_signal(sig)
        codes.append(proc.wait(timeout=120))
        _readable(out)
    assert sum(c != 0 for c in codes) >= 2, codes      # the kills really landed mid-run (SIGKILL: -9, SIGINT: 130)
    subprocess.run(_train_cmd(out, cfg, True), check=True, env=env, cwd=ROOT, timeout=300)
    a, b = _weights(tmp_path / "whole"), _weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_path_exists_at_every_instant(tmp_path, monkeypatch):
    """A kill between the two renames of a checkpoint write must leave last.pt whole (found by the
    fault-injection test in CI: the old code moved last.pt aside before renaming the new one in)."""
    from flowsolve import _checks
    path = tmp_path / "last.pt"
    _checks.atomic_save({"step": 1}, path, keep_previous="previous.pt")
    real = os.replace

    def killed_before_the_last_rename(src, dst):
        if str(dst) == str(path):
            raise KeyboardInterrupt("killed")
        return real(src, dst)
    monkeypatch.setattr(_checks.os, "replace", killed_before_the_last_rename)
    with pytest.raises(KeyboardInterrupt):
        _checks.atomic_save({"step": 2}, path, keep_previous="previous.pt")
    monkeypatch.setattr(_checks.os, "replace", real)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert torch.load(tmp_path / "previous.pt", weights_only=True) == {"step": 1}
