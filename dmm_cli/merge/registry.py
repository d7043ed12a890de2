"""The merge-method registry: each method is one function of (base, teachers, params, tensor name) -> tensor.

Every method sees one tensor at a time, in fp32 sums: the base's (or None) and each teacher's, in
its stored dtype (fp16, say), plus the teacher weights.
"""
from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class MergeParams:
    weights: tuple[float, ...]
    density: float = 0.2
    lam: float = 1.0
    seed: int = 0
    dare_sign: bool = False


OPTIONS = {"density": "--density", "lambda": "--lambda", "seed": "--seed", "dare_sign": "--dare-sign"}


@dataclasses.dataclass(frozen=True)
class Method:
    fn: Callable
    needs_base: bool
    min_teachers: int
    help: str
    uses: tuple[str, ...]  # which of OPTIONS the method reads; giving another one is an error


METHODS: dict[str, Method] = {}

WHOLE = 1 << 24  # tensors up to this many entries are merged at once (every SD UNet tensor)
SLICE = 1 << 22  # larger ones (text encoders' token embeddings) this many entries at a time, so that memory holds
                 # teachers x slice rather than teachers x tensor


def slices(numel: int) -> list[slice]:
    """The stretches of a flattened tensor a method works on at a time."""
    size = numel if numel <= WHOLE else SLICE
    return [slice(start, min(start + size, numel)) for start in range(0, numel, size)]


def register(name: str, *, needs_base: bool, min_teachers: int, help: str, uses: tuple[str, ...] = ()):
    def wrap(fn):
        METHODS[name] = Method(fn, needs_base, min_teachers, help, uses)
        return fn
    return wrap
