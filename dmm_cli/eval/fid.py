"""FID between two sets of features: torchmetrics' FrechetInceptionDistance, fed precomputed features."""
from __future__ import annotations

import torch
from torch import nn


class _Precomputed(nn.Module):
    """Hands cached features to torchmetrics' FID unchanged."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), reset_real_features=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def fid_matrix(real: list[torch.Tensor], fake: list[torch.Tensor]) -> list[list[float]]:
    """M[i][j] = FID(fake set i, real set j)."""
    return [[fid(r, f) for r in real] for f in fake]


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100) -> float:
    """Kernel Inception Distance (unbiased, so usable at small K), on seeded subsets: the same features, the same KID."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(1000, len(real), len(fake))
    with warnings.catch_warnings():  # its note that features are kept in memory: they are, a few MB
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size,
                                         reset_real_features=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return float(metric.compute()[0])
