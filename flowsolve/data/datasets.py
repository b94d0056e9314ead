"""Training data for the trainers: finite datasets as one tensor, and exact samplers.

Every source has `data_shape` and `sample(n, generator)`; finite ones also have `x`
(and `labels` where known). Images are scaled to [−1, 1] (paper Appendix D.1).
Nothing is downloaded: scikit-learn's digits ship with scikit-learn, image folders and
torchvision datasets are read from disk.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
import torch

from .gmm import GaussianMixture
from .._checks import seeded_generator
from ..errors import ArgumentError, ArgumentTypeError, PathError

__all__ = [
    "TensorData",
    "Moons",
    "digits",
    "moons",
    "image_folder",
    "torchvision_dataset",
    "load",
    "BUILTIN",
    "DIGITS_HELD_OUT",
    "labelled_batches",
    "num_classes",
    "batches",
]

DIGITS_HELD_OUT = 400  # digits rows kept out of training (fixed permutation, seed 0): the FD reference set
BUILTIN = {
    "gmm2d": "the exact paper mixture (App. D.1): 5 modes on a circle of radius 5, std 0.5",
    "moons": "two interleaved half circles with Gaussian noise 0.1 (exact sampler)",
    "digits": "scikit-learn's 8x8 handwritten digits in [-1, 1] (1797 images; 400 held out)",
    "mnist": "torchvision MNIST padded to 32x32 (needs a local copy under --root or $FLOWSOLVE_DATA)",
    "cifar10": "torchvision CIFAR-10 (local copy)",
    "celeba": "torchvision CelebA center-cropped to 64x64 (local copy)",
}


def _generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        generator = seeded_generator(None)
    return generator


class TensorData:
    """A finite dataset x of shape (N, *data_shape), with optional integer labels."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor | None = None, name: str = "tensor") -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or len(x) == 0:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ArgumentError(f"x: expected a non-empty tensor of shape (N, *data_shape), got {got}")
        if not torch.isfinite(x).all():
            raise ArgumentError(f"x: dataset {name!r} contains non-finite values")
        if labels is not None and len(labels) != len(x):
            raise ArgumentError(f"labels: expected {len(x)} labels, got {len(labels)}")
        self.x, self.labels, self.name = x.float(), labels, name
        self.data_shape = tuple(x.shape[1:])

    def __len__(self) -> int:
        return len(self.x)

    def __repr__(self) -> str:
        return f"TensorData({self.name!r}, n={len(self)}, shape={self.data_shape})"

    def sample(self, n: int, generator: torch.Generator | None = None, **_) -> torch.Tensor:
        """n rows drawn uniformly with replacement."""
        idx = torch.randint(len(self.x), (n,), generator=_generator(generator))
        return self.x[idx]


class Moons:
    """Two interleaved half circles (scikit-learn's make_moons geometry) plus N(0, noise²) noise,
    sampled exactly and without limit."""

    def __init__(self, noise: float = 0.1) -> None:
        self.noise, self.data_shape, self.name = float(noise), (2,), "moons"

    def __repr__(self) -> str:
        return f"Moons(noise={self.noise})"

    def sample(self, n: int, generator: torch.Generator | None = None, **_) -> torch.Tensor:
        g = _generator(generator)
        upper = torch.rand(n, generator=g) < 0.5
        angle = torch.rand(n, generator=g) * math.pi
        x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
        y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
        pts = torch.stack([x, y], 1) + self.noise * torch.randn(n, 2, generator=g)
        return pts.float()


def moons(noise: float = 0.1) -> Moons:
    return Moons(noise)


def digits(split: str = "train", size: int | None = None) -> TensorData:
    """scikit-learn's 8×8 digits (1797 images, 16 grey levels) scaled to [−1, 1], shape (1, 8, 8)
    or (1, size, size) with bilinear upsampling. `split`: "train" (1397), "test" (the 400 held-out
    images, a fixed seed-0 permutation) or "all"."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ArgumentError(f"split: expected 'train', 'test' or 'all', got {split!r}")
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.as_tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    if split == "train":
        perm = perm[:-DIGITS_HELD_OUT]
    elif split == "test":
        perm = perm[-DIGITS_HELD_OUT:]
    x, y = x[perm], y[perm]
    if size is not None and size != 8:
        if not isinstance(size, int) or size < 8:
            raise ArgumentError(f"size: expected an integer >= 8, got {size!r}")
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)
    return TensorData(x, y, name=f"digits-{split}")


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def image_folder(path: str | os.PathLike, size: int | None = None, channels: int | None = None) -> TensorData:
    """Every image under `path` (recursively), center-cropped to a square, resized to `size`
    (default: the first image's short side) and scaled to [−1, 1]. Sub-folder names become labels."""
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise PathError(f"data: image folder {str(root)!r} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ArgumentError(f"data: no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {str(root)!r}")
    classes = sorted({p.parent.relative_to(root).as_posix() for p in files})
    xs, ys = [], []
    for p in files:
        try:
            img: Image.Image = Image.open(p)
            img.load()
        except Exception as e:  # noqa: BLE001 - name the bad file
            raise ArgumentError(f"data: cannot read image {str(p)!r}: {e}") from None
        if channels is None:
            channels = 1 if img.mode in ("L", "1", "I", "I;16", "F") else 3
        img = img.convert("L" if channels == 1 else "RGB")
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        size = size or s
        img = img.resize((size, size), Image.Resampling.LANCZOS)
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float()
        xs.append(t.view(size, size, channels).permute(2, 0, 1) / 127.5 - 1.0)
        ys.append(classes.index(p.parent.relative_to(root).as_posix()))
    return TensorData(torch.stack(xs), torch.tensor(ys), name=str(root))


def torchvision_dataset(
    name: str, root: str | os.PathLike | None = None, train: bool = True, limit: int | None = None
) -> TensorData:
    """MNIST (padded to 32×32, App. D.1), CIFAR-10 or CelebA (center crop, 64×64) from a local copy;
    never downloads. `root` defaults to $FLOWSOLVE_DATA or ~/.cache/flowsolve/data."""
    import torchvision
    from torchvision import transforms as T

    root = Path(root or os.environ.get("FLOWSOLVE_DATA") or Path.home() / ".cache" / "flowsolve" / "data")
    to_pm1 = T.Compose([T.ToTensor(), T.Normalize(0.5, 0.5)])
    makers = {
        "mnist": lambda: torchvision.datasets.MNIST(
            root, train=train, download=False, transform=T.Compose([T.Pad(2), to_pm1])
        ),
        "cifar10": lambda: torchvision.datasets.CIFAR10(root, train=train, download=False, transform=to_pm1),
        "celeba": lambda: torchvision.datasets.CelebA(
            root,
            split="train" if train else "test",
            download=False,
            transform=T.Compose([T.CenterCrop(178), T.Resize(64), to_pm1]),
        ),
    }
    if name not in makers:
        raise ArgumentError(f"name: expected one of {sorted(makers)}, got {name!r}")
    try:
        ds = makers[name]()
    except RuntimeError as e:
        raise PathError(
            f"data: {name} is not available under {str(root)!r} (flowsolve never downloads; "
            f"put a torchvision copy there or set FLOWSOLVE_DATA): {e}"
        ) from None
    n = len(ds) if limit is None else min(limit, len(ds))
    xs, ys = zip(*(ds[i] for i in range(n)))
    return TensorData(
        torch.stack(xs),
        torch.as_tensor([int(y) if not torch.is_tensor(y) else int(y.flatten()[0]) for y in ys]),
        name=name,
    )


def load(
    name: str | os.PathLike, split: str = "train", *, size: int | None = None, root: str | os.PathLike | None = None
):
    """A data source by name (see `BUILTIN`) or an image-folder path."""
    if isinstance(name, str) and name in BUILTIN:
        if name == "gmm2d":
            return GaussianMixture.paper()
        if name == "moons":
            return Moons()
        if name == "digits":
            return digits(split, size=size)
        return torchvision_dataset(name, root=root, train=split != "test")
    if Path(name).is_dir():
        return image_folder(name, size=size)
    raise ArgumentError(f"data: expected one of {sorted(BUILTIN)} or an image folder, got {str(name)!r}")


def shape_of(source) -> tuple[int, ...]:
    shape = getattr(source, "data_shape", None)
    if shape is None and isinstance(source, GaussianMixture):
        shape = (source.dim,)
    if shape is None:
        raise ArgumentError(f"data: cannot tell the data shape of {source!r}")
    return tuple(shape)


def as_source(data) -> object:
    """Accept a source object, a name/path, or a tensor of samples."""
    if isinstance(data, torch.Tensor):
        return TensorData(data)
    if isinstance(data, (str, os.PathLike)):
        return load(data)
    if hasattr(data, "sample"):
        return data
    raise ArgumentTypeError(
        f"data: expected a dataset name, a folder, a tensor or an object with .sample(n, generator), "
        f"got {type(data).__name__}"
    )


def batches(source, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """One training batch (float32)."""
    x = source.sample(batch_size, generator=generator)
    return x.float()


def labelled_batches(source, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch with its integer labels, (x float32, labels long): the same rows `batches`
    draws from the same generator state."""
    labels = getattr(source, "labels", None)
    if labels is None:
        raise ArgumentError(
            f"data: {getattr(source, 'name', type(source).__name__)!r} has no labels; conditional "
            f"training needs labelled data (digits, image folders with one subfolder per class, "
            f"torchvision datasets)"
        )
    idx = torch.randint(len(source.x), (batch_size,), generator=generator)
    return source.x[idx].float(), torch.as_tensor(labels)[idx].long()


def batch_with_labels(source, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rows of a labelled source drawn uniformly within each class, row b of class labels[b]."""
    all_labels = torch.as_tensor(source.labels).long()
    out = torch.empty(len(labels), *source.x.shape[1:])
    for c in labels.unique().tolist():
        members = (all_labels == c).nonzero().squeeze(1)
        at = (labels == c).nonzero().squeeze(1)
        if len(members) == 0:
            raise ArgumentError(f"labels: class {c} has no rows in the data")
        out[at] = source.x[members[torch.randint(len(members), (len(at),), generator=generator)]].float()
    return out


def num_classes(source) -> int:
    """The number of classes of a labelled source (labels 0 .. K − 1)."""
    labels = getattr(source, "labels", None)
    if labels is None:
        raise ArgumentError("data: conditional training needs labelled data")
    return int(torch.as_tensor(labels).max()) + 1
