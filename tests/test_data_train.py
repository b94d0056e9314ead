"""Datasets, the training loop (resume exactness, config checks, corrupt checkpoints) and metrics."""
import json

import numpy as np
import pytest
import torch

import flowsolve as fs
from flowsolve.train.loop import CheckpointError

TINY = dict(width=32, depth=2, emb_size=16, log_every=5, checkpoint_every=5, warmup=3)


def test_digits_splits():
    tr, te, al = fs.data.digits("train"), fs.data.digits("test"), fs.data.digits("all")
    assert len(tr) == 1397 and len(te) == fs.data.DIGITS_HELD_OUT == 400 and len(al) == 1797
    assert tr.data_shape == (1, 8, 8) and tr.x.min() == -1 and tr.x.max() == 1
    flat = {tuple(r) for r in tr.x.reshape(len(tr), -1).tolist()}
    overlap = sum(tuple(r) in flat for r in te.x.reshape(len(te), -1).tolist())
    assert overlap <= 2          # the raw dataset holds a couple of exact duplicate images
    assert set(te.labels.tolist()) == set(range(10))
    up = fs.data.digits("test", size=16)
    assert up.data_shape == (1, 16, 16) and up.x.abs().max() <= 1
    with pytest.raises(ValueError, match="split"):
        fs.data.digits("val")


def test_moons_and_sources():
    x = fs.data.Moons(noise=0.0).sample(2000, torch.Generator().manual_seed(0))
    on_up = ((x.norm(dim=1) - 1).abs() < 1e-5) & (x[:, 1] >= -1e-6)
    on_lo = (((x - torch.tensor([1.0, 0.5])).norm(dim=1) - 1).abs() < 1e-5) & (x[:, 1] <= 0.5 + 1e-6)
    assert bool((on_up | on_lo).all())
    assert 0.45 < on_up.float().mean() < 0.55
    assert isinstance(fs.data.load("gmm2d"), fs.data.GaussianMixture)
    with pytest.raises(ValueError, match="expected one of"):
        fs.data.load("imagenet")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        fs.data.load("mnist", root="/nonexistent-flowsolve")


def test_image_folder(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    d = fs.data.image_folder(tmp_path, size=8)
    assert d.data_shape == (1, 8, 8) and len(d) == 6 and d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert d.x.min() >= -1 and d.x.max() <= 1
    (tmp_path / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        fs.data.image_folder(tmp_path)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_is_exact(tmp_path):
    full = fs.train.edm("gmm2d", out=tmp_path / "a", steps=20, progress=False, **TINY)
    fs.train.edm("gmm2d", out=tmp_path / "b", steps=10, progress=False, **TINY)
    resumed = fs.train.edm("gmm2d", out=tmp_path / "b", steps=20, resume=True, progress=False, **TINY)
    a, b = _weights(full), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    loaded = fs.from_pretrained(tmp_path / "b")
    x = torch.randn(4, 2)
    with torch.no_grad():
        assert torch.equal(loaded(x, 0.5), full(x, 0.5))
    meta = json.loads((tmp_path / "b" / "flowsolve.json").read_text())
    assert meta["training"]["config"]["steps"] == 20 and meta["data"] == "gmm2d"


def test_corrupt_checkpoint_is_named(tmp_path):
    fs.train.edm("gmm2d", out=tmp_path / "c", steps=10, progress=False, **TINY)     # checkpoints at 5 and 10
    ck = tmp_path / "c" / "checkpoints" / "last.pt"
    prev = ck.with_name("previous.pt")
    assert torch.load(prev, weights_only=True)["step"] == 5
    ck.write_bytes(ck.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="last.pt.*corrupt.*previous.pt"):
        fs.train.edm("gmm2d", out=tmp_path / "c", steps=12, resume=True, progress=False, **TINY)
    prev.replace(ck)                                   # the kept checkpoint resumes
    fs.train.edm("gmm2d", out=tmp_path / "c", steps=12, resume=True, progress=False, **TINY)
    assert torch.load(ck, weights_only=True)["step"] == 12
    with pytest.raises(CheckpointError, match="does not exist"):
        fs.train.edm("gmm2d", out=tmp_path / "none", steps=10, resume=True, progress=False, **TINY)


def test_unknown_config_keys_name_the_nearest():
    with pytest.raises(ValueError, match="unknown key 'stpes'.*'steps'"):
        fs.train.edm("gmm2d", config={"stpes": 3}, progress=False)
    with pytest.raises(ValueError, match="network"):
        fs.train.edm("gmm2d", steps=1, network="transformer", progress=False)


def test_gaussian_frechet_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0]), torch.tensor([2.0, -1.0])
    c1, c2 = torch.diag(torch.tensor([1.0, 4.0])), torch.diag(torch.tensor([9.0, 0.25]))
    # diagonal covariances: ‖μ1 − μ2‖² + Σ (s1 − s2)²
    want = 8.0 + (1 - 3) ** 2 + (2 - 0.5) ** 2
    assert fs.metrics.gaussian_frechet(mu1, c1, mu2, c2) == pytest.approx(want, abs=1e-9)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 4, generator=g) @ torch.randn(4, 4, generator=g)
    b = torch.randn(500, 4, generator=g) * 2 + 1
    A, B = a.double().numpy(), b.double().numpy()
    c1, c2 = np.cov(A.T), np.cov(B.T)
    ref = ((A.mean(0) - B.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy_linalg.sqrtm(c1 @ c2).real)
    assert fs.metrics.frechet_distance_features(a, b) == pytest.approx(ref, rel=1e-8)


def test_torchmetrics_frechet_matches_closed_form():
    class Flat(torch.nn.Module):
        num_features = 64

        def forward(self, x):
            return x.reshape(len(x), -1)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 1, 8, 8, generator=g) * 2 - 1
    y = (torch.rand(300, 1, 8, 8, generator=g) * 1.5 - 1).clamp(-1, 1)
    tm = fs.metrics.frechet_distance(x, y, Flat())
    cf = fs.metrics.frechet_distance_features(x.reshape(300, -1), y.reshape(300, -1))
    assert tm == pytest.approx(cf, rel=1e-4)


def _write_idx(path, arr):
    import struct
    arr = np.asarray(arr, dtype=np.uint8)
    magic = 2049 if arr.ndim == 1 else 2051
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape))
        f.write(arr.tobytes())


def test_local_mnist_in_torchvision_format(tmp_path):
    """The real torchvision loader on a local folder laid out like a downloaded MNIST."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 28, 28))
    for split in ("train", "t10k"):
        _write_idx(raw / f"{split}-images-idx3-ubyte", imgs)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", [3, 1, 4, 1, 5])
    d = fs.data.load("mnist", root=tmp_path)
    assert d.data_shape == (1, 32, 32) and len(d) == 5 and d.labels.tolist() == [3, 1, 4, 1, 5]
    assert torch.allclose(d.x[0, 0, 2:30, 2:30], torch.as_tensor(imgs[0], dtype=torch.float32) / 127.5 - 1, atol=1e-5)
    assert (d.x[:, :, :2] == -1).all()          # App. D.1: padded to 32×32 with black


@pytest.mark.slow
def test_edm_trainer_fits_the_exact_mixture(tmp_path, gmm):
    """Table 5 settings (MLP 512×4, Fourier embedding, 10 000 Adam steps): heun-32 samples are as close
    to the mixture in energy distance as the model card reports (about 4 minutes on 2 cores)."""
    den = fs.train.edm("gmm2d", out=tmp_path / "g", progress=False)
    x = fs.sample(fs.fields.EDM(den), solver="heun", nfe=32, n=3000, seed=0)
    true = gmm.sample(3000, torch.Generator().manual_seed(1))
    assert fs.metrics.energy_distance(x, true) < 0.02
    share = torch.bincount(gmm.assign(x), minlength=5).float() / len(x)
    assert share.min() > 0.15


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    from flowsolve.train.loop import LoopConfig, fit
    model = torch.nn.Linear(2, 1)
    calls = {"n": 0}

    def loss_fn(m, g):
        calls["n"] += 1
        out = m(torch.randn(4, 2, generator=g)).square().mean()
        return out * float("nan") if calls["n"] == 4 else out

    cfg = LoopConfig(steps=10, checkpoint_every=2, log_every=1, warmup=1)
    with pytest.raises(FloatingPointError, match="at step 3.*last good checkpoint"):
        fit(model, loss_fn, cfg, out=tmp_path, progress=False)
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_lr_schedule_is_applied_after_warmup(schedule):
    """The learning rate the optimizer sees at each step: warm-up ramp × 1, ½(1 + cos πu) or 1 − u."""
    import math

    from flowsolve.train.loop import LoopConfig, fit
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    seen = []

    def step_fn(m, g, step):
        seen.append(opt.param_groups[0]["lr"])
        return 0.0
    cfg = LoopConfig(steps=10, warmup=2, lr=0.1, lr_schedule=schedule, ema_decay=0.0, checkpoint_every=100,
                     log_every=5)
    fit(net, None, cfg, optimizers={"m": opt}, step_fn=step_fn, progress=False)
    decay = {"constant": lambda u: 1.0, "cosine": lambda u: 0.5 * (1 + math.cos(math.pi * u)),
             "linear": lambda u: 1 - u}[schedule]
    want = [0.1 * min(1.0, (k + 1) / 2) * decay(k / 10) for k in range(10)]
    assert seen == pytest.approx(want)
    with pytest.raises(ValueError, match="lr_schedule"):
        fit(net, None, LoopConfig(steps=1, lr_schedule="step"), optimizers={"m": opt}, step_fn=step_fn, progress=False)


def _fit_counter(out, steps, resume=False, select=None, select_every=None, **cfg):
    """fit() on a one-weight network whose weight is k after step k (no EMA, a checkpoint every 2 steps)."""
    from flowsolve.train.loop import LoopConfig, fit
    net = torch.nn.Linear(1, 1, bias=False)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)

    def step_fn(m, g, step):
        with torch.no_grad():
            m.weight.fill_(float(step + 1))        # after step k the weight is k
        return 0.0
    config = LoopConfig(steps=steps, lr=1.0, ema_decay=0.0, checkpoint_every=2, log_every=1, warmup=0, **cfg)
    return fit(net, None, config, optimizers={"m": opt}, step_fn=step_fn, progress=False, out=out, resume=resume,
               select=select, select_every=select_every)


def test_model_selection_keeps_the_best_scored_weights_across_resume(tmp_path):
    """fit(select=...) (Table 7: best validation FID) returns the weights of the best-scored step,
    keeps them in the checkpoint, and a resumed run selects among old and new steps alike."""
    def score(m):
        return abs(m.weight.item() - 3.2)          # best at step 3
    best, hist = _fit_counter(tmp_path, 5, select=score, select_every=1)
    assert best.weight.item() == 3.0 and hist["selected"]["step"] == 3
    again, hist2 = _fit_counter(tmp_path, 8, resume=True, select=score, select_every=1)
    assert again.weight.item() == 3.0 and [s for s, _ in hist2["selection"]] == list(range(1, 9))
    plain, _ = _fit_counter(tmp_path, 9, resume=True)
    assert plain.weight.item() == 9.0                 # no select: the last weights


def test_tail_average_returns_the_mean_of_the_last_checkpoints_weights_across_resume(tmp_path):
    """tail_average=k (checkpoint averaging, Izmailov et al. 2018): the returned weights are the mean
    of the EMA weights at the last k scheduled checkpoints, the final step included; a run extended by
    resume averages the same steps as one run straight through (the shorter run's off-schedule end
    leaves the tail)."""
    def run(steps, out, resume=False, tail=3):
        return _fit_counter(out, steps, resume=resume, tail_average=tail)
    avg, hist = run(7, tmp_path / "a")
    assert hist["tail_average"] == [4, 6, 7] and avg.weight.item() == pytest.approx(17 / 3)
    run(5, tmp_path / "b")                                                # tail 2, 4, 5
    resumed, hist_b = run(9, tmp_path / "b", resume=True)
    straight, hist_c = run(9, tmp_path / "c")
    assert hist_b["tail_average"] == hist_c["tail_average"] == [6, 8, 9]
    assert resumed.weight.item() == straight.weight.item() == pytest.approx(23 / 3)
    last, hist_d = run(9, tmp_path / "d", tail=0)
    assert last.weight.item() == 9.0 and "tail_average" not in hist_d
    with pytest.raises(fs.errors.ArgumentError, match="tail_average"):
        run(3, tmp_path / "e", tail=-1)


def test_tail_average_with_selection_keeps_the_best_scored_checkpoint_average_across_resume(tmp_path):
    """tail_average=k with select: every score is of the mean of the last k checkpoints' weights
    (closed form: the weight is the step), the best-scored mean is returned with its steps, and a run
    extended by resume chooses among old and new averages exactly as a straight run does."""
    scored = []

    def score(m):                                     # best where the mean of the tail is closest to 5
        scored.append(m.weight.item())
        return abs(m.weight.item() - 5.0)
    best, hist = _fit_counter(tmp_path / "a", 12, select=score, tail_average=3)
    # checkpoints every 2 steps: tails [2], [2,4], [2,4,6], [4,6,8], [6,8,10], [8,10,12]
    assert scored == pytest.approx([2, 3, 4, 6, 8, 10])
    assert hist["selection"] == [[2, 3.0], [4, 2.0], [6, 1.0], [8, 1.0], [10, 3.0], [12, 5.0]]
    assert hist["selected"]["step"] == 6 and hist["tail_average"] == [2, 4, 6]
    assert best.weight.item() == pytest.approx(4.0)
    _fit_counter(tmp_path / "b", 7, select=score, tail_average=3)        # ends off schedule at 7
    resumed, hist_b = _fit_counter(tmp_path / "b", 12, resume=True, select=score, tail_average=3)
    assert resumed.weight.item() == pytest.approx(4.0) and hist_b["tail_average"] == [2, 4, 6]
    assert [s for s, _ in hist_b["selection"]] == [2, 4, 6, 8, 10, 12]   # step 7 (off schedule) left

    def near_7(m):
        return abs(m.weight.item() - 7.0)
    short, _ = _fit_counter(tmp_path / "c", 7, select=near_7)               # plain selection: its end wins
    again, _ = _fit_counter(tmp_path / "c", 7, resume=True, select=near_7)  # not extended: the end still counts
    assert again.weight.item() == 7.0
    longer, hist_c = _fit_counter(tmp_path / "c", 12, resume=True, select=near_7)
    straight, _ = _fit_counter(tmp_path / "s", 12, select=near_7)
    assert short.weight.item() == 7.0 and longer.weight.item() == straight.weight.item() == 6.0
    assert hist_c["selected"]["step"] == 6
    with pytest.raises(fs.errors.ArgumentError, match="select_every"):
        _fit_counter(tmp_path / "d", 4, select=score, select_every=3, tail_average=2)
