"""Feature spaces for FID: the standard Inception features, or one a plug-in registers (the toy zoo's
classifier). Features of a sample set are computed once and cached beside its pictures."""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import console, plugins
from ..errors import BadInput, DMMError, NetworkError
from ..files import state
from ..files.atomic import atomic_file
from ..files.hashing import cached_sha256
from ..generate.samples import SampleSet

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


@dataclass
class FeatureSpace:
    name: str
    key: str
    num_features: int
    extract: Callable[[list[Image.Image]], torch.Tensor]
    batch_size: int = 64


def inception_weights(path: str | None) -> Path:
    """The FID Inception weights: the file given, else a copy already here whose sha256 is right, else downloaded
    once into $DMM_HOME/weights (never offline: then say exactly what to put where)."""
    from ..files.download import download_verified
    from ..models.hub import offline

    if path:
        return Path(path)
    target = state.home() / "weights" / INCEPTION_FILE
    torch_hub = Path(os.environ.get("TORCH_HOME", "~/.cache/torch")).expanduser() / "hub" / "checkpoints"
    for candidate in (target, torch_hub / INCEPTION_FILE):
        if candidate.is_file():
            if cached_sha256(candidate) == INCEPTION_SHA256:
                return candidate
            console.warn(f"{candidate}: not the FID Inception weights (wrong sha256); ignoring it")
    if offline():
        raise NetworkError(f"--features inception: the FID Inception weights {INCEPTION_FILE} are not here and "
                           f"HF_HUB_OFFLINE is set; download {INCEPTION_URL} to {target}")
    state.store("weights")
    return download_verified(INCEPTION_URL, target, INCEPTION_SHA256, "the FID Inception weights")


def inception_space(path: str | None, device: torch.device) -> FeatureSpace:
    """Features as torch-fidelity computes them (the TF FID reference): uint8 pictures at their own size,
    resized inside the network by its TF1-style bilinear resize, in float32."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception is torch-fidelity's)
    except (ImportError, RuntimeError) as e:  # RuntimeError: a torchvision built for another torch
        raise DMMError(f"--features inception needs torch-fidelity and a torchvision that matches torch ({e}): "
                       "pip install 'dmm-cli[inception]'") from None
    weights = inception_weights(path)
    # torchmetrics 1.8+ resizes with antialiasing by default, which torch-fidelity and TF FID do not
    reference_resize = {"antialias": False} if "antialias" in inspect.signature(NoTrainInceptionV3).parameters else {}
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], **reference_resize,
                             feature_extractor_weights_path=str(weights)).to(device).eval()

    @torch.inference_mode()
    def extract(images):
        pixels = [torch.from_numpy(np.array(i.convert("RGB"))).permute(2, 0, 1) for i in images]
        if len({p.shape for p in pixels}) > 1:  # pictures of several sizes: one at a time
            return torch.cat([net(p[None].to(device)) for p in pixels]).double().cpu()
        return net(torch.stack(pixels).to(device)).double().cpu()

    return FeatureSpace("inception", "inception-tf-" + cached_sha256(weights)[:12], 2048, extract, batch_size=32)


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
    paths = samples.paths()
    if path.is_file():
        try:
            cached = load_file(path)["features"]
            if len(cached) == len(paths):
                return cached
        except (SafetensorError, OSError, KeyError):
            pass
        console.warn(f"eval: the feature cache {path} does not read; computing the features again")
    chunks = [space.extract([Image.open(p) for p in paths[i:i + space.batch_size]])
              for i in range(0, len(paths), space.batch_size)]
    features = torch.cat(chunks).double()
    with atomic_file(path) as tmp:
        save_file({"features": features.contiguous()}, tmp)
    return features
