"""Dynamic shifting: μ computed as diffusers' pipelines compute it from the latent tokens, checked against
the pipelines' own μ functions (read out of diffusers' source files: the pipelines themselves need the
transformers library for their text encoders) and against the scheduler's loop."""
import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import flowsolve as fs
from flowsolve.models.dynamic_shift import dynamic_shift_mu, latent_tokens, mu_rule_of
from conftest import peer_function
from test_pipeline_models import _flux, _flux_ids, _flux_loop_check, _rel

def _peer_function(relpath: str, name: str):
    return peer_function(relpath, name)


CFG = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)


@pytest.mark.parametrize("pipeline,path", [("FluxPipeline", "flux/pipeline_flux.py"),
                                           ("QwenImagePipeline", "qwenimage/pipeline_qwenimage.py"),
                                           ("LTXPipeline", "ltx/pipeline_ltx.py"),
                                           ("StableDiffusion3Pipeline",
                                            "stable_diffusion_3/pipeline_stable_diffusion_3.py")])
def test_linear_rule_is_the_pipelines_calculate_shift(pipeline, path):
    peer = _peer_function(path, "calculate_shift")
    assert mu_rule_of(pipeline) == "linear"
    cfg = dict(CFG, base_shift=0.3, max_shift=1.4, max_image_seq_len=8192)
    for L in (16, 256, 1024, 4096, 9000):
        want = peer(L, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"])
        assert dynamic_shift_mu(cfg, L) == pytest.approx(want, rel=1e-12)


def test_cogview4_and_flux2_rules_are_their_pipelines():
    cog = _peer_function("cogview4/pipeline_cogview4.py", "calculate_shift")
    assert mu_rule_of("CogView4Pipeline") == "sqrt"
    cfg = dict(base_image_seq_len=256, base_shift=0.25, max_shift=0.75)
    for L in (64, 256, 4096):
        assert dynamic_shift_mu(cfg, L, rule="sqrt") == pytest.approx(cog(L, 256, 0.25, 0.75), rel=1e-12)
    flux2 = _peer_function("flux2/pipeline_flux2.py", "compute_empirical_mu")
    assert mu_rule_of("Flux2Pipeline") == "flux2"
    for L, n in ((1024, 4), (1024, 28), (4096, 50), (6000, 10)):
        assert dynamic_shift_mu({}, L, n, "flux2") == pytest.approx(flux2(L, n), rel=1e-12)
    assert mu_rule_of(None) == "linear" and mu_rule_of("NoSuchPipeline") == "linear"
    with pytest.raises(ValueError, match="image_seq_len: expected a positive int"):
        dynamic_shift_mu(CFG, 0)
    with pytest.raises(ValueError, match="rule: expected one of"):
        dynamic_shift_mu(CFG, 16, rule="cubic")


def test_latent_tokens_from_inputs_and_config():
    assert latent_tokens({}, {"img_ids": torch.zeros(12, 3)}, None) == 12
    assert latent_tokens({}, {"img_ids": torch.zeros(2, 20, 4)}, None) == 20  # Flux 2: (batch, tokens, 4)
    assert latent_tokens({}, {"img_shapes": [[(1, 4, 6)], [(1, 4, 6)]]}, None) == 24  # Qwen-Image, per sample
    assert latent_tokens({}, {"img_shapes": [[(1, 4, 6), (1, 8, 8)]]}, None) == 24  # Edit: + the reference's
    assert latent_tokens({}, {"num_frames": 3, "height": 4, "width": 5}, None) == 60  # LTX
    assert latent_tokens({"patch_size": 2}, {}, (16, 8, 12)) == 24  # SD3: patches of the sample size
    assert latent_tokens({}, {}, None) is None and latent_tokens({}, {}, (4, 8, 8)) is None  # a UNet: no patches


def _flux_folder(tmp_path, pipeline: str, **sched):
    net = _flux()
    root = tmp_path / pipeline
    net.save_pretrained(root / "transformer")
    FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, **sched).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": pipeline, "transformer": ["diffusers", "FluxTransformer2DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    return net, root


def test_a_flux_folder_without_mu_samples_the_pipelines_loop(tmp_path):
    """FluxPipeline computes μ = calculate_shift(latents.shape[1], ...) from the scheduler's config: the
    model does the same from its position table (one row per latent token), and `euler` with nfe=N is
    then the pipeline's loop with no μ given; `image_seq_len=` says the count where no table does."""
    cfg = dict(base_image_seq_len=4, max_image_seq_len=64, base_shift=0.5, max_shift=1.15)
    net, root = _flux_folder(tmp_path, "FluxPipeline", **cfg)
    B, h, w, L, N = 2, 4, 4, 5, 6
    img_ids, txt_ids = _flux_ids(h, w, L)
    m = fs.models.from_diffusers(root, img_ids=img_ids, txt_ids=txt_ids, guidance=torch.tensor([3.5]))
    mu = _peer_function("flux/pipeline_flux.py", "calculate_shift")(h * w, 4, 64, 0.5, 1.15)
    assert m.mu == pytest.approx(mu, rel=1e-12)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, **cfg)
    sched.set_timesteps(N, sigmas=np.linspace(1.0, 1 / N, N), mu=mu)
    _flux_loop_check(m, net, sched, N, h, w, L, img_ids, txt_ids, B)
    # the count by name; the μ given wins; a swapped flow scheduler keeps the pipeline's rule
    by_count = fs.models.from_diffusers(root, image_seq_len=h * w)
    torch.testing.assert_close(by_count.field().grid(N, "schedule"), sched.sigmas.double(), rtol=1e-6, atol=1e-7)
    assert fs.models.from_diffusers(root, image_seq_len=h * w, mu=0.2).mu == 0.2
    bigger = fs.models.from_diffusers(root, image_seq_len=64)
    assert bigger.mu == pytest.approx(1.15) and by_count.field().grid(N, "schedule")[1] < bigger.field().grid(
        N, "schedule")[1]  # more tokens: a stronger shift toward the noise
    with pytest.raises(ValueError, match=r"mu: .*image_seq_len="):
        fs.models.from_diffusers(root)
    with pytest.raises(ValueError, match="image_seq_len: expected a positive int"):
        fs.models.from_diffusers(root, image_seq_len=-3)
    with pytest.raises(ValueError, match="mu_rule: expected one of linear, sqrt, flux2"):
        fs.models.from_diffusers(root, image_seq_len=16, mu_rule="cubic")
    assert fs.models.from_diffusers(root, image_seq_len=16, mu_rule="sqrt").mu == pytest.approx(
        dynamic_shift_mu(dict(cfg), 16, rule="sqrt"))


def test_flux2s_mu_depends_on_the_steps(tmp_path):
    """Flux 2's pipeline fits μ to the image's tokens and the number of steps: each N gets its own."""
    _, root = _flux_folder(tmp_path, "Flux2Pipeline")
    m = fs.models.from_diffusers(root, image_seq_len=1024)
    peer = _peer_function("flux2/pipeline_flux2.py", "compute_empirical_mu")
    for N in (4, 12):
        sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        sched.set_timesteps(N, sigmas=np.linspace(1.0, 1 / N, N), mu=peer(1024, N))
        torch.testing.assert_close(m.field().grid(N, "schedule"), sched.sigmas.double(), rtol=1e-6, atol=1e-7)
    assert m.mu == pytest.approx(peer(1024, 50))  # its time shift: at the pipeline's default 50 steps
    swapped = m.with_scheduler(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=1.0))
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(4, sigmas=np.linspace(1.0, 1 / 4, 4), mu=peer(1024, 4))
    torch.testing.assert_close(swapped.field().grid(4, "schedule"), sched.sigmas.double(), rtol=1e-6, atol=1e-7)


def test_an_sd3_transformer_counts_the_patches_of_its_sample_size():
    """SD3's pipeline: image_seq_len = (h / patch_size)(w / patch_size) of its latents; the model's
    default shape is its config's sample size (8 × 8 latents in patches of 2: 16 tokens)."""
    from conftest import tiny_sd3
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64)
    m = fs.models.from_diffusers(tiny_sd3(), sched)
    assert m.mu == pytest.approx(dynamic_shift_mu(dict(sched.config), 16))
    peer = _peer_function("stable_diffusion_3/pipeline_stable_diffusion_3.py", "calculate_shift")
    assert m.mu == pytest.approx(peer(16, 4, 64, 0.5, 1.15), rel=1e-12)
    text = {"encoder_hidden_states": torch.randn(1, 3, 16), "pooled_projections": torch.randn(1, 8)}
    assert fs.sample(m.field(), "euler", nfe=2, n=1, seed=0, cond=text).shape == (1, 4, 8, 8)
    # its pipeline at another size computes another μ: a batch of 12 × 12 latents (36 tokens) is refused
    big = torch.randn(1, 4, 12, 12)
    with pytest.raises(ValueError, match=r"image_seq_len: .* for 16 latent tokens.*have 36.*image_seq_len=36"):
        fs.sample(m.field(), "euler", nfe=2, x_init=big, cond=text)
    m36 = fs.models.from_diffusers(tiny_sd3(), sched, image_seq_len=36)
    assert m36.mu == pytest.approx(peer(36, 4, 64, 0.5, 1.15), rel=1e-12)
    assert torch.isfinite(fs.sample(m36.field(), "euler", nfe=2, x_init=big, cond=text)).all()
    # a μ given is the user's: no count to check
    assert fs.sample(fs.models.from_diffusers(tiny_sd3(), sched, mu=0.7).field(), "euler", nfe=2, x_init=big,
                     cond=text).shape == big.shape


@pytest.mark.parametrize("strength", [0.3, 0.6])
def test_a_flux_folders_img2img_is_flux_img2img_pipelines_loop(tmp_path, strength):
    """FluxImg2ImgPipeline, written out with its own `get_timesteps` and `calculate_shift`: sigmas
    linspace(1, 1/N, N) shifted by μ of the image's tokens, the strength's steps counted its way (8 steps
    at 0.3: 3), the packed image latents noised by `scale_noise`, then the scheduler's steps. The model
    does all of it from the folder and the position table alone."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL
    from flowsolve.noise import SampleNoise
    cfg = dict(base_image_seq_len=4, max_image_seq_len=64, base_shift=0.5, max_shift=1.15)
    net, root = _flux_folder(tmp_path, "FluxPipeline", **cfg)
    AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8,), latent_channels=4, norm_num_groups=8,
                  scaling_factor=0.36, shift_factor=0.11).save_pretrained(root / "vae")
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKL"]}))
    B, N, L = 2, 8, 3
    img_ids, txt_ids = _flux_ids(2, 3, L)
    m = fs.models.from_diffusers(root, img_ids=img_ids, txt_ids=txt_ids, guidance=torch.tensor([3.5]))
    images = torch.rand(B, 1, 4, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z0 = m.encode(images)
    text = {"encoder_hidden_states": torch.randn(B, L, 16), "pooled_projections": torch.randn(B, 8)}
    got = fs.sample(m.field(), "euler", steps=N, init=z0, strength=strength, seed=5, cond=text)
    # the pipeline's loop
    src = "flux/pipeline_flux_img2img.py"
    mu = peer_function(src, "calculate_shift")(6, 4, 64, 0.5, 1.15)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, **cfg)
    sched.set_timesteps(N, sigmas=np.linspace(1.0, 1 / N, N), mu=mu)
    timesteps, walked = peer_function(src, "get_timesteps", "FluxImg2ImgPipeline")(
        SimpleNamespace(scheduler=sched), N, strength, "cpu")
    assert walked == (3 if strength == 0.3 else 5)
    eps = SampleNoise(5, 0, B, tuple(z0.shape[1:]), torch.float32, "cpu", stream=0)()
    x = sched.scale_noise(z0, timesteps[:1].repeat(B), eps)
    g = torch.full((B,), 3.5)
    with torch.no_grad():
        for t in timesteps:
            v = net(hidden_states=x, timestep=t.expand(B) / 1000, guidance=g, img_ids=img_ids, txt_ids=txt_ids,
                    **text).sample
            x = sched.step(v, t, x).prev_sample
    assert _rel(got, x) <= 1e-5


def test_a_flux_kontext_folder_samples_its_pipelines_loop(tmp_path):
    """FluxKontextPipeline: the reference image's packed latents follow the sample's tokens
    (torch.cat([latents, image_latents], dim=1)), its position ids follow theirs with first column 1,
    the prediction is cut to the sample's tokens, and μ counts the sample's tokens only. A Kontext
    folder appends `cond["concat"]` along the tokens, and μ, the decode grid and the sample's shape
    leave the reference rows of img_ids out."""
    cfg = dict(base_image_seq_len=4, max_image_seq_len=64, base_shift=0.5, max_shift=1.15)
    net, root = _flux_folder(tmp_path, "FluxKontextPipeline", **cfg)
    B, N, L = 2, 5, 3
    gen_ids, txt_ids = _flux_ids(2, 3, L)
    ref_ids, _ = _flux_ids(3, 3, L)
    ref_ids[:, 0] = 1  # the pipeline's mark of the reference image's tokens
    img_ids = torch.cat([gen_ids, ref_ids])
    m = fs.models.from_diffusers(root, img_ids=img_ids, txt_ids=txt_ids, guidance=torch.tensor([3.5]))
    assert m.concat_dim == 1 and m.data_shape == (6, 16)
    mu = peer_function("flux/pipeline_flux_kontext.py", "calculate_shift")(6, 4, 64, 0.5, 1.15)
    assert m.mu == pytest.approx(mu, rel=1e-12)
    reference = torch.randn(B, 9, 16, generator=torch.Generator().manual_seed(4))
    text = {"encoder_hidden_states": torch.randn(B, L, 16), "pooled_projections": torch.randn(B, 8)}
    z = torch.randn(B, 6, 16, generator=torch.Generator().manual_seed(3))
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, **cfg)
    sched.set_timesteps(N, sigmas=np.linspace(1.0, 1 / N, N), mu=mu)
    g = torch.full((B,), 3.5)
    x = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out = net(hidden_states=torch.cat([x, reference], dim=1), timestep=t.expand(B) / 1000, guidance=g,
                      img_ids=img_ids, txt_ids=txt_ids, **text).sample
            x = sched.step(out[:, : x.shape[1]], t, x).prev_sample
    got = fs.sample(m.field(), "euler", nfe=N, x_init=z, cond={**text, "concat": reference})
    assert _rel(got, x) <= 1e-5
    plain = fs.models.from_diffusers(root, img_ids=gen_ids, txt_ids=txt_ids, guidance=torch.tensor([3.5]))
    assert plain.mu == pytest.approx(mu, rel=1e-12)  # the same μ without the reference rows
