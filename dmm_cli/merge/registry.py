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


def register(name: str, *, needs_base: bool, min_teachers: int, help: str, uses: tuple[str, ...] = ()):
    def wrap(fn):
        METHODS[name] = Method(fn, needs_base, min_teachers, help, uses)
        return fn
    return wrap
