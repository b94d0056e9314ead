"""Named grids against the peers that define them: k-diffusion's `get_sigmas_*` and diffusers'
σ spacings (`use_exponential_sigmas`, `use_beta_sigmas`), in float64; every σ spacing on a flow
field is the same noise levels mapped to its time."""
import math

import numpy as np
import pytest
import torch

import flowsolve as fs


@pytest.fixture(scope="module")
def K():
    return pytest.importorskip("peers").k_diffusion_sampling()


@pytest.mark.parametrize("n", [1, 2, 7, 30])
def test_sigma_spacings_are_k_diffusions(K, n):
    lo, hi = 0.0292, 14.6146
    assert torch.allclose(fs.grids.karras(n, lo, hi), K.get_sigmas_karras(n, lo, hi).double(), rtol=1e-6)
    assert torch.allclose(fs.grids.loglinear(n, lo, hi), K.get_sigmas_exponential(n, lo, hi).double(), rtol=1e-6)
    for rho in (1.0, 2.5):
        ref = K.get_sigmas_polyexponential(n, lo, hi, rho=rho).double()
        assert torch.allclose(fs.grids.polyexponential(n, lo, hi, rho_grid=rho), ref, rtol=1e-6)
    # k-diffusion's VP grid runs from t = 1 to eps_s = 1e-3 of the VP SDE: the same levels, as σ_max, σ_min
    def vp_sigma(t):
        return math.sqrt(math.expm1(19.9 * t**2 / 2 + 0.1 * t))
    if n > 1:  # k-diffusion computes exp(·) − 1 in float32: 2e-4 off at σ_min ≈ 0.0105 (expm1 here)
        ours = fs.grids.vp(n, vp_sigma(1e-3), vp_sigma(1.0))
        assert torch.allclose(ours, K.get_sigmas_vp(n).double(), rtol=2e-3)
        t = torch.linspace(1.0, 1e-3, n, dtype=torch.float64)
        assert torch.allclose(ours[:-1], torch.tensor([vp_sigma(v) for v in t.tolist()], dtype=torch.float64),
                              rtol=1e-12)
    assert torch.allclose(fs.grids.polyexponential(n, lo, hi), fs.grids.loglinear(n, lo, hi), rtol=1e-12)


@pytest.mark.parametrize("steps", [4, 10, 25])
def test_beta_and_exponential_spacings_are_diffusers(steps):
    """EulerDiscreteScheduler's `use_beta_sigmas` (Beta(0.6, 0.6) quantiles) and `use_exponential_sigmas`
    between its training σ's are `grids.beta` and `grids.loglinear` over the same range."""
    from diffusers import EulerDiscreteScheduler
    train = EulerDiscreteScheduler()
    alphas = train.alphas_cumprod.double()
    s_all = ((1 - alphas) / alphas).sqrt()
    lo, hi = float(s_all[0]), float(s_all[-1])
    for key, ours in (("use_beta_sigmas", fs.grids.beta), ("use_exponential_sigmas", fs.grids.loglinear)):
        sched = EulerDiscreteScheduler(**{key: True})
        sched.set_timesteps(steps)
        got = ours(steps, lo, hi)
        assert len(got) == len(sched.sigmas) == steps + 1
        assert torch.allclose(got, sched.sigmas.double(), rtol=2e-5, atol=1e-6)
    # the Beta quantiles gather at both ends: the middle step is the widest
    g = fs.grids.beta(11, 0.1, 10.0)[:-1]
    gaps = (g[:-1] - g[1:]).numpy()
    assert gaps[5] == gaps.max() and gaps[0] < gaps[5] and gaps[-1] < gaps[5]


def test_every_sigma_spacing_runs_on_edm_and_flow_fields_alike():
    """A σ spacing on a flow field is the same noise levels σ/α mapped to the path's time: t = σ/(1 + σ),
    from t = 1."""
    for name in sorted(fs.grids.SIGMA_SPACINGS):
        flow = fs.fields.FlowMatching(lambda x, t: x, shape=(2,))
        g = flow.grid(6, name, sigma_min=0.01, sigma_max=50.0)
        ve = fs.grids.make(name, 6, sigma_min=0.01, sigma_max=50.0)
        assert float(g[0]) == 1.0 and float(g[-1]) == 0.0
        assert torch.allclose(g[1:-1], ve[1:-1] / (1 + ve[1:-1]), rtol=1e-12)


@pytest.mark.parametrize("call,word", [
    (lambda: fs.grids.polyexponential(4, 1.0, 0.5), "sigma_min"),
    (lambda: fs.grids.polyexponential(4, 0.1, 5.0, rho_grid=0.0), "rho_grid"),
    (lambda: fs.grids.vp(4, 0.1, 5.0, beta_d=-1.0), "beta_d"),
    (lambda: fs.grids.beta(4, 0.1, 5.0, a=0.0), "a, b"),
    (lambda: fs.grids.make("polyexponentail", 4), "polyexponential"),
])
def test_bad_grid_arguments_are_named(call, word):
    with pytest.raises(ValueError, match=word):
        call()


def test_named_grids_sample_a_model_through_the_one_call():
    m = fs.from_pretrained("pretrained/digits-edm")
    for name in ("polyexponential", "vp", "beta", "kl_optimal"):
        x, info = fs.sample(m.field(), "dpmpp_2m", nfe=8, n=4, seed=0, grid=name, return_info=True)
        assert x.shape == (4, 1, 8, 8) and bool(torch.isfinite(x).all()) and info.nfe == 8
        assert np.isclose(float(info.grid[0]), m.field().sigma_max) and float(info.grid[-1]) == 0.0


def test_kl_optimal_is_comfyuis_schedule_and_uniform_in_the_angle():
    """ComfyUI's `kl_optimal_scheduler(n, σ_min, σ_max)` written out: n knots uniform in arctan σ, then 0;
    on a TrigFlow field with σ_d = 1 the same spacing is uniform in its time (after its first knot, which
    every flow grid moves to the pure noise)."""
    n, lo, hi = 9, 0.03, 14.6
    r = torch.arange(n, dtype=torch.float64) / (n - 1)
    ref = torch.zeros(n + 1, dtype=torch.float64)
    ref[:-1] = (r * math.atan(lo) + (1 - r) * math.atan(hi)).tan()
    torch.testing.assert_close(fs.grids.kl_optimal(n, lo, hi), ref, rtol=1e-14, atol=0)
    torch.testing.assert_close(fs.grids.make("kl_optimal", 4, sigma_min=lo, sigma_max=hi, final_zero=False),
                               fs.grids.kl_optimal(5, lo, hi)[:-1], rtol=1e-14, atol=0)
    trig = fs.fields.TrigFlow(lambda x, t: 0 * x, (2,), sigma_data=1.0)
    g = trig.grid(8, "kl_optimal", sigma_min=math.tan(0.1), sigma_max=math.tan(1.5))
    assert float(g[0]) == trig.t_start and float(g[-1]) == 0.0     # a flow grid starts at its pure noise
    torch.testing.assert_close(g[1:-1], torch.linspace(1.5, 0.1, 8, dtype=torch.float64)[1:], rtol=1e-12, atol=1e-12)


def test_align_your_steps_is_the_published_schedule():
    """diffusers' `AysSchedules` (10 steps, 3 decimals, up to 1.4% off the later table NVIDIA publishes),
    and NVIDIA's log-linear interpolation of the 10-step levels (written out) for other step counts; the
    last knot is σ = 0."""
    from diffusers.schedulers import AysSchedules
    for model, key in (("sd1", "StableDiffusionSigmas"), ("sdxl", "StableDiffusionXLSigmas"),
                       ("svd", "StableDiffusionVideoSigmas")):
        peer = torch.tensor(AysSchedules[key], dtype=torch.float64)
        torch.testing.assert_close(fs.grids.align_your_steps(10, model), peer, rtol=2e-2, atol=1e-9)
    levels = fs.grids.align_your_steps(10, "sdxl")[:-1].tolist() + [0.0291671582]
    for steps in (4, 7, 25):
        pos = np.linspace(0, 1, steps + 1)
        ref = np.exp(np.interp(pos, np.linspace(0, 1, 11), np.log(levels[::-1])))[::-1].copy()
        ref[-1] = 0.0
        np.testing.assert_allclose(fs.grids.align_your_steps(steps, "sdxl").numpy(), ref, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="model: expected one of"):
        fs.grids.align_your_steps(10, "sd3")


# -- ComfyUI's schedulers on a model's table of noise levels ------------------------------------------

def _comfy_table(kind, steps, sigmas):
    """ComfyUI's comfy/samplers.py schedulers written out on an ascending table `sigmas` (a list)."""
    n = len(sigmas)
    if kind == "simple":
        return [sigmas[-(1 + int(x * n / steps))] for x in range(steps)] + [0.0]
    if kind == "ddim_uniform":
        out, x = [0.0], 1
        while x < n:
            out.append(sigmas[x])
            x += max(n // steps, 1)
        return out[::-1]
    raise AssertionError(kind)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("steps", [1, 5, 10, 30])
def test_comfyuis_table_schedulers_on_a_diffusers_model(unet64, beta_schedule, steps):
    """On a DDPM-type model, "normal" is k-diffusion's `get_sigmas` of its discrete wrapper (the same
    table), "sgm_uniform" drops the last of steps + 1 such timesteps, "simple" and "ddim_uniform" pick
    the table's entries as ComfyUI does."""
    import importlib
    from diffusers import DDPMScheduler
    pytest.importorskip("peers").k_diffusion_sampling()
    external = importlib.import_module("k_diffusion.external")
    sched = DDPMScheduler(beta_schedule=beta_schedule)
    field = fs.models.from_diffusers(unet64, sched).field()
    kd = external.DiscreteEpsDDPMDenoiser(torch.nn.Identity(), sched.alphas_cumprod.double(), quantize=False)
    table = kd.sigmas.double()
    assert torch.allclose(field.sigma_table(), table, rtol=1e-12, atol=0)
    # (k-diffusion spaces its timesteps in float32: 1e-6)
    assert torch.allclose(field.grid(steps, "normal"), kd.get_sigmas(steps).double(), rtol=1e-6, atol=0)
    sgm = field.grid(steps, "sgm_uniform")
    assert torch.allclose(sgm[:-1], kd.get_sigmas(steps + 1).double()[:-2], rtol=1e-6, atol=0) and sgm[-1] == 0
    for kind in ("simple", "ddim_uniform"):
        assert field.grid(steps, kind).tolist() == _comfy_table(kind, steps, field.sigma_table().tolist())
    x, info = fs.sample(field, "euler", grid="simple", nfe=steps, n=2, seed=0, dtype=torch.float64, return_info=True)
    assert torch.equal(info.grid, field.grid(steps, "simple")) and torch.isfinite(x).all()


def test_comfyuis_normal_on_a_continuous_field_is_log_linear():
    """On a continuous-σ field ComfyUI's table is log-uniform, so "normal" is the log-linear grid
    (k-diffusion's get_sigmas_exponential, also accepted as "exponential")."""
    field = fs.fields.EDM(lambda x, s: 0 * x, shape=(2,))
    assert torch.allclose(field.grid(7, "normal"), fs.grids.loglinear(7, 0.002, 80.0), rtol=1e-12, atol=0)
    assert torch.equal(field.grid(7, "exponential"), field.grid(7, "loglinear"))
    K = pytest.importorskip("peers").k_diffusion_sampling()
    assert torch.allclose(fs.grids.make("exponential", 7, sigma_min=0.002, sigma_max=80.0),
                          K.get_sigmas_exponential(7, 0.002, 80.0).double(), rtol=1e-6, atol=0)


def test_comfyuis_table_schedulers_need_a_table():
    plain = fs.fields.Function(lambda x, t: 0 * x, 1.0, 0.0)
    with pytest.raises(ValueError, match="ComfyUI's 'simple' reads a model's table of noise levels"):
        plain.grid(5, "simple")
    with pytest.raises(ValueError, match="table: expected an ascending table"):
        fs.grids.from_table("simple", 5, torch.tensor([3.0, 2.0, 1.0]))


def _comfy_flow(kind, steps, shift, entries=1000):
    """ComfyUI's schedulers on its discrete-flow sampling written out: the table shift((i + 1)/N), a
    timestep of σ·N and σ(timestep) = shift(timestep/N)."""
    table = [shift((i + 1) / entries) for i in range(entries)]
    if kind in ("simple", "ddim_uniform"):
        return _comfy_table(kind, steps, table)
    start, end = table[-1] * entries, table[0] * entries
    count = steps + 1 if kind == "sgm_uniform" else steps
    ts = [start + (end - start) * k / (count - 1) for k in range(count)] if count > 1 else [start]
    if kind == "sgm_uniform":
        ts = ts[:-1]
    return [shift(t / entries) for t in ts] + [0.0]


@pytest.mark.parametrize("kind", ["normal", "sgm_uniform", "simple", "ddim_uniform"])
@pytest.mark.parametrize("steps", [1, 4, 9, 28])
@pytest.mark.parametrize("model", ["plain", "sd3", "flux"])
def test_comfyuis_table_schedulers_on_flow_fields(unet64, kind, steps, model):
    """On a flow field the table is t_i = shift((i + 1)/1000) with the model's shift: none for a plain
    flow, the scheduler's s t/(1 + (s − 1) t) (SD3's shift 3), or Flux's dynamic e^μ/(e^μ + 1/t − 1)."""
    import math
    from diffusers import FlowMatchEulerDiscreteScheduler
    if model == "plain":
        field, shift = fs.fields.FlowMatching(lambda x, t: 0 * x, (2,)), (lambda t: t)
    elif model == "sd3":
        field = fs.models.from_diffusers(unet64, FlowMatchEulerDiscreteScheduler(shift=3.0)).field()
        shift = lambda t: 3.0 * t / (1 + 2.0 * t)  # noqa: E731
    else:
        sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        field = fs.models.from_diffusers(unet64, sched, mu=0.8).field()
        shift = lambda t: math.exp(0.8) / (math.exp(0.8) + (1 / t - 1))  # noqa: E731
    got = field.grid(steps, kind)
    assert torch.allclose(got, torch.tensor(_comfy_flow(kind, steps, shift), dtype=torch.float64), rtol=1e-12, atol=0)
    assert float(got[0]) <= 1.0 and float(got[-1]) == 0.0


def _mochi(steps, threshold_noise=0.025, linear_steps=None):
    """Mochi's linear-quadratic σ schedule (genmoai/models infer.py, ComfyUI's copy) written out."""
    if steps == 1:
        return [1.0, 0.0]
    if linear_steps is None:
        linear_steps = steps // 2
    linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
    diff = linear_steps - threshold_noise * steps
    quadratic_steps = steps - linear_steps
    qc = diff / (linear_steps * quadratic_steps ** 2)
    lc = threshold_noise / linear_steps - 2 * diff / (quadratic_steps ** 2)
    const = qc * (linear_steps ** 2)
    quadratic = [qc * (i ** 2) + lc * i + const for i in range(linear_steps, steps)]
    return [1.0 - x for x in linear + quadratic + [1.0]]


@pytest.mark.parametrize("steps", [1, 2, 5, 20, 50])
def test_linear_quadratic_is_mochis_schedule(steps):
    flow = fs.fields.FlowMatching(lambda x, t: 0 * x, (2,))
    assert torch.allclose(flow.grid(steps, "linear_quadratic"), torch.tensor(_mochi(steps), dtype=torch.float64),
                          rtol=0, atol=1e-14)
    edm = fs.fields.EDM(lambda x, s: 0 * x, shape=(2,))
    assert torch.allclose(edm.grid(steps, "linear_quadratic"), 80.0 * torch.tensor(_mochi(steps), dtype=torch.float64),
                          rtol=0, atol=1e-12)
    g = fs.grids.linear_quadratic(steps, threshold_noise=0.1, linear_steps=max(1, steps // 4) if steps > 1 else None)
    ref = _mochi(steps, 0.1, max(1, steps // 4) if steps > 1 else None)
    assert torch.allclose(g, torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-14)
    x, info = fs.sample(flow, "euler", grid="linear_quadratic", nfe=steps, n=2, seed=0, return_info=True)
    assert len(info.grid) == steps + 1


def _comfy_beta(steps, sigmas, alpha=0.6, beta=0.6):
    """ComfyUI's beta_scheduler written out (numpy's rint, repeats of a timestep dropped)."""
    from scipy import stats
    ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), alpha, beta) * (len(sigmas) - 1))
    out, last = [], -1
    for t in ts:
        if t != last:
            out.append(float(sigmas[int(t)]))
        last = t
    return out + [0.0]


@pytest.mark.parametrize("steps", [1, 4, 10, 30, 300])
def test_comfyui_prefixed_grids_are_comfyuis_schedulers(unet64, steps):
    """`grid="comfyui:<name>"`: ComfyUI's scheduler of that name. Its beta picks the table's entries at
    Beta(0.6, 0.6) quantiles (not diffusers' beta over σ, `grid="beta"`); its karras, exponential and
    kl_optimal span the table's range; on a flow model they space t itself between the table's ends
    (t_0 = shift(1/1000) and 1), as ComfyUI treats a flow's σ; the table schedulers are the plain names."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
    K = pytest.importorskip("peers").k_diffusion_sampling()
    field = fs.models.from_diffusers(unet64, DDPMScheduler(beta_schedule="scaled_linear")).field()
    table = field.sigma_table().tolist()
    assert field.grid(steps, "comfyui:beta").tolist() == _comfy_beta(steps, table)
    assert not torch.equal(field.grid(10, "comfyui:beta"), field.grid(10, "beta"))  # not diffusers' beta
    lo, hi = table[0], table[-1]
    assert torch.allclose(field.grid(steps, "comfyui:karras"), K.get_sigmas_karras(steps, lo, hi).double(), rtol=1e-5)
    assert torch.allclose(field.grid(steps, "comfyui:exponential"), K.get_sigmas_exponential(steps, lo, hi).double(),
                          rtol=1e-5)
    assert torch.equal(field.grid(steps, "comfyui:simple"), field.grid(steps, "simple"))
    flow = fs.models.from_diffusers(unet64, FlowMatchEulerDiscreteScheduler(shift=3.0)).field()
    ftable = fs.grids.flow_table(flow.time_shift)
    assert ftable[-1] == pytest.approx(1.0) and ftable[0] == pytest.approx(3 * 0.001 / (1 + 2 * 0.001))
    assert flow.grid(steps, "comfyui:beta").tolist() == _comfy_beta(steps, ftable)
    assert torch.allclose(flow.grid(steps, "comfyui:karras"),
                          K.get_sigmas_karras(steps, ftable[0], ftable[-1]).double(), rtol=1e-5)
    x, info = fs.sample(flow, "euler", grid="comfyui:beta", steps=min(steps, 10), n=2, seed=0, return_info=True)
    assert torch.isfinite(x).all() and float(info.grid[0]) == pytest.approx(ftable[-1])
    with pytest.raises(fs.errors.ArgumentError, match="ComfyUI has no scheduler 'betta'.*did you mean 'beta'"):
        field.grid(steps, "comfyui:betta")
