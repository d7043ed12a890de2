"""The styles of a DMM student: its styles.json table, and the style vectors `--style` asks for.

An index, a name, `all`, or a mix `a:0.7,b:0.3` becomes one-hot or blended vectors; plain torch, so
reading a student's styles loads no model library.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BadInput, ModelError
from ..files.images import unique_slugs
from ..files.safetensors_header import component_shapes

STYLES_FILE = "styles.json"


@dataclass
class Style:
    name: str
    teacher: str = ""
    sha256: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class StyleTable:
    """The contents of a student's styles.json: style names, and where each style came from."""

    styles: list[Style]
    lineage: list[dict] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.styles]

    @property
    def synthesis_prompt_digests(self) -> set[str]:
        """Digests of every prompt whose teacher pictures this student (or an earlier stage) trained on."""
        return {d for entry in self.lineage for d in entry.get("synthesis", {}).get("prompts_sha256", [])}

    def to_json(self) -> str:
        return json.dumps({
            "format": "dmm-styles/1",
            "styles": [{"index": i, "name": s.name, "teacher": s.teacher, "sha256": s.sha256, **s.extra}
                       for i, s in enumerate(self.styles)],
            "lineage": self.lineage,
        }, indent=2) + "\n"

    @classmethod
    def read(cls, folder: Path) -> "StyleTable | None":
        path = Path(folder) / STYLES_FILE
        if not path.is_file():
            return None
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ModelError(f"{path}: not a valid styles table (not UTF-8 text)") from None
        table = cls.from_json(text, path)
        unet = Path(folder) / "unet"
        if unet.is_dir() and any(unet.glob("*.safetensors")):  # the style MLP's input width, from the header alone
            takes = component_shapes(unet).get("class_embedding.linear_1.weight", [0, len(table.names)])[1]
            if takes != len(table.names):
                raise ModelError(f"{path}: lists {len(table.names)} styles but the UNet takes {takes}")
        return table

    @classmethod
    def from_json(cls, text: str, where) -> "StyleTable":
        """A table from its JSON text (a styles.json, or a single file's dmm.styles metadata at `where`)."""
        try:
            data = json.loads(text)
            styles = [Style(s["name"], s.get("teacher", ""), s.get("sha256", ""),
                            {k: v for k, v in s.items() if k not in ("index", "name", "teacher", "sha256")})
                      for s in sorted(data["styles"], key=lambda s: s["index"])]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{where}: not a valid styles table ({e})") from None
        return cls(styles, data.get("lineage", []))


def one_hot(index: int, n: int) -> torch.Tensor:
    v = torch.zeros(n)
    v[index] = 1.0
    return v


def mix(weights: dict[int, float], n: int) -> torch.Tensor:
    """A style vector that blends styles by weight, normalised to sum to 1."""
    v = torch.zeros(n)
    for i, w in weights.items():
        v[i] += w
    total = v.sum()
    if total <= 0:
        raise BadInput("--style: the mix weights must add up to more than 0")
    return v / total


def _index(token: str, names: list[str]) -> int:
    token = token.strip()
    if re.fullmatch(r"\d+", token):
        i = int(token)
        if i >= len(names):
            raise BadInput(f"--style: style index {i} is out of range (this model has {len(names)} styles: "
                           f"0..{len(names) - 1})")
        return i
    if token in names:
        return names.index(token)
    raise BadInput(f"--style: unknown style {token!r} (this model's styles: {', '.join(names)})")


def style_slugs(labels: list[str], names: list[str]) -> list[str]:
    """File-name parts for `parse_style`'s labels: a style whose name leaves no ASCII is `style-INDEX`."""
    return unique_slugs(labels, [f"style-{names.index(x)}" if x in names else "mix" for x in labels])


def parse_style(spec: str, names: list[str]) -> list[tuple[str, torch.Tensor]]:
    """Labelled style vectors for a --style spec: an index, a name, `all`, or a mix `a:0.7,b:0.3`."""
    n = len(names)
    spec = spec.strip()
    if spec == "all":
        return [(name, one_hot(i, n)) for i, name in enumerate(names)]
    if ":" in spec:
        weights: dict[int, float] = {}
        for part in spec.split(","):
            key, _, value = part.partition(":")
            try:
                weight = float(value)
            except ValueError:
                raise BadInput(f"--style: mix weight {value!r} for {key!r} is not a number") from None
            if not (math.isfinite(weight) and weight >= 0):
                raise BadInput(f"--style: mix weight for {key!r} must be 0 or more, and finite (got {weight})")
            i = _index(key, names)
            weights[i] = weights.get(i, 0.0) + weight
        label = "+".join(f"{names[i]}{w:g}" for i, w in weights.items())
        return [(label, mix(weights, n))]
    i = _index(spec, names)
    return [(names[i], one_hot(i, n))]
