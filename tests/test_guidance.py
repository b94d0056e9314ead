"""Conditional scores and guidance (issue 13): per-sample `cond=` through every chunk, CFG and its
successors as σ-time fields, checked against the exact mixture, diffusers' own CFG loops on tiny
random models, and diffusers' `rescale_noise_cfg`."""
import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

import flowsolve as fs
from flowsolve.fields.guidance import GuidedDenoiser

GMM = fs.data.GaussianMixture.paper()
K = 5
COMPONENTS = [fs.data.GaussianMixture(GMM.means[k:k + 1], 0.5) for k in range(K)]


def cond_den(x, sigma, class_labels):
    """The exact denoiser of p(x | c) (one mode of the mixture), and of p(x) for the null label K."""
    out = GMM.denoiser(x, sigma).clone()
    for k in range(K):
        rows = class_labels == k
        if rows.any():
            out[rows] = COMPONENTS[k].denoiser(x[rows], sigma[rows])
    return out


LABELS = torch.arange(40) % K


def test_cond_rows_follow_every_chunk():
    f = fs.fields.EDM(cond_den, shape=(2,))
    whole, info = fs.sample(f, "heun", nfe=15, n=40, seed=2, cond={"class_labels": LABELS}, return_info=True)
    for batch in (1, 7, 16):
        assert torch.equal(fs.sample(f, "heun", nfe=15, n=40, seed=2, cond={"class_labels": LABELS},
                                     batch_size=batch), whole)
    assert torch.equal(GMM.assign(whole), LABELS)                  # each sample lands in its own mode
    part = fs.sample(f, "heun", nfe=15, n=5, seed=2, index_offset=35, cond={"class_labels": LABELS[35:]})
    assert torch.equal(part, whole[35:])
    one = fs.sample(f, "heun", nfe=15, n=6, seed=0, cond={"class_labels": torch.tensor([3])})     # size 1: broadcast
    assert torch.equal(GMM.assign(one), torch.full((6,), 3))
    assert info.network_passes == info.nfe


@pytest.mark.parametrize("bad,word", [({"class_labels": LABELS[:3]}, "leading size 3"), (["x"], "dict"),
                                      ({"class_labels": "three"}, "class_labels")])
def test_bad_cond_names_the_key(bad, word):
    f = fs.fields.EDM(cond_den, shape=(2,))
    with pytest.raises((ValueError, TypeError), match=word):
        fs.sample(f, "euler", nfe=4, n=40, cond=bad)


def test_cond_on_a_field_without_conditioning_is_refused():
    with pytest.raises(ValueError, match="takes no conditioning"):
        fs.sample(fs.fields.Function(lambda x, t: -x, shape=(2,)), "euler", nfe=2, n=4, cond={"y": torch.zeros(4)})


def test_cfg_is_the_score_difference_of_eq_26_and_every_solver_runs_it():
    w = 3.0
    guided = fs.fields.EDM(cond_den, shape=(2,), guidance=w, uncond={"class_labels": K})
    # Eq. 26: μ_data = w on the conditional score, μ_ρ = w − 1 on the unconditional one
    sum_field = w * fs.fields.EDM(cond_den, shape=(2,)) + (1 - w) * fs.fields.EDM(
        lambda x, s, class_labels: GMM.denoiser(x, s), shape=(2,))
    assert sum_field.time_is_sigma                       # field arithmetic stays σ-time
    cond = {"class_labels": LABELS}
    a = fs.sample(guided, "euler", nfe=12, n=40, seed=0, cond=cond)
    b = fs.sample(sum_field, "euler", nfe=12, n=40, seed=0, cond=cond)
    assert torch.allclose(a, b, atol=1e-5)
    for solver in ("dpmpp_2m", "dpmpp_3m", "ipndm", "heun", "sde"):
        x, info = fs.sample(guided, solver, nfe=10, n=40, seed=1, cond=cond, return_info=True)
        assert torch.isfinite(x).all()
        assert info.network_passes == info.nfe           # the two branches as one batched call
    # w = 1 is the conditional model, w = 0 the unconditional one
    one = fs.fields.EDM(cond_den, shape=(2,), guidance=1.0, uncond={"class_labels": K})
    assert torch.allclose(fs.sample(one, "heun", nfe=9, n=40, seed=3, cond=cond),
                          fs.sample(fs.fields.EDM(cond_den, shape=(2,)), "heun", nfe=9, n=40, seed=3, cond=cond),
                          atol=1e-5)
    zero = fs.fields.EDM(cond_den, shape=(2,), guidance=0.0, uncond={"class_labels": K})
    x0 = fs.sample(zero, "heun", nfe=31, n=400, seed=3, cond={"class_labels": torch.arange(400) % K})
    share = (GMM.assign(x0) == torch.arange(400) % K).float().mean()
    assert 0.1 < share < 0.35                            # the label is ignored: about 1 in 5 by chance


def _branches(x, sigma):
    return cond_den(x, sigma, LABELS[:len(x)]), GMM.denoiser(x, sigma)


def test_rescale_matches_diffusers_rescale_noise_cfg():
    from diffusers.guiders.guider_utils import rescale_noise_cfg
    x = GMM.sample(40, torch.Generator().manual_seed(0)) + torch.randn(40, 2, generator=torch.Generator().manual_seed(1))
    sigma = torch.full((40,), 1.3)
    g = GuidedDenoiser(cond_den, 4.0, {"class_labels": K}, rescale=0.7)
    d = g(x, sigma, class_labels=LABELS)
    d_c, d_u = _branches(x, sigma)
    eps = lambda den: (x - den) / 1.3  # noqa: E731
    eps_cfg = eps(d_u) + 4.0 * (eps(d_c) - eps(d_u))
    want = x - 1.3 * rescale_noise_cfg(eps_cfg, eps(d_c), guidance_rescale=0.7)
    assert torch.allclose(d, want, atol=1e-5)


def test_interval_autoguidance_and_apg():
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(4)) * 3
    d_c, d_u = _branches(x, torch.full((40,), 2.0))
    inside = GuidedDenoiser(cond_den, 3.0, {"class_labels": K}, interval=(0.3, 5.0))
    assert torch.allclose(inside(x, torch.full((40,), 2.0), class_labels=LABELS), d_u + 3 * (d_c - d_u), atol=1e-6)
    d_out = inside(x, torch.full((40,), 8.0), class_labels=LABELS)
    assert torch.equal(d_out, cond_den(x, torch.full((40,), 8.0), LABELS)) and inside.last_passes == 1
    # autoguidance: the guide replaces the unconditional branch (here an unconditional guide, two passes)
    auto = GuidedDenoiser(cond_den, 2.5, guide=GMM.denoiser)
    assert torch.allclose(auto(x, torch.full((40,), 2.0), class_labels=LABELS), d_u + 2.5 * (d_c - d_u), atol=1e-6)
    assert auto.last_passes == 2
    # APG against diffusers' guider (the paper's formulation D_c + (w − 1) update), two calls for the momentum
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance
    apg = GuidedDenoiser(cond_den, 3.0, {"class_labels": K}, apg={"eta": 0.3, "norm_threshold": 2.0,
                                                                   "momentum": -0.5})
    buf = MomentumBuffer(-0.5)
    for s in (2.0, 1.5):
        sig = torch.full((40,), s)
        dc, du = _branches(x, sig)
        want = normalized_guidance(dc, du, 3.0 - 1.0, buf, eta=0.3, norm_threshold=2.0, use_original_formulation=True)
        assert torch.allclose(apg(x, sig, class_labels=LABELS), want, atol=1e-5)
    # APG with η = 1 and no threshold or momentum is CFG; with η = 0 the update is orthogonal to D_c
    plain = GuidedDenoiser(cond_den, 3.0, {"class_labels": K}, apg={"eta": 1.0})
    assert torch.allclose(plain(x, torch.full((40,), 2.0), class_labels=LABELS), d_u + 3 * (d_c - d_u), atol=1e-5)
    orth = GuidedDenoiser(cond_den, 3.0, {"class_labels": K}, apg=True)
    upd = orth(x, torch.full((40,), 2.0), class_labels=LABELS) - d_c
    assert (upd * d_c).sum(1).abs().max() < 1e-4
    capped = GuidedDenoiser(cond_den, 3.0, {"class_labels": K}, apg={"eta": 1.0, "norm_threshold": 0.1})
    step = capped(x, torch.full((40,), 2.0), class_labels=LABELS) - d_c
    assert (step.norm(dim=1) <= 2.0 * 0.1 + 1e-5).all()
    with pytest.raises(ValueError, match="uncond"):
        fs.fields.EDM(cond_den, shape=(2,), guidance=2.0)
    with pytest.raises(ValueError, match="need guidance"):
        fs.fields.EDM(cond_den, shape=(2,), rescale=0.5)


# -- diffusers' own CFG loops on tiny random models ----------------------------------------------
def _ddim_cfg_loop(model, sched, z, w, cond, uncond, channels):
    """Classifier-free guidance written as diffusers' pipelines do it: one batch of [cond; uncond]."""
    x = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
            out = model(torch.cat([x, x]), t.expand(2 * len(x)), **both).sample[:, :channels]
            e_c, e_u = out.chunk(2)
            x = sched.step(e_u + w * (e_c - e_u), t, x, eta=0.0).prev_sample
    return x


def _models():
    torch.manual_seed(0)
    small = dict(sample_size=8, block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)
    labels = UNet2DModel(in_channels=1, out_channels=1, num_class_embeds=11, **small).eval()
    text = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4).eval()
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    y = torch.arange(6) % 10
    emb = torch.randn(6, 5, 16, generator=torch.Generator().manual_seed(3))
    return [("unet-labels", labels, {"class_labels": y}, {"class_labels": torch.full((6,), 10)}),
            ("unet-text", text, {"encoder_hidden_states": emb}, {"encoder_hidden_states": torch.zeros(6, 5, 16)}),
            ("dit-labels", dit, {"class_labels": y}, {"class_labels": torch.full((6,), 10)})]


@pytest.mark.parametrize("case", range(3), ids=["unet-labels", "unet-text", "dit-labels"])
def test_cfg_reproduces_diffusers_loops(case):
    name, model, cond, uncond = _models()[case]
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, timestep_spacing="trailing")
    sched.set_timesteps(8)
    z = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = _ddim_cfg_loop(model, sched, z, 4.0, cond, uncond, channels=1)
    den = fs.models.from_diffusers(model, sched)
    field = fs.fields.EDM(den, guidance=4.0, uncond={k: v[:1] for k, v in uncond.items()})
    grid = den.ddim_grid(sched.timesteps, 0.0)
    x0 = z * (1 + grid[0] ** 2).sqrt().float()
    scale = max(1.0, ref.abs().max().item())
    for batch in (None, 4):
        x = fs.sample(field, "euler", grid=grid, x_init=x0, cond=cond, batch_size=batch)
        assert (x - ref).abs().max().item() <= 1e-5 * scale, name


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon", "sample"])
def test_rescale_on_a_diffusers_model_rescales_its_own_prediction(prediction):
    """Stable Diffusion 2.1's recipe (Lin et al. 2024): a zero-terminal-SNR DDIM v-model, CFG with
    `guidance_rescale` = 0.7. The pipelines rescale the network's own output (`rescale_noise_cfg` on
    noise_pred: v, ε or x_0), so `rescale=` on a diffusers model does too: the loop is theirs."""
    from diffusers.guiders.guider_utils import rescale_noise_cfg
    _, model, cond, uncond = _models()[1]
    kw = dict(clip_sample=False, timestep_spacing="trailing", prediction_type=prediction,
              rescale_betas_zero_snr=prediction != "epsilon")
    sched = DDIMScheduler(num_train_timesteps=1000, **kw)
    sched.set_timesteps(8)
    z = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
            p_c, p_u = model(torch.cat([x, x]), t.expand(12), **both).sample.chunk(2)
            guided = rescale_noise_cfg(p_u + 4.0 * (p_c - p_u), p_c, guidance_rescale=0.7)
            x = sched.step(guided, t, x, eta=0.0).prev_sample
    m = fs.models.from_diffusers(model, DDIMScheduler(num_train_timesteps=1000, **kw))
    field = m.field(guidance=4.0, uncond={k: v[:1] for k, v in uncond.items()}, rescale=0.7)
    got = fs.sample(field, "ddim", nfe=8, x_init=field.from_normal(z, float(field.grid(8)[0])), cond=cond)
    assert (got - x).abs().max().item() <= 2e-5 * max(1.0, x.abs().max().item())


def test_unknown_cond_key_for_a_diffusers_model_is_named():
    _, model, cond, uncond = _models()[0]
    sched = DDIMScheduler(num_train_timesteps=1000)
    den = fs.models.from_diffusers(model, sched)
    with pytest.raises(ValueError, match="class_label'.*did you mean 'class_labels'"):
        fs.sample(den.field(), "euler", nfe=2, n=6, cond={"class_label": cond["class_labels"]})
    with pytest.raises(TypeError, match="class_labels"):
        fs.sample(den.field(), "euler", nfe=2, n=6, cond={"class_labels": cond["class_labels"].float()})


def test_two_process_guided_conditional_sampling_matches_one_process(tmp_path):
    """Issue 13's sharding target: 2 processes under Accelerate, each drawing its rows with their own
    labels, give the one-process guided samples. The UNet's CPU convolutions round differently for
    batches of 13 and 7 (measured 3.5e-6 on values of size 1), so the bound is float32 round-off, 1e-5;
    elementwise models are identical bit for bit (test_cond_rows_follow_every_chunk)."""
    import numpy as np
    from test_hardening import _one_and_two_processes
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    args = ["sample", "--model", str(root / "pretrained" / "digits-cond-edm"), "--solver", "dpmpp_2m", "--nfe", "6",
            "--guidance", "2", "--cond", "class_labels=" + ",".join(str(i % 10) for i in range(13)),
            "--num-samples", "13", "--seed", "5", "--quiet"]
    _, r2 = _one_and_two_processes(args, tmp_path / "one.npy", tmp_path / "two.npy", "accelerate")
    assert "from 2 processes (accelerate)" in r2.stdout
    assert np.abs(np.load(tmp_path / "one.npy") - np.load(tmp_path / "two.npy")).max() <= 1e-5


def cond_velocity(x, t, class_labels):
    """The exact flow velocity of the same conditional mixture on x_t = (1 − t) x_0 + t ε:
    v = (x − D(x/(1 − t); t/(1 − t)))/t."""
    col = t.reshape(-1, 1)
    return (x - cond_den(x / (1 - col), t / (1 - t), class_labels)) / col


@pytest.mark.parametrize("kw", [{}, {"rescale": 0.7}, {"apg": {"eta": 0.3, "momentum": 0.0, "norm_threshold": 1.0}},
                                {"interval": (0.5, 3.0)}])
def test_velocity_guidance_is_denoiser_guidance_on_the_same_path(kw):
    """CFG, rescale, APG and interval on a flow velocity give the velocity of the guided denoiser
    (v_w = (x − D_w)/t at σ = t/(1 − t)), pointwise at times across (0, 1), and stay finite at t = 1."""
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(0)) * 2
    y = {"class_labels": LABELS}
    gv = GuidedDenoiser(cond_velocity, 3.0, {"class_labels": K}, prediction="velocity", **kw)
    gd = GuidedDenoiser(cond_den, 3.0, {"class_labels": K}, **kw)
    for t in (0.05, 0.3, 0.6, 0.9):
        tt = torch.full((40,), t, dtype=x.dtype)
        expected = (x - gd(x / (1 - t), tt / (1 - t), **y)) / t
        assert torch.allclose(gv(x, tt, **y), expected, atol=1e-4, rtol=1e-4), (kw, t)
    ones = torch.ones(40)
    prior = GuidedDenoiser(lambda x, t, class_labels: x - GMM.means[class_labels % K], 3.0, {"class_labels": K},
                           prediction="velocity", **kw)
    assert torch.isfinite(prior(x, ones, **y)).all()
    with pytest.raises(ValueError, match="prediction"):
        GuidedDenoiser(cond_velocity, 3.0, {"class_labels": K}, prediction="eps")


def test_guided_flow_model_reproduces_a_flow_match_cfg_loop():
    """A class-conditional UNet as a flow model: `m.field(guidance=w, uncond=)` under euler is the
    FlowMatchEuler loop with CFG on the velocity; rescale runs; options without guidance are refused."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    _, model, cond, uncond = _models()[0]
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(8)
    z = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            v_c, v_u = model(torch.cat([x, x]), t.expand(12), class_labels=torch.cat([cond["class_labels"],
                                                                                       uncond["class_labels"]])).sample.chunk(2)
            x = sched.step(v_u + 4.0 * (v_c - v_u), t, x).prev_sample
    m = fs.models.from_diffusers(model, FlowMatchEulerDiscreteScheduler(shift=3.0))
    field = m.field(guidance=4.0, uncond={"class_labels": 10})
    ours = fs.sample(field, "euler", nfe=8, x_init=z, cond=cond)
    assert (ours - x).abs().max().item() <= 1e-5 * max(1.0, x.abs().max().item())
    rescaled = fs.sample(m.field(guidance=4.0, uncond={"class_labels": 10}, rescale=0.7), "dpmpp_2m", nfe=8,
                         x_init=z, cond=cond)
    assert torch.isfinite(rescaled).all() and not torch.allclose(rescaled, ours)
    with pytest.raises(ValueError, match="guidance"):
        m.field(rescale=0.7)


def test_a_guidance_schedule_is_the_scale_at_each_noise_level():
    """`guidance=` as a function of σ: a step function is `interval` guidance (both CFG inside, the
    conditional model outside), per-sample σ's get per-sample scales, a constant is the number, and
    a scale that is not a finite number is refused by name."""
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(4)) * 3
    sigma = torch.linspace(0.1, 8.0, 40)
    step = GuidedDenoiser(cond_den, lambda s: torch.where((s > 0.3) & (s <= 5.0), 3.0, 1.0), {"class_labels": K})
    interval = GuidedDenoiser(cond_den, 3.0, {"class_labels": K}, interval=(0.3, 5.0))
    assert torch.allclose(step(x, sigma, class_labels=LABELS), interval(x, sigma, class_labels=LABELS), atol=1e-6)
    d_c, d_u = _branches(x, sigma)
    ramp = GuidedDenoiser(cond_den, lambda s: 1 + s, {"class_labels": K})
    assert torch.allclose(ramp(x, sigma, class_labels=LABELS), d_u + (1 + sigma)[:, None] * (d_c - d_u), atol=1e-5)
    const = GuidedDenoiser(cond_den, lambda s: 2.5, {"class_labels": K})
    assert torch.allclose(const(x, sigma, class_labels=LABELS), d_u + 2.5 * (d_c - d_u), atol=1e-6)
    with pytest.raises(ValueError, match="guidance"):
        GuidedDenoiser(cond_den, lambda s: float("nan"), {"class_labels": K})(x, sigma, class_labels=LABELS)


def test_list_inputs_are_rows_in_both_branches():
    """A list of per-sample tensors (IP-Adapter's image embeddings) in cond and uncond: each entry
    gets the branch's rows, so CFG on a model of a list input is the formula on its two calls."""
    def den(x, sigma, feats):
        assert isinstance(feats, list) and len(feats) == 2
        return x / (1 + sigma[:, None] ** 2) + feats[0] - 2 * feats[1]
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((6,), 1.5)
    feats = [torch.randn(6, 2, generator=torch.Generator().manual_seed(1)), torch.randn(1, 2)]
    null = [torch.zeros(1, 2), torch.ones(1, 2)]
    g = GuidedDenoiser(den, 3.0, {"feats": null})
    want = den(x, sigma, null) + 3.0 * (den(x, sigma, feats) - den(x, sigma, null))
    from flowsolve._cond import RowList  # what fs.sample's cond check makes of a list of tensors
    assert torch.allclose(g(x, sigma, feats=RowList(feats)), want, atol=1e-6)
    assert g.last_passes == 1
    short = GuidedDenoiser(den, 3.0, {"feats": null[:1]})  # one unconditional entry for two
    with pytest.raises(ValueError, match="uncond: input 'feats' does not match cond's in structure"):
        short(x, sigma, feats=RowList(feats))


def test_apg_momentum_on_a_flow_field_is_per_solve_whatever_the_chunking():
    """APG's momentum belongs to one solve: a guided flow velocity gets its own copy per chunk (as a
    guided denoiser does), so sample i is the same whatever `batch_size`."""
    g = GuidedDenoiser(cond_velocity, 3.0, {"class_labels": K}, prediction="velocity", apg={"momentum": -0.5})
    field = fs.fields.FlowMatching(g, (2,))
    grid = fs.grids.uniform(8, 0.99, 0.0).double()
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = {"class_labels": LABELS[:6]}
    whole = fs.sample(field, "euler", grid=grid, x_init=z, cond=y)
    chunked = fs.sample(field, "euler", grid=grid, x_init=z, cond=y, batch_size=3)
    assert torch.allclose(whole, chunked, atol=1e-10)
