"""The command line, run as a user would (subprocess) and in-process."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from flowsolve.cli import main


def test_sample_gmm2d_to_png_npy_pt(tmp_path):
    for ext in ("png", "npy", "pt"):
        out = tmp_path / f"x.{ext}"
        assert main(["sample", "--model", "gmm2d", "--solver", "heun", "--nfe", "32", "--n", "300",
                     "--out", str(out), "--quiet"]) == 0
        assert out.stat().st_size > 0
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (300, 2)
    assert torch.allclose(torch.load(tmp_path / "x.pt", weights_only=True), torch.from_numpy(x))
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"
    # the samples are on the mixture: every point within 3 std (1.5) of a mode at radius 5
    r = np.linalg.norm(x, axis=1)
    assert ((r > 3.0) & (r < 7.0)).mean() > 0.97


def test_python_m_flowsolve_and_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "flowsolve", "sample", "--solver", "sde", "--alpha", "0.5",
                        "--nfe", "16", "--n", "10", "--out", str(tmp_path / "a.npy"), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "flowsolve", "sample", "--solver", "nope", "--out",
                        str(tmp_path / "b.npy"), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown solver 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "flowsolve", "sample", "--out", str(tmp_path / "c.txt"), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--out" in r.stderr


def test_sample_in_float64_is_the_float32_run_more_precisely(tmp_path):
    """--dtype float64 on a float32 network: the same seed, the same samples to float32 round-off,
    saved in float64 (the network runs in its own dtype, as in EDM's sampler)."""
    import flowsolve as fs

    for dt in ("float32", "float64"):
        assert main(["sample", "--model", "digits-edm", "--solver", "heun", "--nfe", "9", "--n", "6",
                     "--device", "cpu", "--dtype", dt, "--out", str(tmp_path / f"{dt}.npy"), "--quiet"]) == 0
    a, b = np.load(tmp_path / "float32.npy"), np.load(tmp_path / "float64.npy")
    assert a.dtype == np.float32 and b.dtype == np.float64
    assert np.abs(a - b).max() < 1e-4
    ref = fs.sample(fs.from_pretrained("digits-edm").field(), "heun", nfe=9, n=6, seed=0)
    assert np.abs(ref.numpy() - a).max() == 0.0
    # streamed to disk chunk by chunk (n > --batch-size): the same file, in the same dtype
    assert main(["sample", "--model", "digits-edm", "--solver", "heun", "--nfe", "9", "--n", "6", "--batch-size", "4",
                 "--device", "cpu", "--dtype", "float64", "--out", str(tmp_path / "streamed.npy"), "--quiet"]) == 0
    c = np.load(tmp_path / "streamed.npy")
    # equal up to the float32 network's round-off, which depends on the batch it sees (and the thread count)
    assert c.dtype == np.float64 and np.abs(b - c).max() < 1e-5


def test_solvers_listing(capsys):
    assert main(["solvers"]) == 0
    out = capsys.readouterr().out
    assert "heun" in out and "torchsde:srk" in out


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_sample_a_model_folder(tmp_path):
    out = tmp_path / "digits.png"
    assert main(["sample", "--model", str(ROOT / "pretrained" / "digits-edm"), "--solver", "heun", "--nfe", "8",
                 "--n", "16", "--out", str(out), "--quiet"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["sample", "--model", str(ROOT / "pretrained" / "digits-edm"), "--nfe", "4", "--n", "5",
                 "--out", str(tmp_path / "x.npy"), "--quiet"]) == 0
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (5, 1, 8, 8) and np.isfinite(x).all()


def test_train_then_sample_then_resume(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"width": 16, "depth": 1, "emb_size": 8, "checkpoint_every": 3}')
    run = tmp_path / "run"
    assert main(["train", "edm", "--data", "moons", "--out", str(run), "--steps", "6", "--seed", "1",
                 "--config", str(cfg), "--quiet"]) == 0
    assert (run / "config.json").is_file() and (run / "checkpoints" / "last.pt").is_file()
    assert main(["sample", "--model", str(run), "--n", "7", "--nfe", "4", "--out", str(tmp_path / "m.npy"),
                 "--quiet"]) == 0
    assert np.load(tmp_path / "m.npy").shape == (7, 2)
    assert main(["train", "edm", "--data", "moons", "--out", str(run), "--steps", "9", "--seed", "1",
                 "--config", str(cfg), "--resume", "--quiet"]) == 0


def test_train_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"widht": 16}')
    assert main(["train", "edm", "--data", "gmm2d", "--out", str(tmp_path / "r"), "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'widht'" in err and "'width'" in err
    assert main(["train", "edm", "--data", "no-such-data", "--out", str(tmp_path / "r")]) == 2
    assert "expected one of" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path / "missing-model"), "--out", str(tmp_path / "x.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sample", "--model", str(ROOT / "pretrained" / "digits-features"), "--out",
                 str(tmp_path / "x.npy")]) == 2
    assert "not a model that generates" in capsys.readouterr().err


def test_unreachable_hub_id_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["sample", "--model", "nobody/no-such-model", "--n", "2", "--out", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert "Hugging Face Hub" in err and "Traceback" not in err


def test_invert_then_sample_from_the_latents_is_a_round_trip(tmp_path, capsys):
    """`flowsolve invert` writes the latents of a file of samples; `flowsolve sample --x-init` with the
    same solver and grid brings them back (equal to the Python API's `fs.invert`)."""
    import flowsolve as fs
    x, z, y = tmp_path / "x.npy", tmp_path / "z.npy", tmp_path / "y.npy"
    common = ["--model", "pretrained/digits-edm", "--solver", "dpmpp_3m", "--grid", "karras", "--dtype", "float64"]
    assert main(["sample", "--model", "pretrained/digits-edm", "--solver", "dpmpp_2m", "--nfe", "32", "--n", "6",
                 "--dtype", "float64", "--out", str(x), "--quiet"]) == 0
    assert main(["invert", *common, "--nfe", "64", "--data", str(x), "--out", str(z)]) == 0
    assert "latents at t = 40" in capsys.readouterr().out
    assert main(["sample", *common, "--nfe", "64", "--x-init", str(z), "--out", str(y), "--quiet"]) == 0
    xs, zs, ys = np.load(x), np.load(z), np.load(y)
    assert zs.shape == xs.shape == ys.shape and np.abs(ys - xs).max() < 0.05 * np.abs(xs).max()
    m = fs.from_pretrained("pretrained/digits-edm")
    api = fs.invert(m.field(), torch.from_numpy(xs), "dpmpp_3m", 64, grid="karras", dtype=torch.float64)
    assert np.allclose(api.numpy(), zs, atol=1e-10)
    # bad input is named before any work
    assert main(["invert", *common, "--data", str(tmp_path / "missing.npy"), "--out", str(z)]) == 2
    assert main(["invert", "--model", "pretrained/digits-edm", "--solver", "euler_ancestral", "--data", str(x),
                 "--out", str(z)]) == 2
    np.save(tmp_path / "bad.npy", np.zeros((3, 2), dtype=np.float32))
    assert main(["invert", *common, "--data", str(tmp_path / "bad.npy"), "--out", str(z)]) == 2
    assert "shape" in capsys.readouterr().err
