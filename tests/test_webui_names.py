"""AUTOMATIC1111's sampler labels ("DPM++ 2M Karras", "Euler a", "DPM2") as `solver=`: the k-diffusion
sampler with the grid its schedule type makes on the model's table, as A1111's `get_sigmas` makes it
(σ_min, σ_max of the table; steps + 1 levels with the next-to-last dropped for DPM2, DPM2 a and
DPM++ 3M SDE), checked against k-diffusion's samplers and sigma functions on k-diffusion's own
discrete wrapper of the same model, and against A1111's schedule formulas written out."""
import importlib
import math
import re

import pytest
import torch

import flowsolve as fs
from flowsolve.noise import SampleNoise


@pytest.fixture(scope="module")
def K():
    return pytest.importorskip("peers").k_diffusion_sampling()


@pytest.fixture(scope="module")
def ddpm(unet64, K):
    """A diffusers DDPM-type model and k-diffusion's discrete wrapper of its table (A1111's model_wrap)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    model = fs.models.from_diffusers(unet64, sched)
    external = importlib.import_module("k_diffusion.external")
    kd = external.DiscreteEpsDDPMDenoiser(torch.nn.Identity(), sched.alphas_cumprod.double(), quantize=False)
    return model, kd


def _a1111_levels(K, kd, schedule: str, n: int) -> torch.Tensor:
    """A1111's schedule types (modules/sd_schedulers.py) for n steps, written out from its formulas."""
    table = kd.sigmas.double()
    lo, hi = table[0].item(), table[-1].item()
    if schedule == "Karras":
        return K.get_sigmas_karras(n, lo, hi, rho=7.0).double()
    if schedule == "Exponential":
        return K.get_sigmas_exponential(n, lo, hi).double()
    if schedule == "Polyexponential":
        return K.get_sigmas_polyexponential(n, lo, hi, rho=1.0).double()
    if schedule == "Uniform":
        return kd.get_sigmas(n).double()
    if schedule in ("Normal", "SGM Uniform"):
        start, end = kd.sigma_to_t(torch.tensor(hi)), kd.sigma_to_t(torch.tensor(lo))
        ts = torch.linspace(float(start), float(end), n + 1)[:-1] if schedule == "SGM Uniform" else \
            torch.linspace(float(start), float(end), n)
        return torch.tensor([float(kd.t_to_sigma(t)) for t in ts] + [0.0], dtype=torch.float64)
    if schedule == "KL Optimal":  # n + 1 levels from σ_max to σ_min, no final zero
        a_lo, a_hi = math.atan(lo), math.atan(hi)
        return torch.tensor([math.tan(i / n * a_lo + (1 - i / n) * a_hi) for i in range(n + 1)], dtype=torch.float64)
    if schedule == "Simple":
        ss = len(table) / n
        return torch.tensor([table[-(1 + int(x * ss))].item() for x in range(n)] + [0.0], dtype=torch.float64)
    if schedule == "DDIM":
        ss, x, sigs = max(len(table) // n, 1), 1, []
        while x < len(table):
            sigs.append(table[x].item())
            x += ss
        return torch.tensor(sigs[::-1] + [0.0], dtype=torch.float64)
    if schedule == "Beta":
        from scipy import stats
        u = [1 - i / (n - 1) for i in range(n)] if n > 1 else [1.0]
        return torch.tensor([lo + stats.beta.ppf(v, 0.6, 0.6) * (hi - lo) for v in u] + [0.0], dtype=torch.float64)
    raise AssertionError(schedule)


def _a1111_sigmas(K, kd, schedule: str, steps: int, discard: bool) -> torch.Tensor:
    """A1111's get_sigmas: steps + 1 levels with the next-to-last dropped where the sampler discards it."""
    s = _a1111_levels(K, kd, schedule, steps + 1 if discard else steps)
    return torch.cat([s[:-2], s[-1:]]) if discard else s


SCHEDULES = ["Karras", "Exponential", "Polyexponential", "Uniform", "Normal", "SGM Uniform", "KL Optimal", "Simple",
             "DDIM", "Beta"]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("steps", [3, 10, 25])
def test_each_schedule_type_is_a1111s_grid_on_the_models_table(ddpm, K, schedule, steps):
    model, kd = ddpm
    field = model.field()
    for sampler, discard in (("Euler", False), ("DPM2", True)):
        _, info = fs.sample(field, f"{sampler} {schedule}", steps=steps, n=1, seed=0, return_info=True)
        ref = _a1111_sigmas(K, kd, schedule, steps, discard)
        assert info.grid.shape == ref.shape, (sampler, info.grid, ref)
        # (k-diffusion interpolates its timesteps in float32: 1e-6)
        assert torch.allclose(info.grid, ref, rtol=2e-6, atol=1e-12), (sampler, info.grid, ref)


@pytest.mark.parametrize("label,kname,schedule,discard", [
    ("DPM++ 2M", "sample_dpmpp_2m", "Karras", False),       # its "Automatic" is Karras
    ("DPM++ 2M Karras", "sample_dpmpp_2m", "Karras", False),  # the label before A1111 1.9
    ("k_dpmpp_2m", "sample_dpmpp_2m", "Karras", False),
    ("Euler", "sample_euler", "Uniform", False),             # no schedule of its own: the model's table
    ("Heun Exponential", "sample_heun", "Exponential", False),
    ("LMS KL Optimal", "sample_lms", "KL Optimal", False),   # ends at σ_min, as A1111's does
    ("DPM2", "sample_dpm_2", "Karras", True),
    ("DPM2 Beta", "sample_dpm_2", "Beta", True),
])
def test_a1111_labels_are_its_k_diffusion_run(ddpm, K, label, kname, schedule, discard):
    """`fs.sample(field, "DPM++ 2M Karras", steps=N)` is k-diffusion's sampler on A1111's sigmas for N
    steps, on the same model (its denoiser in k-diffusion's σ convention), from the same start."""
    model, kd = ddpm
    steps = 12
    sig = _a1111_sigmas(K, kd, schedule, steps, discard)
    z = torch.randn(3, *model.field().data_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sig[0]
    den = lambda x, s, **kw: model.denoise(x, s)  # noqa: E731
    with torch.no_grad():
        ref = getattr(K, kname)(den, z.clone(), sig, disable=True)
        got, info = fs.sample(model.field(), label, steps=steps, x_init=z.clone(), seed=0, return_info=True)
    assert torch.allclose(info.grid, sig, rtol=2e-6, atol=1e-12)
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_ancestral_labels_with_a_discarded_level_draw_the_same_noise_as_k_diffusion(ddpm, K):
    """"DPM2 a" (Karras, next-to-last level dropped): k-diffusion's sample_dpm_2_ancestral given the same
    per-step noise."""
    model, kd = ddpm
    steps = 8
    sig = _a1111_sigmas(K, kd, "Karras", steps, True)
    z = torch.randn(3, *model.field().data_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sig[0]
    src = SampleNoise(5, 0, 3, tuple(model.field().data_shape), torch.float64, "cpu", stream=1)
    with torch.no_grad():
        ref = K.sample_dpm_2_ancestral(lambda x, s, **kw: model.denoise(x, s), z.clone(), sig, disable=True,
                                       noise_sampler=lambda a, b: src())
        got = fs.sample(model.field(), "DPM2 a", steps=steps, x_init=z.clone(), seed=5)
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_a_grid_given_as_a_schedule_type_keeps_the_samplers_discard(ddpm, K):
    """`grid="Karras"` with "DPM2" is A1111's DPM2 with the Karras schedule type (its level dropped);
    a flowsolve spacing or a tensor given as the grid replaces the label's grid as it is."""
    model, kd = ddpm
    field = model.field()
    _, info = fs.sample(field, "DPM2", grid="Exponential", steps=6, n=1, seed=0, return_info=True)
    assert torch.allclose(info.grid, _a1111_sigmas(K, kd, "Exponential", 6, True), rtol=2e-6)
    _, info = fs.sample(field, "DPM2", grid="loglinear", steps=6, n=1, seed=0, return_info=True)
    assert torch.allclose(info.grid, field.grid(6, "loglinear"), rtol=0, atol=0)
    _, info = fs.sample(field, "dpm_2", grid="Karras", steps=6, n=1, seed=0, return_info=True)  # no discard
    assert torch.allclose(info.grid, _a1111_sigmas(K, kd, "Karras", 6, False), rtol=2e-6)


def test_an_nfe_budget_takes_the_most_steps_that_fit(ddpm):
    """With an NFE budget instead of steps, the label's grid has as many steps as the budget affords,
    counting a grid that ends above σ = 0 (KL Optimal) as needing its last Heun step in full."""
    model, _ = ddpm
    field = model.field()
    _, info = fs.sample(field, "Heun Karras", nfe=9, n=1, seed=0, return_info=True)
    assert len(info.grid) - 1 == 5 and info.nfe == 9
    _, info = fs.sample(field, "Heun KL Optimal", nfe=9, n=1, seed=0, return_info=True)
    assert len(info.grid) - 1 == 4 and info.nfe == 8 and info.grid[-1] > 0


def test_a1111_labels_work_on_continuous_and_flow_fields(gmm64):
    """On an EDM field the table is ComfyUI's 1000 log-uniform levels; on a flow field the levels map to
    its time. Both reach the mixture."""
    field = fs.fields.EDM(gmm64.denoiser)
    x = fs.sample(field, "DPM++ 2M", steps=20, n=2000, seed=0, dtype=torch.float64)
    ref = gmm64.sample(2000, generator=torch.Generator().manual_seed(1)).double()
    assert fs.metrics.energy_distance(x, ref) < 0.02
    _, info = fs.sample(field, "Euler a", steps=5, n=2, seed=0, return_info=True)
    assert torch.allclose(info.grid, field.grid(5, "normal"))


def test_a1111_samplers_that_are_not_k_diffusions_are_refused_with_the_nearest(gmm64):
    field = fs.fields.EDM(gmm64.denoiser)
    for name, hint in [("DDIM", "ddim_uniform"), ("UniPC", "unipc_bh1"), ("LCM", "consistency")]:
        with pytest.raises(fs.errors.ArgumentError, match=f"AUTOMATIC1111's '{name}'.*{hint}"):
            fs.sample(field, name, steps=4, n=2, seed=0)
    with pytest.raises(fs.errors.ArgumentError, match=re.escape("unknown solver 'DPM++ 2M Karas' (did you mean 'DPM++ 2M Karras'?)")):
        fs.sample(field, "DPM++ 2M Karas", steps=4, n=2, seed=0)
    with pytest.raises(fs.errors.ArgumentError, match="expected an AUTOMATIC1111 schedule type"):
        fs.solvers.names.WebUIGrid("Karas")


@pytest.mark.parametrize("label", ["DPM fast", "DPM fast Karras", "k_dpm_fast", "DPM adaptive"])
def test_dpm_fast_and_adaptive_take_the_tables_range_and_a1111s_count(gmm64, K, label):
    """A1111 hands "DPM fast" its step count as k-diffusion's n (evaluations) and both samplers the
    table's σ_min and σ_max, whatever the schedule type; "DPM adaptive" ignores the step count."""
    field = fs.fields.EDM(gmm64.denoiser, sigma_min=0.002, sigma_max=80.0)
    z = torch.randn(16, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 80
    den = lambda x, s, **kw: gmm64.denoiser(x, s)  # noqa: E731
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # k-diffusion builds its λ grid in the default dtype
    try:
        if "adaptive" in label:
            ref, kinfo = K.sample_dpm_adaptive(den, z.clone(), 0.002, 80.0, disable=True, return_info=True)
        else:
            ref = K.sample_dpm_fast(den, z.clone(), 0.002, 80.0, 10, disable=True)
    finally:
        torch.set_default_dtype(default)
    got, info = fs.sample(field, label, steps=10, x_init=z.clone(), seed=0, return_info=True)
    assert (got - ref).abs().max().item() <= 1e-9 * ref.abs().max().item()
    assert info.nfe == (kinfo["nfe"] - kinfo["n_reject"] if "adaptive" in label else 10)


@pytest.mark.parametrize("steps", [12, 30, 40])
def test_restart_spends_its_steps_as_a1111s_restart_sampler(gmm64, steps):
    """A1111's "Restart" with N steps: below 20 plain Heun on Karras; from 20, Karras re-spaced to N − 9
    steps and 9 restart steps once from ρ = 2 to 0.1; from 36, N − 2·(N // 4) and N // 4 steps twice —
    the restart loop written out (`test_restart._reference`) on those levels, given the same noise."""
    from test_restart import _reference
    field = fs.fields.EDM(gmm64.denoiser, sigma_min=0.002, sigma_max=80.0)
    k, times = (steps // 4, 2) if steps >= 36 else (9, 1) if steps >= 20 else (0, 0)
    sig = fs.grids.karras(steps - k * times, 0.002, 80.0)
    restarts = ((0.1, 2.0, k, times),) if times else ()
    z = torch.randn(16, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 80
    src = SampleNoise(5, 0, 16, (64,), torch.float64, "cpu", stream=1)
    ref, calls = _reference(gmm64.denoiser, z.clone(), sig.tolist(), restarts, src)
    got, info = fs.sample(field, "Restart", steps=steps, x_init=z, seed=5, return_info=True)
    assert torch.allclose(info.grid, sig, rtol=1e-12)
    assert (got - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()
    assert info.nfe == calls


def test_the_cli_takes_a1111_labels(tmp_path, capsys, K):
    """`flowsolve sample --solver "DPM2 a Karras" --steps 6` on the shipped DDPM-type digits model walks
    A1111's σ list of its table (7 Karras levels with the next-to-last dropped)."""
    from flowsolve.cli import main
    out = tmp_path / "x.npy"
    assert main(["sample", "--model", "pretrained/digits-ddpm", "--solver", "DPM2 a Karras", "--steps", "6", "--n", "4",
                 "--out", str(out), "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "solver dpm_2_ancestral, 6 steps" in said and out.exists()


@pytest.mark.parametrize("label,kname,schedule,discard", [("Euler a", "sample_euler_ancestral", "Uniform", False),
                                                         ("DPM++ 2M Karras", "sample_dpmpp_2m", "Karras", False),
                                                         ("DPM2", "sample_dpm_2", "Karras", True)])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_a1111_img2img_walks_its_steps_from_the_data_noised(ddpm, K, label, kname, schedule, discard, strength):
    """A1111's img2img with a label: t_enc = ⌊min(strength, 0.999)·N⌋, the sampler on sigmas[N − t_enc − 1:]
    from x + σ_0 ε (its processing.py and sd_samplers_kdiffusion.sample_img2img), with the same noise."""
    model, kd = ddpm
    steps = 12
    sig = _a1111_sigmas(K, kd, schedule, steps, discard)
    t_enc = int(min(strength, 0.999) * steps)
    sched = sig[steps - t_enc - 1:]
    shape = tuple(model.field().data_shape)
    x0 = torch.randn(3, *shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.5
    eps = SampleNoise(5, 0, 3, shape, torch.float64, "cpu", stream=0)()
    src = SampleNoise(5, 0, 3, shape, torch.float64, "cpu", stream=1)
    with torch.no_grad():
        ref = getattr(K, kname)(lambda x, s, **kw: model.denoise(x, s), x0 + float(sched[0]) * eps, sched,
                                disable=True, **({"noise_sampler": lambda a, b: src()} if "ancestral" in kname else {}))
        got, info = fs.sample(model.field(), label, steps=steps, init=x0, strength=strength, seed=5, return_info=True)
    assert info.steps == t_enc + 1 and torch.allclose(info.grid, sched, rtol=2e-6, atol=1e-12)
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
