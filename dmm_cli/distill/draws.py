"""What is random about a step, but its noise: which samples, which teacher, caption drop and timesteps.

Everything step k draws comes from a CPU generator seeded by (seed, k, micro-batch), so a resumed run replays
exactly what an uninterrupted one would have done, and every process draws the same whole-step batch and
takes its own rows of it (distill/placement.py): one seed trains the same student whatever the placement.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .placement import Placement


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from `parts` (a linear congruential step per part)."""
    value = 0x9E3779B97F4A7C15
    for p in parts:
        value = (value * 6364136223846793005 + p + 1442695040888963407) % (1 << 63)
    return value


def timesteps(spec, steps: int, b: int, g: torch.Generator) -> torch.Tensor:
    """`b` training timesteps of a `steps`-long schedule, as train.timesteps (`spec`) draws them."""
    if spec.sampling == "uniform":
        return torch.randint(0, steps, (b,), generator=g, device="cpu")
    u = torch.sigmoid(spec.mean + spec.std * torch.randn(b, generator=g, device="cpu"))
    return (u * steps).long().clamp_(max=steps - 1)


@dataclass
class MicroBatch:
    """What is random about this process's part of one micro-batch and small: drawn on the CPU for the whole
    step's batch, sent to the device in one copy. Its noise is drawn on the device (`Trainer.noise`), from a
    generator seeded with `seed`."""

    idx: torch.Tensor
    labels: torch.Tensor
    drop: torch.Tensor
    t: torch.Tensor
    t2: torch.Tensor  # for the adversarial loss: x̂0 is re-noised to timestep t2
    source: int
    seed: int  # of the device generator that draws the noise (and the re-noise)
    rows: torch.Tensor | None = None  # this process's samples among the step batch's; None: all of them
    weight: float = 1.0  # what this process's mean loss counts for (Placement.weight)


class Draws:
    """The seeded draws of a run over its data sources (distill/trainer.py's DataSource: their sizes, stages and
    per-teacher labels), its styles and its placement."""

    def __init__(self, cfg, placement: Placement, sources: list, styles: int, old_styles: int, schedule_steps: int):
        self.cfg, self.placement, self.sources = cfg, placement, sources
        self.styles, self.old_styles, self.schedule_steps = styles, old_styles, schedule_steps
        # with labels (each teacher's own generations), each teacher's share comes from its own items
        self.by_style = [None if s.labels is None else [(s.labels == i).nonzero().squeeze(1) for i in range(styles)]
                         for s in sources]

    def labels(self, b: int, rotate: int) -> torch.Tensor:
        """A balanced split of `b` samples across styles, rotating the remainder; sorted so groups are contiguous.

        With old styles (incremental merging) and train.old_style_fraction set, that share of the batch goes
        to the old styles and the rest to the new ones."""
        n, old = self.styles, self.old_styles

        def spread(count, first, width):
            return (torch.arange(count, device="cpu") * width // max(count, 1) + rotate) % width + first

        fraction = self.cfg.old_style_fraction
        if old and fraction is not None:
            n_old = round(fraction * b) if old < n else b
            labels = torch.cat([spread(n_old, 0, old), spread(b - n_old, old, n - old)])
        else:
            labels = spread(b, 0, n)
        return labels.sort().values

    def own_labels(self, rotate: int) -> torch.Tensor:
        """The styles of this process's samples in a step batch split with this rotation."""
        labels = self.labels(self.placement.step_batch, rotate)
        return labels[self.placement.rows(labels)]

    def micro_batch(self, step: int, micro: int) -> MicroBatch:
        """This process's part of micro-batch `micro` of step `step`: the whole step batch is drawn, its rows taken."""
        b = self.placement.step_batch
        # the trailing 0 was the process's rank when each drew its own batch; kept so a seed draws what it drew
        g = torch.Generator().manual_seed(seed_for(self.cfg.seed, step, micro, 0))
        stage = max(s.stage for s in self.sources if s.from_step <= step)
        candidates = [k for k, s in enumerate(self.sources) if s.stage == stage]
        source = candidates[0]
        if len(candidates) > 1:  # one bucket per micro-batch, each as often as it holds pictures
            sizes = torch.tensor([len(self.sources[k].latents) for k in candidates], dtype=torch.float)
            source = candidates[int(torch.multinomial(sizes, 1, generator=g))]
        labels = self.labels(b, step + micro)
        by_style = self.by_style[source]
        if by_style is None:
            idx = torch.randint(0, len(self.sources[source].latents), (b,), generator=g, device="cpu")
        else:
            picks = torch.randint(0, 1 << 62, (b,), generator=g, device="cpu")
            sizes = torch.tensor([len(by_style[i]) for i in range(self.styles)])
            idx = torch.stack([by_style[int(l)][int(p % sizes[l])] for l, p in zip(labels, picks)])
        drop = torch.rand(b, generator=g, device="cpu") < self.cfg.caption_dropout
        t = timesteps(self.cfg.timesteps, self.schedule_steps, b, g)
        t2 = torch.randint(0, self.schedule_steps, (b,), generator=g, device="cpu")
        seed = int(torch.randint(0, 1 << 62, (), generator=g))
        if self.placement.processes == 1:
            return MicroBatch(idx, labels, drop, t, t2, source, seed)
        rows = self.placement.rows(labels)
        return MicroBatch(idx[rows], labels[rows], drop[rows], t[rows], t2[rows], source, seed, rows,
                          self.placement.weight(len(rows)))
