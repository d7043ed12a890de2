"""TIES (Yadav et al. 2023): trim task vectors, elect signs, take the disjoint mean.

Trimming needs each teacher's k-th largest change. Found directly, that is several passes over memory per
teacher. Here a sample brackets it instead. One compiled pass merges with every teacher trimmed at its
bracket's lower end, and marks the entries where some teacher's change falls inside its bracket (a few
percent). Everywhere else that merge is already exact. Only the marked entries decide the exact thresholds,
and only they are merged again."""
from __future__ import annotations

import math

import torch

from . import fused
from .registry import register, slices

SAMPLE = 1 << 16  # at most this many entries are drawn to bracket a threshold
SIGMAS = 3.5  # a bracket's half-width, in standard deviations of the sampled rank: it misses about once in 2000


def disjoint_mean(changes: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """TIES' sign election and disjoint mean: each entry's sign is that of Σ wᵢδᵢ, and its value the weighted mean
    of the δᵢ of that sign (0 where none agrees)."""
    elected = torch.sign(sum(w * d for w, d in zip(weights, changes)))
    agreeing = [torch.clamp(d * elected, min=0) for d in changes]  # |δᵢ| where δᵢ has the elected sign, else 0
    num = sum(w * a for w, a in zip(weights, agreeing))
    den = sum(w * (a > 0) for w, a in zip(weights, agreeing))
    return elected * num / torch.where(den == 0, 1.0, den)


def _change(teacher: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|teacher − base| in fp32 (teachers stacked on a first axis work too)."""
    return (teacher.float() - base).abs()


def trimmed_merge(base, teachers, thresholds, weights, lam):
    """base + λ·disjoint mean of the task vectors, each keeping the entries whose magnitude reaches its threshold."""
    changes = [teacher.float() - base for teacher in teachers]
    kept = [torch.where(d.abs() >= threshold, d, 0.0) for d, threshold in zip(changes, thresholds)]
    return base + lam * disjoint_mean(kept, weights)


def _merge_and_mark(base, teachers, lows, highs, weights, lam):
    """trimmed_merge at the thresholds `lows`; as 0/1 bytes, the entries where some teacher's change lies inside
    its bracket [low, high] (unless low = high: the bracket is then one value, the threshold if any); and per
    teacher, how many of its changes lie above the bracket and how many reach it."""
    merged = trimmed_merge(base, teachers, lows, weights, lam)
    magnitudes = [_change(teacher, base) for teacher in teachers]
    marked = torch.zeros_like(base, dtype=torch.bool)
    for magnitude, low, high in zip(magnitudes, lows, highs):
        marked = marked | ((magnitude >= low) & (magnitude <= high) & (low < high))
    counts = [torch.stack([(m > high).sum(dtype=torch.int64), (m >= low).sum(dtype=torch.int64)])
              for m, low, high in zip(magnitudes, lows, highs)]
    return merged, marked.to(torch.uint8), torch.stack(counts)  # bytes: compiled code writes them faster than bools


def _brackets(flat: torch.Tensor, models: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per teacher, a [low, high] that holds its k-th largest change almost surely, from a sample of its changes."""
    n = flat.numel()
    size = min(SAMPLE, n // 16)
    stride = n // size  # one draw in each stretch of `stride` entries, in order: kinder to caches than draws anywhere
    offsets = torch.randint(stride, (size,), generator=torch.Generator().manual_seed(n))
    draws = (torch.arange(0, stride * size, stride) + offsets).to(flat.device)
    sample = _change(torch.stack([m.index_select(0, draws) for m in models]), flat.index_select(0, draws))
    rank, spread = (n - k) / n * size, SIGMAS * math.sqrt(size * k / n * (1 - k / n)) + 1
    first, last = math.floor(rank - spread), math.ceil(rank + spread) + 1  # ranks from the smallest, 1-based
    low = sample.kthvalue(first, dim=1).values if first >= 1 else torch.zeros(len(models), device=flat.device)
    high = sample.kthvalue(last, dim=1).values if last <= size else torch.full_like(low, math.inf)
    return low, high


def _by_slices(fn, flat: torch.Tensor, models: list[torch.Tensor], *rest) -> list:
    """fn(base slice, teacher slices, *rest) for each slice of the flat tensors. Compiled, fn is one pass that
    holds no per-teacher temporaries, so it takes the whole tensor and its outputs need no joining."""
    parts = [slice(0, flat.numel())] if fused.compiles(flat.numel()) else slices(flat.numel())
    return [fused.run(fn, part.stop - part.start, flat[part], [m[part] for m in models], *rest) for part in parts]


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    return values.kthvalue(values.numel() - k + 1).values


@register("ties", needs_base=True, min_teachers=2, uses=("density", "lambda"),
          help="Trim task vectors to the top `density` by magnitude, elect signs by Σ wᵢδᵢ, disjoint mean; "
               "base + λ·mean.")
def ties(base, models, params, key):
    # Flat and detached: compiled code is handed tensors, not views of them.
    flat, models = base.reshape(-1).detach(), [m.reshape(-1).detach() for m in models]
    n, weights, lam = flat.numel(), torch.tensor(params.weights, device=flat.device), params.lam
    k = max(1, math.ceil(params.density * n))
    if k == n or n < fused.COMPILE_FROM:
        thresholds = torch.stack([_kth_largest(_change(m, flat), k) for m in models])
        return trimmed_merge(flat, models, thresholds, weights, lam).view(base.shape)
    lows, highs = _brackets(flat, models, k)
    pieces = _by_slices(_merge_and_mark, flat, models, lows, highs, weights, lam)
    merged, marked, counts = pieces[0] if len(pieces) == 1 else (torch.cat(x) for x in zip(*pieces))
    counts = counts.view(-1, len(models), 2).sum(0).tolist()  # per teacher, over the slices
    where = marked.nonzero().squeeze(1)
    b, teachers = flat[where], [m[where] for m in models]
    magnitudes = _change(torch.stack(teachers), b)
    insides = (magnitudes >= lows[:, None]) & (magnitudes <= highs[:, None])
    thresholds, missed = [], False
    for i, (magnitude, inside) in enumerate(zip(magnitudes, insides)):
        above, reached = counts[i]
        if not above < k <= reached:  # the bracket missed: search the whole tensor, and merge it all again
            thresholds.append(_kth_largest(_change(models[i], flat), k))
            missed = True
        elif lows[i] == highs[i]:  # a bracket of one value (a teacher equal to the base here, say) is the threshold
            thresholds.append(lows[i])
        else:
            thresholds.append(_kth_largest(magnitude[inside], k - above))
    thresholds = torch.stack(thresholds)
    if missed:
        merged = torch.cat(_by_slices(trimmed_merge, flat, models, thresholds, weights, lam))
    else:
        merged[where] = fused.run(trimmed_merge, where.numel(), b, teachers, thresholds, weights, lam)
    return merged.view(base.shape)
