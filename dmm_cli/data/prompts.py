"""Prompt lists for evaluation and for synthesized training data: a file, a plug-in's own set for its
models, or the shipped ones. A student is never trained on pictures of the prompts it is evaluated on:
the default lists for the two purposes share no prompt, distill refuses synthesis prompts that are eval
prompts, and eval refuses prompts a student's synthesized data used (it records their digests)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from .. import plugins
from ..errors import BadInput

PURPOSES = ("eval", "synthesis")
SHIPPED = {"eval": Path(__file__).parent / "coco_prompts.txt",  # COCO-style captions
           "synthesis": Path(__file__).parent / "synthesis_prompts.txt"}  # 80 subjects x 12 renderings, 600 of them
PROMPT_SETS: list[tuple[str, Callable[[list[str]], bool], Callable[[], list[str]]]] = []


def register_prompts(purpose: str, applies: Callable[[list[str]], bool], prompts: Callable[[], list[str]]) -> None:
    """`prompts()` is the default `purpose` prompt list for teachers whose references satisfy `applies`."""
    PROMPT_SETS.append((purpose, applies, prompts))


def read_prompts(path: Path | None, teacher_refs: list[str], purpose: str = "eval",
                 where: str = "--prompts") -> list[str]:
    """The prompts in `path`, one per line; without one, the default `purpose` list for these teachers. `where`:
    what the user set `path` with, for errors."""
    if path is None:
        plugins.load()
        for kind, applies, prompts in PROMPT_SETS:
            if kind == purpose and applies(teacher_refs):
                return prompts()
        path = SHIPPED[purpose]
    path = Path(path)
    if path.is_dir() or not path.exists():  # a pipe (`--prompts <(grep cat all.txt)`) reads too
        raise BadInput(f"{where} {path}: {'a folder, not a file' if path.is_dir() else 'no such file'}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise BadInput(f"{where} {path}: not UTF-8 text") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise BadInput(f"{where} {path}: no prompts in the file")
    return prompts


def prompt_digest(prompt: str) -> str:
    """The same for prompts that differ only in case or spacing."""
    return hashlib.sha256(" ".join(prompt.casefold().split()).encode()).hexdigest()[:16]


def shared_prompts(prompts: list[str], digests: set[str]) -> list[str]:
    """The prompts whose digest is in `digests`, in order."""
    return [p for p in prompts if prompt_digest(p) in digests]
