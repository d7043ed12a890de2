"""DARE (Yu et al. 2024): drop task-vector entries with a seeded Bernoulli mask and rescale."""
from __future__ import annotations

import hashlib

import torch

from . import fused
from .registry import register, slices
from .ties import disjoint_mean


def mask_draws(seed: int, key: str, index: int) -> torch.Generator:
    """The generator of teacher `index`'s keep-mask for tensor `key`: it depends only on these three."""
    digest = hashlib.sha256(f"{seed}:{key}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def dare_mask(shape, density: float, seed: int, key: str, index: int, device) -> torch.Tensor:
    """A Bernoulli(density) keep-mask that depends only on (seed, tensor name, teacher index)."""
    return (torch.rand(shape, generator=mask_draws(seed, key, index)) < density).to(device)


@register("dare", needs_base=True, min_teachers=2, uses=("density", "lambda", "seed", "dare_sign"),
          help="Drop task-vector entries with a seeded Bernoulli keep-mask (p = density), rescale by 1/density, "
               "then base + λ·Σ wᵢδᵢ (or TIES' sign election with --dare-sign).")
def dare(base, models, params, key):
    flat = base.reshape(-1)
    # Each teacher's mask is drawn slice after slice from its own generator: the same draws as one mask of the
    # whole tensor (tests/test_merge.py holds this), with memory for a slice only.
    draws = [mask_draws(params.seed, key, i) for i in range(len(models))]
    merged, weights = torch.empty_like(flat), torch.tensor(params.weights, device=flat.device)
    for part in slices(flat.numel()):
        rows = []
        for i, model in enumerate(models):
            keep = (torch.rand(part.stop - part.start, generator=draws[i]) < params.density).to(flat.device)
            rows.append(torch.sub(model.reshape(-1)[part], flat[part]).mul_(keep).div_(params.density))
        if params.dare_sign:
            merged[part] = fused.run(disjoint_mean, part.stop - part.start, rows, weights)
        else:
            total = rows[0].mul_(params.weights[0])
            for w, row in zip(params.weights[1:], rows[1:]):
                total.add_(row, alpha=w)
            merged[part] = total
    return merged.view(base.shape).mul_(params.lam).add_(base)
