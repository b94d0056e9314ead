"""Scale-out and hardening: malformed inputs across the public API (each error names the argument),
solver properties (hypothesis), sharded sampling with 2 processes, SIGINT then resume."""
import os
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
from flowsolve.distributed import shard_range

ROOT = Path(__file__).resolve().parents[1]
GMM = fs.data.GaussianMixture.paper()
EDM = fs.fields.EDM(GMM.denoiser)


def _den():
    return fs.models.EDMPrecond(fs.models.MLP(dim=2, width=8, depth=1), data_shape=(2,))


MALFORMED = [
    ("sample-field", lambda: fs.sample(GMM.denoiser, n=2), TypeError, "field"),
    ("sample-solver", lambda: fs.sample(EDM, "rk45", n=2), (ValueError, KeyError), "solver"),
    ("sample-nfe", lambda: fs.sample(EDM, "heun", nfe=-3, n=2), ValueError, "nfe"),
    ("sample-n", lambda: fs.sample(EDM, n=0), ValueError, "n"),
    ("sample-n-float", lambda: fs.sample(EDM, n=2.5), (ValueError, TypeError), "n"),
    ("sample-seed", lambda: fs.sample(EDM, n=2, seed=-1), ValueError, "seed"),
    ("sample-batch", lambda: fs.sample(EDM, n=2, batch_size=0), ValueError, "batch_size"),
    ("sample-x-init-nan", lambda: fs.sample(EDM, x_init=torch.tensor([[float("nan"), 0.0]])), ValueError, "x_init"),
    ("sample-x-init-int", lambda: fs.sample(EDM, x_init=torch.zeros(2, 2, dtype=torch.long)), TypeError, "x_init"),
    ("sample-x-init-1d", lambda: fs.sample(EDM, x_init=torch.zeros(2)), ValueError, "x_init"),
    ("sample-shape", lambda: fs.sample(EDM, n=2, shape=(0,)), ValueError, "shape"),
    ("sample-dtype", lambda: fs.sample(EDM, n=2, dtype=torch.int32), TypeError, "dtype"),
    ("sample-dtype-name", lambda: fs.sample(EDM, n=2, dtype="float16x"), TypeError, "dtype"),
    ("sample-device", lambda: fs.sample(EDM, n=2, device="gpu0"), ValueError, "device"),
    ("sample-device-absent", lambda: fs.sample(EDM, n=2, device="cuda:99"), ValueError, "device"),
    ("pretrained-device", lambda: fs.from_pretrained("digits-edm", device="cuda:99"), ValueError, "device"),
    ("sample-option", lambda: fs.sample(EDM, "heun", n=2, S_churn=1.0), (ValueError, TypeError), "S_churn"),
    ("sample-offset", lambda: fs.sample(EDM, n=2, index_offset=-1), ValueError, "index_offset"),
    ("sample-grid-up", lambda: fs.sample(EDM, "euler", n=2, grid=torch.tensor([0.0, 1.0, 2.0])), ValueError, "grid"),
    ("edm-denoiser", lambda: fs.fields.EDM(3.0), TypeError, "data"),
    ("edm-sigmas", lambda: fs.fields.EDM(GMM.denoiser, sigma_min=5.0, sigma_max=1.0), ValueError, "sigma_min"),
    ("df-eta", lambda: fs.fields.DiscriminatorFlow(lambda x, t: x.sum(1), eta=0.0), ValueError, "eta"),
    ("df-tend", lambda: fs.fields.DiscriminatorFlow(lambda x, t: x.sum(1), t_end=1.5), ValueError, "t_end"),
    ("mmd-data", lambda: fs.fields.MMDFlow(torch.zeros(5)), ValueError, "data"),
    ("svgd-score", lambda: fs.fields.SVGD("score"), TypeError, "score"),
    ("precond-sigma", lambda: fs.models.EDMPrecond(torch.nn.Identity(), sigma_data=-1.0), ValueError, "sigma_data"),
    ("denoiser-x", lambda: _den()(torch.zeros(3, 5), 1.0), ValueError, "x"),
    ("denoiser-sigma", lambda: _den()(torch.zeros(3, 2), torch.ones(2)), ValueError, "sigma"),
    ("mlp-activation", lambda: fs.models.MLP(activation="gelu"), ValueError, "activation"),
    ("unet-preset", lambda: fs.models.unet((1, 8, 8), "huge"), ValueError, "preset"),
    ("unet-shape", lambda: fs.models.unet((1, 8, 6)), ValueError, "data_shape"),
    ("from-pretrained", lambda: fs.from_pretrained("/nonexistent/model"), FileNotFoundError, "path"),
    ("from-diffusers-sched", lambda: fs.models.from_diffusers(torch.nn.Identity(), None), ValueError, "scheduler"),
    ("train-key", lambda: fs.train.edm("gmm2d", config={"lr_rate": 1.0}), ValueError, "lr"),
    ("train-steps", lambda: fs.train.edm("gmm2d", steps=0, progress=False), ValueError, "steps"),
    ("train-lr", lambda: fs.train.edm("gmm2d", steps=1, lr=-1.0, progress=False), ValueError, "lr"),
    ("train-data", lambda: fs.train.edm("no-such-dataset"), ValueError, "data"),
    ("df-loss", lambda: fs.train.discriminator_flow("gmm2d", loss="wgan", steps=1, progress=False), ValueError, "loss"),
    ("df-matrices", lambda: fs.train.discriminator_flow(torch.zeros(8, 2, 3), steps=1, progress=False), ValueError,
     "data"),
    ("train-device", lambda: fs.train.edm("gmm2d", steps=1, device="tpu", progress=False), ValueError, "device"),
    ("df-dtype", lambda: fs.fields.DiscriminatorFlow(lambda x, t: x.sum(1), compute_dtype="int8"), ValueError,
     "compute_dtype"),
    ("score-weights", lambda: fs.fields.ScoreDifference(GMM.denoiser, mu_data="2"), TypeError, "mu_data"),
    ("dcgan-shape", lambda: fs.models.DCGANGenerator((1, 2, 2)), ValueError, "data_shape"),
    ("scoregan-shape", lambda: fs.train.score_gan(GMM.denoiser, None, steps=1, progress=False), ValueError,
     "data_shape"),
    ("digits-split", lambda: fs.data.digits("validation"), ValueError, "split"),
    ("digits-size", lambda: fs.data.digits(size=4), ValueError, "size"),
    ("tensor-data", lambda: fs.data.TensorData(torch.tensor([[float("inf")]])), ValueError, "x"),
    ("folder", lambda: fs.data.image_folder("/nonexistent/images"), FileNotFoundError, "data"),
    ("energy", lambda: fs.metrics.energy_distance(torch.zeros(1, 2), torch.zeros(3, 2)), ValueError, "x"),
    ("energy-dim", lambda: fs.metrics.energy_distance(torch.zeros(4, 2), torch.zeros(3, 3)), ValueError, "y"),
    ("mmd-bw", lambda: fs.metrics.mmd(torch.randn(4, 2), torch.randn(4, 2), bandwidth=0.0), ValueError, "bandwidth"),
    ("fd-features", lambda: fs.metrics.frechet_distance_features(torch.zeros(5), torch.zeros(5, 2)), ValueError, "a"),
    ("compare-metric", lambda: fs.compare(EDM, ["euler"], [4], "psnr"), ValueError, "metric"),
    ("compare-seeds", lambda: fs.compare(EDM, ["euler"], [4], "nll", seeds=0, reference=GMM), ValueError, "seeds"),
    ("interp-method", lambda: fs.latent.interpolate(torch.zeros(3), torch.ones(3), 4, "cubic"), ValueError, "method"),
    ("interp-steps", lambda: fs.latent.interpolate(torch.zeros(3), torch.ones(3), 1), ValueError, "steps"),
    ("generator-n", lambda: fs.models.Generator((2,), latent=4, width=4, depth=1).sample(0), ValueError, "n"),
    ("gan-loss", lambda: fs.models.GANLoss("least-squares"), ValueError, "loss"),
]


@pytest.mark.parametrize("call,exc,arg", [pytest.param(c, e, a, id=i) for i, c, e, a in MALFORMED])
def test_malformed_input_names_the_argument(call, exc, arg):
    with pytest.raises(exc) as info:
        call()
    assert arg in str(info.value), f"the error does not name {arg!r}: {info.value}"


def test_enough_malformed_cases():
    assert len(MALFORMED) >= 30


SOLVERS = ["euler", "heun", "dpmpp_2m", "ipndm", "adams", "torchdiffeq:rk4", "torchdiffeq:midpoint"]


@settings(max_examples=25, deadline=None)
@given(solver=st.sampled_from(SOLVERS), steps=st.integers(2, 12), seed=st.integers(0, 2 ** 31),
       dim=st.integers(1, 5))
def test_zero_field_leaves_particles_unchanged(solver, steps, seed, dim):
    zero = fs.fields.Function(lambda x, t: torch.zeros_like(x), t_start=0.0, t_end=1.0, shape=(dim,))
    x0 = torch.randn(7, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if solver.startswith("dpmpp"):
        return                      # needs a σ-time field; covered by the EDM variant below
    x = fs.sample(zero, solver, grid=torch.linspace(0, 1, steps + 1, dtype=torch.float64), x_init=x0)
    assert torch.equal(x, x0)


ORDER = {"euler": 1, "heun": 2, "ipndm": 2, "adams": 2, "torchdiffeq:rk4": 4, "torchdiffeq:midpoint": 2}


@settings(max_examples=25, deadline=None)
@given(solver=st.sampled_from(sorted(ORDER)), a=st.floats(-2.0, 2.0), seed=st.integers(0, 2 ** 31))
def test_linear_field_matches_its_exponential_solution(solver, a, seed):
    """dx/dt = a x on [0, 1]: the error at h = 1/32 stays within C·h^order of x0·e^a."""
    lin = fs.fields.Function(lambda x, t: a * x, t_start=0.0, t_end=1.0, shape=(3,))
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    steps = 32
    x = fs.sample(lin, solver, grid=torch.linspace(0, 1, steps + 1, dtype=torch.float64), x_init=x0)
    exact = x0 * float(np.exp(a))
    err = (x - exact).abs().max().item() / max(1.0, exact.abs().max().item())
    assert err <= 4.0 * abs(a) ** 2 * np.exp(abs(a)) * (1 / steps) ** min(ORDER[solver], 2) + 1e-12


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 500), size=st.integers(1, 9))
def test_shards_cover_every_sample_once(n, size):
    ranges = [shard_range(n, r, size) for r in range(size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1


def test_index_offset_reproduces_the_full_run():
    full = fs.sample(EDM, "sde", nfe=8, n=70, seed=5)
    part = fs.sample(EDM, "sde", nfe=8, n=30, seed=5, index_offset=40)
    assert torch.equal(part, full[40:])


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher(kind: str) -> list[str]:
    """2 CPU processes with gloo: torchrun, or `accelerate launch` (its --multi_gpu launcher runs on
    CPU-only machines too; its --cpu flag would start a single process without MPI)."""
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    pytest.importorskip("accelerate")
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m"]


def _one_and_two_processes(args, out_one, out_two, launcher: str = "torchrun"):
    """Run the flowsolve CLI once plainly and once with 2 processes; return (r1, r2)."""
    r1 = subprocess.run([sys.executable, "-m", "flowsolve"] + args + ["--out", str(out_one)], env=_env(),
                        capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-1500:]
    r2 = subprocess.run(_launcher(launcher) + ["flowsolve"] + args + ["--out", str(out_two)], env=_env(),
                        capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    return r1, r2


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_process_sampling_matches_one_process(tmp_path, launcher):
    args = ["sample", "--model", "gmm2d", "--solver", "sde", "--nfe", "16", "--num-samples", "77", "--seed", "4",
            "--quiet"]
    _, r2 = _one_and_two_processes(args, tmp_path / "one.npy", tmp_path / "two.npy", launcher)
    engine = "accelerate" if launcher == "accelerate" else "torch"
    assert f"from 2 processes ({engine})" in r2.stdout
    assert np.array_equal(np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy"))


def test_two_process_sampling_in_float64_with_an_idle_process(tmp_path):
    """One sample over 2 processes: the process without rows pads in the run's dtype (float64 here),
    so the gather matches and the sample equals one process's."""
    args = ["sample", "--model", "gmm2d", "--solver", "heun", "--nfe", "9", "--num-samples", "1", "--seed", "2",
            "--dtype", "float64", "--quiet"]
    _one_and_two_processes(args, tmp_path / "one.npy", tmp_path / "two.npy")
    one, two = np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy")
    assert one.dtype == two.dtype == np.float64 and np.array_equal(one, two)


def test_sigint_writes_a_checkpoint_then_resume(tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"width": 32, "depth": 2, "emb_size": 8, "checkpoint_every": 40}')
    cmd = [sys.executable, "-m", "flowsolve", "train", "edm", "--data", "gmm2d", "--out", str(out), "--steps",
           "1000000", "--config", str(cfg), "--quiet"]
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    while not first.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)                             # training is running once the step-40 checkpoint exists
    assert first.exists(), "no checkpoint appeared"
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-1500:]
    assert "checkpoint written" in err
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ck["step"] >= 40
    r = subprocess.run(cmd[:-4] + [str(ck["step"] + 5), "--config", str(cfg), "--resume", "--quiet"], env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == ck["step"] + 5


@pytest.mark.parametrize("objective,config,launcher", [
    ("edm", '{"width": 32, "depth": 2, "emb_size": 8, "warmup": 1}', "torchrun"),
    ("discriminator-flow", '{"width": 32, "depth": 2, "emb_size": 8, "N": 6, "gp": 0.1}', "torchrun"),
    ("edm", '{"width": 32, "depth": 2, "emb_size": 8, "warmup": 1}', "accelerate"),
    ("discriminator-flow", '{"width": 32, "depth": 2, "emb_size": 8, "N": 6, "gp": 0.1}', "accelerate"),
    ("mmd-generator", '{"width": 32, "depth": 2, "latent": 8, "batch_size": 64}', "accelerate"),
])
def test_two_process_training_matches_one_process(tmp_path, objective, config, launcher):
    """Data-parallel training: 2 processes on halves of the same global batch (for a Discriminator Flow
    also half of the simulated particles; for the MMD generator, ρ gathered from both), gradients
    averaged, give the weights of 1 process on the whole batch (to float round-off)."""
    cfg = tmp_path / "small.json"
    cfg.write_text(config)
    args = ["train", objective, "--data", "gmm2d", "--steps", "5", "--config", str(cfg), "--quiet"]
    _one_and_two_processes(args, tmp_path / "one", tmp_path / "two", launcher)
    a, b = fs.from_pretrained(tmp_path / "one"), fs.from_pretrained(tmp_path / "two")
    diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    assert diff < 1e-5
    ck = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["step"] == 5


def test_two_process_compare_matches_one_process(tmp_path):
    args = ["compare", "--model", "gmm2d", "--solvers", "euler,sde", "--nfe", "4,8", "--metric", "energy",
            "--num-samples", "151", "--seeds", "2", "--quiet"]
    _one_and_two_processes(args, tmp_path / "one", tmp_path / "two")
    import csv
    one = list(csv.DictReader(open(tmp_path / "one" / "compare.csv")))
    two = list(csv.DictReader(open(tmp_path / "two" / "compare.csv")))
    assert [(r["solver"], r["nfe_used"]) for r in one] == [(r["solver"], r["nfe_used"]) for r in two]
    assert all(abs(float(a["value"]) - float(b["value"])) < 1e-9 for a, b in zip(one, two))


def test_two_process_generator_sampling_and_score_gan_training(tmp_path):
    """`accelerate launch -m flowsolve train score-gan` with 2 processes gives the weights of one
    process on the same global batch, and sampling its generator with 2 processes gives the
    same samples as one."""
    cfg = tmp_path / "small.json"
    cfg.write_text('{"width": 32, "depth": 2, "latent": 8, "score_width": 32, "score_depth": 2, "K": 2}')
    args = ["train", "score-gan", "--data", "gmm2d", "--steps", "3", "--config", str(cfg), "--quiet"]
    _one_and_two_processes(args, tmp_path / "one", tmp_path / "two", "accelerate")
    a, b = fs.from_pretrained(tmp_path / "one"), fs.from_pretrained(tmp_path / "two")
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())) < 1e-5
    args = ["sample", "--model", str(tmp_path / "one"), "--num-samples", "33", "--seed", "2", "--quiet"]
    _, r2 = _one_and_two_processes(args, tmp_path / "one.npy", tmp_path / "two.npy", "accelerate")
    assert "on 2 processes (accelerate)" in r2.stdout
    assert np.array_equal(np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy"))


@pytest.mark.parametrize("name,solver,nfe", [("digits-edm", "heun", 9), ("digits-df", "euler", 8),
                                             ("digits-ddpm", "dpmpp_2m", 6), ("gmm2d-edm", "sde", 8)])
def test_a_seed_is_the_same_run_in_every_dtype(name, solver, nfe):
    """float32 networks sampled in float64 (EDM's sampler runs x in float64, the network in its own
    dtype): the same seed draws the same noise, so the two runs agree to float32 round-off, and a
    dtype may be named by string."""
    field = fs.from_pretrained(name).field()
    a = fs.sample(field, solver, nfe=nfe, n=4, seed=3)
    b = fs.sample(field, solver, nfe=nfe, n=4, seed=3, dtype="float64")
    assert a.dtype == torch.float32 and b.dtype == torch.float64
    assert (a.double() - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())
    c = fs.sample(field, solver, nfe=nfe, n=4, seed=3, dtype=torch.bfloat16)
    assert c.dtype == torch.bfloat16 and torch.isfinite(c.float()).all()


def test_sampling_follows_the_models_device():
    """With no device= or x_init=, particles go where the field's network is (a model moved to a GPU
    samples there); plain functions stay on the CPU."""
    from flowsolve.sample import _particles

    m = fs.from_pretrained("digits-edm")
    assert _particles(m.field(), 2, None, None, None, None)[2] == torch.device("cpu")
    m.to("meta")  # a device without data: where the particles would go, nothing computed
    assert m.field().model_device() == torch.device("meta")
    assert m.field(guidance=2.0, uncond={}).model_device() == torch.device("meta")
    assert _particles(m.field(), 2, None, None, None, None)[2].type == "meta"
    assert _particles(m.field(), 2, None, None, "cpu", None)[2] == torch.device("cpu")  # asked for: kept
    assert EDM.model_device() is None
    assert fs.from_pretrained("digits-df").to("meta").field().model_device() == torch.device("meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_model_on_the_gpu_samples_there_and_matches_the_cpu():
    m = fs.from_pretrained("digits-edm")
    z = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
    cpu = fs.sample(m.field(), "heun", nfe=9, x_init=z)
    gpu = fs.sample(m.to("cuda").field(), "heun", nfe=9, n=8, seed=0)
    assert gpu.device.type == "cuda"
    assert (fs.sample(m.field(), "heun", nfe=9, x_init=z.cuda()).cpu() - cpu).abs().max() < 1e-2  # cuDNN may use TF32
