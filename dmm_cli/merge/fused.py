"""Elementwise merge steps compiled into one pass over memory each (torch.compile), where a tensor is large
enough to pay for it.

Run eagerly, every operation of a merge formula reads and writes whole tensors: TIES is a dozen such passes
per teacher. Compiled, the same Python function runs as one loop. Where compiling fails (no C++ compiler,
say), the function runs eagerly: the same numbers, more slowly, after one warning."""
from __future__ import annotations

import functools

import torch

from .. import console

COMPILE_FROM = 1 << 18  # entries; below this the compiled call's fixed cost outweighs what it saves


@functools.cache
def _compiled(fn):
    # One compile worker: a pool of processes gains nothing on a few small kernels and outlives Ctrl-C badly.
    return torch._inductor.config.patch(compile_threads=1)(torch.compile(fn, dynamic=True))


_failed = False  # set once compiling has failed in this process: from then on, eager only


def compiles(numel: int) -> bool:
    """Whether run() compiles for `numel` entries: they are enough, and compiling has not failed here."""
    return numel >= COMPILE_FROM and not _failed


def run(fn, numel: int, *args):
    """fn(*args), compiled when `numel`, the entries it works on, is large enough and compiling works here."""
    global _failed
    if not compiles(numel):
        return fn(*args)
    try:
        return _compiled(fn)(*args)
    except Exception as e:  # noqa: BLE001  compiling failed; a real error in fn raises again just below
        _failed = True
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        console.warn(f"torch.compile does not work here ({reason}); merging without it, which is slower")
        return fn(*args)
