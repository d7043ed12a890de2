"""Extra measures a plug-in adds to a report row, beside FID (the toy zoo's style and colour accuracy).

A measure sees one evaluated model's sample sets (one per style for a student, else one) and the
recipe's teacher references, and returns named figures; `applies(teacher_refs)` says when it runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import plugins
from ..generate.samples import SampleSet


@dataclass(frozen=True)
class Measure:
    applies: Callable[[list[str]], bool]
    measure: Callable[[list[SampleSet], list[str]], dict]


MEASURES: dict[str, Measure] = {}


def register_measure(name: str, applies: Callable[[list[str]], bool],
                     measure: Callable[[list[SampleSet], list[str]], dict]) -> None:
    MEASURES[name] = Measure(applies, measure)


def measures_for(teacher_refs: list[str]) -> list[Measure]:
    plugins.load()
    return [m for m in MEASURES.values() if m.applies(teacher_refs)]
