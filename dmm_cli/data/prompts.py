"""Prompt lists for evaluation and synthesized data: a file, a plug-in's own set for its models, or the
shipped COCO-style captions."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .. import plugins
from ..errors import BadInput

COCO_PROMPTS = Path(__file__).parent / "coco_prompts.txt"
PROMPT_SETS: list[tuple[Callable[[list[str]], bool], Callable[[], list[str]]]] = []


def register_prompts(applies: Callable[[list[str]], bool], prompts: Callable[[], list[str]]) -> None:
    """`prompts()` is the default prompt list for teachers whose references satisfy `applies`."""
    PROMPT_SETS.append((applies, prompts))


def read_prompts(path: Path | None, teacher_refs: list[str]) -> list[str]:
    """The prompts in `path`, one per line; without one, the default for these teachers."""
    if path is None:
        plugins.load()
        for applies, prompts in PROMPT_SETS:
            if applies(teacher_refs):
                return prompts()
        path = COCO_PROMPTS
    if not Path(path).is_file():
        raise BadInput(f"--prompts {path}: no such file")
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise BadInput(f"--prompts {path}: no prompts in the file")
    return prompts
