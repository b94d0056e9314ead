"""Command line: `flowsolve sample | train | eval | compare | animate | solvers`.

flowsolve sample --model pretrained/digits-edm --solver heun --nfe 32 --n 64 --out digits.png
flowsolve sample --model gmm2d --solver heun --nfe 32 --n 2000 --out samples.png
flowsolve train edm --data digits --out runs/digits-edm [--steps N] [--config cfg.json] [--seed S] [--resume]
flowsolve eval --model pretrained/digits-edm --features pretrained/digits-features
flowsolve compare --model gmm2d --solvers euler,heun,dpmpp_2m --nfe 4,8,16,32 --metric energy --out results/
flowsolve animate --model pretrained/digits-edm --solver heun --nfe 32 --n 16 --out generation.gif
flowsolve solvers
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import solvers
from ._checks import check_disk, check_dtype, check_int, check_number, check_output
from .errors import ArgumentError, FlowsolveError
from .fields import Field
from .inpainting import INPAINT_MODES
from .models.protocol import GeneratorModel, ParticleModel
from .sample import check_cond, cond_rows, invert, sample, sample_sharded

BUILTIN_MODELS = {
    "gmm2d": "the exact paper mixture (App. D.1: 5 modes on a circle of radius 5, std 0.5) as an EDM field",
}


class UserError(ArgumentError):
    """A mistake in the command line: printed as one line, exit code 2."""


def load_any(name: str, device: torch.device | None = None):
    """A built-in name or a model folder / Hub id → (model, reference data or None), where the model is
    a Field (built-ins), a ParticleModel or a GeneratorModel: what it is, it says by its type. With
    `device` (`_device(args)`), a network is moved there (its field then samples there)."""
    from . import data, fields

    if name == "gmm2d":
        gmm = data.GaussianMixture.paper()
        return fields.EDM(gmm.denoiser), gmm
    from .models.io import resolve_shipped, shipped_models

    if not Path(resolve_shipped(name)).exists() and "/" not in name:
        raise UserError(
            f"--model: unknown model {name!r}; expected a model folder, a Hub id, a built-in model "
            f"({', '.join(BUILTIN_MODELS)}) or a shipped one ({', '.join(shipped_models())})"
        )
    from .models import from_pretrained

    model = from_pretrained(name, device=device)
    if not isinstance(model, (ParticleModel, GeneratorModel)):
        raise UserError(f"--model: {name!r} holds a {type(model).__name__}, not a model that generates samples")
    ref = data.GaussianMixture.paper() if getattr(model, "metadata", {}).get("data") == "gmm2d" else None
    return model, ref


def load_model(name: str, device: torch.device | None = None):
    """The field of a particle model (returns (field, reference data or None)); generators are refused."""
    model, ref = load_any(name, device)
    if isinstance(model, GeneratorModel):
        raise UserError(
            f"--model: {name!r} is a generator (one evaluation per sample): it has no field for solvers; "
            f"use `flowsolve sample` or `flowsolve eval`"
        )
    return (model if isinstance(model, Field) else model.field()), ref


def _parse_cond(items: list[str] | None, flag: str = "--cond") -> dict:
    """KEY=VALUE pairs: an integer or a comma list of integers (labels), or of numbers; or a
    .safetensors file, whose tensors are the inputs of their names (e.g. prompt embeddings)."""
    out = {}
    for item in items or []:
        if "=" not in item and item.endswith(".safetensors"):
            if not Path(item).is_file():
                raise UserError(f"{flag}: no such file {item!r}")
            from safetensors.torch import load_file

            try:
                out.update(load_file(item))
            except Exception as err:  # noqa: BLE001 - a broken file is the argument's fault
                raise UserError(f"{flag}: could not read {item!r} as safetensors ({err})") from None
            continue
        if "=" not in item:
            raise UserError(f"{flag}: expected KEY=VALUE such as class_labels=3, or a .safetensors file, got {item!r}")
        k, v = item.split("=", 1)
        try:
            vals = [ast.literal_eval(t) for t in v.split(",") if t.strip()]
        except (ValueError, SyntaxError):
            raise UserError(f"{flag}: {k}: expected numbers, got {v!r}") from None
        if not vals or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in vals):
            raise UserError(f"{flag}: {k}: expected numbers, got {v!r}")
        dtype = torch.long if all(isinstance(t, int) for t in vals) else torch.float32
        out[k] = torch.tensor(vals, dtype=dtype)
    return out


def _guidance_kw(args, guidance: float | None) -> dict:
    """Keywords for `model.field(...)`: guidance and its variants from the command line."""
    if getattr(args, "guider", None) is not None:  # a diffusers guider folder: its own scale and variants
        variants = {"--guidance-rescale": "guidance_rescale", "--guidance-interval": "guidance_interval"}
        given = [f for f, name in variants.items() if getattr(args, name, None) is not None]
        given = (["--guidance"] if guidance is not None else []) + given
        if given:
            raise UserError(f"--guider: the guider sets its own scale and variants; drop {given[0]}")
        from .fields import load_guider

        guidance = load_guider(args.guider)
    if guidance is None:
        return {}
    kw: dict[str, Any] = {"guidance": guidance}
    uncond = _parse_cond(getattr(args, "uncond", None), "--uncond")
    if uncond:
        kw["uncond"] = {k: v[:1] for k, v in uncond.items()}
    if getattr(args, "guidance_rescale", None):
        kw["rescale"] = args.guidance_rescale
    if getattr(args, "guidance_interval", None):
        lo, _, hi = args.guidance_interval.partition(",")
        try:
            kw["interval"] = (float(lo), float(hi))
        except ValueError:
            raise UserError(
                f"--guidance-interval: expected LOW,HIGH noise levels, got {args.guidance_interval!r}"
            ) from None
    return kw


def _field_of(model, args, guidance: float | None):
    """The field of a loaded model, guided when asked (built-in fields and Discriminator Flows take no guidance)."""
    if isinstance(model, Field):
        if guidance is not None or getattr(args, "guider", None) is not None:
            raise UserError("--guidance: this built-in model has no conditional score to guide")
        return model
    kw = _guidance_kw(args, guidance)
    if kw and not model.guidable:
        raise UserError(f"--guidance: a {type(model).__name__} takes no guidance (a denoiser does)")
    return model.field(**kw)


def _balanced_labels(model, n: int) -> dict:
    """class_labels i mod K for a class-conditional model (none for others)."""
    classes = (getattr(model, "conditioning", {}) or {}).get("class_labels", {})
    if isinstance(classes, dict) and classes.get("classes"):
        return {"class_labels": torch.arange(n) % int(classes["classes"])}
    return {}


def _parse_options(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--option: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def _for_png(model, x: torch.Tensor, out: str) -> torch.Tensor:
    """A latent model's samples decoded to images for a .png (its VAE, as the pipeline decodes them);
    .npy / .pt files keep the latents themselves (for img2img or a later decode)."""
    vae = getattr(model, "vae", None) or getattr(getattr(model, "net", None), "vae", None)
    if Path(out).suffix.lower() != ".png" or vae is None or not callable(getattr(model, "decode", None)):
        return x
    return model.decode(x).float().cpu()


def save_samples(x: torch.Tensor, out: Path, reference=None) -> None:
    """.npy / .pt: the raw tensor; .png: a scatter plot (2-D) or an image grid (images)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix == ".pt":
        torch.save(x.cpu(), out)
    elif suffix == ".npy":
        import numpy as np

        np.save(out, x.cpu().numpy() if x.dtype in (torch.float32, torch.float64) else x.float().cpu().numpy())
    elif suffix == ".png":
        from .viz import save_png

        save_png(x, out, reference=reference)
    else:
        raise UserError(f"--out: expected a .png, .npy or .pt file, got {out.name!r}")


SAMPLE_SUFFIXES = (".png", ".npy", ".pt")
STREAM_BYTES = 256 * 2**20  # a .npy output larger than this is written chunk by chunk (bounded memory)


def _stream_npy(field, args, options) -> tuple[int, int]:
    """Sample n particles chunk by chunk into a memory-mapped .npy file: sample i is the one
    `fs.sample(seed=)` gives (index_offset), so the file equals the one-piece result. Returns (nfe, chunk)."""
    import os

    import numpy as np

    shape = tuple(field.data_shape)
    np_dtype = np.float64 if options["dtype"] == torch.float64 else np.float32  # as save_samples writes it
    per = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
    chunk = args.batch_size
    out = Path(args.out)
    check_disk("--n", out.parent, args.n * per)
    tmp = out.with_name(out.name + ".tmp.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=(args.n, *shape))
    options = dict(options)
    cond = check_cond(options.pop("cond", None), args.n)
    nfe = 0
    for start in range(0, args.n, chunk):
        count = min(chunk, args.n - start)
        x, info = sample(
            field,
            solver=args.solver,
            nfe=args.nfe,
            n=count,
            seed=args.seed,
            index_offset=start,
            cond=cond_rows(cond, start, count, args.n),
            return_info=True,
            **options,
        )
        arr[start : start + count] = x.cpu().to(torch.float64 if np_dtype is np.float64 else torch.float32).numpy()
        nfe = info.nfe
    arr.flush()
    del arr
    os.replace(tmp, out)
    return nfe, chunk


def _evaluations(gen: GeneratorModel) -> str:
    """A generator's evaluations per sample, in words."""
    return "1 evaluation" if gen.steps == 1 else f"{gen.steps} evaluations"


def _device(args) -> torch.device:
    """--device: 'auto' is the launched process's device (accelerate / torchrun), else CUDA when
    available, else the CPU; any other value must name a device this machine has."""
    from .train.loop import device_for

    return device_for(args.device, "--device")


# `flowsolve sample` settings of a solve, which a generator (its own network passes) has none of: those
# that change what is drawn are refused, the budget's are ignored with a note (a command run over models
# of every kind may carry them)
_FIELD_FLAGS = tuple(
    "x_init init strength mask inpaint denoising_end denoising_start guidance uncond guider guidance_rescale "
    "guidance_interval".split()
)
_BUDGET_FLAGS = tuple("nfe steps alpha option grid".split())


def _refuse_field_flags(args) -> None:
    """A generator draws its samples in its own evaluations: refuse the flags that would change what a
    field's solve draws (guidance, starting data), by name; note the budget's flags as ignored."""
    given = [f for f in _FIELD_FLAGS if getattr(args, f, None) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UserError(
            f"{flag}: {args.model!r} is a generator (a fixed number of network evaluations per sample), which "
            "takes no guidance or starting data; drop the flag (--cond, --seed and --n apply)"
        )
    ignored = [f for f in _BUDGET_FLAGS if getattr(args, f, None) is not None]
    if args.solver != "heun":
        ignored.insert(0, "solver")
    if ignored and not args.quiet:
        flags = ", ".join("--" + f.replace("_", "-") for f in ignored)
        print(
            f"flowsolve: note: {args.model!r} is a generator (its own network evaluations): {flags} ignored",
            file=sys.stderr,
        )


def cmd_sample(args) -> int:
    from .distributed import is_launched
    from .models import generate_sharded

    options: dict = {}
    check_output(args.out, SAMPLE_SUFFIXES, "--out")
    check_int("--n", args.n, 1)
    device, dtype = _device(args), check_dtype("--dtype", args.dtype)
    model, ref = load_any(args.model, device)
    options.update(device=device, dtype=dtype)
    if isinstance(model, GeneratorModel):  # a generator: one network evaluation, solver/nfe unused
        _refuse_field_flags(args)
        t0 = time.perf_counter()
        given = _parse_cond(args.cond) or None  # else the generator's own (class-balanced labels)
        x = (
            generate_sharded(model, args.n, seed=args.seed, cond=given)
            if is_launched()
            else model.sample(args.n, seed=args.seed, cond=given)
        )
        procs = f" on {_processes()}" if is_launched() else ""
        if finish_processes():
            save_samples(_for_png(model, x, args.out), Path(args.out), reference=ref)
            print(
                f"wrote {args.out}: {tuple(x.shape)} samples from a generator ({_evaluations(model)}){procs}, "
                f"{time.perf_counter() - t0:.2f} s"
            )
        return 0
    field = _field_of(model, args, args.guidance)
    if args.x_init is not None:  # start from given particles (the latents of `flowsolve invert`)
        options["x_init"] = _load_data(args.x_init, "--x-init")
        args.n = len(options["x_init"])
    if args.init is not None:  # image-to-image (SDEdit): data to noise to a level and denoise from there
        options["init"] = _load_data(args.init, "--init")
        args.n = len(options["init"])
    if args.strength is not None:  # a number, or a file of per-element strengths (differential diffusion)
        try:
            options["strength"] = float(args.strength)
        except ValueError:
            options["strength"] = _load_data(args.strength, "--strength")
    if args.mask is not None:  # inpainting: 1 where to generate, 0 where to keep --init
        options["mask"] = _load_data(args.mask, "--mask")
    if args.inpaint is not None:
        options["inpaint"] = args.inpaint
    for key in ("denoising_end", "denoising_start"):  # SDXL's base and refiner parts of one schedule
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    cond = _parse_cond(args.cond) or _balanced_labels(model, args.n)
    if cond:
        options["cond"] = cond
    options = {**_parse_options(args.option), **options}
    if args.grid is not None:
        options["grid"] = args.grid
    if args.alpha is not None:
        options["alpha"] = args.alpha
    if args.steps is not None:
        options["steps"] = args.steps
    t0 = time.perf_counter()
    if is_launched():  # accelerate launch / torchrun: each process draws its share
        x = sample_sharded(
            field, args.solver, args.nfe, n=args.n, seed=args.seed, batch_size=args.batch_size, **options
        )
        procs = _processes()
        if finish_processes():
            save_samples(_for_png(model, x, args.out), Path(args.out), reference=ref)
            print(f"wrote {args.out}: {tuple(x.shape)} samples from {procs}, {time.perf_counter() - t0:.2f} s")
        return 0
    shape = tuple(field.data_shape or ())
    per = int(torch.tensor(shape).prod()) * 4
    if args.batch_size is None:  # bound the solver's working set: ~STREAM_BYTES per chunk
        args.batch_size = max(1, min(65536, STREAM_BYTES // (12 * per)))
    if args.n > args.batch_size and Path(args.out).suffix.lower() == ".npy" and args.x_init is args.init is None:
        nfe, chunk = _stream_npy(field, args, options)
        print(
            f"wrote {args.out}: {(args.n, *shape)} samples streamed in chunks of {chunk}, solver {args.solver}, "
            f"nfe {nfe}, {time.perf_counter() - t0:.2f} s"
        )
        return 0
    if args.n * per > 4 * STREAM_BYTES:
        raise UserError(
            f"--out: {args.n} samples of shape {shape} are more than {4 * STREAM_BYTES // 2**20} MiB "
            f"to hold at once; write them to a .npy file, which is streamed to disk"
        )
    x, info = sample(
        field,
        solver=args.solver,
        nfe=args.nfe,
        n=None if args.x_init is not None or args.init is not None else args.n,
        seed=args.seed,
        batch_size=args.batch_size,
        return_info=True,
        progress=not args.quiet,
        **options,
    )
    save_samples(_for_png(model, x, args.out), Path(args.out), reference=ref)
    print(
        f"wrote {args.out}: {tuple(x.shape)} samples, solver {info.solver}, {info.steps} steps, "
        f"nfe {info.nfe}, {time.perf_counter() - t0:.2f} s"
    )
    return 0


def _load_data(path: str, flag: str = "--data") -> torch.Tensor:
    """Samples from a .npy or .pt file as a floating-point tensor (checked before any work)."""
    import numpy as np

    p = Path(path)
    if p.suffix.lower() not in (".npy", ".pt"):
        raise UserError(f"{flag}: expected a .npy or .pt file of samples, got {path!r}")
    if not p.is_file():
        raise UserError(f"{flag}: no such file {path!r}")
    x = torch.from_numpy(np.load(p)) if p.suffix.lower() == ".npy" else torch.load(p, weights_only=True)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise UserError(f"{flag}: expected a floating-point array of shape (n, *data_shape) in {path!r}")
    return x


def cmd_invert(args) -> int:
    check_output(args.out, (".npy", ".pt"), "--out")
    device, dtype = _device(args), check_dtype("--dtype", args.dtype)
    x = _load_data(args.data)
    model, _ = load_any(args.model, device)
    if isinstance(model, GeneratorModel):
        raise UserError(f"--model: {args.model!r} is a generator: it has no probability-flow ODE to invert")
    field = _field_of(model, args, args.guidance)
    shape = field.data_shape
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise UserError(f"--data: the model's samples have shape {tuple(shape)}, the file's {tuple(x.shape[1:])}")
    options = {**_parse_options(args.option), "device": device, "dtype": dtype}
    cond = _parse_cond(args.cond)
    if cond:
        options["cond"] = cond
    if args.grid is not None:
        options["grid"] = args.grid
    t0 = time.perf_counter()
    z, info = invert(field, x, args.solver, args.nfe, batch_size=args.batch_size, return_info=True, **options)
    save_samples(z, Path(args.out))
    print(
        f"wrote {args.out}: {tuple(z.shape)} latents at t = {float(info.grid[-1]):g}, solver {info.solver}, "
        f"{info.steps} steps, nfe {info.nfe}, {time.perf_counter() - t0:.2f} s"
    )
    return 0


def _teacher(args):
    """The data score of a Score GAN: --teacher DIR (any model folder or Hub id), or the exact mixture
    denoiser for --data gmm2d."""
    from . import data

    if args.teacher:
        from .models import Denoiser, from_pretrained
        from .models.student import teacher_denoiser

        t = teacher_denoiser(from_pretrained(args.teacher))  # flow models through as_denoiser()
        if not isinstance(t, Denoiser):  # a Score GAN's teacher is a data denoiser D(x, σ)
            raise UserError(f"--teacher: {args.teacher!r} holds a {type(t).__name__}, not a denoiser or flow model")
        return t, t.data_shape
    if args.data == "gmm2d":
        return data.GaussianMixture.paper().denoiser, (2,)
    raise UserError(
        "--teacher: a Score GAN needs a pretrained data score (a model folder); only --data gmm2d "
        "has a built-in exact one"
    )


def cmd_train(args) -> int:
    from .train.discriminator_flow import DF_RECIPES
    from .train.loop import load_config_file
    from .train.score_gan import RECIPES as SCORE_GAN_RECIPES
    from .train.score_gan import GENERATOR_LOSSES, STUDENT_TRAIN

    if args.data is None and not (args.objective == "score-gan" and args.teacher):
        raise UserError(f"--data: {args.objective} trains on data; name it (e.g. --data digits)")
    if args.allow_changes and not args.resume:
        raise UserError("--allow-changes: only with --resume (it accepts settings that differ from the checkpoint's)")
    if args.objective == "features" and args.resume:
        raise UserError("--resume: the feature network trains in one go (no resume); drop --resume")
    if args.objective == "mmd-flow":  # the name before 0.2: it trains the MMD *generator*
        print(
            "flowsolve: warning: 'train mmd-flow' is renamed 'train mmd-generator'; the old name goes in the "
            "next release",
            file=sys.stderr,
        )
        args.objective = "mmd-generator"

    config = load_config_file(args.config) if args.config else None
    command = "flowsolve " + " ".join(sys.argv[1:]) if args.command_line is None else args.command_line
    overrides = dict(
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        minutes=args.minutes,
        log_with=args.log_with,
        sample_every=args.sample_every,
    )
    if args.conditional or args.cond_dropout is not None:
        if args.objective not in ("edm", "discriminator-flow"):
            raise UserError(
                f"--conditional: class-conditional training is for edm and discriminator-flow (a "
                f"score-gan is conditional when its teacher is), got {args.objective}"
            )
        if args.cond_dropout is not None and args.objective != "edm":
            raise UserError("--cond-dropout: label dropout is for edm --conditional")
        overrides.update(conditional=True)
        if args.cond_dropout is not None:
            overrides.update(cond_dropout=args.cond_dropout)
    recipes = {"score-gan": SCORE_GAN_RECIPES, "discriminator-flow": DF_RECIPES}  # the trainers' registries
    if args.recipe is not None:
        if args.objective not in recipes:
            raise UserError(f"--recipe: recipes are for {' and '.join(recipes)}, got {args.objective}")
        if args.recipe not in recipes[args.objective]:
            raise UserError(
                f"--recipe: {args.objective} has recipes {', '.join(recipes[args.objective])}, got {args.recipe!r}"
            )
        overrides.update(recipe=args.recipe)
    distil = dict(
        init=args.init,
        gan_weight=args.gan_weight,
        gan_sigma_max=args.gan_sigma_max,
        gan_r1=args.gan_r1,
        gan_augment=args.gan_augment,
        normalize=False if args.normalize == "none" else args.normalize,
        init_sigma=args.init_sigma,
        student_steps=args.student_steps,
        student_sigma_min=args.student_sigma_min,
        student_train=args.student_train,
        guidance=args.guidance,
        generator_loss=args.generator_loss,
        sid_alpha=args.sid_alpha,
        cond=_parse_cond(args.cond) or None,
        uncond=_parse_cond(args.uncond, "--uncond") or None,
    )
    if args.student_train not in (None, *STUDENT_TRAIN):
        raise UserError(f"--student-train: expected one of {', '.join(STUDENT_TRAIN)}, got {args.student_train!r}")
    if args.generator_loss not in (None, *GENERATOR_LOSSES):
        raise UserError(f"--generator-loss: expected one of {', '.join(GENERATOR_LOSSES)}, got {args.generator_loss!r}")
    used = [k for k, v in distil.items() if v is not None]
    if used and args.objective != "score-gan":
        raise UserError(f"--{used[0].replace('_', '-')}: a distillation option of score-gan, got {args.objective}")
    for name in ("select_seed", "select_n"):
        if getattr(args, name) is not None and args.select_every is None:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag}: a setting of the selection, which needs --select-every, got none")
    if args.select_n is not None and args.select_n < 2:
        raise UserError(f"--select-n: expected at least 2 samples per selection score, got {args.select_n}")
    if args.select_every is not None:
        if args.objective not in ("gan", "score-gan", "mmd-generator", "discriminator-flow"):
            raise UserError(
                f"--select-every: model selection is for the generators gan, score-gan and mmd-generator "
                f"and for discriminator-flow, got {args.objective}"
            )
        if args.select_every < 1:
            raise UserError(f"--select-every: expected a positive number of steps, got {args.select_every}")
        from .evaluate import validation_energy, validation_fd

        # validation FD on digits; energy distance on vector data (validation_energy refuses images)
        digits = args.data == "digits"
        scored: dict = {} if args.select_seed is None else {("seed" if digits else "sample_seed"): args.select_seed}
        if args.select_n is not None:
            scored["n"] = args.select_n
        select = validation_fd(**scored) if digits else validation_energy(args.data, **scored)
        overrides.update(select=select, select_every=args.select_every)
    if args.objective == "features" and args.data != "digits":
        raise UserError(f"--data: the feature network is trained on 'digits' only, got {args.data!r}")
    t0 = time.perf_counter()
    out, made = Path(args.out), not Path(args.out).exists()
    check_output(out, None, "--out")  # after the arguments' checks: a refused run makes no folder
    common = dict(out=args.out, config=config, progress=not args.quiet, command=command, **overrides)
    try:
        model = _run_trainer(args, distil, common)
    except BaseException:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # the trainer refused its settings before writing anything: no folder left
        raise
    if not finish_processes():
        return 0
    print(
        f"wrote {args.out}: {args.objective} on {args.data or 'the teacher alone'}, {time.perf_counter() - t0:.0f} s "
        f"{model.metadata.get('held_out_accuracy', '')}"
    )
    return 0


def _run_trainer(args, distil: dict, common: dict):
    """Call the trainer `args.objective` names with the CLI's settings; returns the trained model."""
    from . import train

    if args.objective == "features":
        return train.digits_features(**common)
    if args.objective == "score-gan":
        teacher, shape = _teacher(args)
        extra = {k: v for k, v in distil.items() if v is not None}
        return train.score_gan(
            teacher,
            shape,
            data=args.data,
            resume=args.resume,
            allow_changes=args.allow_changes,
            data_name=args.data,
            **extra,
            **common,
        )
    trainer = {
        "edm": train.edm,
        "ddpm": train.ddpm,
        "flow-matching": train.flow_matching,
        "discriminator-flow": train.discriminator_flow,
        "gan": train.gan,
        "mmd-generator": train.mmd_generator,
    }[args.objective]
    return trainer(args.data, resume=args.resume, allow_changes=args.allow_changes, **common)


def cmd_eval(args) -> int:
    from .evaluate import evaluate_digits

    if args.json:
        check_output(args.json, (".json",), "--json")
    model, _ = load_any(args.model, _device(args))
    target = model if isinstance(model, (GeneratorModel, Field)) else model.field()
    report = evaluate_digits(
        target, args.features, solver=args.solver, nfe=args.nfe, n=args.n, seed=args.seed, progress=not args.quiet
    )
    print(report.markdown())
    if args.json:
        Path(args.json).write_text(report.json())
    return 0


def _processes() -> str:
    from .distributed import engine, world

    return f"{world()[1]} processes ({engine()})"


def finish_processes() -> bool:
    """Under a distributed launcher: wait for every process, close the engine, and say whether this
    is the main process (the one that prints and writes). Always True in one process."""
    from .distributed import finish

    return finish()


def _values(text: str, flag: str, kind: type = int) -> list:
    """A comma-separated list of `kind` (int or float) from a flag, or a one-line error naming it."""
    try:
        out = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise UserError(f"{flag}: expected comma-separated {noun}, got {text!r}") from None
    if not out:
        raise UserError(f"{flag}: expected at least one value")
    return out


def cmd_compare(args) -> int:
    from .comparison import METRICS, CompareTable, compare

    check_output(args.out, None, "--out")
    metrics = [m.strip() for m in args.metric.split(",") if m.strip()]
    for m in metrics:
        if m not in METRICS:
            raise UserError(f"--metric: expected some of {', '.join(METRICS)}, got {m!r}")
    guidances = [None] if args.guidance is None else _values(args.guidance, "--guidance", float)
    model, ref = load_any(args.model, _device(args))
    if isinstance(model, GeneratorModel):
        raise UserError(f"--model: {args.model!r} is a generator; compare solvers on a particle model")
    base = model if isinstance(model, Field) else _field_of(model, args, None)
    features = args.features if any(m in ("fd", "accuracy") for m in metrics) else None
    if any(m in ("energy", "mmd", "sliced") for m in metrics) and ref is None:
        if getattr(base, "data_shape", None) == (1, 8, 8):
            from .data import digits

            ref = digits("test").x
        else:
            raise UserError(
                "--metric: energy, mmd and sliced need reference samples; this model has none "
                "(use --metric rmse, or gmm2d / a digits model)"
            )
    cond = _parse_cond(args.cond) or _balanced_labels(model, args.n)
    rows = []
    for g in guidances:
        field = base if g is None else _field_of(model, args, g)
        table = compare(
            field,
            [s.strip() for s in args.solvers.split(",") if s.strip()],
            _values(args.nfe, "--nfe"),
            metrics,
            n=args.n,
            seeds=args.seeds,
            reference=ref,
            features=features,
            cond=cond or None,
            model_name=args.model,
            progress=not args.quiet,
            label="" if g is None else f"g={g:g}",
            grids=[None if v.strip() == "default" else v.strip() for v in args.grid.split(",")]
            if args.grid
            else (None,),
        )
        rows += table.rows
    if not finish_processes():
        return 0
    table = CompareTable(",".join(metrics), args.model, rows)
    files = table.save(args.out)
    print(table.to_markdown())
    print("wrote " + ", ".join(str(f) for f in files.values()))
    return 0


def cmd_calibrate(args) -> int:
    """Fit grids for each NFE and store them in the model folder (calibration.json)."""
    from .calibrate import calibrate, endpoint_error, reference_solve
    from .models.io import save_calibration
    from .sample import initial_noise

    if not Path(args.model).is_dir():
        raise UserError(
            f"--model: calibrated grids are stored with the model; expected a model folder, got {args.model!r}"
        )
    check_number("--seconds", args.seconds, 0.0, lo_open=True)
    model, _ = load_any(args.model, _device(args))
    if isinstance(model, GeneratorModel):
        raise UserError(
            f"--model: {args.model!r} is a generator ({_evaluations(model)}); there is no grid to calibrate"
        )
    field = model.field()
    for nfe in _values(args.nfe, "--nfe"):
        r = calibrate(
            field,
            args.solver,
            nfe,
            n=args.n,
            seed=args.seed,
            seconds=args.seconds,
            coefficients=not args.grid_only,
            return_result=True,
        )
        save_calibration(args.model, r.solver, nfe, r.grid)
        # measured on fresh starting points (seed + 1000), never on the ones it was fitted on
        z = initial_noise(field, args.seed + 1000, 0, args.n, field.data_shape, t_start=float(r.grid[0]))
        ref = reference_solve(field, z)
        fresh = {
            name: endpoint_error(sample(field, args.solver, nfe=nfe, grid=g, x_init=z), ref)
            for name, g in (("default", None), ("calibrated", r.grid))
        }
        print(
            f"{args.solver} nfe {nfe}: endpoint error {fresh['default']:.4g} -> {fresh['calibrated']:.4g} on fresh "
            f"points ({r.default_fit_error:.4g} -> {r.fit_error:.4g} fitted), {r.trials} grids in {r.seconds:.0f} s"
            + (", with learned solver coefficients" if getattr(r.grid, "coefficients", None) else ""),
            flush=True,
        )
    print(f"wrote {Path(args.model) / 'calibration.json'}")
    return 0


def cmd_plot(args) -> int:
    from .train.loop import read_log
    from .viz import training_curves

    out = args.out or str(Path(args.run) / "curves.png")
    records = read_log(args.run)
    training_curves(records, out, title=str(args.run))
    last = [r for r in records if "loss" in r][-1:] or [{}]
    print(f"wrote {out}: {len(records)} records, last step {last[0].get('step', '-')}, loss {last[0].get('loss', '-')}")
    return 0


def cmd_animate(args) -> int:
    from .viz import animate

    check_output(args.out, (".gif", ".png", ".apng"), "--out")
    check_int("--every", args.every, 1)
    field, ref = load_model(args.model, _device(args))
    frames = animate(
        field, args.out, solver=args.solver, nfe=args.nfe, n=args.n, seed=args.seed, every=args.every, reference=ref
    )
    print(f"wrote {args.out}: {frames} frames")
    return 0


def cmd_solvers(args) -> int:
    print(solvers.describe())
    return 0


def _guidance_flags(p: argparse.ArgumentParser, several: bool) -> None:
    p.add_argument(
        "--cond",
        action="append",
        metavar="KEY=VALUE|FILE.safetensors",
        help="per-sample conditioning, e.g. class_labels=3 or class_labels=0,1,2, or a .safetensors file of "
        "inputs with leading size n or 1 (prompt embeddings); default for a class-conditional model: labels "
        "i mod K",
    )
    p.add_argument(
        "--guidance",
        type=str if several else float,
        default=None,
        help="classifier-free guidance scale w (1: the conditional model, 0: the unconditional one)"
        + ("; comma-separated to compare several" if several else ""),
    )
    p.add_argument(
        "--uncond",
        action="append",
        metavar="KEY=VALUE|FILE.safetensors",
        help="the unconditional inputs (default: the null label the model was trained with), e.g. the empty "
        "prompt's embeddings in a .safetensors file",
    )
    p.add_argument(
        "--guider",
        default=None,
        metavar="FOLDER",
        help="a diffusers guider (a folder with guider_config.json: CFG, CFG-Zero*, APG, PAG, ...) as the guidance",
    )
    p.add_argument("--guidance-rescale", type=float, default=None, help="guidance rescale φ (Lin et al. 2023)")
    p.add_argument(
        "--guidance-interval",
        default=None,
        metavar="LOW,HIGH",
        help="guide only for σ in (LOW, HIGH] (Kynkäänniemi et al. 2024)",
    )


def _device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:N, mps, or auto (the launched process's GPU, else CUDA when available, else the CPU)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowsolve", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="draw samples from a model with any solver")
    s.add_argument(
        "--model",
        default="gmm2d",
        help=f"a model folder (e.g. pretrained/digits-edm), a Hub id, or a built-in model "
        f"({', '.join(BUILTIN_MODELS)})",
    )
    s.add_argument("--solver", default="heun", help="a name from `flowsolve solvers`")
    s.add_argument("--nfe", type=int, default=None, help="field-evaluation budget per sample")
    s.add_argument("--steps", type=int, default=None, help="solver steps instead of --nfe (a scheduler's step count)")
    s.add_argument(
        "--n",
        "--num-samples",
        dest="n",
        type=int,
        default=1000,
        help="number of samples (--num-samples under torchrun, whose parser claims --n)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--x-init",
        default=None,
        help="a .npy or .pt file of starting particles, e.g. the latents of `flowsolve invert` (sets --n)",
    )
    s.add_argument(
        "--init",
        default=None,
        help="image-to-image: a .npy or .pt file of data (or a latent model's latents) to noise and denoise (sets --n)",
    )
    s.add_argument(
        "--strength",
        default=None,
        help="with --init: the share of the steps walked, from the data noised to that level (default 0.8); or a "
        ".npy / .pt file of strengths in [0, 1] per element (differential diffusion)",
    )
    s.add_argument(
        "--mask",
        default=None,
        help="with --init, inpainting: a .npy or .pt mask, 1 where to generate and 0 where to keep the data "
        "(broadcast to the data; --strength then defaults to 1)",
    )
    s.add_argument(
        "--inpaint",
        default=None,
        choices=INPAINT_MODES,
        help="with --mask: keep the data in the state after each step (diffusers, the default), in the model's "
        "input and prediction (comfyui) or in its prediction (a1111)",
    )
    s.add_argument(
        "--denoising-end",
        type=float,
        default=None,
        help="stop at this fraction of the schedule and write the noisy state (SDXL's base model; a diffusers "
        "model's timesteps set the cut)",
    )
    s.add_argument(
        "--denoising-start",
        type=float,
        default=None,
        help="with --x-init (the base's --denoising-end output): walk the schedule from this fraction (the refiner)",
    )
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--alpha", type=float, default=None, help="Eq. 21 interpolation for the 'sde' solvers")
    s.add_argument("--option", action="append", help="extra solver option KEY=VALUE (repeatable)")
    s.add_argument(
        "--grid",
        default=None,
        help="karras | loglinear | polyexponential | vp | beta | uniform | schedule | calibrated (the model "
        "folder's calibrated grid for this solver and NFE)",
    )
    _device_flag(s)
    s.add_argument(
        "--dtype",
        default="float32",
        help="the particles' dtype for the solver: float32, float64, bfloat16 or float16 (networks run in their "
        "own dtype; generators ignore it)",
    )
    _guidance_flags(s, several=False)
    s.add_argument(
        "--out",
        required=True,
        help="output .png (a latent model's samples decoded by its VAE), .npy or .pt (the samples themselves)",
    )
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample)
    inv = sub.add_parser("invert", help="the latents of data under a model's probability-flow ODE (DDIM inversion)")
    inv.add_argument("--model", required=True, help="a model folder, a Hub id or a built-in model")
    inv.add_argument("--data", required=True, help="a .npy or .pt file of samples (n, *data_shape)")
    inv.add_argument("--solver", default="dpmpp_2m", help="a solver that runs backwards (fs.solvers.REVERSIBLE)")
    inv.add_argument("--nfe", type=int, default=None, help="field-evaluation budget per sample")
    inv.add_argument("--grid", default=None, help="the sampling grid to walk backwards (a spacing name)")
    inv.add_argument("--batch-size", type=int, default=None)
    inv.add_argument("--option", action="append", help="extra solver option KEY=VALUE (repeatable)")
    _device_flag(inv)
    inv.add_argument("--dtype", default="float32", help="float32 or float64")
    _guidance_flags(inv, several=False)
    inv.add_argument("--out", required=True, help="output .npy or .pt")
    inv.set_defaults(func=cmd_invert)
    t = sub.add_parser(
        "train",
        help="train a model (edm, ddpm: data scores; discriminator-flow, gan, score-gan, "
        "mmd-generator: the paper's models; features: the digits FD network)",
    )
    t.add_argument(
        "objective",
        choices=[
            "edm",
            "ddpm",
            "flow-matching",
            "features",
            "discriminator-flow",
            "gan",
            "score-gan",
            "mmd-generator",
            "mmd-flow",
        ],
        help="mmd-flow is the old name of mmd-generator (accepted for one release)",
    )
    t.add_argument(
        "--data",
        default=None,
        help="gmm2d, moons, digits, mnist, cifar10, celeba or an image folder (score-gan with --teacher: only for "
        "its real-data GAN and model selection)",
    )
    t.add_argument("--out", required=True, help="output model folder (checkpoints go to OUT/checkpoints)")
    t.add_argument("--teacher", default=None, help="score-gan: the pretrained data score (model folder or Hub id)")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="a wall-clock budget: stop, checkpoint and save once training has taken this long (resume counts "
        "the time already spent)",
    )
    t.add_argument(
        "--log-with",
        default=None,
        help="also log losses and metrics to an Accelerate tracker: tensorboard (files in OUT/tensorboard), wandb, ...",
    )
    t.add_argument(
        "--sample-every",
        type=int,
        default=None,
        help="write OUT/samples/step_NNNNNN.png (image grid or 2-D scatter of the EMA model's samples) every N steps",
    )
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--config", default=None, help="JSON file of training settings (unknown keys are rejected)")
    t.add_argument(
        "--conditional",
        action="store_true",
        default=None,
        help="edm, discriminator-flow: class-conditional on the data's labels (digits, image folders); "
        "edm with label dropout, for guidance",
    )
    t.add_argument(
        "--cond-dropout",
        type=float,
        default=None,
        help="edm --conditional: share of labels dropped to the null label (classifier-free guidance)",
    )
    t.add_argument(
        "--recipe",
        default=None,
        help="score-gan: paper (Alg. 1, Table 7; the default) or beyond-teacher (teacher-initialised "
        "student, two time scales, GAN on real data); discriminator-flow: paper (Alg. 3, Table 4; the "
        "default) or fast (the settings of pretrained/digits-df: a good image model in 90 CPU minutes)",
    )
    t.add_argument(
        "--init",
        default=None,
        help="score-gan: a fresh generator (paper), the teacher's own network (teacher), or the folder of a saved "
        "student to train on (e.g. pretrained/digits-scoregan)",
    )
    t.add_argument(
        "--gan-weight",
        type=float,
        default=None,
        help="score-gan: weight of the real-data GAN direction (discriminator head on the generated score)",
    )
    t.add_argument(
        "--gan-sigma-max",
        type=float,
        default=None,
        help="score-gan: the GAN's own noise levels, Eq. 28 on [sigma_min, this] (default: the score's range)",
    )
    t.add_argument(
        "--gan-r1",
        type=float,
        default=None,
        help="score-gan: R1 penalty weight on the real-data GAN's discriminator (gamma/2 E|grad f(x_real)|^2)",
    )
    t.add_argument(
        "--gan-augment",
        default=None,
        help="score-gan: DiffAugment policy of the real-data GAN's head, e.g. translation,cutout (also color)",
    )
    t.add_argument(
        "--normalize",
        choices=("none", "rms", "dmd"),
        default=None,
        help="score-gan: per-sample scaling of the generator's score direction: dmd (over the teacher's "
        "denoising error, as DMD; the beyond-teacher recipe's on images), rms (unit RMS; the recipe's on "
        "vectors), none (Alg. 1)",
    )
    t.add_argument("--student-steps", type=int, default=None, help="score-gan --init teacher: evaluations per sample")
    t.add_argument(
        "--init-sigma",
        type=float,
        default=None,
        help="score-gan --init teacher: the σ of the student's first evaluation (SiD, the recipe: 2.5)",
    )
    t.add_argument(
        "--student-sigma-min",
        type=float,
        default=None,
        help="score-gan, a multi-step student: the σ of its last evaluation (a Karras ρ = 7 chain from "
        "--init-sigma; the recipe: 0.5)",
    )
    t.add_argument(
        "--student-train",
        default=None,  # checked against score_gan.STUDENT_TRAIN when the run starts (the trainer's import)
        help="score-gan, a multi-step student: which step of its chain is trained: random (DMD2's backward "
        "simulation) or last (the chain's output only)",
    )
    t.add_argument("--guidance", type=float, default=None, help="score-gan: CFG scale of a conditional teacher")
    t.add_argument(
        "--generator-loss",
        default=None,  # checked against score_gan.GENERATOR_LOSSES when the run starts (the trainer's import)
        help="score-gan: the generator's objective: int-pm (Eq. 27, Alg. 1; the default) or sid (Score identity "
        "Distillation's loss, through both denoisers)",
    )
    t.add_argument("--sid-alpha", type=float, default=None, help="score-gan --generator-loss sid: SiD's alpha (1.2)")
    t.add_argument(
        "--cond",
        action="append",
        metavar="KEY=VALUES|FILE.safetensors",
        help="score-gan: the pool of conditions the training samples draw from, e.g. class_labels=3,7 or a "
        ".safetensors file of tensors with one leading size P (encoder_hidden_states of P prompts); default "
        "for a class-conditional teacher: all its labels",
    )
    t.add_argument(
        "--uncond",
        action="append",
        metavar="KEY=VALUE|FILE.safetensors",
        help="score-gan --guidance: the teacher's unconditional inputs (default: its null label), e.g. the "
        "empty prompt's embeddings in a .safetensors file",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoints/last.pt (the same settings, "
        "or an error listing the differences; --steps may grow)",
    )
    t.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: accept settings that differ from the checkpoint's (recorded in the training "
        "history of the saved model)",
    )
    t.add_argument(
        "--select-every",
        type=int,
        default=None,
        metavar="N",
        help="gan/score-gan/mmd-generator/discriminator-flow: keep the model with the best validation score, computed "
        "every N steps (Table 7's model selection): FD against the training digits on digits, "
        "energy distance to fresh validation samples on gmm2d and moons",
    )
    t.add_argument(
        "--select-seed",
        type=int,
        default=None,
        metavar="S",
        help="with --select-every: the seed of the generated samples the selection scores (default 1 on digits, "
        "123 on vector data); keep it out of the seeds you evaluate with, so that no evaluation seed is the "
        "one a checkpoint was chosen on",
    )
    t.add_argument(
        "--select-n",
        type=int,
        default=None,
        metavar="N",
        help="with --select-every: samples per selection score (default 1000 on digits, 3000 on vector data). "
        "On digits the FD of one model at n = 1000 varies by a std of 6-8 across sample seeds, at n = 10000 "
        "by about 1, so a selection between close checkpoints needs the larger n",
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="Fréchet distance and class coverage of a digits model")
    e.add_argument("--model", required=True)
    _device_flag(e)
    e.add_argument("--features", default="pretrained/digits-features")
    e.add_argument("--solver", default="heun")
    e.add_argument("--nfe", type=int, default=32)
    e.add_argument("--n", type=int, default=1000)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", default=None, help="also write the report as JSON here")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)
    c = sub.add_parser("compare", help="solver × NFE table (CSV, Markdown, PNG) for a model")
    c.add_argument("--model", default="gmm2d")
    _device_flag(c)
    c.add_argument("--solvers", default="euler,heun,dpmpp_2m,ipndm")
    c.add_argument("--nfe", default="4,8,16,32,64", help="comma-separated NFE budgets")
    c.add_argument(
        "--grid",
        default=None,
        help="comma-separated grids to compare: default (each solver's), karras, loglinear, polyexponential, "
        "vp, beta, calibrated "
        "(the model folder's calibrated grids; cells without one are left out)",
    )
    c.add_argument(
        "--metric",
        default="energy",
        help="comma-separated: energy, rmse, nll, fd, mmd, sliced, accuracy (class accuracy of the samples "
        "by the --features classifier)",
    )
    _guidance_flags(c, several=True)
    c.add_argument("--n", "--num-samples", dest="n", type=int, default=2000)
    c.add_argument("--seeds", type=int, default=3)
    c.add_argument("--features", default="pretrained/digits-features", help="feature network for --metric fd")
    c.add_argument("--out", required=True, help="output folder for compare.csv, compare.md, compare.png")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_compare)
    a = sub.add_parser("animate", help="the generation process as an animated GIF (paper Figure 1)")
    a.add_argument("--model", default="gmm2d")
    _device_flag(a)
    a.add_argument("--solver", default="heun")
    a.add_argument("--nfe", type=int, default=None)
    a.add_argument("--n", type=int, default=16)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--every", type=int, default=1, help="one frame every k solver steps")
    a.add_argument("--out", required=True, help="output .gif or .png")
    a.set_defaults(func=cmd_animate)
    pl = sub.add_parser("plot", help="loss and selection curves of a training run (RUN/log.jsonl) as PNG")
    pl.add_argument("run", help="the run folder (the --out of flowsolve train)")
    pl.add_argument("--out", default=None, help="output .png (default: RUN/curves.png)")
    pl.set_defaults(func=cmd_plot)
    k = sub.add_parser("calibrate", help="fit low-NFE grids to a converged solve and store them in the model folder")
    k.add_argument("--model", required=True, help="a model folder (the grids go to its calibration.json)")
    _device_flag(k)
    k.add_argument("--solver", default="ipndm")
    k.add_argument("--nfe", default="5", help="comma-separated NFE budgets")
    k.add_argument("--seconds", type=float, default=60.0, help="wall-clock budget per NFE")
    k.add_argument("--n", type=int, default=256, help="starting points to fit on")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument(
        "--grid-only",
        action="store_true",
        help="fit the grid alone, no learned solver coefficients (the whole budget goes to the grid)",
    )
    k.set_defaults(func=cmd_calibrate)
    v = sub.add_parser("solvers", help="list the registered solvers")
    v.set_defaults(func=cmd_solvers)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FlowsolveError as e:  # the library's own errors: one line; genuine bugs keep their traceback
        print(f"flowsolve: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine said no (permissions, disk full, ...)
        print(f"flowsolve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"flowsolve: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
