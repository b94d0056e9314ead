"""Figures: 2-D particle scatter plots and image grids, written as PNG (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path

import torch


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
        if x.shape[-1] < 32:   # tiny images (8×8 digits): enlarge with nearest neighbours to be viewable
            x = torch.nn.functional.interpolate(x, scale_factor=-(-32 // x.shape[-1]), mode="nearest")
        save_image(make_grid((x.clamp(-1, 1) + 1) / 2, nrow=nrow), str(path))
        return
    raise ValueError(f"x: a PNG needs 2-D particles (n, 2) or images (n, C, H, W), got shape {tuple(x.shape)}; "
                     f"write .npy or .pt instead")
