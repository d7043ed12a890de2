"""Which process holds which teachers, and which of a step's samples each process trains on.

Every process draws the same whole-step batch (batch_size x processes samples, their styles balanced and
sorted), so one seed trains the same student whatever the placement:

    replicate   every process holds every teacher and takes every W-th sample of the batch;
    shard       process r holds only teachers [r*n/W, (r+1)*n/W) and takes exactly their samples.

With shard the processes' sample counts differ (5 teachers on 2 GPUs: 2 and 3 teachers' samples), so each
weighs its loss by its share of the step (`Placement.weight`): the processes' gradients, averaged as DDP or
FSDP average them, are then the gradient of the whole batch's mean loss, as with replicate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUT_FILE = "layout.json"  # in each checkpoint: processes, teacher placement and student sharding


def teacher_ranges(teachers: int, processes: int) -> list[range]:
    """A balanced, contiguous split of the teachers over the processes (sizes differ by at most one)."""
    return [range(r * teachers // processes, (r + 1) * teachers // processes) for r in range(processes)]


def resolve(placement: str, teachers: int, processes: int, replicate_fits: bool) -> str:
    """train.teacher_placement's auto: shard over several processes when replicating the teachers does not fit
    the card, or when they split evenly (no process waits on another's larger share); else replicate."""
    if placement != "auto":
        return placement
    if processes == 1 or teachers < processes:
        return "replicate"
    return "shard" if not replicate_fits or teachers % processes == 0 else "replicate"


@dataclass(frozen=True)
class Placement:
    kind: str  # replicate | shard
    rank: int
    processes: int
    teachers: int
    batch_size: int  # per process: a step's batch is batch_size x processes

    @property
    def held(self) -> range:
        """The teachers this process holds."""
        if self.kind == "replicate":
            return range(self.teachers)
        return teacher_ranges(self.teachers, self.processes)[self.rank]

    @property
    def step_batch(self) -> int:
        return self.batch_size * self.processes

    def rows(self, labels: torch.Tensor) -> torch.Tensor:
        """This process's samples (positions in the step's sorted `labels`)."""
        if self.kind == "replicate":
            return torch.arange(self.rank, len(labels), self.processes)
        held = self.held
        return ((labels >= held.start) & (labels < held.stop)).nonzero().squeeze(1)

    def weight(self, rows: int) -> float:
        """What this process's mean loss counts for, so that the processes' average is the step's mean."""
        return rows / self.batch_size
