"""The paper's models: the Int-PM generator step (Eq. 11–13, 25, 27), GAN losses (Eq. 15–16),
Discriminator Flows (Eq. 20, Alg. 3), Score GANs (Alg. 1), kernel flows (Table 2, Eq. 17)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import flowsolve as fs
from flowsolve.cli import main
from flowsolve.models.gan import Discriminator, GANLoss
from flowsolve.train import int_pm_loss, p_sigma

PRE = Path(__file__).resolve().parents[1] / "pretrained"
SMALL_DF = dict(width=64, depth=2, emb_size=16, N=8, log_every=10, checkpoint_every=1000)


def test_free_particles_reproduce_the_pm_step(gmm):
    """Finding 4: with an identity NTK (the particles are the parameters), one SGD step of the
    Int-PM loss is one Euler step of the PM dx/dt = ∇h."""
    x0 = gmm.sample(64, torch.Generator().manual_seed(0)) * 1.3
    x = torch.nn.Parameter(x0.clone())
    v = gmm.score(x.detach())
    eta = 0.05
    opt = torch.optim.SGD([x], lr=eta * len(x0))     # the loss averages over the batch
    int_pm_loss(x, v).backward()
    opt.step()
    field = fs.fields.Function(lambda y, t: gmm.score(y), t_start=0.0, t_end=eta, shape=(2,))
    pm = fs.sample(field, "euler", grid=torch.tensor([0.0, eta], dtype=torch.float64), x_init=x0)
    assert torch.allclose(x.detach(), pm, atol=1e-6)


def test_noisy_int_pm_step_is_euler_maruyama(gmm):
    """Eq. 22 with an identity NTK: one SGD step on the noisy direction moves free particles by
    ∇h dt + γ √dt ξ (Euler–Maruyama of dx = ∇h dt + γ dW), for dt = lr / batch size."""
    from flowsolve.train import noisy_direction
    x0 = gmm.sample(64, torch.Generator().manual_seed(0))
    x = torch.nn.Parameter(x0.clone())
    xi = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    dt, gamma = 0.04, 0.7
    v = gmm.score(x0)
    opt = torch.optim.SGD([x], lr=dt * len(x0))
    int_pm_loss(x, noisy_direction(v, gamma, dt, xi)).backward()
    opt.step()
    assert torch.allclose(x.detach(), x0 + dt * v + gamma * dt ** 0.5 * xi, atol=1e-5)
    with pytest.raises(ValueError, match="dt"):
        noisy_direction(v, gamma, 0.0, xi)


def test_linear_generator_moves_particles_through_its_ntk():
    """Eq. 12: for g(z) = W z the NTK is k(z, z') = (z·z') I, so one SGD step moves g(z) by
    lr/B Σ_b (z·z_b) v_b exactly."""
    torch.manual_seed(0)
    g = torch.nn.Linear(5, 3, bias=False)
    z = torch.randn(16, 5)
    v = torch.randn(16, 3)
    z_test = torch.randn(4, 5)
    before = g(z_test).detach()
    lr = 0.1
    opt = torch.optim.SGD(g.parameters(), lr=lr)
    int_pm_loss(g(z), v).backward()
    opt.step()
    want = before + lr / len(z) * (z_test @ z.T) @ v
    assert torch.allclose(g(z_test).detach(), want, atol=1e-6)


def test_int_pm_normalisation():
    x = torch.randn(3, 2, requires_grad=True)
    v = torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 1.0]])
    (g,) = torch.autograd.grad(int_pm_loss(x, v, normalize=True), x)
    rms = (-g * 3).square().mean(1).sqrt()
    assert torch.allclose(rms, torch.ones(3))


def test_gan_losses_are_eq_15_16():
    f = torch.linspace(-3, 3, 7)
    van = GANLoss("vanilla")
    assert torch.allclose(van.a(f), torch.log(1 - torch.sigmoid(f)), atol=1e-6)
    assert torch.allclose(van.b(f), -torch.log(torch.sigmoid(f)), atol=1e-6)
    assert torch.allclose(van.c(f), -torch.log(torch.sigmoid(f)), atol=1e-6)
    ipm = GANLoss("ipm")
    assert torch.equal(ipm.a(f), f) and torch.equal(ipm.c(f), f)
    hinge = GANLoss("hinge")
    assert torch.allclose(hinge.a(f), -F.relu(1 + f)) and torch.allclose(hinge.b(f), F.relu(1 - f))
    with pytest.raises(ValueError, match="loss"):
        GANLoss("wasserstein")


def test_p_sigma_is_eq_28():
    g = torch.Generator().manual_seed(0)
    s = p_sigma(20000, 0.1, 10.0, 3.0, g)
    assert s.min() >= 0.1 - 1e-6 and s.max() <= 10.0 + 1e-6
    median = (10 ** (1 / 3) + 0.5 * (0.1 ** (1 / 3) - 10 ** (1 / 3))) ** 3
    assert abs(float(s.median()) - median) < 0.05


def test_discriminator_fast_gradient_matches_autograd():
    d = Discriminator(3, width=32, depth=3, init_gain=None)
    x = torch.randn(10, 3)
    field = fs.fields.DiscriminatorFlow(d, eta=2.0, loss="vanilla", shape=(3,))
    with torch.no_grad():
        fast = field(x, torch.tensor(0.4))
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.softplus(-d(xg, torch.full((10,), 0.4))).sum(), xg)
    assert torch.allclose(fast, -2.0 * grad, atol=1e-6)


def test_low_precision_simulation_is_close_and_tracks_the_weights():
    """compute_dtype='bfloat16' (DFConfig.compute_dtype): the field stays within bf16 round-off of the
    float32 one (for the fast MLP pass and the autocast path of conv discriminators), comes back in
    float32, and the cached low-precision weights follow optimizer steps."""
    from flowsolve.models import ConvDiscriminator
    torch.manual_seed(0)
    d = Discriminator(2, width=256, depth=4, init_gain=None)
    x = torch.randn(200, 2) * 3
    exact = fs.fields.DiscriminatorFlow(d, eta=20.0)
    low = fs.fields.DiscriminatorFlow(d, eta=20.0, compute_dtype="bfloat16")
    with torch.no_grad():
        a, b = exact(x, 0.3), low(x, 0.3)
    assert b.dtype == torch.float32                  # bf16 keeps 8 mantissa bits: ~5% here, ~1% once trained
    assert 0 < ((a - b).norm() / a.norm()).item() < 0.1
    opt = torch.optim.SGD(d.parameters(), lr=0.5)
    d(x, 0.3).sum().backward()
    opt.step()
    with torch.no_grad():
        a2, b2 = exact(x, 0.3), low(x, 0.3)
    assert ((a2 - b2).norm() / a2.norm()).item() < 0.1 and not torch.allclose(a2, a)
    c = ConvDiscriminator((1, 8, 8), width=8)
    for lin in c.film:
        torch.nn.init.normal_(lin.weight, std=0.3)
    xi = torch.randn(6, 1, 8, 8)
    ga = fs.fields.DiscriminatorFlow(c, eta=1.0)(xi, 0.5)
    gb = fs.fields.DiscriminatorFlow(c, eta=1.0, compute_dtype=torch.bfloat16)(xi, 0.5)
    assert gb.dtype == torch.float32 and 0 < ((ga - gb).norm() / ga.norm()).item() < 0.1
    with pytest.raises(ValueError, match="compute_dtype"):
        fs.fields.DiscriminatorFlow(d, compute_dtype="int8")


def test_discriminator_flow_ipm_moves_mass_to_the_data(tmp_path):
    """Alg. 3 with the IPM loss and a gradient penalty on one Gaussian: particles from N(0, I)
    end up near the data mean (3, 0) and the saved model reloads with the same flow."""
    data = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0)) * 0.5 + torch.tensor([3.0, 0.0])
    model = fs.train.discriminator_flow(data, out=tmp_path / "df", steps=300, loss="ipm", gp=1.0, eta=1.0,
                                        lr=1e-3, progress=False, **SMALL_DF)
    x = fs.sample(model.field(), "euler", nfe=8, n=500, seed=0)
    prior = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    target = data[:500]
    assert (x.mean(0) - torch.tensor([3.0, 0.0])).norm() < 2.0            # the prior mean was 3 away
    assert fs.metrics.energy_distance(x, target) < 0.6 * fs.metrics.energy_distance(prior, target)
    again = fs.from_pretrained(tmp_path / "df")
    assert torch.allclose(fs.sample(again.field(), "euler", nfe=8, n=50, seed=1),
                          fs.sample(model.field(), "euler", nfe=8, n=50, seed=1), atol=1e-6)
    early = fs.sample(model.field(t_end=0.5), "euler", nfe=4, n=50, seed=1, return_info=True)[1]
    assert early.grid[-1] == pytest.approx(0.5)


def test_partial_trajectories_equal_the_full_trajectory_at_every_step():
    """Alg. 3's particles x_{i/N}, simulated piecewise as far as each one needs, equal a full
    N-step trajectory at every step index, the pieces' interior knots included (a particle whose
    step sits exactly on a knot once got its starting noise)."""
    from flowsolve.train.discriminator_flow import partial_trajectories

    d = fs.models.gan.Discriminator(2, 32, 2, time_conditioned=True, seed=0)
    N = 12
    field = fs.fields.DiscriminatorFlow(d, eta=3.0, N=N, shape=(2,))
    grid = torch.linspace(0, 1, N + 1, dtype=torch.float64)
    x0 = torch.randn(N, 2, generator=torch.Generator().manual_seed(0))
    _, info = fs.sample(field, "euler", grid=grid, x_init=x0, return_info=True, trajectory_every=1)
    full = info.trajectory  # (N + 1, B, 2)
    i = torch.stack([torch.arange(N), torch.arange(N).flip(0), torch.full((N,), 4)])  # 4 is a knot
    fakes = partial_trajectories(field, x0, i, "euler", grid, [0, 4, 8, 12], {})
    for k in range(len(i)):
        assert torch.allclose(fakes[k], full[i[k], torch.arange(N)], atol=1e-6), k
    assert not torch.allclose(fakes[2], x0)


@pytest.mark.parametrize("per", [1, 2, 3])
def test_update_particles_give_each_update_per_particles_of_every_trajectory(per):
    """With T starting points and `per` particles of each per update, update k's particle b·per + r
    is x_0 number b on the full N-step trajectory, at the step index returned beside it."""
    from flowsolve.train.discriminator_flow import update_particles

    d = fs.models.gan.Discriminator(2, 32, 2, time_conditioned=True, seed=0)
    N, T, K = 12, 5, 3
    field = fs.fields.DiscriminatorFlow(d, eta=3.0, N=N, shape=(2,))
    grid = torch.linspace(0, 1, N + 1, dtype=torch.float64)
    x0 = torch.randn(T, 2, generator=torch.Generator().manual_seed(0))
    _, info = fs.sample(field, "euler", grid=grid, x_init=x0, return_info=True, trajectory_every=1)
    full = info.trajectory  # (N + 1, T, 2)
    i = torch.randint(N, (K * per, T), generator=torch.Generator().manual_seed(1))
    fakes, steps = update_particles(field, x0, i, K, "euler", grid, [0, 4, 8, 12], {})
    assert fakes.shape == (K, T * per, 2) and steps.shape == (K, T * per)
    owner = torch.arange(T).repeat_interleave(per)
    for k in range(K):
        assert torch.allclose(fakes[k], full[steps[k], owner], atol=1e-6), k
        assert sorted(steps[k].tolist()) == sorted(i[k * per:(k + 1) * per].flatten().tolist())
    with pytest.raises(fs.errors.ArgumentError, match="updates"):
        update_particles(field, x0, i, K + 1, "euler", grid, [0, 12], {})


def test_discriminator_flow_trajectories(tmp_path):
    """`trajectories=batch_size` is the default run, bit for bit; fewer trajectories make the same
    number of updates; one that does not divide the batch is refused before training."""
    data = torch.randn(500, 2, generator=torch.Generator().manual_seed(0)) + torch.tensor([3.0, 0.0])
    a = fs.train.discriminator_flow(data, steps=4, d_steps=2, batch_size=32, progress=False, **SMALL_DF)
    b = fs.train.discriminator_flow(data, steps=4, d_steps=2, batch_size=32, trajectories=32, progress=False,
                                    **SMALL_DF)
    c = fs.train.discriminator_flow(data, steps=4, d_steps=2, batch_size=32, trajectories=8, progress=False,
                                    **SMALL_DF)
    for pa, pb in zip(a.f.parameters(), b.f.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.f.parameters(), c.f.parameters()))
    with pytest.raises(fs.errors.ArgumentError, match="trajectories.*divisor of batch_size=32.*got 12"):
        fs.train.discriminator_flow(data, steps=4, batch_size=32, trajectories=12, progress=False, **SMALL_DF)


def test_discriminator_flow_recipes(tmp_path):
    """recipe="paper" is Alg. 3 with Table 4 (the default, bit for bit); recipe="fast" on images is the
    configuration pretrained/digits-df records that it was trained with (its flowsolve.json, written from
    a config file), settings given explicitly override it; "fast" on vectors and unknown recipes are
    refused before training, and the CLI passes --recipe to this trainer only."""
    data = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    a = fs.train.discriminator_flow(data, steps=2, batch_size=16, progress=False, **SMALL_DF)
    b = fs.train.discriminator_flow(data, steps=2, batch_size=16, recipe="paper", progress=False, **SMALL_DF)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.f.parameters(), b.f.parameters()))
    with pytest.raises(fs.errors.ArgumentError, match="recipe.*measured on images.*got 'custom' of shape .2,."):
        fs.train.discriminator_flow(data, steps=2, recipe="fast", progress=False, **SMALL_DF)
    with pytest.raises(fs.errors.ArgumentError, match="recipe: expected one of .'fast', 'paper'., got 'magic'"):
        fs.train.discriminator_flow(data, steps=2, recipe="magic", progress=False)
    fast = fs.train.discriminator_flow("digits", steps=1, recipe="fast", progress=False)
    got = fast.metadata["training"]
    shipped = json.loads((PRE / "digits-df" / "flowsolve.json").read_text())["training"]
    budget = {"steps", "minutes", "log_every"}  # when to stop and to log: not the training's settings
    assert {k: v for k, v in got["config"].items() if k in shipped["config"] and k not in budget} == {
        k: (tuple(v) if isinstance(v, list) else v) for k, v in shipped["config"].items() if k not in budget}
    defaults = fs.train.DFConfig()  # settings added after the shipped run: at the defaults that keep it
    assert all(v == getattr(defaults, k) for k, v in got["config"].items() if k not in shipped["config"])
    assert got["recipe"] == "fast" and got["config"]["trajectories"] is None and got["config"]["eta"] == 2.0
    mine = fs.train.discriminator_flow("digits", steps=1, recipe="fast", d_steps=1, trajectories=8,
                                       batch_size=16, progress=False)
    assert mine.metadata["training"]["config"]["d_steps"] == 1
    assert mine.metadata["training"]["config"]["activation"] == "silu"
    assert main(["train", "gan", "--data", "gmm2d", "--recipe", "fast", "--steps", "1",
                 "--out", str(tmp_path / "bad")]) != 0
    assert main(["train", "discriminator-flow", "--data", "digits", "--recipe", "beyond-teacher", "--steps", "1",
                 "--out", str(tmp_path / "bad2")]) != 0
    assert main(["train", "discriminator-flow", "--data", "digits", "--select-every", "0", "--steps", "1",
                 "--out", str(tmp_path / "bad3")]) != 0
    assert not any((tmp_path / b).exists() for b in ("bad", "bad2", "bad3"))
    assert main(["train", "discriminator-flow", "--data", "digits", "--recipe", "fast", "--steps", "1",
                 "--batch-size", "16", "--config", str(_json(tmp_path / "c.json", {"trajectories": 8})),
                 "--out", str(tmp_path / "df"), "--quiet"]) == 0
    meta = json.loads((tmp_path / "df" / "flowsolve.json").read_text())["training"]
    assert meta["recipe"] == "fast" and meta["config"]["d_steps"] == 4 and meta["config"]["batch_size"] == 16


def _json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_discriminator_flow_d_steps_and_minutes(tmp_path):
    """`d_steps=K` makes K discriminator updates per simulation (one logged step); a `minutes`
    budget stops the run early with a checkpoint, and a resumed run with the budget spent stops."""
    data = torch.randn(500, 2, generator=torch.Generator().manual_seed(0)) + torch.tensor([3.0, 0.0])
    opt_steps = []
    orig = torch.optim.Adam.step

    def counting(self, *a, **k):
        opt_steps.append(1)
        return orig(self, *a, **k)

    torch.optim.Adam.step = counting
    try:
        fs.train.discriminator_flow(data, steps=3, d_steps=4, progress=False, **SMALL_DF)
    finally:
        torch.optim.Adam.step = orig
    assert len(opt_steps) == 12
    with pytest.raises(fs.errors.ArgumentError, match="d_steps"):
        fs.train.discriminator_flow(data, steps=3, d_steps=0, progress=False, **SMALL_DF)
    fs.train.discriminator_flow(data, out=tmp_path / "df", steps=10**6, minutes=0.02, progress=False, **SMALL_DF)
    ck = torch.load(tmp_path / "df" / "checkpoints" / "last.pt", weights_only=False)
    history = json.loads(ck["extra"])["history"]
    assert 0 < ck["step"] < 10**6 and history["stopped"]["step"] == ck["step"]
    again = fs.train.discriminator_flow(data, out=tmp_path / "df", steps=10**6, minutes=0.02, resume=True,
                                        progress=False, **SMALL_DF)
    ck2 = torch.load(tmp_path / "df" / "checkpoints" / "last.pt", weights_only=False)
    assert ck2["step"] == ck["step"] and again is not None
    # a larger budget and more steps: the resumed run finishes, and its record no longer says stopped
    fs.train.discriminator_flow(data, out=tmp_path / "df", steps=ck["step"] + 3, minutes=5, resume=True,
                                allow_changes=True, progress=False, **SMALL_DF)
    meta = json.loads((tmp_path / "df" / "flowsolve.json").read_text())["training"]
    assert meta["steps_done"] == ck["step"] + 3 and "stopped" not in meta, meta
    with pytest.raises(fs.errors.ArgumentError, match="minutes"):
        fs.train.discriminator_flow(data, steps=3, minutes=-1, progress=False, **SMALL_DF)


def test_score_gan_with_the_exact_score_covers_the_modes(gmm):
    """Alg. 1 with the exact data denoiser and a learned generated score, small networks, per-sample
    gradient normalisation (without it, this short run stays on 1–4 modes)."""
    gen = fs.train.score_gan(gmm.denoiser, (2,), steps=1500, K=3, width=128, depth=3, score_width=128,
                             score_depth=3, latent=16, lr=1e-3, score_lr=2e-3, batch_size=256, normalize=True,
                             progress=False)
    x = gen.sample(2000, seed=0)
    share = torch.bincount(gmm.assign(x), minlength=5).float() / len(x)
    assert share.min() > 0.08, share


def test_kernel_flows_match_closed_forms():
    torch.manual_seed(0)
    x, y = torch.randn(6, 2, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    bw = (0.7, 2.0)
    k, g = fs.fields.rbf_kernel_grad(x, y, bw)
    xx = x.clone().requires_grad_(True)
    kk = sum(torch.exp(-(xx[:, None] - y[None]).square().sum(-1) / (2 * s * s)) for s in bw)
    assert torch.allclose(k, kk.detach())
    for i in range(6):
        for j in range(9):
            (gi,) = torch.autograd.grad(kk[i, j], xx, retain_graph=True)
            assert torch.allclose(g[i, j], gi[i])
    # MMD flow: ∇h at each particle with h(x) = mean_y k(x, y) − mean_x' k(x, x') (ρ = the particles)
    flow = fs.fields.MMDFlow(y, bandwidths=bw)
    xx = x.clone().requires_grad_(True)
    h = lambda p: sum(torch.exp(-(p[None] - y).square().sum(-1) / (2 * s * s)).mean() -  # noqa: E731
                      torch.exp(-(p[None] - x).square().sum(-1) / (2 * s * s)).mean() for s in bw)
    want = torch.stack([torch.autograd.functional.jacobian(h, x[i]) for i in range(6)])
    assert torch.allclose(flow.grad_h(x), want)
    # SVGD (Eq. 17) on a standard normal target: φ(x_i) = mean_j k(x_j, x_i)(−x_j) + ∇_{x_j} k(x_j, x_i)
    svgd = fs.fields.SVGD(lambda p: -p, bandwidths=(1.0,))
    phi = torch.zeros_like(x)
    for i in range(6):
        for j in range(6):
            kij = torch.exp(-(x[j] - x[i]).square().sum() / 2)
            phi[i] += kij * (-x[j]) - (x[j] - x[i]) * kij
    assert torch.allclose(svgd(x, 0.0), phi / 6)


def test_mmd_flow_pm_reaches_the_mixture(gmm):
    """The interacting MMD gradient flow (Table 2) from N(0, I) to the paper's mixture."""
    data = gmm.sample(500, torch.Generator().manual_seed(0))
    x = fs.sample(fs.fields.MMDFlow(data, eta=100.0), "euler", nfe=200, n=500, seed=0)
    share = torch.bincount(gmm.assign(x), minlength=5).float() / len(x)
    assert share.min() > 0.15
    assert fs.metrics.energy_distance(x, gmm.sample(500, torch.Generator().manual_seed(1))) < 0.03


def test_cli_train_then_sample_generators(tmp_path):
    cfg = tmp_path / "small.json"
    cfg.write_text('{"width": 32, "depth": 2, "latent": 8}')
    for kind in ("gan", "mmd-generator", "score-gan"):
        out = tmp_path / kind
        assert main(["train", kind, "--data", "gmm2d", "--out", str(out), "--steps", "3", "--config", str(cfg),
                     "--quiet"]) == 0
        assert main(["sample", "--model", str(out), "--n", "10", "--seed", "0", "--out", str(tmp_path / f"{kind}.npy"),
                     "--quiet"]) == 0
        assert np.load(tmp_path / f"{kind}.npy").shape == (10, 2)
    df_cfg = tmp_path / "df.json"
    df_cfg.write_text('{"width": 32, "depth": 2, "emb_size": 8, "N": 6}')
    assert main(["train", "discriminator-flow", "--data", "gmm2d", "--out", str(tmp_path / "df"), "--steps", "2",
                 "--config", str(df_cfg), "--quiet"]) == 0
    assert main(["sample", "--model", str(tmp_path / "df"), "--solver", "heun", "--nfe", "6", "--n", "7",
                 "--out", str(tmp_path / "df.npy"), "--quiet"]) == 0
    assert np.load(tmp_path / "df.npy").shape == (7, 2)


def test_svgd_reaches_the_mixture(gmm):
    x = fs.sample(fs.fields.SVGD(gmm.score, shape=(2,), eta=20.0), "euler", nfe=200, n=400, seed=0)
    share = torch.bincount(gmm.assign(x), minlength=5).float() / len(x)
    assert share.min() > 0.12
    assert fs.metrics.energy_distance(x, gmm.sample(400, torch.Generator().manual_seed(1))) < 0.06   # prior: > 2


def test_flow_panels_figure(tmp_path, gmm):
    field = fs.fields.EDM(gmm.denoiser)
    fs.viz.flow_panels(field, tmp_path / "f.png", solver="heun", nfe=13, n=32, reference=gmm, panels=4)
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    d = Discriminator(2, width=16, depth=1, emb_size=8)
    flow = fs.fields.DiscriminatorFlow(d, eta=1.0, N=4, shape=(2,))
    fs.viz.flow_panels(flow, tmp_path / "d.png", nfe=4, n=16, panels=3, heat=lambda p, t: d(p, t))
    assert (tmp_path / "d.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="2-D"):
        fs.viz.flow_panels(fs.fields.EDM(fs.data.GaussianMixture.random(3, 2, 0.5).denoiser), tmp_path / "x.png",
                           nfe=4, n=8)


# -- image models (DCGAN generator, conv discriminator with FiLM) ----------------------------------
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 28, 28)])
def test_image_networks_shapes_and_round_trip(tmp_path, shape):
    from flowsolve.models import ConvDiscriminator, DCGANGenerator
    torch.manual_seed(0)
    g, d = DCGANGenerator(shape, latent=16, width=8), ConvDiscriminator(shape, width=8)
    x = g.sample(3, seed=0)
    assert x.shape == (3, *shape) and x.abs().max() <= 1                 # tanh output
    f = d(x, torch.tensor([0.0, 0.5, 1.0]))
    assert f.shape == (3,)
    d.save_pretrained(tmp_path / "d")
    g.save_pretrained(tmp_path / "g")
    assert torch.allclose(type(d).from_pretrained(tmp_path / "d")(x, 0.5), d(x, 0.5), rtol=1e-5, atol=1e-12)
    assert torch.allclose(type(g).from_pretrained(tmp_path / "g").sample(3, seed=0), x, rtol=1e-5, atol=1e-12)


def test_conv_discriminator_film_uses_time():
    """FiLM starts as the identity (zero weights) and then makes f depend on t; per-sample times
    equal a loop over samples (no coupling across the batch, so Eq. 20 is per particle)."""
    from flowsolve.models import ConvDiscriminator
    torch.manual_seed(0)
    d = ConvDiscriminator((1, 8, 8), width=8)
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(d(x, 0.1), d(x, 0.9))                           # identity modulation at init
    for lin in d.film:
        torch.nn.init.normal_(lin.weight, std=0.5)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9])
    assert not torch.allclose(d(x, 0.1), d(x, 0.9))
    one_by_one = torch.stack([d(x[i:i + 1], t[i:i + 1])[0] for i in range(4)])
    assert torch.allclose(d(x, t), one_by_one, atol=1e-6)


def test_image_trainers_and_cli_on_digits(tmp_path):
    """Discriminator Flow, GAN and Score GAN train on 8×8 digits with the image networks, save,
    reload and sample through the CLI with the right shape; a DF field's input gradient is autograd's."""
    df = fs.train.discriminator_flow("digits", steps=2, N=4, conv_width=8, emb_size=8, batch_size=16, progress=False)
    assert type(df.f).__name__ == "ConvDiscriminator"
    x = fs.sample(df.field(), "euler", nfe=4, n=5, seed=0)
    assert x.shape == (5, 1, 8, 8) and torch.isfinite(x).all()
    cfg = tmp_path / "small.json"
    cfg.write_text('{"conv_width": 8, "latent": 8, "batch_size": 16}')
    for kind in ("gan", "score-gan", "discriminator-flow"):
        out = tmp_path / kind
        extra = ["--teacher", "pretrained/digits-edm"] if kind == "score-gan" else []
        conf = cfg if kind != "discriminator-flow" else tmp_path / "df.json"
        (tmp_path / "df.json").write_text('{"conv_width": 8, "emb_size": 8, "N": 4, "batch_size": 16}')
        assert main(["train", kind, "--data", "digits", "--out", str(out), "--steps", "2", "--config", str(conf),
                     "--quiet", *extra]) == 0
        assert main(["sample", "--model", str(out), "--nfe", "4", "--n", "6", "--seed", "0",
                     "--out", str(tmp_path / f"{kind}.npy"), "--quiet"]) == 0
        assert np.load(tmp_path / f"{kind}.npy").shape == (6, 1, 8, 8)
    gen = fs.from_pretrained(tmp_path / "score-gan")
    assert type(gen).__name__ == "DCGANGenerator"
    report = fs.evaluate.evaluate_digits(gen, n=50)
    assert report.nfe == 1 and report.solver == "generator" and report.fd > 0


def test_cli_select_every_keeps_the_best_validation_fd(tmp_path):
    """`flowsolve train score-gan --select-every N` scores the generator every N steps against the
    training digits and saves the best one, recording which; it refuses data without the score."""
    cfg = tmp_path / "small.json"
    cfg.write_text('{"conv_width": 8, "latent": 8, "batch_size": 16, "checkpoint_every": 2}')
    out = tmp_path / "sg"
    assert main(["train", "score-gan", "--teacher", "pretrained/digits-edm", "--data", "digits", "--out", str(out),
                 "--steps", "4", "--config", str(cfg), "--select-every", "2", "--quiet"]) == 0
    meta = fs.from_pretrained(out).metadata["training"]
    scores = {2: None, 4: None}
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    import json
    for step, value in json.loads(ck["extra"])["history"]["selection"]:
        scores[step] = value
    assert meta["selected"]["step"] == min(scores, key=scores.get)
    assert meta["selected"]["value"] == pytest.approx(min(scores.values()))
    from flowsolve.evaluate import validation_fd
    assert validation_fd()(fs.from_pretrained(out)) == pytest.approx(meta["selected"]["value"], rel=1e-4)
    assert main(["train", "edm", "--data", "gmm2d", "--out", str(tmp_path / "e"), "--select-every", "2",
                 "--quiet"]) == 2
    assert main(["train", "gan", "--data", "gmm2d", "--out", str(tmp_path / "g"), "--select-every", "0",
                 "--quiet"]) == 2


def test_cli_select_every_on_the_mixture_keeps_the_best_validation_energy(tmp_path, monkeypatch):
    """On vector data the selection score is the energy distance to validation samples drawn with
    their own seed (`fs.evaluate.validation_energy`); the saved generator is the best-scored one."""
    cfg = tmp_path / "small.json"
    cfg.write_text('{"width": 16, "depth": 2, "latent": 4, "batch_size": 32, "checkpoint_every": 2}')
    out = tmp_path / "g"
    assert main(["train", "gan", "--data", "gmm2d", "--out", str(out), "--steps", "6", "--config", str(cfg),
                 "--select-every", "2", "--quiet"]) == 0
    gen = fs.from_pretrained(out)
    meta = gen.metadata["training"]
    assert meta["selected"]["step"] in (2, 4, 6)
    from flowsolve.evaluate import validation_energy
    assert validation_energy("gmm2d")(gen) == pytest.approx(meta["selected"]["value"], rel=1e-5)
    # --select-seed: the selection scores samples of that seed (kept apart from the evaluation seeds)
    import flowsolve.evaluate as fse
    asked = []  # the keyword arguments each selection score was made with
    real = fse.validation_energy
    monkeypatch.setattr(fse, "validation_energy", lambda data, **kw: asked.append(kw) or real(data, **kw))

    def selected(name, *flags):
        """A two-step run selected every 2 steps with `flags`; the selection's keywords go to `asked`."""
        asked.clear()
        assert main(["train", "gan", "--data", "gmm2d", "--out", str(tmp_path / name), "--steps", "2", "--config",
                     str(cfg), "--select-every", "2", *flags, "--quiet"]) == 0
        return fs.from_pretrained(tmp_path / name)

    gen7 = selected("g7", "--select-seed", "7")
    assert [kw.get("sample_seed") for kw in asked] == [7]
    assert real("gmm2d", sample_seed=7)(gen7) == pytest.approx(gen7.metadata["training"]["selected"]["value"], rel=1e-5)
    assert main(["train", "gan", "--data", "gmm2d", "--out", str(tmp_path / "g8"), "--select-seed", "7",
                 "--quiet"]) == 2  # a selection seed without a selection
    # --select-n: the selection scores that many samples (the score recomputed at that n is the recorded one)
    gen9 = selected("g9", "--select-n", "500")
    assert [kw.get("n") for kw in asked] == [500]
    assert real("gmm2d", n=500)(gen9) == pytest.approx(gen9.metadata["training"]["selected"]["value"], rel=1e-5)
    assert real("gmm2d", n=500)(gen9) != pytest.approx(real("gmm2d")(gen9), rel=1e-3)  # n mattered
    for bad in (["--select-n", "500"], ["--select-every", "2", "--select-n", "1"]):
        assert main(["train", "gan", "--data", "gmm2d", "--out", str(tmp_path / "g10"), *bad, "--quiet"]) == 2
    assert not (tmp_path / "g10").exists()  # refused before any work


def test_cli_select_every_keeps_the_best_discriminator_flow(tmp_path):
    """`flowsolve train discriminator-flow --select-every N` scores the EMA flow (its field at its own
    N Euler steps) every N steps and saves the best-scored one: the saved flow scores the recorded
    value again, and that value is the smallest of the run's selection history."""
    cfg = tmp_path / "small.json"
    cfg.write_text('{"width": 16, "depth": 2, "N": 8, "batch_size": 32, "checkpoint_every": 2}')
    out = tmp_path / "df"
    assert main(["train", "discriminator-flow", "--data", "gmm2d", "--out", str(out), "--steps", "6", "--config",
                 str(cfg), "--select-every", "2", "--quiet"]) == 0
    flow = fs.from_pretrained(out)
    meta = flow.metadata["training"]
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    import json
    history = dict((s, v) for s, v in json.loads(ck["extra"])["history"]["selection"])
    assert set(history) == {2, 4, 6} and len(set(history.values())) == 3     # three different flows scored
    assert meta["selected"]["step"] == min(history, key=history.get)
    from flowsolve.evaluate import validation_energy
    assert validation_energy("gmm2d")(flow) == pytest.approx(meta["selected"]["value"], rel=1e-5)


def test_cli_select_every_with_tail_average_saves_the_best_scored_checkpoint_average(tmp_path):
    """`--select-every` with the config key tail_average=2: each score is of the mean of the last two
    checkpoints' weights, and the saved flow is the best-scored mean: it scores the recorded value
    again and records which steps it averages."""
    cfg = tmp_path / "small.json"
    cfg.write_text('{"width": 16, "depth": 2, "N": 8, "batch_size": 32, "checkpoint_every": 2, "tail_average": 2}')
    out = tmp_path / "df"
    assert main(["train", "discriminator-flow", "--data", "gmm2d", "--out", str(out), "--steps", "6", "--config",
                 str(cfg), "--select-every", "2", "--quiet"]) == 0
    meta = fs.from_pretrained(out).metadata["training"]
    step = meta["selected"]["step"]
    assert meta["tail_average"] == ([2] if step == 2 else [step - 2, step])
    from flowsolve.evaluate import validation_energy
    assert validation_energy("gmm2d")(fs.from_pretrained(out)) == pytest.approx(meta["selected"]["value"], rel=1e-5)
    assert main(["train", "discriminator-flow", "--data", "gmm2d", "--out", str(tmp_path / "bad"), "--steps", "6",
                 "--config", str(cfg), "--select-every", "3", "--quiet"]) != 0     # not a checkpoint step


def test_validation_energy_separates_exact_samples_from_a_shifted_mixture():
    """validation_energy against the exact mixture: a 'generator' drawing exact samples scores at the
    two-sample noise floor (< 0.004 at n = 3000), one drawing the mixture shifted by 1 scores 50× above that."""
    from flowsolve.evaluate import validation_energy
    gmm = fs.data.GaussianMixture.paper()

    class Exact:
        def __init__(self, shift):
            self.shift = shift

        def sample(self, n, seed):
            return gmm.sample(n, torch.Generator().manual_seed(seed)) + self.shift

    score = validation_energy(gmm)
    assert abs(score(Exact(0.0))) < 0.004
    assert score(Exact(1.0)) > 0.2
    with pytest.raises(ValueError, match="data: validation by energy distance is for vectors"):
        validation_energy("digits")


def test_conv_discriminator_activation_makes_the_flow_smooth(tmp_path):
    """A leaky-ReLU conv discriminator is piecewise linear in x: the Discriminator Flow's velocity
    η∇f has zero Jacobian almost everywhere (it cannot contract particles). With activation='silu'
    the Hessian of f is not zero; the choice is a DFConfig setting that saves and reloads."""
    from flowsolve.models import ConvDiscriminator
    x, v = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    for act, curved in (("leaky_relu", False), ("silu", True)):
        d = ConvDiscriminator((1, 8, 8), width=8, activation=act)
        for lin in d.film:
            torch.nn.init.normal_(lin.weight, std=0.3)
        _, hv = torch.autograd.functional.hvp(lambda y: d(y, 0.4).sum(), x, v)
        assert (hv.abs().max().item() > 1e-6) == curved
    with pytest.raises(fs.errors.ArgumentError, match="activation: expected one of"):
        ConvDiscriminator((1, 8, 8), width=8, activation="tanh_x")
    df = fs.train.discriminator_flow("digits", out=tmp_path / "df", steps=2, N=4, conv_width=8, emb_size=8,
                                     batch_size=16, activation="silu", progress=False)
    again = fs.from_pretrained(tmp_path / "df")
    assert isinstance(again.f.act, torch.nn.SiLU) and isinstance(df.f.act, torch.nn.SiLU)
    xa = fs.sample(df.field(), "euler", nfe=4, n=3, seed=0)
    assert torch.allclose(xa, fs.sample(again.field(), "euler", nfe=4, n=3, seed=0), atol=1e-6)
