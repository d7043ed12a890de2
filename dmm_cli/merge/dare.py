"""DARE (Yu et al. 2024): drop task-vector entries with a seeded Bernoulli mask and rescale."""
from __future__ import annotations

import hashlib

import torch

from .registry import register
from .ties import disjoint_mean


def dare_mask(shape, density: float, seed: int, key: str, index: int, device) -> torch.Tensor:
    """A Bernoulli(density) keep-mask that depends only on (seed, tensor name, teacher index)."""
    digest = hashlib.sha256(f"{seed}:{key}:{index}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return (torch.rand(shape, generator=g) < density).to(device)


@register("dare", needs_base=True, min_teachers=2, uses=("density", "lambda", "seed", "dare_sign"),
          help="Drop task-vector entries with a seeded Bernoulli keep-mask (p = density), rescale by 1/density, "
               "then base + λ·Σ wᵢδᵢ (or TIES' sign election with --dare-sign).")
def dare(base, models, params, key):
    def dropped(i):
        keep = dare_mask(base.shape, params.density, params.seed, key, i, base.device)  # its draws freed first
        return (models[i] - base).mul_(keep).div_(params.density)

    if params.dare_sign:
        stack = torch.stack([dropped(i) for i in range(len(models))])
        return disjoint_mean(stack, params.weights).mul_(params.lam).add_(base)
    total = torch.zeros_like(base)
    for i in range(len(models)):
        total.add_(dropped(i), alpha=params.weights[i])
    return total.mul_(params.lam).add_(base)
