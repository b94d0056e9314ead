"""Datasets: the exact Gaussian mixture (paper Appendix D.1) and friends."""
from .gmm import GaussianMixture

__all__ = ["GaussianMixture"]
