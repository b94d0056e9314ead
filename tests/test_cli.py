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


def test_solvers_listing(capsys):
    assert main(["solvers"]) == 0
    out = capsys.readouterr().out
    assert "heun" in out and "torchsde:srk" in out
