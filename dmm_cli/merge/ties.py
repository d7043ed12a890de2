"""TIES (Yadav et al. 2023): trim task vectors, elect signs, take the disjoint mean."""
from __future__ import annotations

import math
import sys

import torch

from .registry import register, slices


def disjoint_mean(stack: torch.Tensor, weights) -> torch.Tensor:
    """TIES' sign election and disjoint mean of task vectors stacked on the first axis (one row per teacher).

    The rows are used up: they end as the agreeing magnitudes. Every step is one operation over the whole
    stack, in place: boolean temporaries and their conversions are slow on the CPU."""
    w = torch.tensor(weights, dtype=stack.dtype, device=stack.device)
    rows = stack.view(len(weights), -1)
    elected = (w @ rows).sign_()
    rows.mul_(elected).clamp_(min=0)  # |δᵢ| where δᵢ agrees with the elected sign, else 0
    num = w @ rows
    den = w @ rows.sign_()  # the weight of the teachers that agree
    if all(x > 0 for x in weights):  # then den is 0 only where num is: one cheap op instead of a mask
        den.clamp_(min=torch.finfo(den.dtype).tiny)
    else:
        den.masked_fill_(den == 0, 1.0)
    return num.mul_(elected).div_(den).view(stack.shape[1:])


BUCKETS = 1 << 15  # a non-negative float32's top 16 bits (sign 0, exponent, 7 mantissa bits)
TOP_HALF = 1 if sys.byteorder == "little" else 0
SMALL = 1 << 18


def kth_largest(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of non-negative float32 values, exactly, in linear time.

    A non-negative float's bit pattern read as an int32 sorts like the float itself, so a histogram of
    its top bits finds the bucket holding the k-th largest, and only that bucket (a few percent of the
    entries) is searched exactly."""
    magnitude = magnitude.reshape(-1)
    if magnitude.device.type != "cpu":
        return magnitude.kthvalue(magnitude.numel() - k + 1).values
    if magnitude.numel() <= SMALL:  # a histogram costs more than it saves
        values = magnitude.numpy().copy()
        values.partition(len(values) - k)
        return torch.tensor(values[len(values) - k])
    buckets = magnitude.view(torch.int16)[TOP_HALF::2]  # the top half of each float, without a new tensor
    from_top = torch.bincount(buckets, minlength=BUCKETS).flip(0).cumsum(0)  # entries in the top j+1 buckets
    j = int(torch.searchsorted(from_top, k))
    inside = magnitude[buckets == BUCKETS - 1 - j].numpy()
    index = len(inside) - (k - (int(from_top[j - 1]) if j else 0))
    inside.partition(index)  # in place, on the bucket's own copy
    return torch.tensor(inside[index])


def threshold_below(magnitude: torch.Tensor, density: float) -> float | None:
    """The largest float below the ⌈density·numel⌉-th largest magnitude (at least the 1st), so that threshold()
    keeps exactly the entries at or above it, ties included; None when every entry is kept."""
    k = max(1, math.ceil(density * magnitude.numel()))
    if k >= magnitude.numel():
        return None
    return float(torch.nextafter(kth_largest(magnitude, k), magnitude.new_zeros(())))


def trim_(row: torch.Tensor, below: float | None, magnitude: torch.Tensor) -> None:
    """Zero, in place, the entries of `row` whose magnitude is not above `below`; `magnitude` holds |row| and
    is used up."""
    if below is not None:
        torch.nn.functional.threshold_(magnitude, below, 0.0)
        torch.copysign(magnitude, row, out=row)


@register("ties", needs_base=True, min_teachers=2, uses=("density", "lambda"),
          help="Trim task vectors to the top `density` by magnitude, elect signs by Σ wᵢδᵢ, disjoint mean; "
               "base + λ·mean.")
def ties(base, models, params, key):
    n, flat = len(models), base.reshape(-1)
    parts = slices(flat.numel())
    buffer, magnitude = flat.new_empty(n * (parts[0].stop - parts[0].start)), torch.empty_like(flat)
    belows = [None] * n
    if len(parts) > 1:  # each teacher's threshold is over its whole task vector: find them first
        for i, model in enumerate(models):
            belows[i] = threshold_below(torch.sub(model.reshape(-1), flat, out=magnitude).abs_(), params.density)
    merged = None if len(parts) == 1 else torch.empty_like(flat)
    # Teachers one after another, slices one after another: every operation already uses all the cores.
    for part in parts:
        width = part.stop - part.start
        rows, scratch = buffer[:n * width].view(n, width), magnitude[:width]
        for i, model in enumerate(models):
            torch.sub(model.reshape(-1)[part], flat[part], out=rows[i])
            torch.abs(rows[i], out=scratch)
            if len(parts) == 1:
                belows[i] = threshold_below(scratch, params.density)
            trim_(rows[i], belows[i], scratch)
        if merged is None:
            merged = disjoint_mean(rows, params.weights)
        else:
            merged[part] = disjoint_mean(rows, params.weights)
    return merged.view(base.shape).mul_(params.lam).add_(base)
