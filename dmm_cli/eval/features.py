"""Feature spaces for FID: the standard Inception features, or one a plug-in registers (the toy zoo's
classifier). Features of a sample set are computed once and cached beside its pictures."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from .. import plugins
from ..errors import BadInput
from ..files import state
from ..files.atomic import atomic_file
from ..files.hashing import sha256_file
from ..generate.samples import SampleSet

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


@dataclass
class FeatureSpace:
    name: str
    key: str
    num_features: int
    extract: Callable[[list[Image.Image]], torch.Tensor]
    batch_size: int = 64


def inception_weights(path: str | None) -> Path:
    """The FID Inception weights file, which cannot be downloaded here: say exactly what to put where."""
    candidates = [Path(path)] if path else [
        state.home() / "weights" / INCEPTION_FILE,
        Path(os.environ.get("TORCH_HOME", "~/.cache/torch")).expanduser() / "hub" / "checkpoints" / INCEPTION_FILE,
    ]
    for c in candidates:
        if c.is_file():
            return c
    raise BadInput(f"--features inception: the FID Inception weights {INCEPTION_FILE} are not available offline; "
                   f"download {INCEPTION_URL} to {candidates[0]}")


def inception_space(path: str | None, device: torch.device) -> FeatureSpace:
    weights = inception_weights(path)
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError:
        raise BadInput("--features inception needs torch-fidelity: pip install torch-fidelity") from None
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=str(weights)).to(device).eval()

    @torch.inference_mode()
    def extract(images):
        arr = np.stack([np.asarray(i.convert("RGB").resize((299, 299), Image.BICUBIC)) for i in images])
        return net(torch.from_numpy(arr).permute(0, 3, 1, 2).to(device)).double().cpu()

    return FeatureSpace("inception", "inception-" + sha256_file(weights)[:12], 2048, extract, batch_size=32)


@dataclass(frozen=True)
class Registered:
    make: Callable[[torch.device], FeatureSpace]
    default_for: Callable[[list[str]], bool] | None  # `--features auto` picks it for these teacher references


FEATURE_SPACES: dict[str, Registered] = {}


def register_feature_space(name: str, make: Callable[[torch.device], FeatureSpace],
                           default_for: Callable[[list[str]], bool] | None = None) -> None:
    FEATURE_SPACES[name] = Registered(make, default_for)


def pixel_space() -> FeatureSpace:
    """Pictures shrunk to 16x16 and read as 768 numbers: needs no weights, so it works anywhere, but its
    FIDs say nothing comparable with published ones. For smoke tests and machines without Inception."""
    side = 16

    def extract(images):
        return torch.from_numpy(np.stack([np.asarray(i.convert("RGB").resize((side, side), Image.BICUBIC),
                                                     np.float64).reshape(-1) / 255 for i in images]))

    return FeatureSpace("pixels", f"pixels-{side}", 3 * side * side, extract)


register_feature_space("inception", lambda device: inception_space(None, device))
register_feature_space("pixels", lambda device: pixel_space())


def feature_space(choice: str, teacher_refs: list[str], device: torch.device) -> FeatureSpace:
    """The space `--features` names; `auto` is the first registered space made for these teachers, else Inception."""
    plugins.load()
    if choice == "auto":
        choice = next((name for name, r in FEATURE_SPACES.items() if r.default_for and r.default_for(teacher_refs)),
                      "inception")
    if choice in FEATURE_SPACES:
        return FEATURE_SPACES[choice].make(device)
    if Path(choice).is_file():
        return inception_space(choice, device)
    raise BadInput(f"--features: {choice!r} is not auto, {', '.join(FEATURE_SPACES)}, or an Inception weights file")


def features_of(samples: SampleSet, space: FeatureSpace) -> torch.Tensor:
    """(K, D) features of a sample set, cached beside its pictures."""
    path = samples.folder / f"features-{space.key}.safetensors"
    if path.is_file():
        return load_file(path)["features"]
    paths = samples.paths()
    chunks = [space.extract([Image.open(p) for p in paths[i:i + space.batch_size]])
              for i in range(0, len(paths), space.batch_size)]
    features = torch.cat(chunks).double()
    with atomic_file(path) as tmp:
        save_file({"features": features.contiguous()}, tmp)
    return features
