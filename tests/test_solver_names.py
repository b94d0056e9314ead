"""The names users bring (`fs.solvers.resolve`): k-diffusion's sampler functions, ComfyUI's KSampler
names and diffusers' schedulers, each checked against the peer's own code on the same start and noise."""
import importlib
import math

import pytest
import torch

import flowsolve as fs
from flowsolve.noise import SampleNoise
from test_peer_solvers import BrownianIncrements, _diffusers_loop, _in_float64, _noisy_diffusers_loop


def _k():
    return pytest.importorskip("peers").k_diffusion_sampling()


@pytest.mark.parametrize("kname", ["sample_euler", "sample_heun", "sample_dpm_2", "sample_lms", "sample_dpmpp_2m",
                                   "sample_euler_ancestral", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral",
                                   "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_dpmpp_sde"])
@pytest.mark.parametrize("prefix", [True, False])
def test_k_diffusion_names_are_its_samplers_with_its_defaults(gmm64, kname, prefix):
    """`fs.sample(field, "sample_lms")` (or "lms") with no options is k-diffusion's `sample_lms` with its
    own defaults (order 4; dpmpp_2s_ancestral's eta = 1, ...), given the same noise."""
    K = _k()
    sig = K.get_sigmas_karras(10, 0.002, 80.0).double()
    z = torch.randn(16, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 80
    src = SampleNoise(5, 0, 16, (64,), torch.float64, "cpu", stream=1)
    noise = BrownianIncrements(16, (64,)) if kname == "sample_dpmpp_sde" else (lambda a, b: src())
    extra = {"noise_sampler": noise} if "noise_sampler" in _params(K, kname) else {}
    ref = getattr(K, kname)(lambda x, s, **kw: gmm64.denoiser(x, s), z.clone(), sig, disable=True, **extra)
    name = kname if prefix else kname.removeprefix("sample_")
    got = fs.sample(fs.fields.EDM(gmm64.denoiser), name, grid=sig, x_init=z, seed=5)
    assert (got - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()


def _params(K, kname):
    import inspect
    return inspect.signature(getattr(K, kname)).parameters


@pytest.mark.parametrize("kname,step", [("sample_heun", "heun"), ("sample_euler", "euler"), ("sample_dpm_2", "dpm_2")])
def test_k_diffusions_churn_keywords_on_its_names_are_edm(gmm64, kname, step):
    """k-diffusion's own keywords on its own names: `fs.sample(field, "sample_heun", s_churn=10, ...)` is
    `sample_heun(s_churn=10, ...)` (flowsolve's `edm` with step="heun"), given the same noise."""
    K = _k()
    sig = K.get_sigmas_karras(8, 0.002, 80.0).double()
    z = torch.randn(16, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 80
    src = SampleNoise(5, 0, 16, (64,), torch.float64, "cpu", stream=1)
    churned = iter([0.05 <= float(s) <= 50.0 for s in sig[:-1]])
    kw = dict(s_churn=10.0, s_tmin=0.05, s_tmax=50.0, s_noise=0.9)
    original = K.torch.randn_like
    K.torch.randn_like = lambda x, *a, **k: src() if next(churned) else torch.zeros_like(x)
    try:
        ref = getattr(K, kname)(lambda x, s, **k: gmm64.denoiser(x, s), z.clone(), sig, disable=True, **kw)
    finally:
        K.torch.randn_like = original
    got, info = fs.sample(fs.fields.EDM(gmm64.denoiser), kname, grid=sig, x_init=z, seed=5, return_info=True, **kw)
    assert info.solver == "edm"
    assert (got - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
    plain = fs.sample(fs.fields.EDM(gmm64.denoiser), kname, grid=sig, x_init=z)
    assert torch.equal(plain, fs.sample(fs.fields.EDM(gmm64.denoiser), step, grid=sig, x_init=z))


@pytest.mark.parametrize("name,solver,opts", [
    ("lms", "adams", {"order": 4, "schedule_ramp": False}), ("dpmpp_2s_ancestral", "dpmpp_2s", {"eta": 1.0}),
    ("uni_pc", "unipc_bh1", {"order": 3}), ("uni_pc_bh2", "unipc", {"order": 3}), ("lcm", "consistency", {}),
    ("dpmpp_2m_sde_gpu", "dpmpp_2m_sde", {}), ("res_multistep", "dpmpp_2m_heun", {}),
    ("exp_heun_2_x0", "seeds_2", {"eta": 0.0, "r": 1.0, "solver_type": "phi_2"}),
])
def test_comfyui_names_are_the_solver_with_its_defaults_and_options_override(gmm64, name, solver, opts):
    spec, got = fs.solvers.resolve(name)
    assert (spec.name, got) == (solver, opts)
    field = fs.fields.EDM(gmm64.denoiser)
    a = fs.sample(field, name, nfe=6, n=3, seed=1, dtype=torch.float64)
    b = fs.sample(field, solver, nfe=6, n=3, seed=1, dtype=torch.float64, **opts)
    assert torch.equal(a, b)
    if "order" in opts:  # an option given overrides the name's default
        assert fs.solvers.resolve(name, {"order": 2})[1]["order"] == 2


def test_unknown_names_list_flowsolves_and_the_peers():
    with pytest.raises(ValueError, match=r"unknown solver 'dpmpp_2s_ancestra' \(did you mean 'dpmpp_2s_ancestral'\?\)"):
        fs.solvers.resolve("dpmpp_2s_ancestra")
    with pytest.raises(ValueError, match="k-diffusion's and ComfyUI's sampler names"):
        fs.sample(fs.fields.EDM(lambda x, s: 0 * x, shape=(2,)), "heunpp9", nfe=4, n=2)
    with pytest.raises(TypeError, match="expected a solver name \\(str\\), a diffusers scheduler or a flowsolve"):
        fs.solvers.resolve(3)


def test_an_unregistered_solver_entry_is_accepted_as_it_is(gmm64):
    """A `Solver` made for the call runs without registering it, with its own NFE accounting."""
    def half_euler(run, x, *, scale: float = 1.0):
        for i in run.steps():
            x = x + scale * (run.times[i + 1] - run.times[i]) * run.f(x, i)
        return x
    mine = fs.solvers.Solver("mine", half_euler, lambda steps, singular_end: steps)
    field = fs.fields.EDM(gmm64.denoiser)
    a, info = fs.sample(field, mine, nfe=8, n=3, seed=0, dtype=torch.float64, return_info=True)
    assert info.solver == "mine" and info.nfe == 8
    assert torch.equal(a, fs.sample(field, "euler", nfe=8, n=3, seed=0, dtype=torch.float64))
    with pytest.raises(TypeError, match="unknown option 'scal'"):
        fs.sample(field, mine, nfe=8, n=3, scal=2.0)


# -- diffusers schedulers ------------------------------------------------------------------------

# (scheduler, configuration, step keyword arguments, whether its loop draws noise)
_CONFIGS = [
    ("DDIMScheduler", {}, {}, False),                                       # clips x̂₀, steps along the unclipped ε
    ("DDIMScheduler", {"clip_sample": False}, {"eta": 0.5}, True),
    ("DDIMScheduler", {}, {"use_clipped_model_output": True}, False),
    ("DDIMParallelScheduler", {}, {"eta": 0.5}, True),
    ("DDPMScheduler", {"clip_sample": False}, {}, True),
    ("DDPMParallelScheduler", {}, {}, True),
    ("PNDMScheduler", {"skip_prk_steps": True}, {}, False),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, {}, False),
    ("EulerAncestralDiscreteScheduler", {}, {}, True),
    ("HeunDiscreteScheduler", {}, {}, False),
    ("KDPM2DiscreteScheduler", {}, {}, False),
    ("KDPM2AncestralDiscreteScheduler", {}, {}, True),
    ("LMSDiscreteScheduler", {}, {}, False),
    ("LMSDiscreteScheduler", {}, {"order": 2}, False),
    ("DPMSolverMultistepScheduler", {}, {}, False),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
     {}, False),
    ("DPMSolverMultistepScheduler", {"solver_type": "heun", "final_sigmas_type": "sigma_min"}, {}, False),
    ("DPMSolverMultistepScheduler", {"solver_order": 1}, {}, False),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "final_sigmas_type": "sigma_min"}, {}, True),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "solver_order": 3, "final_sigmas_type": "sigma_min"},
     {}, False),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}, {}, True),
    ("DPMSolverSinglestepScheduler", {"solver_order": 3}, {}, False),
    ("UniPCMultistepScheduler", {"solver_order": 3}, {}, False),
    # (diffusers' bh1 and ε forms divide by zero at a final σ = 0: both end at σ_min here)
    ("UniPCMultistepScheduler", {"solver_type": "bh1", "disable_corrector": [0, 2], "final_sigmas_type": "sigma_min"},
     {}, False),
    ("UniPCMultistepScheduler", {"predict_x0": False, "final_sigmas_type": "sigma_min"}, {}, False),
    ("DEISMultistepScheduler", {"solver_order": 3}, {}, False),
    ("SASolverScheduler", {"predictor_order": 3, "corrector_order": 4}, {}, True),
    ("DPMSolverSDEScheduler", {}, {}, False),                               # (its Brownian tree: replaced)
    ("LCMScheduler", {}, {}, True),
    ("TCDScheduler", {}, {"eta": 0.5}, True),
    ("EDMEulerScheduler", {}, {}, False),
    ("EDMDPMSolverMultistepScheduler", {"solver_order": 3}, {}, False),
]


def _brownian(sched, z, on: bool):
    """DPMSolverSDEScheduler's Brownian tree replaced by the increments `dpmpp_sde` draws."""
    module = importlib.import_module(type(sched).__module__)
    tree = getattr(module, "BrownianTreeNoiseSampler", None)
    if on and tree is not None:
        module.BrownianTreeNoiseSampler = lambda *a, **k: BrownianIncrements(len(z), tuple(z.shape[1:]))
    return module, tree


@pytest.mark.parametrize("name,kw,step_kw,noisy", _CONFIGS)
def test_a_scheduler_given_as_the_solver_is_its_own_loop(unet64, name, kw, step_kw, noisy):
    """`fs.sample(model.field(), solver=scheduler, **step_kwargs)` on a model loaded with that scheduler
    is the scheduler's own loop (`scheduler.step(..., **step_kwargs)`), from the same start and noise."""
    import diffusers
    cls = getattr(diffusers, name)
    steps = 8
    sched = _in_float64(cls(**kw), steps)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    module, tree = _brownian(sched, z, name == "DPMSolverSDEScheduler")
    try:
        ref = (_noisy_diffusers_loop if noisy else _diffusers_loop)(unet64, sched, z, **step_kw)
    finally:
        if tree is not None:
            module.BrownianTreeNoiseSampler = tree
    m = fs.models.from_diffusers(unet64, cls(**kw))
    field = m.field()
    grid = field.grid(steps, "schedule")
    x = fs.sample(field, cls(**kw), grid=grid, x_init=z * m.prior_std_at(float(grid[0])), dtype=torch.float64,
                  seed=5, **step_kw)
    vp = m.prior_std_at(float(grid[0])) > float(grid[0]) and name != "LCMScheduler"   # α x at a last σ > 0
    alpha_end = 1.0 / math.sqrt(1.0 + float(grid[-1]) ** 2) if vp else 1.0
    assert (x * alpha_end - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()
    if not kw:  # the class, and its name, mean its default configuration
        assert fs.solvers.resolve(name, step_kw) == fs.solvers.resolve(cls, step_kw) == fs.solvers.resolve(cls(), step_kw)


@pytest.mark.parametrize("name,kw", [("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
                                     ("FlowMatchHeunDiscreteScheduler", {}),
                                     ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0,
                                                                      "prediction_type": "flow_prediction"}),
                                     ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0,
                                                                  "prediction_type": "flow_prediction"}),
                                     ("SASolverScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0,
                                                            "prediction_type": "flow_prediction"})])
def test_a_flow_scheduler_given_as_the_solver_is_its_own_loop(unet64, name, kw):
    """Flow-mode schedulers too; SA-Solver's default τ rule (1 for timesteps in [200, 800]) is read on
    the flow model's timesteps, given the same noise."""
    import diffusers
    cls = getattr(diffusers, name)
    unet = unet64.float()
    steps = 6
    sched = cls(**kw)
    sched.set_timesteps(steps)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = z.clone()
    module = importlib.import_module(type(sched).__module__)
    src = SampleNoise(5, 0, 2, (1, 8, 8), torch.float32, "cpu", stream=1)
    original = getattr(module, "randn_tensor", None)
    if original is not None:
        module.randn_tensor = lambda shape, **k: src()
    try:
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(unet(x, t).sample, t, x).prev_sample
    finally:
        if original is not None:
            module.randn_tensor = original
    m = fs.models.from_diffusers(unet, cls(**kw))
    spec, _ = fs.solvers.resolve(cls(**kw))
    nfe = spec.evals(steps, False)
    got = fs.sample(m.field(), cls(**kw), nfe=nfe, x_init=z, seed=5)
    unet64.double()
    assert (got - x).abs().max().item() <= 1e-4 * x.abs().max().item()


def test_scheduler_configurations_that_no_solver_reproduces_are_named():
    import diffusers
    with pytest.raises(ValueError, match="euler_at_final=True ending at σ_min"):
        fs.solvers.from_scheduler(diffusers.DPMSolverMultistepScheduler(euler_at_final=True,
                                                                         final_sigmas_type="sigma_min"))
    with pytest.raises(ValueError, match="algorithm_type='sde-dpmsolver\\+\\+' and solver_order=3"):
        fs.solvers.from_scheduler(diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
                                                                         solver_order=3))
    with pytest.raises(TypeError, match="DDIMScheduler.step has no option 'etaa'.*did you mean 'eta'"):
        fs.solvers.from_scheduler(diffusers.DDIMScheduler(), etaa=0.5)
    with pytest.raises(ValueError, match="diffusers has no scheduler 'DPMSolverMultistepSchedulerr'"):
        fs.solvers.resolve("DPMSolverMultistepSchedulerr")
    assert fs.solvers.from_scheduler(diffusers.DPMSolverMultistepScheduler) == ("dpmpp_2m", {"lower_order_final": True})
    # DDIM's eta given to fs.sample is the pipeline's: η > 0 is ancestral sampling
    assert fs.solvers.resolve(diffusers.DDIMScheduler(), {"eta": 0.3})[0].name == "euler_ancestral"


def test_invert_calibrate_and_compare_take_the_peer_names_too(gmm):
    """Every entry point resolves names alike: `invert` with k-diffusion's "lms" is `adams(order=4)`,
    `calibrate` fits the grid of the solver a name means, `compare` labels a row by the name given."""
    field = fs.fields.EDM(gmm.denoiser)
    x = fs.sample(field, "heun", nfe=31, n=8, seed=0, dtype=torch.float64)
    z = fs.invert(field, x, "lms", nfe=12, dtype=torch.float64)
    assert torch.equal(z, fs.invert(field, x, "adams", nfe=12, dtype=torch.float64, order=4))
    assert not torch.equal(z, fs.invert(field, x, "adams", nfe=12, dtype=torch.float64))
    g = fs.grids.calibrate(field, "lms", nfe=4, n=8, seconds=0.5, coefficients=False)
    assert len(g) == len(fs.sample(field, "adams", nfe=4, n=1, seed=0, return_info=True)[1].grid)
    table = fs.compare(field, ["sample_lms", "dpmpp_2s_ancestral"], nfe=[8], metric="energy", n=64, seeds=1,
                       reference=gmm.sample(256, generator=torch.Generator().manual_seed(1)))
    assert [r["solver"] for r in table.rows] == ["sample_lms", "dpmpp_2s_ancestral"]


def test_steps_counts_as_schedulers_and_k_diffusion_count(unet64):
    """`steps=` instead of `nfe=`: the grid has that many steps and the budget is what they cost, so a
    Heun-type scheduler's loop at N inference steps is `fs.sample(field, scheduler, steps=N)`."""
    import diffusers
    m = fs.models.from_diffusers(unet64, diffusers.HeunDiscreteScheduler())
    field = m.field()
    sched = _in_float64(diffusers.HeunDiscreteScheduler(), 6)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _diffusers_loop(unet64, sched, z)
    x, info = fs.sample(field, diffusers.HeunDiscreteScheduler(), steps=6, dtype=torch.float64,
                        x_init=z * m.prior_std_at(float(field.grid(6, "schedule")[0])), return_info=True)
    assert info.steps == 6 and info.nfe == 11
    assert (x - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()
    gmm_field = fs.fields.EDM(lambda v, s: 0 * v, shape=(2,))
    _, info = fs.sample(gmm_field, "dpmpp_2m", steps=7, n=2, seed=0, return_info=True)
    assert info.steps == 7 and info.nfe == 7
    with pytest.raises(ValueError, match="steps: give steps or nfe, not both"):
        fs.sample(gmm_field, "heun", steps=5, nfe=9, n=2)
    with pytest.raises(ValueError, match="steps: solver 'dpm_adaptive' chooses its own steps"):
        fs.sample(gmm_field, "dpm_adaptive", steps=5, n=2)


def test_a_scheduler_other_than_the_models_own_is_said_to_walk_the_models_grid(unet64):
    import warnings
    import diffusers
    m = fs.models.from_diffusers(unet64, diffusers.DDIMScheduler())
    with pytest.warns(UserWarning, match="DPMSolverMultistepScheduler's loop runs on this field's default grid, "
                                         "the timesteps of DDIMScheduler"):
        fs.sample(m.field(), diffusers.DPMSolverMultistepScheduler(), steps=4, n=1, seed=0)
    with pytest.warns(UserWarning, match="the timesteps of DDIMScheduler"):
        fs.sample(m.field(), "UniPCMultistepScheduler", steps=4, n=1, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fs.sample(m.field(), diffusers.DDIMScheduler, steps=4, n=1, seed=0)
        fs.sample(m.field(), diffusers.DPMSolverMultistepScheduler(), steps=4, n=1, seed=0,
                  grid="karras")  # a grid asked for: nothing to say


def test_scheduler_names_the_models_own(unet64, tmp_path):
    """`solver="scheduler"`: the scheduler the model was loaded with, so a pipeline folder's default
    loop is `fs.sample(m.field(), "scheduler", steps=N)` (CLI `--solver scheduler --steps N`)."""
    import diffusers
    kw = {"solver_order": 3, "final_sigmas_type": "sigma_min"}
    m = fs.models.from_diffusers(unet64, diffusers.UniPCMultistepScheduler(**kw))
    sched = _in_float64(diffusers.UniPCMultistepScheduler(**kw), 8)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _diffusers_loop(unet64, sched, z)
    grid = m.field().grid(8, "schedule")
    x, info = fs.sample(m.field(), "scheduler", steps=8, x_init=z * m.prior_std_at(float(grid[0])),
                        dtype=torch.float64, return_info=True)
    alpha_end = 1.0 / math.sqrt(1.0 + float(grid[-1]) ** 2)
    assert info.solver == "unipc" and (x * alpha_end - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()
    with pytest.raises(ValueError, match="'scheduler' means the scheduler a diffusers model was loaded with"):
        fs.sample(fs.fields.EDM(lambda v, s: 0 * v, shape=(2,)), "scheduler", nfe=4, n=1)


def test_the_cli_takes_the_models_scheduler_and_steps(tmp_path, capsys):
    from flowsolve.cli import main
    out = tmp_path / "x.npy"
    assert main(["sample", "--model", "pretrained/digits-ddpm", "--solver", "scheduler", "--steps", "5", "--n", "4",
                 "--out", str(out), "--quiet"]) == 0
    assert "solver ddpm, 5 steps, nfe 5" in capsys.readouterr().out and out.exists()
