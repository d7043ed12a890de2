"""Linear merges: the weighted average and task arithmetic."""
from __future__ import annotations

import torch

from .registry import register


@register("average", needs_base=False, min_teachers=2,
          help="Σ wᵢθᵢ / Σ wᵢ: the paper's weighted merging (equal weights by default).")
def average(base, models, params, key):
    total = None
    for i in range(len(models)):
        m = models[i]
        total = torch.zeros(m.shape, dtype=torch.float32, device=m.device) if total is None else total
        total.add_(m, alpha=params.weights[i])
    return total.div_(sum(params.weights))


@register("task-arithmetic", needs_base=True, min_teachers=1, uses=("lambda",),
          help="base + λ·Σ wᵢ(θᵢ − base).")
def task_arithmetic(base, models, params, key):
    total = torch.zeros_like(base)
    for i in range(len(models)):
        total.add_(models[i] - base, alpha=params.weights[i])
    return total.mul_(params.lam).add_(base)
