"""Turn a model reference into a local diffusers folder.

References: `toy:<name>` (the shipped toy zoo) or a local diffusers folder.
"""
from __future__ import annotations

from pathlib import Path

from . import toy
from .errors import ModelError
from .pipeline import pipeline_class

TOY_PREFIX = "toy:"


def resolve(ref: str) -> Path:
    """The local folder of a model reference, checked to be a complete SD-family pipeline folder."""
    if ref.startswith(TOY_PREFIX):
        name = ref[len(TOY_PREFIX):]
        names = toy.model_names()
        if name not in names:
            raise ModelError(f"{ref}: no such toy model (the toy zoo has {', '.join(names)})")
        folder = toy.ZOO / name
    else:
        folder = Path(ref).expanduser()
        if not folder.exists():
            raise ModelError(f"{ref}: no such model folder")
    pipeline_class(folder)
    return folder.resolve()
