"""Figures: 2-D particle scatter plots and image grids, written as PNG (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import torch
from ._checks import check_int, check_output
from .errors import ArgumentError


def save_png(x: torch.Tensor, path: str | Path, reference=None, title: str | None = None) -> None:
    """2-D particles: a scatter plot (with the reference mixture's means when given);
    images (n, C, H, W) in [−1, 1]: a square grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = x.detach().cpu().float()
    if x.dim() == 2 and x.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
        if reference is not None and hasattr(reference, "means"):
            m = reference.means
            ax.scatter(m[:, 0], m[:, 1], marker="D", c="k", s=30, label="modes")
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, label="samples")
        ax.set_aspect("equal")
        ax.set_title(title or f"{len(x)} samples")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return
    if x.dim() == 4:
        from torchvision.utils import make_grid, save_image

        nrow = max(1, int(len(x) ** 0.5))
        if x.shape[-1] < 32:  # tiny images (8×8 digits): enlarge with nearest neighbours to be viewable
            x = torch.nn.functional.interpolate(x, scale_factor=-(-32 // x.shape[-1]), mode="nearest")
        save_image(make_grid((x.clamp(-1, 1) + 1) / 2, nrow=nrow), str(path))
        return
    raise ArgumentError(
        f"x: a PNG needs 2-D particles (n, 2) or images (n, C, H, W), got shape {tuple(x.shape)}; "
        f"write .npy or .pt instead"
    )


def flow_panels(
    field,
    path: str | Path,
    n: int = 128,
    nfe: int | None = None,
    solver: str = "euler",
    panels: int = 6,
    seed: int = 0,
    reference=None,
    heat=None,
    title: str | None = None,
    grid=None,
) -> None:
    """The paper's Figures 8–12: particles of a 2-D field at `panels` times of the generation, with
    the field's vectors (∇h up to the time scale) as arrows, the reference mixture's samples as
    diamonds, and, for discriminator models, `heat(x, t)` (e.g. c∘f) as a background heat-map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .sample import sample

    x, info = sample(field, solver, nfe=nfe, n=n, seed=seed, grid=grid, return_info=True, trajectory_every=1)
    traj, times = info.trajectory, info.trajectory_times
    if traj.shape[-1] != 2 or traj.dim() != 3:
        raise ArgumentError(f"field: flow_panels draws 2-D particles, got samples of shape {tuple(traj.shape[1:])}")
    picks = sorted({round(i * (len(times) - 1) / (panels - 1)) for i in range(panels)})
    fig, axes = plt.subplots(1, len(picks), figsize=(2.6 * len(picks), 2.8), dpi=70)
    ref = reference.sample(n, __import__("torch").Generator().manual_seed(seed + 1)) if reference is not None else None
    lim = float(max(8.0, traj[-1].abs().max() * 1.1))
    for ax, k in zip(axes, picks):
        xk, tk = traj[k], times[k]
        if heat is not None:
            g = torch.linspace(-lim, lim, 120)
            gx, gy = torch.meshgrid(g, g, indexing="xy")
            pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
            with torch.no_grad():
                hv = heat(pts, torch.full((len(pts),), float(tk))).reshape(120, 120)
            ax.imshow(hv.numpy(), extent=(-lim, lim, -lim, lim), origin="lower", cmap="viridis", alpha=0.6)
        if ref is not None:
            ax.scatter(ref[:, 0], ref[:, 1], marker="D", s=6, c="k", alpha=0.4)
        ax.scatter(xk[:, 0], xk[:, 1], s=6, c="tab:red")
        if k < len(times) - 1 or field.finite_at_end:
            with torch.no_grad():
                v = field(xk, torch.tensor(float(tk)))
            dt = times[min(k + 1, len(times) - 1)] - tk if k < len(times) - 1 else times[k] - times[k - 1]
            step = v * dt
            ax.quiver(
                xk[:, 0],
                xk[:, 1],
                step[:, 0],
                step[:, 1],
                angles="xy",
                scale_units="xy",
                scale=1,
                width=0.004,
                color="tab:blue",
                alpha=0.7,
            )
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"step {k}, t = {tk:.3g}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _frame_2d(x: torch.Tensor, lim: float, title: str, reference=None):
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, ax = plt.subplots(figsize=(3.2, 3.2), dpi=70)
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], marker="D", s=5, c="k", alpha=0.3)
    ax.scatter(x[:, 0], x[:, 1], s=5, c="tab:red")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _frame_images(x: torch.Tensor, title: str):
    from PIL import Image
    from torchvision.utils import make_grid

    nrow = max(1, int(len(x) ** 0.5))
    if x.shape[-1] < 32:
        x = torch.nn.functional.interpolate(x, scale_factor=-(-32 // x.shape[-1]), mode="nearest")
    grid = make_grid((x.clamp(-1, 1) + 1) / 2, nrow=nrow, padding=1)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype("uint8")
    return Image.fromarray(arr)


def animate(
    field,
    path: str | Path,
    solver: str = "heun",
    nfe: int | None = None,
    n: int = 16,
    seed: int = 0,
    every: int = 1,
    duration_ms: int = 120,
    reference=None,
    **options,
) -> int:
    """The generation process of any field (the paper's Figure 1) as an animated GIF or PNG: one
    frame per `every` solver steps plus the last, an image grid for images or a scatter plot for
    2-D particles. Returns the number of frames."""
    from .sample import sample

    path = Path(path)
    check_output(path, (".gif", ".png", ".apng"), "path")
    check_int("every", every, 1)
    x, info = sample(field, solver, nfe=nfe, n=n, seed=seed, return_info=True, trajectory_every=every, **options)
    traj, times = info.trajectory.detach().cpu().float(), info.trajectory_times
    if traj.dim() == 3 and traj.shape[-1] == 2:
        lim = float(max(traj[-1].abs().max() * 1.15, 3.0))
        ref = reference.sample(n * 4, torch.Generator().manual_seed(seed + 1)) if reference is not None else None
        frames = [_frame_2d(traj[k], lim, f"t = {times[k]:.3g}", ref) for k in range(len(traj))]
    elif traj.dim() == 5:
        frames = [_frame_images(traj[k], f"t = {times[k]:.3g}") for k in range(len(traj))]
    else:
        raise ArgumentError(
            f"field: animations need 2-D particles or images, got samples of shape {tuple(traj.shape[2:])}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    durations = [duration_ms] * (len(frames) - 1) + [duration_ms * 8]  # hold the last frame
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return len(frames)


def interpolation_grid(
    generator, path: str | Path, method: str = "spherical_cauchy_linear", rows: int = 4, steps: int = 8, seed: int = 0
) -> torch.Tensor:
    """Latent interpolations of a generator model (App. C.3, Figure 5): `rows` pairs of latents, each
    row `steps` outputs along the chosen interpolation; images as a grid, 2-D outputs as paths."""
    from .latent import interpolate

    g = torch.Generator().manual_seed(seed)
    latent = generator.config.latent
    a, b = torch.randn(rows, latent, generator=g), torch.randn(rows, latent, generator=g)
    z = interpolate(a, b, steps, method).transpose(0, 1).reshape(rows * steps, latent)
    p = next(generator.parameters())
    with torch.no_grad():
        x = generator(z.to(p.device, p.dtype)).cpu()
    if x.dim() == 4:
        from torchvision.utils import make_grid, save_image

        big = x
        if x.shape[-1] < 32:
            big = torch.nn.functional.interpolate(x, scale_factor=-(-32 // x.shape[-1]), mode="nearest")
        save_image(make_grid((big.clamp(-1, 1) + 1) / 2, nrow=steps), str(path))
    elif x.dim() == 2 and x.shape[1] == 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
        for r in x.reshape(rows, steps, 2):
            ax.plot(r[:, 0], r[:, 1], "-o", ms=3)
        ax.set_aspect("equal")
        ax.set_title(f"{method} interpolations", fontsize=9)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
    else:
        raise ArgumentError(f"generator: interpolation grids need images or 2-D outputs, got {tuple(x.shape[1:])}")
    return x


def training_curves(records: list[dict], path: str | Path, title: str | None = None) -> None:
    """Loss (smoothed and last) and model-selection scores of a run's log.jsonl against the step, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_output(path, (".png",), "out")
    losses = [r for r in records if "loss" in r]
    scores = [r for r in records if "select" in r]
    if not losses and not scores:
        raise ArgumentError("run: its log.jsonl holds no loss or selection records yet")
    panels = 2 if scores else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.5), squeeze=False)
    ax = axes[0][0]
    if losses:
        ax.plot([r["step"] for r in losses], [r["last_loss"] for r in losses], lw=0.6, alpha=0.4, label="loss")
        ax.plot([r["step"] for r in losses], [r["loss"] for r in losses], lw=1.2, label="smoothed")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    if scores:
        ax = axes[0][1]
        ax.plot([r["step"] for r in scores], [r["select"] for r in scores], marker="o", ms=3)
        ax.set_xlabel("step")
        ax.set_ylabel("selection score (lower is better)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
