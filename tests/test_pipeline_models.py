"""Models as their pipelines run them (issue 14's Gaussian paths, widened): multistep schedulers in
flow mode (Wan's UniPC, Sana's DPM-Solver), Flux-family transformers (timestep / 1000, packed
latents, position ids, guidance embedding), Lumina's reversed time and negated output, PixArt's
learned σ with CFG, SDXL's dict-valued conditioning with CFG, folders of any diffusers model class,
and VAEs with a shift or per-channel statistics. Each is checked against the pipeline's own loop written out with diffusers' scheduler on
a tiny random model of the real class."""
import contextlib
import importlib
import json

import numpy as np
import pytest
import torch
from diffusers import (DEISMultistepScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler,
                       FlowMatchEulerDiscreteScheduler, UNet2DModel, UniPCMultistepScheduler)

import flowsolve as fs
from conftest import tiny_unet64


def _loop(net, sched, z, call=None):
    """A pipeline's loop: the network at the scheduler's (integer) timestep, then its step."""
    call = call or (lambda x, t: net(x, t).sample)
    x = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(call(x, t), t, x).prev_sample
    return x


def _rel(x, ref):
    return (x - ref).abs().max().item() / ref.abs().max().item()


Z64 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("cls,kw,solver,opts,tol", [
    (DPMSolverMultistepScheduler, {}, "dpmpp_2m", {}, 1e-6),                 # diffusers keeps α, σ in float32
    (DPMSolverMultistepScheduler, {"solver_type": "heun"}, "dpmpp_2m_heun", {}, 1e-6),
    (DPMSolverMultistepScheduler, {"solver_order": 1}, "ddim", {}, 1e-6),
    (UniPCMultistepScheduler, {}, "unipc", {}, 1e-12),                       # Wan's
    (UniPCMultistepScheduler, {"solver_order": 3}, "unipc", {"order": 3}, 1e-12),
    (DPMSolverSinglestepScheduler, {}, "dpmpp_singlestep", {}, 1e-12),
    # DEIS in flow mode repeats its last knot (a step that moves nothing): its real last step is
    # of full order, as `lower_order_final=False` does, and flowsolve saves that step's evaluation
    (DEISMultistepScheduler, {}, "deis", {"order": 2, "lower_order_final": False}, 1e-12),
])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_multistep_schedulers_in_flow_mode_are_the_solvers_on_the_flow_field(unet64, cls, kw, solver, opts,
                                                                             tol, shift):
    """`use_flow_sigmas` + `flow_prediction` makes the model a flow field whose default grid, for every
    solver, is the scheduler's schedule; the network sees the scheduler's integer timesteps."""
    def make():
        return cls(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift, **kw)
    sched = make()
    sched.set_timesteps(10)
    sched.sigmas = sched.sigmas.double()
    ref = _loop(unet64, sched, Z64)
    m = fs.models.from_diffusers(unet64, make())
    assert isinstance(m, fs.models.DiffusersFlow) and m.integer_timesteps
    x, info = fs.sample(m.field(), solver, nfe=10, x_init=Z64, dtype=torch.float64, return_info=True, **opts)
    assert info.nfe == (9 if cls is DEISMultistepScheduler else 10) and _rel(x, ref) <= tol


def test_flow_mode_needs_a_flow_prediction(unet64):
    with pytest.raises(ValueError, match="flow_prediction"):
        fs.models.from_diffusers(unet64, UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="epsilon"))


def _flux(guidance_embeds=True, in_channels=16, out_channels=None):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=in_channels, out_channels=out_channels, num_layers=1,
                                  num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=8, guidance_embeds=guidance_embeds,
                                  axes_dims_rope=(2, 2, 4)).eval()


def _flux_loop_check(m, net, sched, N, h, w, L, img_ids, txt_ids, B=2):
    """FluxPipeline's loop on `sched` (guidance 3.5, random text) against `euler` with nfe=N on `m`."""
    text = {"encoder_hidden_states": torch.randn(B, L, 16), "pooled_projections": torch.randn(B, 8)}
    z = torch.randn(B, h * w, 16, generator=torch.Generator().manual_seed(3))
    g = torch.full((B,), 3.5)
    ref = _loop(net, sched, z, lambda x, t: net(hidden_states=x, timestep=t.expand(B) / 1000, guidance=g,
                                                 img_ids=img_ids, txt_ids=txt_ids, **text).sample)
    assert _rel(fs.sample(m.field(), "euler", nfe=N, x_init=z, cond=text), ref) <= 1e-5


def _flux_ids(h, w, text_len):
    img = torch.zeros(h, w, 3)
    img[..., 1], img[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None]
    return img.reshape(-1, 3), torch.zeros(text_len, 3)


def test_a_flux_transformer_runs_as_flux_pipeline_does():
    """FluxPipeline: packed latents (batch, h·w, 16), one table of image / text position ids for the
    batch, the distilled guidance as an input, timestep / 1000, the scheduler's dynamic shift at mu and
    its sigmas linspace(1, 1/N, N). `euler` on the same grid is its loop."""
    net = _flux()
    B, h, w, L, N, mu = 2, 4, 4, 5, 6, 0.7
    img_ids, txt_ids = _flux_ids(h, w, L)
    text = {"encoder_hidden_states": torch.randn(B, L, 16), "pooled_projections": torch.randn(B, 8)}
    kw = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    sched = FlowMatchEulerDiscreteScheduler(**kw)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / N, N), mu=mu)
    z = torch.randn(B, h * w, 16, generator=torch.Generator().manual_seed(3))
    g = torch.full((B,), 3.5)
    ref = _loop(net, sched, z, lambda x, t: net(hidden_states=x, timestep=t.expand(B) / 1000, guidance=g,
                                                 img_ids=img_ids, txt_ids=txt_ids, **text).sample)
    m = fs.models.from_diffusers(net, FlowMatchEulerDiscreteScheduler(**kw), mu=mu, img_ids=img_ids,
                                 txt_ids=txt_ids, guidance=torch.tensor([3.5]))
    assert m.timestep_scale == 1.0 and not m.integer_timesteps and not m.negate
    x = fs.sample(m.field(), "euler", grid=sched.sigmas.double(), x_init=z, cond=text)
    assert _rel(x, ref) <= 1e-5
    # every other solver runs on the same field; the time convention can be overridden by name
    y = fs.sample(m.field(), "dpmpp_2m", nfe=N, x_init=z, cond=text)
    assert y.shape == z.shape and torch.isfinite(y).all()
    wrong = fs.models.from_diffusers(net, FlowMatchEulerDiscreteScheduler(**kw), mu=mu, img_ids=img_ids,
                                     txt_ids=txt_ids, guidance=torch.tensor([3.5]), timestep_scale=1000.0)
    assert _rel(fs.sample(wrong.field(), "euler", grid=sched.sigmas.double(), x_init=z, cond=text), ref) > 1e-3
    bare = fs.models.from_diffusers(net, FlowMatchEulerDiscreteScheduler(**kw), mu=mu)
    with pytest.raises(ValueError, match="img_ids: FluxTransformer2DModel needs its position ids"):
        fs.sample(bare.field(), "euler", nfe=2, x_init=z, cond=text)


def test_a_flux_pipeline_folder_loads_with_its_vae_shift(tmp_path):
    """A pipeline folder of classes outside the first list (Flux transformer) loads from disk; the VAE's
    shift_factor is undone on decoding as FluxPipeline / SD3 do: latents / scaling_factor + shift."""
    from diffusers import AutoencoderKL
    net = _flux(guidance_embeds=False)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8,), latent_channels=4, norm_num_groups=8,
                        scaling_factor=0.3611, shift_factor=0.1159).eval()
    root = tmp_path / "flux"
    net.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"]}))
    img_ids, txt_ids = _flux_ids(2, 2, 3)
    m = fs.models.from_diffusers(root, img_ids=img_ids, txt_ids=txt_ids)
    assert type(m.model).__name__ == "FluxTransformer2DModel" and m.timestep_scale == 1.0
    text = {"encoder_hidden_states": torch.randn(1, 3, 16), "pooled_projections": torch.randn(1, 8)}
    z = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(fs.sample(m.field(), "euler", nfe=3, x_init=z, cond=text)).all()
    lat = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = vae.decode(lat / 0.3611 + 0.1159).sample
    assert torch.allclose(m.decode(lat), want)


@pytest.mark.parametrize("pipeline,linear", [("FluxPipeline", True), ("StableDiffusion3Pipeline", False)])
def test_a_flux_family_folder_samples_its_pipelines_linear_sigmas_by_default(tmp_path, pipeline, linear):
    """FluxPipeline (and the other pipelines whose source sets sigmas = linspace(1, 1/N, N): Flux 2, Chroma,
    Qwen-Image, LTX, ...) hands its scheduler those sigmas; SD3's pipeline lets the scheduler make its
    own. A folder names its pipeline in model_index.json, and the model's default schedule of N steps
    is that pipeline's: `euler` with nfe=N, no grid given, is FluxPipeline's loop (it was the
    scheduler's own schedule, another grid, before); `pipeline_sigmas=` overrides the choice."""
    net = _flux()
    root = tmp_path / "flux"
    net.save_pretrained(root / "transformer")
    kw = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    FlowMatchEulerDiscreteScheduler(**kw).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": pipeline, "transformer": ["diffusers", "FluxTransformer2DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    B, h, w, L, N, mu = 2, 4, 4, 5, 6, 0.7
    img_ids, txt_ids = _flux_ids(h, w, L)
    ids = dict(img_ids=img_ids, txt_ids=txt_ids, guidance=torch.tensor([3.5]))
    m = fs.models.from_diffusers(root, mu=mu, **ids)
    sched = FlowMatchEulerDiscreteScheduler(**kw)
    sched.set_timesteps(N, sigmas=np.linspace(1.0, 1 / N, N) if linear else None, mu=mu)
    torch.testing.assert_close(m.field().grid(N, "schedule"), sched.sigmas.double(), rtol=1e-6, atol=1e-7)
    _flux_loop_check(m, net, sched, N, h, w, L, img_ids, txt_ids, B)
    other = fs.models.from_diffusers(root, mu=mu, pipeline_sigmas=not linear, **ids)
    assert not torch.allclose(other.field().grid(N, "schedule"), sched.sigmas.double(), rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="pipeline_sigmas"):
        fs.models.from_diffusers(UNet2DModel(sample_size=8, in_channels=1, out_channels=1, norm_num_groups=8,
                                             block_out_channels=(16, 32), down_block_types=("DownBlock2D",) * 2,
                                             up_block_types=("UpBlock2D",) * 2), DPMSolverMultistepScheduler(),
                                 pipeline_sigmas=True)


def test_a_vae_with_per_channel_latent_statistics_decodes_as_the_pipelines():
    """SDXL / Wan pipelines: latents · std / scaling_factor + mean, per channel."""
    from diffusers import AutoencoderKL, DDIMScheduler
    torch.manual_seed(0)
    mean, std = [0.1, -0.2], [0.5, 2.0]
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8,), latent_channels=2, norm_num_groups=8,
                        scaling_factor=0.5, latents_mean=mean, latents_std=std).eval()
    unet = UNet2DModel(sample_size=4, in_channels=2, out_channels=2, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    m = fs.models.from_diffusers(unet, DDIMScheduler(), vae=vae)
    lat = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    col = (1, 2, 1, 1)
    with torch.no_grad():
        want = vae.decode(lat * torch.tensor(std).reshape(col) / 0.5 + torch.tensor(mean).reshape(col)).sample
    assert torch.allclose(m.decode(lat), want)


def test_lumina2_runs_backwards_in_time_with_a_negated_prediction():
    """Lumina2Pipeline feeds 1 − t/1000 and steps with −prediction (its model runs from noise at 0)."""
    from diffusers import Lumina2Transformer2DModel
    torch.manual_seed(0)
    net = Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=1,
                                    num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                                    axes_dim_rope=(4, 6, 6), axes_lens=(16, 16, 16), cap_feat_dim=16).eval()
    B, L = 2, 5
    text = {"encoder_hidden_states": torch.randn(B, L, 16),
            "encoder_attention_mask": torch.ones(B, L, dtype=torch.bool)}
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    z = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = _loop(net, sched, z, lambda x, t: -net(x, timestep=(1 - t / 1000).expand(B), **text).sample)
    m = fs.models.from_diffusers(net, FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert m.reverse_time and m.negate
    assert _rel(fs.sample(m.field(), "euler", nfe=6, x_init=z, cond=text), ref) <= 1e-5


def test_sana_scales_the_integer_timestep_of_its_flow_mode_dpm_solver():
    """SanaPipeline: DPM-Solver with flow sigmas, the integer timestep times the model's timestep_scale."""
    from diffusers import SanaTransformer2DModel
    torch.manual_seed(0)
    net = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                 num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                 cross_attention_dim=16, caption_channels=8, sample_size=8, patch_size=1,
                                 timestep_scale=0.5).eval()
    B = 2
    text = {"encoder_hidden_states": torch.randn(B, 5, 8)}

    def make():
        return DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    sched = make()
    sched.set_timesteps(8)
    z = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = _loop(net, sched, z, lambda x, t: net(x, timestep=t.expand(B) * 0.5, **text).sample)
    m = fs.models.from_diffusers(net, make())
    assert m.timestep_scale == 500.0
    assert _rel(fs.sample(m.field(), "dpmpp_2m", nfe=8, x_init=z, cond=text), ref) <= 1e-5


def test_wan_unipc_with_classifier_free_guidance_on_video_latents():
    """WanPipeline: UniPC in flow mode, 5-D video latents, CFG with two calls; flowsolve batches the two
    branches into one call (the integer timestep is found for the doubled batch too)."""
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    net = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1,
                                rope_max_seq_len=32).eval()
    B, w = 2, 5.0
    emb, null = torch.randn(B, 5, 16), torch.zeros(1, 5, 16)

    def make():
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)

    def guided(x, t):
        c = net(x, timestep=t.expand(B), encoder_hidden_states=emb).sample
        u = net(x, timestep=t.expand(B), encoder_hidden_states=null.expand(B, -1, -1)).sample
        return u + w * (c - u)
    sched = make()
    sched.set_timesteps(8)
    z = torch.randn(B, 4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = _loop(net, sched, z, guided)
    m = fs.models.from_diffusers(net, make())
    x = fs.sample(m.field(guidance=w, uncond={"encoder_hidden_states": null}), "unipc", nfe=8, x_init=z,
                  cond={"encoder_hidden_states": emb})
    assert _rel(x, ref) <= 1e-5


def test_pixart_learned_sigma_with_guidance_is_its_dpm_solver_loop():
    """PixArtSigmaPipeline: DPM-Solver++(2M), CFG on the 8-channel output then its ε half kept; the
    adapter keeps the ε half, guidance is linear, so the two agree."""
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(0)
    net = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                   num_layers=1, cross_attention_dim=16, sample_size=8, patch_size=2,
                                   caption_channels=12).eval()
    B, w = 2, 4.5
    emb, null = torch.randn(B, 5, 12), torch.zeros(1, 5, 12)
    added = {"resolution": None, "aspect_ratio": None}

    def guided(x, t):
        out = net(torch.cat([x, x]), encoder_hidden_states=torch.cat([null.expand(B, -1, -1), emb]),
                  timestep=t.expand(2 * B), added_cond_kwargs=added).sample
        u, c = out.chunk(2)
        return (u + w * (c - u)).chunk(2, dim=1)[0]
    sched = DPMSolverMultistepScheduler()
    sched.set_timesteps(8)
    z = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = _loop(net, sched, z, guided)
    m = fs.models.from_diffusers(net, DPMSolverMultistepScheduler(), added_cond_kwargs=added)
    field = m.field(guidance=w, uncond={"encoder_hidden_states": null})
    start = m.prior_std_at(float(field.grid(8, "schedule")[0]))     # x_T ~ N(0, I) is x = x_T/√ᾱ in σ-time
    x = fs.sample(field, "dpmpp_2m", nfe=8, x_init=z * start, cond={"encoder_hidden_states": emb})  # ends at σ = 0
    assert _rel(x, ref) <= 1e-5


def test_sdxl_dict_conditioning_with_guidance_is_its_pipeline_loop():
    """StableDiffusionXLPipeline: a UNet with `added_cond_kwargs = {"text_embeds", "time_ids"}`, CFG
    with negative embeddings in both the text and the dict input, EulerDiscrete "leading". cond and
    uncond may hold dicts; their leaves are rows like any other input (one per sample or one for all)."""
    from diffusers import EulerDiscreteScheduler
    from conftest import tiny_sdxl_unet
    net = tiny_sdxl_unet()
    B, w = 2, 5.0
    emb, pooled = torch.randn(B, 5, 16), torch.randn(B, 8)
    nemb, npooled = torch.zeros(1, 5, 16), torch.zeros(1, 8)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
              steps_offset=1)
    sched = EulerDiscreteScheduler(**kw)
    sched.set_timesteps(8)

    def guided(x, t):
        added = {"text_embeds": torch.cat([npooled.expand(B, -1), pooled]), "time_ids": time_ids.expand(2 * B, -1)}
        out = net(sched.scale_model_input(torch.cat([x, x]), t), t,
                  encoder_hidden_states=torch.cat([nemb.expand(B, -1, -1), emb]), added_cond_kwargs=added).sample
        u, c = out.chunk(2)
        return u + w * (c - u)
    z = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = _loop(net, sched, z * sched.init_noise_sigma, guided)
    m = fs.models.from_diffusers(net, EulerDiscreteScheduler(**kw))
    field = m.field(guidance=w, uncond={"encoder_hidden_states": nemb, "added_cond_kwargs": {"text_embeds": npooled}})
    cond = {"encoder_hidden_states": emb, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    x = fs.sample(field, "euler", nfe=8, x_init=z * m.prior_std_at(float(field.grid(8, "schedule")[0])), cond=cond)
    assert _rel(x, ref) <= 1e-5
    # the rows of a nested input are checked and split like the others (chunks of one sample each)
    one = fs.sample(field, "euler", nfe=8, x_init=z * m.prior_std_at(float(field.grid(8, "schedule")[0])),
                    cond=cond, batch_size=1)
    assert _rel(one, ref) <= 1e-5
    with pytest.raises(ValueError, match="added_cond_kwargs.text_embeds"):
        fs.sample(field, "euler", nfe=2, n=2, cond={**cond, "added_cond_kwargs": {"text_embeds": torch.randn(3, 8)}})


@pytest.mark.parametrize("lcm", [False, True])
def test_flow_match_euler_stochastic_sampling_is_the_consistency_solver(unet64, lcm):
    """FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) and FlowMatchLCMScheduler re-noise the
    data prediction at each knot, x = (1 − t') D + t' ε: the `consistency` solver on the flow field,
    given the same noise."""

    from diffusers import FlowMatchLCMScheduler

    def make():
        if lcm:
            return FlowMatchLCMScheduler(shift=3.0)
        return FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=3.0)
    sched = make()
    sched.set_timesteps(6)
    with _same_noise(type(sched), len(Z64), Z64.shape[1:], Z64.dtype):
        ref = _loop(unet64, sched, Z64)
    m = fs.models.from_diffusers(unet64, make())
    x = fs.sample(m.field(), "consistency", nfe=6, x_init=Z64, dtype=torch.float64, seed=5)
    assert _rel(x, ref) <= 1e-6


@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 1.0), (0.3, 0.7), (0.0, 1.0)])
@pytest.mark.parametrize("explicit", [False, True])
def test_ltx_euler_ancestral_rf_is_euler_ancestral_with_the_rf_split(unet64, eta, s_noise, explicit):
    """LTXEulerAncestralRFScheduler (ComfyUI's `sample_euler_ancestral_RF`) ends the deterministic part
    of each step at t_down = t'(1 + η(t'/t − 1)) and re-noises to t': `euler_ancestral` on the flow
    field with the split its model reports ("rf"), given the same noise, on the scheduler's own
    schedule and on an explicit (ComfyUI-style) one. It runs in float32, hence the tolerance."""
    from diffusers import LTXEulerAncestralRFScheduler

    sigmas = [1.0, 0.93, 0.8, 0.55, 0.3, 0.1, 0.0]
    sched = LTXEulerAncestralRFScheduler(eta=eta, s_noise=s_noise)
    sched.set_timesteps(sigmas=sigmas) if explicit else sched.set_timesteps(6)
    with _same_noise(type(sched), len(Z64), Z64.shape[1:], torch.float32):
        ref = _loop(unet64, sched, Z64)
    m = fs.models.from_diffusers(unet64, LTXEulerAncestralRFScheduler(eta=eta, s_noise=s_noise))
    assert m.integer_timesteps is False  # the network sees 1000 t, as the scheduler's timesteps
    grid = {"grid": torch.tensor(sigmas, dtype=torch.float64)} if explicit else {"nfe": 6}
    x = fs.sample(m.field(), "euler_ancestral", x_init=Z64, dtype=torch.float64, seed=5, eta=eta,
                  s_noise=s_noise, **grid)
    assert _rel(x, ref) <= 2e-6
    if 0 < eta < 1:  # k-diffusion's split of the same η is another sampler
        ve = fs.sample(m.field(), "euler_ancestral", x_init=Z64, dtype=torch.float64, seed=5, eta=eta,
                       s_noise=s_noise, split="ve", **grid)
        assert _rel(ve, ref) > 1e-2


def test_clipping_applies_to_the_guided_prediction_as_in_diffusers():
    """diffusers clips (or thresholds) the guided x_0, not each branch's: CFG with `clip_sample` on a
    DDIM loop (its `use_clipped_model_output=True` form) is `euler` on the guided field."""
    from diffusers import DDIMScheduler
    net = tiny_unet64(out_channels=1, text_dim=16)
    B, w = 3, 6.0
    emb, neg = torch.randn(B, 5, 16, dtype=torch.float64), torch.zeros(1, 5, 16, dtype=torch.float64)
    kw = dict(clip_sample=True, clip_sample_range=0.5, timestep_spacing="trailing")
    sched = DDIMScheduler(**kw)
    sched.set_timesteps(10)
    sched.alphas_cumprod = sched.alphas_cumprod.double()

    def guided(x, t):
        u, c = net(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([neg.expand(B, -1, -1), emb])).sample.chunk(2)
        return u + w * (c - u)
    z = torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(guided(x, t), t, x, use_clipped_model_output=True).prev_sample
    m = fs.models.from_diffusers(net, DDIMScheduler(**kw))
    field = m.field(guidance=w, uncond={"encoder_hidden_states": neg})
    grid = field.grid(10, "schedule")
    y = fs.sample(field, "euler", grid=grid, x_init=z * m.prior_std_at(float(grid[0])), dtype=torch.float64,
                  cond={"encoder_hidden_states": emb})
    assert _rel(y, x) <= 1e-10
    assert y.abs().max() <= 0.5 + 1e-12          # the last step lands on the clipped guided x_0


def test_scheduler_timesteps_hold_under_guidance_too():
    """A scheduler that casts its spaced σ's timesteps to integers (DPM-Solver with exponential σ's:
    truncated) feeds the network those timesteps; guidance's doubled batch gets them as well."""
    net = tiny_unet64(out_channels=1, text_dim=16)
    B, w = 3, 4.0
    emb, neg = torch.randn(B, 5, 16, dtype=torch.float64), torch.zeros(1, 5, 16, dtype=torch.float64)

    def make():
        return DPMSolverMultistepScheduler(use_exponential_sigmas=True)
    sched = make()
    sched.set_timesteps(8)
    sched.sigmas, sched.alphas_cumprod = sched.sigmas.double(), sched.alphas_cumprod.double()

    def guided(x, t):
        u, c = net(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([neg.expand(B, -1, -1), emb])).sample.chunk(2)
        return u + w * (c - u)
    z = torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _loop(net, sched, z, guided)
    m = fs.models.from_diffusers(net, make())
    field = m.field(guidance=w, uncond={"encoder_hidden_states": neg})
    grid = field.grid(8, "schedule")
    x = fs.sample(field, "dpmpp_2m", grid=grid, x_init=z * m.prior_std_at(float(grid[0])), dtype=torch.float64,
                  cond={"encoder_hidden_states": emb})
    assert _rel(x, ref) <= 1e-6


@contextlib.contextmanager
def _same_noise(scheduler_cls, n, shape, dtype, brownian=False):
    """Within the block, the noise of `scheduler_cls`'s module is flowsolve's per-sample stream
    (seed 5, stream 1), as `fs.sample(..., seed=5)` draws it: one draw per `randn_tensor` call, or per
    step from a Brownian sampler (`brownian=True`, as `dpmpp_2m_sde` draws)."""
    from unittest import mock

    from flowsolve.noise import SampleNoise
    module = importlib.import_module(scheduler_cls.__module__)
    src = SampleNoise(5, 0, n, tuple(shape), dtype, "cpu", stream=1)
    if brownian:
        with mock.patch.object(module, "BrownianTreeNoiseSampler", lambda *a, **k: (lambda s, s_next: src())):
            yield src
    else:
        with mock.patch.object(module, "randn_tensor", lambda shape, **k: src()):
            yield src


@pytest.mark.parametrize("kw,opts", [
    ({}, {}),                                                     # Stable Audio Open's
    ({"sigma_schedule": "karras"}, {}),
    ({"solver_type": "heun"}, {"solver_type": "heun"}),
    ({"prediction_type": "epsilon"}, {}),
])
def test_cosine_dpm_solver_takes_its_atan_timestep_and_is_dpmpp_2m_sde(unet64, kw, opts):
    """CosineDPMSolverMultistepScheduler (Stable Audio) feeds the network c_noise = 2 atan(σ)/π, not
    EDM's ¼ ln σ: the adapter asks the scheduler's own `precondition_noise`. Its DPM++ 2M SDE loop,
    handed the same noise through its Brownian sampler, is `dpmpp_2m_sde` on the model's grid."""

    from diffusers import CosineDPMSolverMultistepScheduler
    from test_peer_solvers import _diffusers_loop, _in_float64
    with _same_noise(CosineDPMSolverMultistepScheduler, 3, (1, 8, 8), torch.float64, brownian=True):
        ref = _diffusers_loop(unet64, _in_float64(CosineDPMSolverMultistepScheduler(**kw), 10), Z64)
    m = fs.models.from_diffusers(unet64, CosineDPMSolverMultistepScheduler(**kw))
    sigma = torch.tensor([500.0, 1.0, 0.3], dtype=torch.float64)
    assert torch.allclose(m.timestep(sigma), sigma.atan() * 2 / torch.pi)
    grid = m.field().grid(10, "schedule")
    x = fs.sample(m.field(), "dpmpp_2m_sde", grid=grid, x_init=Z64 * m.prior_std_at(float(grid[0])),
                  dtype=torch.float64, seed=5, **opts)
    assert _rel(x, ref) <= 1e-6


def test_stable_audio_dit_with_guidance_is_its_pipeline_loop():
    """StableAudioPipeline: a 1-D DiT on (channels, length) latents, rotary position tables passed as
    they are (fixed `model_kwargs`), text and global conditioning, CFG on the v-prediction, and the
    cosine DPM++ 2M SDE; `n=` samples have the sequence shape."""

    from diffusers import CosineDPMSolverMultistepScheduler, StableAudioDiTModel
    from diffusers.models.embeddings import get_1d_rotary_pos_embed
    torch.manual_seed(0)
    net = StableAudioDiTModel(sample_size=16, in_channels=4, num_layers=1, attention_head_dim=8,
                              num_attention_heads=2, num_key_value_attention_heads=1, out_channels=4,
                              cross_attention_dim=12, time_proj_dim=8, global_states_input_dim=12,
                              cross_attention_input_dim=10).eval()
    B, L, w = 2, 16, 7.0
    text, glob, null = torch.randn(B, 3, 10), torch.randn(B, 1, 12), torch.zeros(1, 3, 10)
    rotary = get_1d_rotary_pos_embed(4, L + 1, use_real=True, repeat_interleave_real=False)

    def guided(x, t):
        out = net(torch.cat([x, x]), t.unsqueeze(0), encoder_hidden_states=torch.cat([null.expand(B, -1, -1), text]),
                  global_hidden_states=torch.cat([glob, glob]), rotary_embedding=rotary).sample
        u, c = out.chunk(2)
        return u + w * (c - u)
    sched = CosineDPMSolverMultistepScheduler()
    sched.set_timesteps(8)
    z = torch.randn(B, 4, L, generator=torch.Generator().manual_seed(3))
    with _same_noise(CosineDPMSolverMultistepScheduler, B, (4, L), torch.float32, brownian=True):
        ref = _loop(net, sched, z * sched.init_noise_sigma, lambda x, t: guided(sched.scale_model_input(x, t), t))
    m = fs.models.from_diffusers(net, CosineDPMSolverMultistepScheduler(), rotary_embedding=rotary)
    assert m.data_shape == (4, L)
    field = m.field(guidance=w, uncond={"encoder_hidden_states": null})
    cond = {"encoder_hidden_states": text, "global_hidden_states": glob}
    x = fs.sample(field, "dpmpp_2m_sde", nfe=8, x_init=z * m.prior_std_at(float(field.grid(8, "schedule")[0])),
                  seed=5, cond=cond)
    assert _rel(x, ref) <= 1e-5
    assert fs.sample(field, "dpmpp_2m_sde", nfe=2, n=B, seed=0, cond=cond).shape == (B, 4, L)


def test_cogvideox_dpm_with_dynamic_guidance_is_its_pipeline_loop():
    """CogVideoXPipeline: a video transformer on (batch, frames, channels, h, w) latents, v-prediction
    with CogVideoX's SNR-shifted schedule, its DPM scheduler (DPM-Solver++(2M) SDE, whose first draw of
    a second-order step is discarded) and dynamic CFG, a guidance scale that follows the timestep
    (a `guidance=` schedule). CogVideoX's schedulers take `clip_sample=True` and never clip; neither
    does the adapter."""
    import importlib
    import math

    from diffusers import CogVideoXDPMScheduler, CogVideoXTransformer3DModel
    from flowsolve.noise import SampleNoise
    torch.manual_seed(0)
    net = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                      time_embed_dim=8, text_embed_dim=12, num_layers=1, sample_width=8,
                                      sample_height=8, sample_frames=5, patch_size=2, max_text_seq_length=5).eval()
    B, N, w = 2, 8, 6.0
    emb, null = torch.randn(B, 5, 12), torch.zeros(1, 5, 12)
    kw = dict(prediction_type="v_prediction", snr_shift_scale=3.0, timestep_spacing="trailing",
              beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert CogVideoXDPMScheduler(**kw).config.clip_sample

    def dynamic(t):  # CogVideoXPipeline's use_dynamic_cfg, at the integer timestep t (a float or a tensor)
        return 1 + w * (1 - torch.cos(math.pi * torch.as_tensor((N - t) / N, dtype=torch.float64) ** 5.0)) / 2
    sched = CogVideoXDPMScheduler(**kw)
    sched.set_timesteps(N)
    module = importlib.import_module(CogVideoXDPMScheduler.__module__)
    src = SampleNoise(5, 0, B, (2, 4, 8, 8), torch.float32, "cpu", stream=1)
    now: dict = {}
    original, module.randn_tensor = module.randn_tensor, lambda shape, **k: now["noise"]
    x = z = torch.randn(B, 2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    old, ts = None, sched.timesteps
    try:
        with torch.no_grad():
            for i, t in enumerate(ts):
                out = net(hidden_states=torch.cat([x, x]), timestep=t.expand(2 * B),
                          encoder_hidden_states=torch.cat([null.expand(B, -1, -1), emb])).sample
                u, c = out.chunk(2)
                now["noise"] = src()     # one draw per step: a second-order step uses its second draw
                x, old = sched.step(u + float(dynamic(t.item())) * (c - u), old, t, ts[i - 1] if i > 0 else None, x,
                                    return_dict=False)
    finally:
        module.randn_tensor = original
    m = fs.models.from_diffusers(net, CogVideoXDPMScheduler(**kw))
    assert not m.clip_sample
    # in float64, as the pipeline's Python floats: (N − t)/N is about −120, its fifth power about −3e10
    field = m.field(guidance=lambda sigma: dynamic(m.timestep(sigma).double()), uncond={"encoder_hidden_states": null})
    y = fs.sample(field, "dpmpp_2m_sde", nfe=N, x_init=z * m.prior_std_at(float(field.grid(N, "schedule")[0])),
                  seed=5, cond={"encoder_hidden_states": emb})
    assert _rel(y, x) <= 1e-5
    with pytest.raises(ValueError, match="guidance"):     # a schedule gives one scale, or one per sample
        fs.sample(m.field(guidance=lambda sigma: torch.ones(3), uncond={"encoder_hidden_states": null}),
                  "euler", nfe=2, x_init=z, cond={"encoder_hidden_states": emb})


def test_schedulers_that_take_clip_sample_without_clipping_are_not_clipped(unet64):
    """CogVideoXDDIMScheduler (default `clip_sample=True`) and TCDScheduler take the option but never
    clip: the adapter reads what the scheduler's code does, so the DDIM loop is `euler` to round-off
    (it was 98% apart with a clipped D); DDIMScheduler with the same option clips, in both (its
    `use_clipped_model_output=True` form)."""
    from diffusers import CogVideoXDDIMScheduler, DDIMScheduler, TCDScheduler
    from test_peer_solvers import _diffusers_loop, _in_float64
    for cls, clips in ((CogVideoXDDIMScheduler, False), (DDIMScheduler, True)):
        ref = _diffusers_loop(unet64, _in_float64(cls(clip_sample=True), 10), Z64, use_clipped_model_output=True)
        m = fs.models.from_diffusers(unet64, cls(clip_sample=True))
        assert m.clip_sample is clips
        grid = m.field().grid(10, "schedule")
        x = fs.sample(m.field(), "euler", grid=grid, x_init=Z64 * m.prior_std_at(float(grid[0])), dtype=torch.float64)
        assert _rel(x, ref) <= 1e-12
    tcd = fs.models.from_diffusers(unet64, TCDScheduler(clip_sample=True, thresholding=True))
    assert not tcd.clip_sample and not tcd.thresholding


@pytest.mark.parametrize("clip,variance", [(True, "fixed_small_log"), (False, "fixed_small_log"),
                                           (False, "learned_range")])
def test_unclip_scheduler_with_its_pipelines_prev_timestep_is_ddpm(unet64, unet64_var, clip, variance):
    """UnCLIPScheduler (Karlo / unCLIP decoders and priors: DDPM on the cosine schedule, steps from
    999 to 0 handed `prev_timestep` by the pipeline, fixed-small-log variance) is `ddpm` given the same
    noise, its variance type read from the scheduler (learned range from the variance channels). Its
    last step uses its float32 β_0 where 1 − ᾱ_0 is the same number in exact arithmetic, so
    both sides get the tables in float64 (in float32 the two differ by 5e-4)."""

    from diffusers import UnCLIPScheduler

    unet = unet64_var if variance == "learned_range" else unet64

    def make():
        sched = UnCLIPScheduler(clip_sample=clip, variance_type=variance)
        sched.betas = sched.betas.double()
        sched.alphas = 1.0 - sched.betas
        sched.alphas_cumprod = torch.cumprod(sched.alphas, 0)
        return sched
    sched = make()
    sched.set_timesteps(10)
    ts, x = sched.timesteps, Z64
    with _same_noise(UnCLIPScheduler, 3, (1, 8, 8), torch.float64), torch.no_grad():
        for i, t in enumerate(ts):
            nxt = None if i + 1 == len(ts) else ts[i + 1]
            x = sched.step(unet(x, t).sample, t, x, prev_timestep=nxt).prev_sample
    m = fs.models.from_diffusers(unet, make())
    assert m.clip_sample is clip and m.variance_type == variance
    grid = m.field().grid(10, "schedule")
    y = fs.sample(m.field(), "ddpm", grid=grid, x_init=Z64 * m.prior_std_at(float(grid[0])), dtype=torch.float64,
                  seed=5)
    assert _rel(y, x) <= 1e-9


@pytest.mark.parametrize("kw", [{}, {"scaler": 2.0}, {"scaler": 0.5}])
def test_wuerstchen_continuous_cosine_schedule_is_ddpm(unet64, kw):
    """DDPMWuerstchenScheduler (Würstchen, Stable Cascade): ᾱ(t) a cosine of the continuous time
    t ∈ [0, 1] clamped to [1e-4, 0.9999], the network given t itself. Its loop is `ddpm` on the
    model's default grid, which ends at σ(0) = 0.01 with no noise on the last step (DDPM's Alg. 2);
    the adapter's time for σ inverts the scheduler's ᾱ(t) between the clamps."""
    import math

    from diffusers import DDPMWuerstchenScheduler
    sched = DDPMWuerstchenScheduler(**kw)
    sched.set_timesteps(10)
    x = Z64
    with _same_noise(DDPMWuerstchenScheduler, 3, (1, 8, 8), torch.float64), torch.no_grad():
        for t in sched.timesteps[:-1]:      # the pipelines' loop
            x = sched.step(unet64(x, t.expand(3)).sample, t.expand(3), x).prev_sample
    m = fs.models.from_diffusers(unet64, DDPMWuerstchenScheduler(**kw))
    grid = m.field().grid(10, "schedule")
    assert len(grid) == 11 and abs(float(grid[-1]) - 0.01) < 1e-4 and m.sigma_max == pytest.approx(99.995, rel=1e-4)
    y = fs.sample(m.field(), "ddpm", grid=grid, x_init=Z64 * m.prior_std_at(float(grid[0])), dtype=torch.float64,
                  seed=5)
    assert _rel(y / math.sqrt(1 + float(grid[-1]) ** 2), x) <= 1e-6
    # between the clamps the time is the inverse of the scheduler's ᾱ(t)
    t = torch.linspace(0.05, 0.95, 19)
    abar = sched._alpha_cumprod(t, "cpu").double()
    inner = (abar > 1e-4) & (abar < 0.9999)
    assert torch.allclose(m.timestep(((1 - abar) / abar).sqrt())[inner], t.double()[inner], atol=1e-6)


def test_stable_cascade_prior_with_guidance_is_its_pipeline_loop():
    """StableCascadePriorPipeline: a StableCascadeUNet given `timestep_ratio` (its second input) and
    CLIP text, pooled text and image inputs, CFG as torch.lerp, DDPMWuerstchenScheduler; in float32
    the scheduler's knots are found in the knot table (the σ's rounded to float32) so the network
    sees t = 1 exactly at the first step."""
    import math

    from diffusers import DDPMWuerstchenScheduler, StableCascadeUNet
    torch.manual_seed(0)
    net = StableCascadeUNet(in_channels=4, out_channels=4, timestep_ratio_embedding_dim=8, conditioning_dim=16,
                            block_out_channels=(16, 16), num_attention_heads=(2, 2), down_num_layers_per_block=(1, 1),
                            up_num_layers_per_block=(1, 1), clip_text_in_channels=12, clip_text_pooled_in_channels=12,
                            clip_image_in_channels=12, clip_seq=2, dropout=(0.0, 0.0), switch_level=(False,)).eval()
    B, w = 2, 4.0
    cond = {"clip_text": torch.randn(B, 3, 12), "clip_text_pooled": torch.randn(B, 1, 12),
            "clip_img": torch.randn(B, 1, 12)}
    null = {"clip_text": torch.zeros(1, 3, 12), "clip_text_pooled": torch.zeros(1, 1, 12),
            "clip_img": torch.zeros(1, 1, 12)}
    sched = DDPMWuerstchenScheduler()
    sched.set_timesteps(6)
    x = z = torch.randn(B, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    with _same_noise(DDPMWuerstchenScheduler, B, (4, 6, 6), torch.float32), torch.no_grad():
        for t in sched.timesteps[:-1]:
            r = t.expand(B)
            both = {k: torch.cat([cond[k], null[k].expand(B, -1, -1)]) for k in cond}
            c, u = net(torch.cat([x, x]), torch.cat([r, r]), **both).sample.chunk(2)
            x = sched.step(torch.lerp(u, c, w), r, x).prev_sample
    m = fs.models.from_diffusers(net, DDPMWuerstchenScheduler())
    field = m.field(guidance=w, uncond=null)
    grid = field.grid(6, "schedule")
    y = fs.sample(field, "ddpm", nfe=6, x_init=z * m.prior_std_at(float(grid[0])), seed=5, cond=cond)
    assert _rel(y / math.sqrt(1 + float(grid[-1]) ** 2), x) <= 1e-5


def test_inpainting_unet_takes_its_mask_and_image_latents_as_concatenated_channels():
    """StableDiffusionInpaintPipeline (a 9-channel UNet): the scaled latents with the mask and the
    masked image's latents appended along the channels, the same in both CFG branches. cond["concat"]
    is that input; the samples keep the UNet's 4 output channels."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    torch.manual_seed(0)
    net = UNet2DConditionModel(sample_size=8, in_channels=9, out_channels=4, block_out_channels=(8, 16),
                               layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                               norm_num_groups=4, attention_head_dim=4).eval()
    B, w = 2, 7.5
    emb, null = torch.randn(B, 5, 16), torch.zeros(1, 5, 16)
    mask = (torch.rand(B, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    masked = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * (1 - mask)
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
              steps_offset=1)
    sched = EulerDiscreteScheduler(**kw)
    sched.set_timesteps(8)

    def guided(x, t):
        inp = torch.cat([sched.scale_model_input(torch.cat([x, x]), t), torch.cat([mask, mask]),
                         torch.cat([masked, masked])], dim=1)
        u, c = net(inp, t, encoder_hidden_states=torch.cat([null.expand(B, -1, -1), emb])).sample.chunk(2)
        return u + w * (c - u)
    z = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = _loop(net, sched, z * sched.init_noise_sigma, guided)
    m = fs.models.from_diffusers(net, EulerDiscreteScheduler(**kw))
    assert m.data_shape == (4, 8, 8)
    field = m.field(guidance=w, uncond={"encoder_hidden_states": null})
    cond = {"encoder_hidden_states": emb, "concat": torch.cat([mask, masked], dim=1)}
    x = fs.sample(field, "euler", nfe=8, x_init=z * m.prior_std_at(float(field.grid(8, "schedule")[0])), cond=cond)
    assert _rel(x, ref) <= 1e-5
    assert fs.sample(field, "euler", nfe=2, n=B, seed=0, cond=cond).shape == (B, 4, 8, 8)
    with pytest.raises(ValueError, match="concat"):
        fs.sample(field, "euler", nfe=2, n=B, seed=0, cond={**cond, "concat": torch.zeros(B, 5, 4, 4)})


def _tiny_svd_unet(frames):
    """A tiny spatio-temporal UNet of Stable Video Diffusion's class (image latents appended: 8 channels in)."""
    from diffusers import UNetSpatioTemporalConditionModel
    torch.manual_seed(0)
    return UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12, cross_attention_dim=16, num_attention_heads=(2, 2),
        num_frames=frames).eval()


def test_stable_video_diffusion_with_per_frame_guidance_is_its_pipeline_loop():
    """StableVideoDiffusionPipeline: a spatio-temporal UNet on (batch, frames, channels, h, w) latents
    with the image latents appended along the channel axis (2), `added_time_ids`, CFG whose scale
    grows across the frames (a guidance tensor of shape (1, frames, 1, 1, 1)), and EulerDiscrete with
    v-prediction on continuous timesteps ¼ ln σ and Karras σ's (SVD's scheduler)."""
    from diffusers import EulerDiscreteScheduler
    net = _tiny_svd_unet(3)
    B, F = 2, 3
    emb, image = torch.randn(B, 1, 16), torch.randn(B, F, 4, 8, 8)
    ids = torch.tensor([[6.0, 127.0, 0.02]]).expand(B, -1)
    scale = torch.linspace(1.0, 3.0, F).reshape(1, F, 1, 1, 1)
    kw = dict(prediction_type="v_prediction", timestep_type="continuous", use_karras_sigmas=True,
              sigma_min=0.002, sigma_max=700.0, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
              interpolation_type="linear", timestep_spacing="leading", steps_offset=1)
    sched = EulerDiscreteScheduler(**kw)
    sched.set_timesteps(6)

    def guided(x, t):
        inp = torch.cat([sched.scale_model_input(torch.cat([x, x]), t), torch.cat([torch.zeros_like(image), image])],
                        dim=2)
        u, c = net(inp, t, encoder_hidden_states=torch.cat([torch.zeros_like(emb), emb]),
                   added_time_ids=torch.cat([ids, ids])).sample.chunk(2)
        return u + scale * (c - u)
    z = torch.randn(B, F, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = _loop(net, sched, z * sched.init_noise_sigma, guided)
    m = fs.models.from_diffusers(net, EulerDiscreteScheduler(**kw), added_time_ids=ids[:1])  # one row for all
    assert m.concat_dim == 2 and m.continuous_time
    field = m.field(guidance=scale, uncond={"encoder_hidden_states": torch.zeros(1, 1, 16),
                                            "concat": torch.zeros(1, F, 4, 8, 8)})
    x = fs.sample(field, "euler", nfe=6, x_init=z * m.prior_std_at(float(field.grid(6, "schedule")[0])),
                  cond={"encoder_hidden_states": emb, "concat": image})
    assert _rel(x, ref) <= 1e-5
    # a fixed input is one row for every sample; per-sample rows belong in cond (said by name)
    rows = fs.models.from_diffusers(net, EulerDiscreteScheduler(**kw), added_time_ids=ids)
    with pytest.raises(ValueError, match="added_time_ids: the model's fixed input has 2 rows"):
        fs.sample(rows.field(guidance=2.0, uncond={"encoder_hidden_states": torch.zeros(1, 1, 16)}), "euler", nfe=2,
                  x_init=z, cond={"encoder_hidden_states": emb, "concat": image})


def test_flux_fill_takes_its_mask_and_image_as_concatenated_token_features():
    """FluxFillPipeline: packed latents (batch, h·w, 16) with the packed masked-image latents and mask
    appended along the feature axis (2) of the tokens, in_channels 16 + 24 and 16 out; cond["concat"]
    goes there by the model's class."""
    net = _flux(in_channels=40, out_channels=16)
    B, h, w, L, N = 2, 4, 4, 5, 6
    img_ids, txt_ids = _flux_ids(h, w, L)
    text = {"encoder_hidden_states": torch.randn(B, L, 16), "pooled_projections": torch.randn(B, 8)}
    fill = torch.randn(B, h * w, 24, generator=torch.Generator().manual_seed(4))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(N)
    z = torch.randn(B, h * w, 16, generator=torch.Generator().manual_seed(3))
    g = torch.full((B,), 30.0)
    ref = _loop(net, sched, z, lambda x, t: net(hidden_states=torch.cat([x, fill], dim=2), timestep=t.expand(B) / 1000,
                                                 guidance=g, img_ids=img_ids, txt_ids=txt_ids, **text).sample)
    m = fs.models.from_diffusers(net, FlowMatchEulerDiscreteScheduler(shift=3.0), img_ids=img_ids, txt_ids=txt_ids,
                                 guidance=torch.tensor([30.0]))
    assert m.concat_dim == 2
    x = fs.sample(m.field(), "euler", nfe=N, x_init=z, cond={**text, "concat": fill})
    assert _rel(x, ref) <= 1e-5


def test_instruct_pix2pix_three_branch_guidance_is_its_pipeline_loop():
    """StableDiffusionInstructPix2PixPipeline: an 8-channel UNet given the image latents as channels,
    three branches (text and image, image only, neither) and two scales, ε = ε_∅ + s_I (ε_I − ε_∅) +
    s_T (ε_TI − ε_I): chained guidance with uncond=[neither, image only], guidance=[s_I, s_T]."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    torch.manual_seed(0)
    net = UNet2DConditionModel(sample_size=8, in_channels=8, out_channels=4, block_out_channels=(8, 16),
                               layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                               norm_num_groups=4, attention_head_dim=4).eval()
    B, s_text, s_image = 2, 7.5, 1.5
    emb, neg = torch.randn(B, 5, 16), torch.zeros(1, 5, 16)
    image = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched = EulerDiscreteScheduler(**kw)
    sched.set_timesteps(6)

    def guided(x, t):
        inp = torch.cat([sched.scale_model_input(torch.cat([x] * 3), t),
                         torch.cat([image, image, torch.zeros_like(image)])], dim=1)
        text = torch.cat([emb, neg.expand(B, -1, -1), neg.expand(B, -1, -1)])
        e_text, e_image, e_none = net(inp, t, encoder_hidden_states=text).sample.chunk(3)
        return e_none + s_text * (e_text - e_image) + s_image * (e_image - e_none)
    z = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = _loop(net, sched, z * sched.init_noise_sigma, guided)
    m = fs.models.from_diffusers(net, EulerDiscreteScheduler(**kw))
    field = m.field(guidance=[s_image, s_text],
                    uncond=[{"encoder_hidden_states": neg, "concat": torch.zeros(1, 4, 8, 8)},
                            {"encoder_hidden_states": neg}])
    x, info = fs.sample(field, "euler", nfe=6, x_init=z * m.prior_std_at(float(field.grid(6, "schedule")[0])),
                        cond={"encoder_hidden_states": emb, "concat": image}, return_info=True)
    assert _rel(x, ref) <= 1e-5 and info.network_passes == 6
    # one entry is CFG; a mismatched list, or an uncond key cond lacks, is named
    one = m.field(guidance=[s_text], uncond=[{"encoder_hidden_states": neg}])
    cfg = m.field(guidance=s_text, uncond={"encoder_hidden_states": neg})
    kwargs = dict(nfe=4, x_init=z * 10, cond={"encoder_hidden_states": emb, "concat": image})
    assert torch.allclose(fs.sample(one, "euler", **kwargs), fs.sample(cfg, "euler", **kwargs), atol=1e-6)
    with pytest.raises(ValueError, match="one scale per entry"):
        m.field(guidance=[1.0], uncond=[{"encoder_hidden_states": neg}, {"concat": image}])
    with pytest.raises(ValueError, match="'class_labels' is not in cond"):
        fs.sample(m.field(guidance=[2.0], uncond=[{"class_labels": 3}]), "euler", **kwargs)


def _tiny_text_unet(in_channels=4):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=4).eval()


def _randomized(module, seed):
    """The module with random weights (a ControlNet's zero convolutions made non-zero, so that its
    residuals matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def _controlnet(unet, seed):
    """A ControlNet of the UNet's shape with random weights."""
    from diffusers import ControlNetModel
    return _randomized(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8)), seed)


def test_controlnets_steer_the_unet_as_the_controlnet_pipeline_does():
    """StableDiffusionControlNetPipeline: each ControlNet sees the scaled latents, the timestep, the
    text and its image (the same in both CFG branches); its residuals times its conditioning scale are
    summed and added to the UNet's skips and middle block. One ControlNet, and two as
    MultiControlNetModel runs them (images by name), equal the pipeline's loop."""
    from diffusers import DDIMScheduler, MultiControlNetModel
    unet = _tiny_text_unet()
    nets = [_controlnet(unet, 1), _controlnet(unet, 2)]
    B, w = 2, 7.5
    emb, null = torch.randn(B, 5, 16), torch.zeros(1, 5, 16)
    images = [torch.rand(B, 3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (5, 6)]
    scales = [0.8, 0.5]
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
              set_alpha_to_one=False, steps_offset=1)
    z = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for k in (1, 2):
        sched = DDIMScheduler(**kw)
        sched.set_timesteps(6)

        def guided(x, t):
            inp, text = torch.cat([x, x]), torch.cat([null.expand(B, -1, -1), emb])
            down, mid = None, None
            for net, image, s in zip(nets[:k], images[:k], scales[:k]):
                d, m = net(inp, t, encoder_hidden_states=text, controlnet_cond=torch.cat([image, image]),
                           conditioning_scale=s, return_dict=False)
                down = d if down is None else [a + b for a, b in zip(down, d)]
                mid = m if mid is None else mid + m
            u, c = unet(inp, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample.chunk(2)
            return u + w * (c - u)
        ref = _loop(unet, sched, z, guided)
        control = nets[0] if k == 1 else MultiControlNetModel(nets)
        m = fs.models.from_diffusers(unet, DDIMScheduler(**kw), controlnet=control,
                                     controlnet_scale=scales[0] if k == 1 else {"0": scales[0], "1": scales[1]})
        image_cond = images[0] if k == 1 else {"0": images[0], "1": images[1]}
        field = m.field(guidance=w, uncond={"encoder_hidden_states": null})
        grid = field.grid(6, "schedule")
        x = fs.sample(field, "euler", grid=grid, x_init=z * m.prior_std_at(float(grid[0])),
                      cond={"encoder_hidden_states": emb, "controlnet_cond": image_cond})
        assert _rel(x * float(1 / (1 + grid[-1] ** 2) ** 0.5), ref) <= 1e-5
    # the image is said to be missing by name, and the residuals matter (without them, another sample)
    with pytest.raises(ValueError, match="controlnet_cond"):
        fs.sample(field, "euler", nfe=2, n=B, seed=0, cond={"encoder_hidden_states": emb})
    plain = fs.models.from_diffusers(unet, DDIMScheduler(**kw)).field(guidance=w, uncond={"encoder_hidden_states": null})
    y = fs.sample(plain, "euler", grid=grid, x_init=z * m.prior_std_at(float(grid[0])), cond={"encoder_hidden_states": emb})
    assert _rel(y, x) > 1e-2


def test_a_controlnet_pipeline_folder_loads_its_controlnet(tmp_path):
    """A ControlNet pipeline's folder (unet/, controlnet/, scheduler/) loads as the controlled UNet."""
    from diffusers import DDIMScheduler
    unet = _tiny_text_unet()
    cn = _controlnet(unet, 1)
    root = tmp_path / "sd-controlnet"
    unet.save_pretrained(root / "unet")
    cn.save_pretrained(root / "controlnet")
    DDIMScheduler().save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionControlNetPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "controlnet": ["diffusers", "ControlNetModel"], "scheduler": ["diffusers", "DDIMScheduler"]}))
    m = fs.models.from_diffusers(root, controlnet_scale=0.7)
    direct = fs.models.from_diffusers(unet, DDIMScheduler(), controlnet=cn, controlnet_scale=0.7)
    assert type(m.model).__name__ == "ControlledModel" and m.model.scales == {"0": 0.7}
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16), "controlnet_cond": torch.rand(2, 3, 16, 16)}
    a = fs.sample(m.field(), "euler", nfe=3, n=2, seed=0, cond=cond)
    assert torch.allclose(a, fs.sample(direct.field(), "euler", nfe=3, n=2, seed=0, cond=cond), atol=1e-5)


def test_a_flux_controlnet_steers_the_transformer_as_its_pipeline_does():
    """FluxControlNetPipeline: the ControlNet takes the packed latents, timestep / 1000, the distilled
    guidance, text, ids and its packed control image; its double- and single-stream block samples go to
    the transformer. The adapter keeps Flux's time convention under the ControlNet."""
    from diffusers import FluxControlNetModel
    net = _flux()
    cn = _randomized(FluxControlNetModel.from_transformer(net, num_layers=1, num_single_layers=1,
                                                          attention_head_dim=8, num_attention_heads=2), 7)
    B, h, w, L, N, s = 2, 4, 4, 5, 6, 0.7
    img_ids, txt_ids = _flux_ids(h, w, L)
    text = {"encoder_hidden_states": torch.randn(B, L, 16), "pooled_projections": torch.randn(B, 8)}
    control = torch.randn(B, h * w, 16, generator=torch.Generator().manual_seed(4))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(N)
    z = torch.randn(B, h * w, 16, generator=torch.Generator().manual_seed(3))
    guide = torch.full((B,), 3.5)

    def call(x, t):
        common = dict(timestep=t.expand(B) / 1000, guidance=guide, img_ids=img_ids, txt_ids=txt_ids, **text)
        block, single = cn(hidden_states=x, controlnet_cond=control, conditioning_scale=s, return_dict=False, **common)
        return net(hidden_states=x, controlnet_block_samples=block, controlnet_single_block_samples=single,
                   **common).sample
    ref = _loop(net, sched, z, call)
    m = fs.models.from_diffusers(net, FlowMatchEulerDiscreteScheduler(shift=3.0), controlnet=cn, controlnet_scale=s,
                                 img_ids=img_ids, txt_ids=txt_ids, guidance=torch.tensor([3.5]))
    assert m.timestep_scale == 1.0 and m.concat_dim == 2
    x = fs.sample(m.field(), "euler", nfe=N, x_init=z, cond={**text, "controlnet_cond": control})
    assert _rel(x, ref) <= 1e-5
    with pytest.raises(ValueError, match="takes no input 'controlnet_con'"):
        fs.sample(m.field(), "euler", nfe=2, x_init=z, cond={**text, "controlnet_con": control})


def test_an_sd3_controlnet_steers_the_transformer_as_its_pipeline_does():
    """StableDiffusion3ControlNetPipeline: the ControlNet's block samples (its one output) go to the
    transformer's `block_controlnet_hidden_states`; with CFG the control latents are in both branches."""
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel
    torch.manual_seed(0)
    net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16).eval()
    cn = _randomized(SD3ControlNetModel.from_transformer(net, num_layers=1, num_extra_conditioning_channels=0), 7)
    B, w, s = 2, 5.0, 0.9
    text = {"encoder_hidden_states": torch.randn(B, 5, 16), "pooled_projections": torch.randn(B, 8)}
    null = {"encoder_hidden_states": torch.zeros(1, 5, 16), "pooled_projections": torch.zeros(1, 8)}
    control = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    z = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def guided(x, t):
        both = {k: torch.cat([v, null[k].expand_as(v)]) for k, v in text.items()}
        x2, t2 = torch.cat([x, x]), t.expand(2 * B)
        block = cn(hidden_states=x2, timestep=t2, controlnet_cond=torch.cat([control, control]), conditioning_scale=s,
                   return_dict=False, **both)[0]
        c, u = net(hidden_states=x2, timestep=t2, block_controlnet_hidden_states=block, **both).sample.chunk(2)
        return u + w * (c - u)
    ref = _loop(net, sched, z, guided)
    m = fs.models.from_diffusers(net, FlowMatchEulerDiscreteScheduler(shift=3.0), controlnet=cn, controlnet_scale=s)
    x = fs.sample(m.field(guidance=w, uncond=null), "euler", nfe=6, x_init=z, cond={**text, "controlnet_cond": control})
    assert _rel(x, ref) <= 1e-5


def test_an_sdxl_controlnet_takes_the_added_conditioning_too():
    """StableDiffusionXLControlNetPipeline: the ControlNet and the UNet both take SDXL's
    `added_cond_kwargs` (pooled text and time ids), which cond holds once for both."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=4, addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4).eval()
    cn = _controlnet(unet, 3)
    B, s = 2, 0.6
    added = {"text_embeds": torch.randn(B, 8), "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    emb, image = torch.randn(B, 5, 16), torch.rand(B, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
              steps_offset=1)
    sched = EulerDiscreteScheduler(**kw)
    sched.set_timesteps(5)

    def call(x, t):
        both = {"text_embeds": added["text_embeds"], "time_ids": added["time_ids"].expand(B, -1)}
        inp = sched.scale_model_input(x, t)
        down, mid = cn(inp, t, encoder_hidden_states=emb, controlnet_cond=image, conditioning_scale=s,
                       added_cond_kwargs=both, return_dict=False)
        return unet(inp, t, encoder_hidden_states=emb, added_cond_kwargs=both, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
    z = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = _loop(unet, sched, z * sched.init_noise_sigma, call)
    m = fs.models.from_diffusers(unet, EulerDiscreteScheduler(**kw), controlnet=cn, controlnet_scale=s)
    field = m.field()
    x = fs.sample(field, "euler", nfe=5, x_init=z * m.prior_std_at(float(field.grid(5, "schedule")[0])),
                  cond={"encoder_hidden_states": emb, "added_cond_kwargs": added, "controlnet_cond": image})
    assert _rel(x, ref) <= 1e-5


def test_t2i_adapter_residuals_are_a_list_input_in_cond():
    """StableDiffusionAdapterPipeline: the T2I-Adapter's features (computed once, scaled) go to the
    UNet as the list `down_intrablock_additional_residuals`, the same in both CFG branches. A list of
    per-sample tensors in cond is a row list: checked, chunked and batched entry by entry, and handed
    to the network as a fresh list at every call (the UNet pops from it)."""
    from diffusers import EulerDiscreteScheduler, T2IAdapter, UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
                                up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=16, norm_num_groups=4,
                                attention_head_dim=4).eval()
    adapter = _randomized(T2IAdapter(in_channels=3, channels=[8, 16], num_res_blocks=1, downscale_factor=8,
                                     adapter_type="full_adapter"), 9)
    B, w, s = 2, 6.0, 0.8
    emb, null = torch.randn(B, 5, 16), torch.zeros(1, 5, 16)
    with torch.no_grad():
        features = [f * s for f in adapter(torch.rand(B, 3, 64, 64, generator=torch.Generator().manual_seed(5)))]
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched = EulerDiscreteScheduler(**kw)
    sched.set_timesteps(5)

    def guided(x, t):
        both = [torch.cat([f, f]) for f in features]
        u, c = unet(sched.scale_model_input(torch.cat([x, x]), t), t,
                    encoder_hidden_states=torch.cat([null.expand(B, -1, -1), emb]),
                    down_intrablock_additional_residuals=[f.clone() for f in both]).sample.chunk(2)
        return u + w * (c - u)
    z = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = _loop(unet, sched, z * sched.init_noise_sigma, guided)
    m = fs.models.from_diffusers(unet, EulerDiscreteScheduler(**kw))
    field = m.field(guidance=w, uncond={"encoder_hidden_states": null})
    cond = {"encoder_hidden_states": emb, "down_intrablock_additional_residuals": features}
    x0 = z * m.prior_std_at(float(field.grid(5, "schedule")[0]))
    x = fs.sample(field, "euler", nfe=5, x_init=x0, cond=cond)
    assert _rel(x, ref) <= 1e-5
    one = fs.sample(field, "euler", nfe=5, x_init=x0, cond=cond, batch_size=1)  # chunks of one sample each
    assert _rel(one, ref) <= 1e-5
    with pytest.raises(ValueError, match=r"down_intrablock_additional_residuals\.1"):
        fs.sample(field, "euler", nfe=2, x_init=x0, cond={**cond, "down_intrablock_additional_residuals":
                                                         [features[0], torch.zeros(3, 16, 4, 4)]})


def test_a_controlnet_window_is_control_guidance_start_and_end():
    """StableDiffusionControlNetPipeline with control_guidance_end=0.5: the ControlNet's scale is 0 on
    the steps after the first half (diffusers' `controlnet_keep`). On DDIM's 6 steps (timesteps 831,
    665, 499, 333, 167, 1) that is `controlnet_window=(499, 1000)`: the timesteps it acts on."""
    from diffusers import DDIMScheduler
    unet = _tiny_text_unet()
    cn = _controlnet(unet, 1)
    B, s, end = 2, 0.9, 0.5
    emb, image = torch.randn(B, 5, 16), torch.rand(B, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
              set_alpha_to_one=False, steps_offset=1)
    sched = DDIMScheduler(**kw)
    sched.set_timesteps(6)
    steps = list(sched.timesteps)
    keep = [1.0 - float((i + 1) / len(steps) > end) for i in range(len(steps))]

    def call(x, t):
        d, m = cn(x, t, encoder_hidden_states=emb, controlnet_cond=image, conditioning_scale=s * keep[steps.index(t)],
                  return_dict=False)
        return unet(x, t, encoder_hidden_states=emb, down_block_additional_residuals=d,
                    mid_block_additional_residual=m).sample
    z = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = _loop(unet, sched, z, call)
    assert keep == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0] and int(steps[2]) == 499
    m = fs.models.from_diffusers(unet, DDIMScheduler(**kw), controlnet=cn, controlnet_scale=s,
                                 controlnet_window=(499, 1000))
    grid = m.field().grid(6, "schedule")
    x = fs.sample(m.field(), "euler", grid=grid, x_init=z * m.prior_std_at(float(grid[0])),
                  cond={"encoder_hidden_states": emb, "controlnet_cond": image})
    assert _rel(x * float(1 / (1 + grid[-1] ** 2) ** 0.5), ref) <= 1e-5
    with pytest.raises(ValueError, match="controlnet_window"):
        fs.models.from_diffusers(unet, DDIMScheduler(**kw), controlnet=cn, controlnet_window=(600, 100))


def _anyflow():
    """A tiny AnyFlow flow-map transformer (Wan's DiT with a second, target-time embedding), random weights."""
    from diffusers import AnyFlowTransformer3DModel
    net = AnyFlowTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                    out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2,
                                    rope_max_seq_len=32)
    return _randomized(net, 3)


def _anyflow_loop(net, sched, z, emb, neg=None, w=1.0, mean_velocity=True):
    """AnyFlowPipeline's loop: frames-first latents, one timestep (and target timestep r) per frame, CFG
    on the average velocity, then FlowMapEulerDiscreteScheduler's step x_r = x_t − (t − r) ū."""
    x = z.clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            r = sched.sigmas[i + 1] * sched.config.num_train_timesteps
            inp = torch.cat([x, x]) if neg is not None else x
            ts = t.expand(len(inp)).unsqueeze(-1).repeat(1, inp.shape[1])
            rs = r.expand(len(inp)).unsqueeze(-1).repeat(1, inp.shape[1]) if mean_velocity else ts
            e = torch.cat([neg.expand(len(x), -1, -1), emb]) if neg is not None else emb
            u = net(inp, timestep=ts, r_timestep=rs, encoder_hidden_states=e, return_dict=False)[0]
            if neg is not None:
                u_u, u_c = u.chunk(2)
                u = u_u + w * (u_c - u_u)
            x = sched.step(u, t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("w", [None, 4.0])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_anyflow_flow_map_loop_is_the_flow_map_solver(w, steps):
    """A flow-map model (AnyFlow: the network takes the target time r and gives the average velocity
    over [r, t]) with its FlowMapEulerDiscreteScheduler: AnyFlowPipeline's loop, with and without CFG,
    at 1, 2 and 4 steps of one shifted schedule, is `flow_map` on the model's field; with r = t (the
    pipeline's `use_mean_velocity=False`) it is `euler` on the instantaneous velocity."""
    from diffusers import FlowMapEulerDiscreteScheduler
    net = _anyflow()
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 3, 4, 4, 4, generator=g)
    emb, neg = torch.randn(2, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    sched = FlowMapEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    ref = _anyflow_loop(net, sched, z, emb, neg if w else None, w or 1.0)
    m = fs.models.from_diffusers(net, FlowMapEulerDiscreteScheduler(shift=3.0))
    assert m.flow_map
    field = m.field(guidance=w, uncond={"encoder_hidden_states": neg}) if w else m.field()
    x, info = fs.sample(field, "flow_map", nfe=steps, x_init=z, cond={"encoder_hidden_states": emb},
                        return_info=True)
    assert info.nfe == steps and torch.allclose(info.grid, sched.sigmas.to(info.grid.dtype), atol=1e-7)
    assert _rel(x, ref) <= 1e-5
    # the average velocity matters: the instantaneous one (r = t) is another sampler
    inst = _anyflow_loop(net, sched, z, emb, neg if w else None, w or 1.0, mean_velocity=False)
    assert _rel(inst, ref) > 1e-3
    y = fs.sample(field, "euler", nfe=steps, x_init=z, cond={"encoder_hidden_states": emb})
    assert _rel(y, inst) <= 1e-5


def test_flow_map_solver_needs_a_flow_map_model(unet64):
    m = fs.models.from_diffusers(unet64, FlowMatchEulerDiscreteScheduler())
    with pytest.raises(TypeError, match="solver: 'flow_map' needs a flow-map model"):
        fs.sample(m.field(), "flow_map", nfe=2, n=1)
    with pytest.raises(TypeError, match="r: UNet2DModel is not a flow-map model"):
        m.velocity(Z64.float(), torch.ones(3), r=torch.zeros(3))


def test_schedules_diffusers_cannot_make_are_refused_by_name(unet64):
    """PNDM's Runge–Kutta warm-up makes no schedule below 4 steps: the error names nfe, not numpy's
    broadcast. Multi-stage (pyramid) schedulers are refused at load, before any work."""
    from diffusers import HeliosScheduler, PNDMScheduler
    m = fs.models.from_diffusers(unet64, PNDMScheduler())
    with pytest.raises(fs.errors.ArgumentError, match=r"nfe: PNDMScheduler cannot make a schedule of 3 steps"):
        fs.sample(m.field(), "heun", nfe=6, n=1)
    assert fs.sample(m.field(), "heun", nfe=6, n=1, grid="karras").shape == (1, 1, 8, 8)
    with pytest.raises(fs.errors.ArgumentError, match="scheduler: HeliosScheduler is a multi-stage"):
        fs.models.from_diffusers(unet64, HeliosScheduler())


def test_an_inverse_schedulers_knots_are_walked_down_by_sample_and_up_by_invert(unet64):
    """DDIMInverseScheduler lists its timesteps from the data up; the model's grid holds the same knots
    in sampling order (then 0), and `fs.invert` walks them up from the data."""
    from diffusers import DDIMInverseScheduler
    inv = fs.models.from_diffusers(unet64, DDIMInverseScheduler())
    sched = DDIMInverseScheduler()
    sched.set_timesteps(6)
    grid = inv.field().grid(6, "schedule")
    knots = inv.sigma(sched.timesteps.flip(0))
    assert torch.allclose(grid[:-1], knots) and grid[-1] == 0 and bool((grid[1:] < grid[:-1]).all())
    x0 = Z64.clamp(-1, 1)
    _, info = fs.invert(inv.field(), x0, "euler", 6, return_info=True)
    assert torch.allclose(info.grid, knots.flip(0))


def _ip_adapter_unet(seed=0):
    """The tiny text UNet with an IP-Adapter loaded as diffusers loads one (its image projection and
    the decoupled cross-attention processors, from a state dict in the released files' layout), random
    weights."""
    unet = _tiny_text_unet()
    g = torch.Generator().manual_seed(seed)
    cross, clip = unet.config.cross_attention_dim, 12
    image_proj = {"proj.weight": torch.randn(4 * cross, clip, generator=g) * 0.2, "proj.bias": torch.zeros(4 * cross),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            block = name.split(".")
            width = (unet.config.block_out_channels[-1] if block[0] == "mid_block" else
                     list(reversed(unet.config.block_out_channels))[int(block[1])] if block[0] == "up_blocks" else
                     unet.config.block_out_channels[int(block[1])])
            ip[f"{key}.to_k_ip.weight"] = torch.randn(width, cross, generator=g) * 0.3
            ip[f"{key}.to_v_ip.weight"] = torch.randn(width, cross, generator=g) * 0.3
            key += 2
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip}], low_cpu_mem_usage=False)
    return unet.eval(), clip


def test_ip_adapter_image_embeds_are_a_list_input_with_cfg():
    """An IP-Adapter UNet (diffusers' decoupled cross-attention, image embeddings projected to 4
    tokens): StableDiffusionPipeline's loop with `ip_adapter_image_embeds` and CFG (zero image
    embeddings in the unconditional branch) is `euler` on the guided field, with the embeddings a list
    input of `added_cond_kwargs` in cond and uncond."""
    from diffusers import EulerDiscreteScheduler
    unet, clip = _ip_adapter_unet()
    B, w = 2, 5.0
    g = torch.Generator().manual_seed(4)
    emb, null = torch.randn(B, 5, 16, generator=g), torch.zeros(1, 5, 16)
    image = torch.randn(B, 1, clip, generator=g)   # one image per prompt: (batch, images, embedding)
    neg_image = torch.zeros(1, 1, clip)
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched = EulerDiscreteScheduler(**kw)
    sched.set_timesteps(5)

    def guided(x, t):
        u, c = unet(sched.scale_model_input(torch.cat([x, x]), t), t,
                    encoder_hidden_states=torch.cat([null.expand(B, -1, -1), emb]),
                    added_cond_kwargs={"image_embeds": [torch.cat([neg_image.expand(B, -1, -1), image])]}).sample.chunk(2)
        return u + w * (c - u)
    z = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = _loop(unet, sched, z * sched.init_noise_sigma, guided)
    m = fs.models.from_diffusers(unet, EulerDiscreteScheduler(**kw))
    field = m.field(guidance=w, uncond={"encoder_hidden_states": null, "added_cond_kwargs": {"image_embeds": [neg_image]}})
    x0 = z * m.prior_std_at(float(field.grid(5, "schedule")[0]))
    cond = {"encoder_hidden_states": emb, "added_cond_kwargs": {"image_embeds": [image]}}
    x = fs.sample(field, "euler", nfe=5, x_init=x0, cond=cond)
    assert _rel(x, ref) <= 1e-5
    # the image matters: another image embedding moves the samples
    other = fs.sample(field, "euler", nfe=5, x_init=x0, cond={**cond, "added_cond_kwargs": {"image_embeds": [-image]}})
    assert _rel(other, ref) > 1e-3


@pytest.mark.parametrize("frames,chunk", [(3, 14), (5, 4)])
def test_frames_first_latents_decode_as_stable_video_diffusion_decodes_them(frames, chunk):
    """SVD's latents are frames first (b, f, c, h, w) and its VAE's temporal decoder takes frames:
    `decode` is StableVideoDiffusionPipeline.decode_latents (the frames flattened into the batch,
    `decode_chunk_size` at a time, each call told its frame count), videos as (b, c, f, H, W)."""
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler
    net = _tiny_svd_unet(frames)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=(32,), latent_channels=4,
                                       down_block_types=("DownEncoderBlock2D",)).eval()
    latents = torch.randn(2, frames, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # StableVideoDiffusionPipeline.decode_latents, written out
        flat = latents.flatten(0, 1) / vae.config.scaling_factor
        parts = [vae.decode(flat[i:i + chunk], num_frames=len(flat[i:i + chunk])).sample
                 for i in range(0, len(flat), chunk)]
        ref = torch.cat(parts).reshape(-1, frames, 3, 8, 8).permute(0, 2, 1, 3, 4)
    m = fs.models.from_diffusers(net, EulerDiscreteScheduler(prediction_type="v_prediction"), vae=vae)
    out = m.decode(latents, decode_chunk_size=chunk)
    assert out.shape == (2, 3, frames, 8, 8) and torch.allclose(out.float(), ref, atol=1e-5)


def test_frames_first_latents_decode_through_a_video_vae_as_anyflow_decodes_them():
    """AnyFlow's latents are frames first, its VAE (Wan's) decodes whole videos channels first with
    per-channel statistics: `decode` is the pipeline's permute, un-normalise and decode."""
    from diffusers import AutoencoderKLWan, FlowMapEulerDiscreteScheduler
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                           latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0]).eval()
    latents = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(1))   # (b, f, c, h, w)
    with torch.no_grad():
        lat = latents.permute(0, 2, 1, 3, 4)
        mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
        ref = vae.decode(lat / std + mean, return_dict=False)[0]
    m = fs.models.from_diffusers(_anyflow(), FlowMapEulerDiscreteScheduler(), vae=vae)
    out = m.decode(latents)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)


def test_an_anyflow_pipeline_folder_loads_and_samples_as_the_model_in_memory(tmp_path):
    """A pipeline folder (model_index.json, transformer/, scheduler/) of a class that keeps modules in
    float32 (AnyFlow's and Wan's transformers, which diffusers loads only through its low-memory path)
    loads from disk, and samples as the same model in memory."""
    from diffusers import FlowMapEulerDiscreteScheduler
    net = _anyflow()
    net.save_pretrained(tmp_path / "transformer")
    FlowMapEulerDiscreteScheduler(shift=3.0).save_pretrained(tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "AnyFlowPipeline", "transformer": ["diffusers", "AnyFlowTransformer3DModel"],
        "scheduler": ["diffusers", "FlowMapEulerDiscreteScheduler"]}))
    assert net._keep_in_fp32_modules
    disk = fs.models.from_diffusers(str(tmp_path))
    mem = fs.models.from_diffusers(net, FlowMapEulerDiscreteScheduler(shift=3.0))
    emb = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(nfe=2, n=2, shape=(3, 4, 4, 4), cond={"encoder_hidden_states": emb}, seed=0)
    assert disk.flow_map and torch.allclose(fs.sample(disk.field(), "flow_map", **kw),
                                            fs.sample(mem.field(), "flow_map", **kw), atol=1e-6)


def test_torch_dtype_loads_a_folders_weights_in_that_dtype(tmp_path, unet64):
    """`from_diffusers(folder, torch_dtype=torch.bfloat16)`: the network's weights load in bfloat16 (as
    diffusers' own `torch_dtype`), the samples come out in the sampling dtype; a model object is
    refused by name (it is cast with `.to`)."""
    from diffusers import DDIMScheduler
    unet64.save_pretrained(tmp_path / "unet")
    DDIMScheduler(clip_sample=False).save_pretrained(tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDIMScheduler"]}))
    m = fs.models.from_diffusers(str(tmp_path), torch_dtype=torch.bfloat16)
    assert {p.dtype for p in m.model.parameters()} == {torch.bfloat16}
    full = fs.models.from_diffusers(str(tmp_path))
    x = fs.sample(m.field(), "euler", nfe=4, n=2, seed=0)
    ref = fs.sample(full.field(), "euler", nfe=4, n=2, seed=0)
    assert x.dtype == torch.float32 and 0 < _rel(x, ref) < 0.05   # bfloat16 weights: close, not equal
    with pytest.raises(fs.errors.ArgumentError, match=r"torch_dtype: applies to folders and Hub ids"):
        fs.models.from_diffusers(unet64, DDIMScheduler(), torch_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="torch_dtype: expected a torch.dtype"):
        fs.models.from_diffusers(str(tmp_path), torch_dtype="bf16")
    # fs.from_pretrained: a diffusers folder through from_diffusers, a flowsolve folder cast
    assert {p.dtype for p in fs.from_pretrained(str(tmp_path), torch_dtype=torch.bfloat16).model.parameters()} == {
        torch.bfloat16}
    assert {p.dtype for p in fs.from_pretrained("digits-edm", torch_dtype=torch.bfloat16).parameters()} == {
        torch.bfloat16}
