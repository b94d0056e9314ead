"""Pretrained data scores: diffusers adapters against diffusers' own schedulers, EDM preconditioning,
model folders (round trips through diffusers' from_pretrained), safe loading."""
import json
import math
import socket

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMPipeline, DDPMScheduler, EDMEulerScheduler, EulerDiscreteScheduler,
                       UNet2DConditionModel, UNet2DModel)

import flowsolve as fs


def tiny_unet(seed=0, channels=1, size=8, out_channels=None):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=out_channels or channels,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture
def offline(monkeypatch):
    """Any network connection fails the test."""
    def refuse(*a, **k):
        raise AssertionError("flowsolve tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def ddim_loop(unet, sched, z, **step_kw):
    x = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, eta=0.0, **step_kw).prev_sample
    return x


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_is_euler_on_the_sigma_ode(unet, prediction, spacing):
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, prediction_type=prediction,
                          timestep_spacing=spacing)
    sched.set_timesteps(10)
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = ddim_loop(unet, sched, z)
    den = fs.models.from_diffusers(unet, sched)
    grid = den.ddim_grid(sched.timesteps, 0.0)
    x, info = fs.sample(fs.fields.EDM(den), "euler", grid=grid, x_init=z * (1 + grid[0] ** 2).sqrt().float(),
                        return_info=True)
    assert info.nfe == 10
    scale = ref.abs().max().item()
    assert (x - ref).abs().max().item() <= 1e-5 * max(1.0, scale)


def test_ddim_with_clipping_matches_clipped_model_output(unet):
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=True)
    sched.set_timesteps(8)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = ddim_loop(unet, sched, z, use_clipped_model_output=True)
    den = fs.models.from_diffusers(unet, sched)
    assert den.clip_sample     # follows the scheduler's config
    grid = den.ddim_grid(sched.timesteps)
    x = fs.sample(fs.fields.EDM(den), "euler", grid=grid, x_init=z * (1 + grid[0] ** 2).sqrt().float())
    assert (x - ref).abs().max().item() < 1e-5
    assert x.abs().max() <= 1.0 + 1e-6


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_euler_discrete_scheduler_equivalence(unet, prediction):
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, prediction_type=prediction, timestep_spacing="trailing")
    sched.set_timesteps(12)
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    x = z * sched.init_noise_sigma
    x0 = x.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    den = fs.models.from_diffusers(unet, sched)
    y = fs.sample(fs.fields.EDM(den), "euler", grid=sched.sigmas.double(), x_init=x0)
    assert (x - y).abs().max().item() <= 1e-5 * max(1.0, x.abs().max().item())


def test_edm_scheduler_equivalence(unet):
    sched = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    sched.set_timesteps(10)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    x = z * sched.init_noise_sigma
    x0 = x.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    den = fs.models.from_diffusers(unet, sched)
    assert den.schedule == "edm" and den.sigma_max == 80.0
    y = fs.sample(fs.fields.EDM(den), "euler", grid=sched.sigmas.double(), x_init=x0)
    assert (x - y).abs().max().item() <= 1e-5 * max(1.0, x.abs().max().item())


def test_log_sigma_interpolation_of_timesteps(unet):
    den = fs.models.from_diffusers(unet, DDPMScheduler(num_train_timesteps=1000))
    t = torch.tensor([0.0, 1.0, 17.0, 500.0, 999.0], dtype=torch.float64)
    assert torch.equal(den.timestep(den.sigma(t)), t)
    frac = torch.tensor([10.25, 640.5], dtype=torch.float64)
    assert torch.allclose(den.timestep(den.sigma(frac)), frac, atol=1e-6)
    # between knots, log σ is linear in t
    s = den.sigma(torch.tensor([10.0, 11.0, 10.25])).log()
    assert abs(float(s[2] - (0.75 * s[0] + 0.25 * s[1]))) < 1e-12
    a = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    assert den.sigma_min == pytest.approx(float(((1 - a[0]) / a[0]).sqrt()))
    assert den.sigma_max == pytest.approx(float(((1 - a[-1]) / a[-1]).sqrt()))
    # out-of-range σ clamp to the ends of the schedule
    assert den.timestep(torch.tensor([1e-6, 1e6], dtype=torch.float64)).tolist() == [0.0, 999.0]
    # one σ for the whole batch (a solver's knot, an expanded tensor) is remembered: the same
    # timesteps as the per-sample interpolation, on the first call and on the next
    for s in (den.sigma(torch.tensor([17.0])), torch.tensor([3.7]), torch.tensor([3.7], dtype=torch.float64)):
        knot = s.reshape(()).expand(6)
        assert knot.stride(0) == 0
        for _ in range(2):
            got = den.timestep(knot)
            assert got.dtype == s.dtype and got.shape == (6,)
            assert torch.equal(got, den.timestep(knot.clone()))


def test_field_clamps_default_grid_to_model_range(unet):
    den = fs.models.from_diffusers(unet, DDPMScheduler(num_train_timesteps=1000))
    field = fs.fields.EDM(den)
    assert den.sigma_min > 0.002 and den.sigma_max > 80.0
    assert field.sigma_min == pytest.approx(den.sigma_min) and field.sigma_max == 80.0   # within the model's range
    assert field.data_shape == (1, 8, 8)


def test_conditional_unet_kwargs_pass_through():
    torch.manual_seed(0)
    m = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                             norm_num_groups=8, cross_attention_dim=8, attention_head_dim=4).eval()
    cond = torch.randn(1, 3, 8)
    den = fs.models.from_diffusers(m, DDPMScheduler(num_train_timesteps=1000, clip_sample=False),
                                   encoder_hidden_states=cond)
    x = torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.5, 2.0, 9.0])
    t = den.timestep(sigma)
    with torch.no_grad():
        eps = m(x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt(), t, encoder_hidden_states=cond.expand(3, -1, -1)).sample
        d = den(x, sigma)
    assert torch.allclose(d, x - sigma.view(-1, 1, 1, 1) * eps, atol=1e-5)


def test_learned_variance_outputs_use_the_mean_channels():
    m = tiny_unet(channels=1, out_channels=2)
    den = fs.models.from_diffusers(m, DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range",
                                                       clip_sample=False))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = m(x / (1 + 4.0) ** 0.5, den.timestep(torch.tensor([2.0, 2.0]))).sample
        assert torch.allclose(den(x, 2.0), x - 2.0 * out[:, :1], atol=1e-5)


def test_edm_preconditioning_coefficients():
    class Zero(torch.nn.Module):
        def forward(self, x, t):
            return torch.ones_like(x)
    pre = fs.models.EDMPrecond(Zero(), sigma_data=0.5)
    x = torch.randn(4, 2)
    sigma = torch.tensor([0.01, 0.5, 3.0, 40.0])
    s = sigma.view(-1, 1)
    want = 0.25 / (s ** 2 + 0.25) * x + s * 0.5 / (s ** 2 + 0.25).sqrt()
    assert torch.allclose(pre(x, sigma), want, atol=1e-6)
    c_skip, c_out, c_in, c_noise = pre.coefficients(sigma)
    assert torch.allclose(c_noise, sigma.log() / 4)
    # λ(σ) c_out² = 1: the effective training target of F has unit weight (Karras et al. 2022, Eq. 8)
    assert torch.allclose(pre.loss_weight(sigma) * c_out ** 2, torch.ones(4), atol=1e-6)


def test_denoiser_score_is_tweedie(gmm):
    class Exact(fs.models.Denoiser):
        def denoise(self, x, sigma):
            return gmm.denoiser(x, sigma)
    x = torch.randn(16, 2, dtype=torch.float64) * 4
    assert torch.allclose(Exact().score(x, 1.3), gmm.score(x, 1.3), atol=1e-9)


def test_mlp_round_trip_through_diffusers(tmp_path):
    net = fs.models.MLP(dim=2, width=32, depth=2)
    den = fs.models.EDMPrecond(net, sigma_data=0.5, sigma_min=0.002, sigma_max=40.0, data_shape=(2,))
    fs.models.save_pretrained(den, tmp_path / "m", data="gmm2d")
    again = fs.models.MLP.from_pretrained(str(tmp_path / "m"))          # diffusers' own loader
    for (k, a), (_, b) in zip(net.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    loaded = fs.from_pretrained(tmp_path / "m")
    x, s = torch.randn(5, 2), torch.full((5,), 0.7)
    with torch.no_grad():
        assert torch.equal(loaded(x, s), den(x, s))
    assert loaded.sigma_max == 40.0 and loaded.data_shape == (2,)
    assert fs.fields.EDM(loaded).sigma_max == 40.0


def test_unet_round_trip_through_diffusers(tmp_path, offline):
    net = fs.models.unet((1, 8, 8), "tiny")
    den = fs.models.EDMPrecond(net, noise_scale=250.0, data_shape=(1, 8, 8)).eval()
    fs.models.save_pretrained(den, tmp_path / "u", data="digits")
    again = UNet2DModel.from_pretrained(str(tmp_path / "u"))
    loaded = fs.from_pretrained(tmp_path / "u")
    x, s = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 5.0])
    with torch.no_grad():
        assert torch.equal(loaded(x, s), den(x, s))
        assert torch.equal(again(x, s).sample, net(x, s).sample)


def test_pipeline_folder_loads_offline(tmp_path, offline, unet):
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon")
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(str(tmp_path / "p"))
    assert json.loads((tmp_path / "p" / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    for den in (fs.models.from_diffusers(str(tmp_path / "p")), fs.from_pretrained(tmp_path / "p"),
                fs.models.from_diffusers(UNet2DModel.from_pretrained(str(tmp_path / "p"), subfolder="unet"),
                                         DDPMScheduler.from_pretrained(str(tmp_path / "p"), subfolder="scheduler"))):
        ref = fs.models.from_diffusers(unet, sched)
        x, s = torch.randn(2, 1, 8, 8), torch.tensor([0.1, 20.0])
        with torch.no_grad():
            assert torch.allclose(den(x, s), ref(x, s), atol=1e-6)


def test_corrupt_and_missing_weights_are_named(tmp_path):
    den = fs.models.EDMPrecond(fs.models.MLP(dim=2, width=8, depth=1), data_shape=(2,))
    fs.models.save_pretrained(den, tmp_path / "m")
    w = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2])
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors.*corrupt"):
        fs.from_pretrained(tmp_path / "m")
    w.unlink()
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        fs.from_pretrained(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither"):
        fs.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fs.from_pretrained(tmp_path / "nope")
    (tmp_path / "m" / "flowsolve.json").write_text("{not json")
    with pytest.raises(ValueError, match="flowsolve.json.*not valid JSON"):
        fs.from_pretrained(tmp_path / "m")


def test_pickle_weights_are_refused(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(str(tmp_path / "u"), safe_serialization=False)      # a .bin pickle only
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        fs.models.from_diffusers(str(tmp_path / "u"), DDPMScheduler())


def test_adapter_errors(unet):
    with pytest.raises(ValueError, match="scheduler"):
        fs.models.from_diffusers(unet, None)
    with pytest.raises(ValueError, match="prediction_type"):
        fs.models.from_diffusers(unet, DDPMScheduler(), prediction_type="x0")
    den = fs.models.from_diffusers(unet, DDPMScheduler())
    with pytest.raises(ValueError, match=r"x: expected samples of shape \(1, 8, 8\)"):
        den(torch.randn(2, 3, 8, 8), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        den(torch.randn(2, 1, 8, 8), torch.ones(3))


def test_stale_clip_sample_key_is_ignored():
    """A DDPM config converted to EulerDiscreteScheduler keeps `clip_sample` as a stale key that
    EulerDiscreteScheduler never applies; the adapter must not apply it either."""
    ddpm = DDPMScheduler(clip_sample=True)
    eul = EulerDiscreteScheduler.from_config(ddpm.config)
    assert dict(eul.config).get("clip_sample") is True
    assert not fs.models.from_diffusers(tiny_unet(), eul).clip_sample
    assert fs.models.from_diffusers(tiny_unet(), ddpm).clip_sample


def test_network_call_answers_dtype_without_walking_the_model(monkeypatch):
    """The adapter's network call gives the same output as calling the model, while the model's
    `dtype` (diffusers walks every submodule for it) is read once and then answered from the cache;
    the model's class is restored, and a changed dtype is noticed."""
    from diffusers.models import modeling_utils

    from flowsolve.models.diffusers_adapter import call_network

    m = tiny_unet(seed=3)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 500.0])
    walks, seen = [], []
    real = modeling_utils.get_parameter_dtype
    monkeypatch.setattr(modeling_utils, "get_parameter_dtype", lambda mod: walks.append(1) or real(mod))
    m.register_forward_pre_hook(lambda mod, args: seen.append(mod.dtype))
    with torch.no_grad():
        ref = m(x, t).sample
        walks.clear()
        outs = [call_network(m, x, t) for _ in range(3)]
    assert all(torch.equal(o, ref) for o in outs)
    assert len(walks) == 1  # three calls (each forward reads .dtype at least once), one walk
    assert type(m) is UNet2DModel and m.dtype == torch.float32
    m.to(torch.float64)
    with torch.no_grad():
        call_network(m, x.double(), t.double())
    assert seen[-1] == torch.float64 and type(m) is UNet2DModel
    den = fs.models.from_diffusers(m, DDPMScheduler(num_train_timesteps=1000, clip_sample=False))
    with torch.no_grad():  # the adapter itself goes through the same call
        eps = m(x.double() / 5**0.5, den.timestep(torch.tensor([2.0, 2.0])).double()).sample
        assert torch.allclose(den(x.double(), 2.0), x.double() - 2.0 * eps, atol=1e-10)


def test_a_score_sde_ve_model_is_a_denoiser_by_tweedie():
    """NCSN++-style models with ScoreSdeVeScheduler are called at σ itself and return the score:
    D = x + σ² s(x, σ). The default grid is the scheduler's geometric σ's, then the data; every
    solver runs on it, and a v-prediction claim is refused."""
    from diffusers import ScoreSdeVeScheduler
    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                      time_embedding_type="fourier", down_block_types=("DownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4).eval().double()
    m = fs.models.from_diffusers(net, ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=50.0))
    assert m.prediction_type == "score" and (m.sigma_min, m.sigma_max) == (0.01, 50.0)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    s = torch.tensor([0.5, 5.0, 40.0], dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(m(x, s), x + s.reshape(-1, 1, 1, 1) ** 2 * net(x, s).sample, rtol=0, atol=1e-12)
    grid = m.field().grid(4, "schedule")
    sched = ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=50.0)
    sched.set_timesteps(4)
    sched.set_sigmas(4)
    assert torch.allclose(grid[:-1], sched.sigmas.double(), rtol=1e-6) and grid[-1] == 0
    assert abs(math.log(float(grid[0]) / 50.0)) < 1e-9 and abs(math.log(float(grid[-2]) / 0.01)) < 1e-3
    out, info = fs.sample(m.field(), "heun", nfe=7, n=2, seed=0, dtype=torch.float64, return_info=True)
    assert out.shape == (2, 1, 8, 8) and info.nfe == 7 and torch.isfinite(out).all()
    assert m.prior_std_at(50.0) == 50.0      # the pipeline starts from σ_max · N(0, I)
    with pytest.raises(ValueError, match="prediction_type"):
        fs.models.from_diffusers(net, ScoreSdeVeScheduler(), prediction_type="v_prediction")


@pytest.mark.parametrize("make,prediction", [
    (lambda: DDIMScheduler(), "epsilon"), (lambda: DDIMScheduler(prediction_type="v_prediction"), "v_prediction"),
    (lambda: DDIMScheduler(prediction_type="sample"), "sample"),
    (lambda: DDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                           timestep_spacing="trailing"), "v_prediction"),
    (lambda: EDMEulerScheduler(sigma_data=0.5), "epsilon"),
    (lambda: EDMEulerScheduler(sigma_data=0.5, prediction_type="v_prediction"), "v_prediction"),
])
def test_native_predictions_round_trip_through_the_data_prediction(unet, make, prediction):
    """`to_native` inverts `from_native` (what guidance rescale and `ddim_inverse` read): the network's
    output comes back from its D at every level, the zero-SNR top knot (x_0 = −v) included, and
    `noise_at` is the noise DDIM reads there: ε itself, √ᾱ v + √(1 − ᾱ) x_VP, or (x − D)/σ."""
    m = fs.models.from_diffusers(unet, make())
    assert m.prediction_type == prediction
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for s in (0.05, 1.3, 40.0, m.sigma_max):
        sigma = torch.full((4,), s, dtype=torch.float64)
        d = m.from_native(x, sigma, out)
        torch.testing.assert_close(m.to_native(x, sigma, d), out, rtol=1e-9, atol=1e-9)
        eps = m.noise_at(x, sigma, out)
        if prediction == "epsilon":
            assert torch.equal(eps, out)
        elif m.schedule == "discrete" and not m.pure_noise_at(s):
            torch.testing.assert_close(eps, (x - d) / s, rtol=1e-9, atol=1e-9)   # D = x − σ ε (VE)
