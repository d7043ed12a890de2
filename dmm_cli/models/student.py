"""The style-promptable student: a stock diffusers UNet whose class embedding is an MLP of the style vector.

`class_embed_type="projection"` maps an N-dim style vector through Linear → SiLU → Linear to the
timestep-embedding width and adds it to the timestep embedding, which is what the paper's style
embedding + MLP computes. Zeroing the last Linear makes the untrained student the base model exactly.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ..errors import BadInput, ModelError

STYLES_FILE = "styles.json"


def make_student(base: UNet2DConditionModel, num_styles: int, seed: int = 0) -> UNet2DConditionModel:
    """A copy of `base` that also takes an N-dim style vector as `class_labels`; the same seed, the same student."""
    if base.config.class_embed_type is not None:
        raise ModelError(f"the base UNet already has a class embedding ({base.config.class_embed_type!r})")
    config = {k: v for k, v in base.config.items() if not k.startswith("_")}
    config.update(class_embed_type="projection", projection_class_embeddings_input_dim=num_styles)
    student = UNet2DConditionModel.from_config(config).to(base.dtype)
    missing, unexpected = student.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("class_embedding.") for k in missing), (missing, unexpected)
    first, last = student.class_embedding.linear_1, student.class_embedding.linear_2
    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(first.in_features)  # nn.Linear's own default range, drawn from our generator
    with torch.no_grad():
        first.weight.copy_(torch.rand(first.weight.shape, generator=g, device="cpu") * 2 * bound - bound)
        first.bias.copy_(torch.rand(first.bias.shape, generator=g, device="cpu") * 2 * bound - bound)
        last.weight.zero_()
        last.bias.zero_()
    return student


def grow_student(student: UNet2DConditionModel, total: int, init: str, seed: int = 0) -> UNet2DConditionModel:
    """The same student with `total` style inputs: old columns kept, new ones `mean` of the old, `zero`, or
    `random` (nn.Linear's range). Everything else, the rest of the style MLP included, is copied."""
    old = num_styles(student)
    config = {k: v for k, v in student.config.items() if not k.startswith("_")}
    config["projection_class_embeddings_input_dim"] = total
    grown = UNet2DConditionModel.from_config(config).to(student.dtype)
    weights = dict(student.state_dict())
    w = weights["class_embedding.linear_1.weight"]
    if init == "mean":
        new = w.mean(1, keepdim=True).expand(-1, total - old)
    elif init == "zero":
        new = torch.zeros(w.shape[0], total - old, dtype=w.dtype)
    else:
        bound = 1 / math.sqrt(total)
        g = torch.Generator().manual_seed(seed)
        new = (torch.rand(w.shape[0], total - old, generator=g, device="cpu") * 2 * bound - bound).to(w.dtype)
    weights["class_embedding.linear_1.weight"] = torch.cat([w, new.to(w.device)], 1)
    grown.load_state_dict(weights)
    return grown


def num_styles(unet: UNet2DConditionModel) -> int:
    """How many styles a UNet takes (0 for a plain, style-less UNet)."""
    if unet.config.class_embed_type != "projection":
        return 0
    return int(unet.config.projection_class_embeddings_input_dim)


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
            data = json.loads(path.read_text())
            styles = [Style(s["name"], s.get("teacher", ""), s.get("sha256", ""),
                            {k: v for k, v in s.items() if k not in ("index", "name", "teacher", "sha256")})
                      for s in sorted(data["styles"], key=lambda s: s["index"])]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelError(f"{path}: not a valid styles file ({e})") from None
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


class FeatureTaps:
    """Forward hooks that keep the output of every down block, the mid block and every up block.

    Works on a stock (or compiled) diffusers UNet; `features` holds the latest call's outputs in order.
    """

    def __init__(self, unet: UNet2DConditionModel):
        self.features: dict[str, torch.Tensor] = {}
        blocks = [(f"down{i}", b) for i, b in enumerate(unet.down_blocks)]
        blocks.append(("mid", unet.mid_block))
        blocks += [(f"up{i}", b) for i, b in enumerate(unet.up_blocks)]
        self._handles = [block.register_forward_hook(self._keep(name)) for name, block in blocks]

    def _keep(self, name: str):
        def hook(module, args, output):
            self.features[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        features, self.features = self.features, {}
        return features

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
