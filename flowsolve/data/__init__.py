"""Datasets: the exact Gaussian mixture (paper Appendix D.1), moons, scikit-learn's digits,
image folders and local torchvision datasets."""

from .datasets import (
    BUILTIN,
    DIGITS_HELD_OUT,
    Moons,
    TensorData,
    as_source,
    batches,
    digits,
    image_folder,
    labelled_batches,
    batch_with_labels,
    load,
    moons,
    num_classes,
    shape_of,
    torchvision_dataset,
)
from .gmm import GaussianMixture

__all__ = [
    "GaussianMixture",
    "TensorData",
    "Moons",
    "digits",
    "moons",
    "image_folder",
    "torchvision_dataset",
    "load",
    "as_source",
    "shape_of",
    "batches",
    "labelled_batches",
    "batch_with_labels",
    "num_classes",
    "BUILTIN",
    "DIGITS_HELD_OUT",
]
