"""TIES (Yadav et al. 2023): trim task vectors, elect signs, take the disjoint mean."""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .registry import register


def disjoint_mean(delta, n: int, weights) -> torch.Tensor:
    """TIES' sign election and disjoint mean over task vectors `delta(i)`, i < n, in two passes.

    Each pass asks for one task vector at a time, so memory holds a few tensors whatever n is."""
    total = None
    for i in range(n):
        d = delta(i)
        total = d * weights[i] if total is None else total.add_(d, alpha=weights[i])
    elected = total.sign_()
    num = torch.zeros_like(elected)
    den = torch.zeros_like(elected)
    for i in range(n):
        d = delta(i).mul_(elected)  # in place, no temporary: |δᵢ| where δᵢ agrees with the elected sign, else ≤ 0
        den.add_(d > 0, alpha=weights[i])
        num.addcmul_(d.clamp_(min=0), elected, value=weights[i])
    return num.div_(den.masked_fill_(den == 0, 1.0))


def trim_threshold(delta: torch.Tensor, density: float) -> torch.Tensor | None:
    """The magnitude of the k-th largest entry, k = ⌈density·numel⌉ (at least one); None keeps everything."""
    k = max(1, math.ceil(density * delta.numel()))
    if k >= delta.numel():
        return None
    magnitude = delta.abs().view(-1)
    index = magnitude.numel() - k
    if magnitude.device.type == "cpu":
        # numpy selects in place; kthvalue would also hold an int64 index per entry (2× an fp32 tensor)
        magnitude.numpy().partition(index)
        return magnitude[index].clone()
    return magnitude.kthvalue(index + 1).values


TIES_KEEP_BYTES = 256 << 20  # trimmed task vectors up to this size stay in memory between passes


@register("ties", needs_base=True, min_teachers=2, uses=("density", "lambda"),
          help="Trim task vectors to the top `density` by magnitude, elect signs by Σ wᵢδᵢ, disjoint mean; "
               "base + λ·mean.")
def ties(base, models, params, key):
    n = len(models)
    keep = base.numel() * base.element_size() * n <= TIES_KEEP_BYTES

    def prepare(i):
        d = models[i] - base
        threshold = trim_threshold(d, params.density)
        if threshold is not None:
            d.mul_(d.abs() >= threshold)
        return threshold, d if keep else None

    # kthvalue runs on one core: trim teachers side by side, unless their tensors are large
    workers = min(n, os.cpu_count() or 1) if keep else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        prepared = list(pool.map(prepare, range(n)))

    def trimmed(i):
        threshold, d = prepared[i]
        if d is not None:
            return d
        d = models[i] - base
        return d if threshold is None else d.mul_(d.abs() >= threshold)

    return disjoint_mean(trimmed, n, params.weights).mul_(params.lam).add_(base)
