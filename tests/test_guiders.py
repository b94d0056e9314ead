"""diffusers' modular guiders as `guidance=`: every solver step equals diffusers' modular denoise loop
(its `set_state` / `prepare_inputs` / `prepare_models` / `cleanup_models` / `guider(batches)` written
out as `stable_diffusion_3/denoise.py` and `stable_diffusion_xl/denoise.py` run it) with the
scheduler's own step, on tiny random models."""

import json
import math

import pytest
import torch

import flowsolve as fs

guiders = pytest.importorskip("diffusers.guiders")
from diffusers import (  # noqa: E402
    DPMSolverMultistepScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, HeunDiscreteScheduler,
    UNet2DModel,
)
from diffusers.utils import logging as diffusers_logging  # noqa: E402

diffusers_logging.set_verbosity_error()  # the guiders' "experimental feature" warning, once per guider

N_ROWS = 6
LABELS = {"class_labels": torch.arange(N_ROWS) % 10}
NULL = {"class_labels": torch.full((N_ROWS,), 10)}


@pytest.fixture(scope="module")
def labels_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, num_class_embeds=11, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8).eval().double()


def modular_loop(network, call, sched, guider, x, cond, uncond, steps, timesteps=None):
    """diffusers' modular denoise loop: for each timestep, the guider's state, its batches (one network
    call each, between prepare_models and cleanup_models), its combined prediction, the scheduler's step."""
    timesteps = sched.timesteps if timesteps is None else timesteps
    scale = getattr(sched, "scale_model_input", lambda x, t: x)   # FlowMatch schedulers do not scale
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            guider.set_state(step=i, num_inference_steps=steps, timestep=t)
            batches = guider.prepare_inputs({k: (cond[k], uncond[k]) for k in cond})
            for batch in batches:
                guider.prepare_models(network)
                batch.noise_pred = call(scale(x, t), t, {k: getattr(batch, k) for k in cond})
                guider.cleanup_models(network)
            x = sched.step(guider(batches).pred, t, x).prev_sample
    return x


def _unet_call(net):
    return lambda x, t, inputs: net(x, t, **inputs).sample


def _close(x, ref, tol=1e-9):
    return (x - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


GUIDERS = {
    "cfg": lambda: guiders.ClassifierFreeGuidance(guidance_scale=4.0),
    "cfg-rescale-window": lambda: guiders.ClassifierFreeGuidance(guidance_scale=4.0, guidance_rescale=0.5,
                                                                 start=0.25, stop=0.75),
    "cfg-original": lambda: guiders.ClassifierFreeGuidance(guidance_scale=3.0, use_original_formulation=True),
    "cfg-zero-star": lambda: guiders.ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=1),
    "apg-momentum": lambda: guiders.AdaptiveProjectedGuidance(guidance_scale=4.0,
                                                              adaptive_projected_guidance_momentum=-0.5,
                                                              adaptive_projected_guidance_rescale=2.0, eta=0.3),
    "tangential": lambda: guiders.TangentialClassifierFreeGuidance(guidance_scale=4.0),
}


@pytest.mark.parametrize("name", list(GUIDERS))
@pytest.mark.parametrize("scheduler,solver", [(EulerDiscreteScheduler, "euler"),
                                              (DPMSolverMultistepScheduler, "dpmpp_2m")])
def test_a_guider_on_an_eps_unet_is_diffusers_modular_loop(labels_unet, name, scheduler, solver):
    """ε-prediction UNet: the guider combines the ε's (not the data predictions: CFG-Zero*, APG,
    and tangential CFG are not affine in them), at the step index the loop gives it
    (the window, CFG-Zero*'s zero-init step, APG's momentum reset at step 0), in chunks of 4 rows."""
    steps = 8
    sched = scheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    z = torch.randn(N_ROWS, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = modular_loop(labels_unet, _unet_call(labels_unet), sched, GUIDERS[name](), z * sched.init_noise_sigma,
                       LABELS, NULL, steps)
    m = fs.models.from_diffusers(labels_unet, scheduler(num_train_timesteps=1000))
    field = m.field(guidance=GUIDERS[name](), uncond={"class_labels": 10})
    grid = field.grid(steps, "schedule")
    for batch in (None, 4):
        x = fs.sample(field, solver, grid=grid, x_init=z * m.prior_std_at(float(grid[0])), cond=LABELS,
                      batch_size=batch)
        assert _close(x, ref, 1e-6), (name, solver, batch)   # diffusers' σ's and timesteps are float32


def test_the_step_index_counts_evaluations_as_the_heun_loop_does(labels_unet):
    """HeunDiscreteScheduler's loop runs 2N − 1 timesteps with num_inference_steps = N: a guider's
    window is read against the evaluation index, as flowsolve's `heun` on the same schedule does."""
    steps = 6
    sched = HeunDiscreteScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    sched.sigmas = sched.sigmas.double()
    z = torch.randn(N_ROWS, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    make = lambda: guiders.ClassifierFreeGuidance(guidance_scale=5.0, start=0.2, stop=0.6)  # noqa: E731
    ref = modular_loop(labels_unet, _unet_call(labels_unet), sched, make(), z * sched.init_noise_sigma,
                       LABELS, NULL, steps)
    m = fs.models.from_diffusers(labels_unet, HeunDiscreteScheduler(num_train_timesteps=1000))
    field = m.field(guidance=make(), uncond={"class_labels": 10})
    grid = field.grid(steps, "schedule")
    x, info = fs.sample(field, "heun", grid=grid, x_init=z * m.prior_std_at(float(grid[0])), cond=LABELS,
                        return_info=True)
    assert info.nfe == 2 * steps - 1
    assert _close(x, ref, 1e-6)
    # the window matters: the guider on every step is another sample
    everywhere = fs.sample(m.field(guidance=guiders.ClassifierFreeGuidance(guidance_scale=5.0),
                                   uncond={"class_labels": 10}), "heun", grid=grid,
                           x_init=z * m.prior_std_at(float(grid[0])), cond=LABELS)
    assert not _close(everywhere, ref, 1e-3)


def test_img2img_counts_the_walked_steps(labels_unet):
    """img2img: the pipeline's loop over the last ⌊N·s⌋ timesteps gives the guider those steps' count
    and indices from 0, and so does flowsolve's run from `init=`."""
    steps, strength = 10, 0.6
    sched = EulerDiscreteScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    walked = int(steps * strength)
    start = steps - walked
    sched.set_begin_index(start)
    x0 = torch.randn(N_ROWS, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.5
    m = fs.models.from_diffusers(labels_unet, EulerDiscreteScheduler(num_train_timesteps=1000))
    make = lambda: guiders.ClassifierFreeGuidance(guidance_scale=4.0, start=0.2, stop=0.5)  # noqa: E731
    field = m.field(guidance=make(), uncond={"class_labels": 10})
    x, info = fs.sample(field, "euler", steps=steps, init=x0, strength=strength, cond=LABELS, seed=4,
                        return_info=True)
    eps = fs.noise.SampleNoise(4, 0, N_ROWS, (1, 8, 8), torch.float64, "cpu", stream=0)()
    noised = sched.add_noise(x0, eps, sched.timesteps[start:start + 1])
    ref = modular_loop(labels_unet, _unet_call(labels_unet), sched, make(), noised, LABELS, NULL, walked,
                       timesteps=sched.timesteps[start:])
    assert info.nfe == walked
    assert _close(x.double(), ref, 1e-5)


def test_a_guider_on_a_flow_model_guides_its_velocity(labels_unet):
    """A class-conditional UNet as a flow-matching model: CFG-Zero* (made for flows: the first step's
    velocity is zero) on the velocity is the FlowMatchEuler modular loop."""
    steps = 8
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    z = torch.randn(N_ROWS, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    make = lambda: guiders.ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=1)  # noqa: E731
    ref = modular_loop(labels_unet, lambda x, t, inputs: labels_unet(x, t.expand(len(x)), **inputs).sample,
                       sched, make(), z, LABELS, NULL, steps)
    m = fs.models.from_diffusers(labels_unet, FlowMatchEulerDiscreteScheduler(shift=3.0))
    x = fs.sample(m.field(guidance=make(), uncond={"class_labels": 10}), "euler", nfe=steps, x_init=z, cond=LABELS)
    assert _close(x, ref, 1e-6)
    # the zero-init step left the prior's draw where it was for the first step; other solvers run too
    y = fs.sample(m.field(guidance=make(), uncond={"class_labels": 10}), "dpmpp_2m", nfe=steps, x_init=z,
                  cond=LABELS)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("kind", ["pag", "slg"])
def test_a_guider_that_hooks_the_network_for_its_own_branch(kind):
    """Perturbed-attention and skip-layer guidance change the network for one batch through diffusers'
    hooks: flowsolve hands the guider the network around each batch, as the pipeline does (a DiT with
    learned variance; ε channels guided). The hooks are gone afterwards: the plain field gives the
    unguided sample again."""
    from diffusers import DiTTransformer2DModel
    from diffusers.hooks import LayerSkipConfig
    torch.manual_seed(0)
    net = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval().double()
    if kind == "pag":
        make = lambda: guiders.PerturbedAttentionGuidance(  # noqa: E731
            guidance_scale=3.0, perturbed_guidance_scale=2.0, perturbed_guidance_layers=[1],
            perturbed_guidance_start=0.0, perturbed_guidance_stop=0.7)
    else:
        make = lambda: guiders.SkipLayerGuidance(  # noqa: E731
            guidance_scale=3.0, skip_layer_guidance_scale=2.0, skip_layer_guidance_start=0.0,
            skip_layer_guidance_stop=1.0, skip_layer_config=LayerSkipConfig(indices=[0], fqn="transformer_blocks"))
    steps = 6
    sched = EulerDiscreteScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    z = torch.randn(N_ROWS, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    guider = make()
    ref = modular_loop(net, lambda x, t, inputs: net(x, t.expand(len(x)), **inputs).sample[:, :1], sched, guider,
                       z * sched.init_noise_sigma, LABELS, NULL, steps)
    m = fs.models.from_diffusers(net, EulerDiscreteScheduler(num_train_timesteps=1000))
    x0 = z * m.prior_std_at(float(m.field().grid(steps, "schedule")[0]))
    x = fs.sample(m.field(guidance=make(), uncond={"class_labels": 10}), "euler", steps=steps, x_init=x0, cond=LABELS)
    assert _close(x, ref, 1e-6)
    cfg = fs.sample(m.field(guidance=3.0, uncond={"class_labels": 10}), "euler", steps=steps, x_init=x0, cond=LABELS)
    assert not _close(cfg, ref, 1e-3)    # the perturbed branch changed the sample
    plain = fs.sample(m.field(), "euler", steps=steps, x_init=x0, cond=LABELS)
    net_again = fs.models.from_diffusers(net, EulerDiscreteScheduler(num_train_timesteps=1000))
    assert torch.equal(plain, fs.sample(net_again.field(), "euler", steps=steps, x_init=x0, cond=LABELS))


def test_a_guider_on_a_flowsolve_denoiser():
    """flowsolve's own conditional denoiser (digits-cond-edm): the guider combines its data predictions,
    so CFG through the guider is `guidance=w`; its null label is the default uncond."""
    m = fs.from_pretrained(str(__import__("pathlib").Path(__file__).resolve().parents[1] / "pretrained" / "digits-cond-edm"))
    y = {"class_labels": torch.arange(5)}
    a = fs.sample(m.field(guidance=2.0), "dpmpp_2m", nfe=6, n=5, seed=0, cond=y)
    b = fs.sample(m.field(guidance=guiders.ClassifierFreeGuidance(guidance_scale=2.0)), "dpmpp_2m", nfe=6, n=5,
                  seed=0, cond=y)
    assert (a - b).abs().max().item() <= 1e-5


def test_a_guider_outside_a_solve_is_at_step_zero(labels_unet):
    """Called directly (no solve), a guider sees the first step of a solve of unknown length."""
    guider = guiders.ClassifierFreeGuidance(guidance_scale=4.0, start=0.5)
    m = fs.models.from_diffusers(labels_unet, EulerDiscreteScheduler(num_train_timesteps=1000))
    field = m.field(guidance=guider, uncond={"class_labels": 10}).bind(LABELS)
    x = torch.randn(N_ROWS, 1, 8, 8, dtype=torch.float64)
    field(x, torch.tensor(3.0, dtype=torch.float64))
    assert guider.get_state()["step"] == 0 and guider.get_state()["num_inference_steps"] is None
    # inside a solve it saw each evaluation's index and the solve's steps
    seen = []
    original = guider.set_state
    guider.set_state = lambda step, num_inference_steps, timestep: (seen.append((step, num_inference_steps)),
                                                                    original(step, num_inference_steps, timestep))
    fs.sample(m.field(guidance=guider, uncond={"class_labels": 10}), "euler", steps=5, n=N_ROWS, cond=LABELS,
              dtype=torch.float64)
    assert seen == [(i, 5) for i in range(5)]


def test_guider_misuse_is_named(labels_unet, tmp_path):
    m = fs.models.from_diffusers(labels_unet, EulerDiscreteScheduler(num_train_timesteps=1000))
    cfg = guiders.ClassifierFreeGuidance(guidance_scale=4.0)
    with pytest.raises(ValueError, match="rescale.*guider"):
        m.field(guidance=cfg, uncond={"class_labels": 10}, rescale=0.5)
    with pytest.raises(ValueError, match="uncond.*ClassifierFreeGuidance.*unconditional"):
        fs.sample(m.field(guidance=cfg), "euler", steps=3, n=N_ROWS, cond=LABELS)
    with pytest.raises(TypeError, match="uncond"):
        m.field(guidance=cfg, uncond=[{"class_labels": 10}])
    with pytest.raises((TypeError, ValueError), match="guidance"):
        m.field(guidance=object(), uncond={"class_labels": 10})
    with pytest.raises(ValueError, match="guider_config.json"):
        fs.fields.load_guider(tmp_path)
    (tmp_path / "guider_config.json").write_text(json.dumps({"_class_name": "NoSuchGuidance"}))
    with pytest.raises(ValueError, match="NoSuchGuidance.*ClassifierFreeGuidance"):
        fs.fields.load_guider(tmp_path)


def test_a_saved_guider_loads_with_its_class_and_settings(tmp_path):
    apg = guiders.AdaptiveProjectedGuidance(guidance_scale=6.5, adaptive_projected_guidance_momentum=-0.3,
                                            eta=0.2, start=0.1)
    apg.save_pretrained(tmp_path / "guider")
    back = fs.fields.load_guider(tmp_path / "guider")
    assert type(back) is guiders.AdaptiveProjectedGuidance
    assert math.isclose(back.guidance_scale, 6.5) and math.isclose(back.eta, 0.2) and back._start == 0.1


def test_the_cli_takes_a_guider_folder(tmp_path, capsys):
    """`flowsolve sample --guider FOLDER` runs a saved diffusers guider: CFG at scale 2 is `--guidance 2`;
    a guider with --guidance is refused by name."""
    import numpy as np
    from flowsolve.cli import main
    model = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "pretrained" / "digits-cond-edm")
    guiders.ClassifierFreeGuidance(guidance_scale=2.0).save_pretrained(tmp_path / "guider")
    common = ["sample", "--model", model, "--solver", "dpmpp_2m", "--nfe", "6", "--num-samples", "5", "--seed", "3",
              "--quiet"]
    assert main([*common, "--guider", str(tmp_path / "guider"), "--out", str(tmp_path / "a.npy")]) == 0
    assert main([*common, "--guidance", "2", "--out", str(tmp_path / "b.npy")]) == 0
    assert np.abs(np.load(tmp_path / "a.npy") - np.load(tmp_path / "b.npy")).max() <= 1e-5
    assert main([*common, "--guider", str(tmp_path / "guider"), "--guidance", "2", "--out", str(tmp_path / "c.npy")]) != 0
    assert "--guider" in capsys.readouterr().err and not (tmp_path / "c.npy").exists()
