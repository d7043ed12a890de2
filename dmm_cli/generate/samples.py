"""Sample sets: pictures a model makes for a prompt list, generated in batches and cached on disk.

A set is keyed by the model's UNet sha256, the style vector, the prompts, the seed and the sampler
settings, so asking again (or from another command) regenerates nothing already there.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import console
from ..files import state
from ..files.atomic import atomic_file
from ..files.hashing import component_sha256
from ..files.images import save_png
from .sampling import generate


@dataclass(frozen=True)
class SamplerSettings:
    steps: int
    guidance: float
    seed: int
    scheduler: str | None = None
    width: int | None = None
    height: int | None = None
    negative: str | None = None


@dataclass
class SampleSet:
    folder: Path
    prompts: list[str]

    def paths(self) -> list[Path]:
        return [self.folder / f"{k:05d}.png" for k in range(len(self.prompts))]

    def images(self) -> list[Image.Image]:
        return [Image.open(p).convert("RGB") for p in self.paths()]


def sample_key(model: Path, style: torch.Tensor | None, prompts: list[str], settings: SamplerSettings) -> str:
    h = hashlib.sha256()
    h.update(component_sha256(model / "unet").encode())
    h.update(json.dumps(style.tolist() if style is not None else None).encode())
    h.update(json.dumps(prompts).encode())
    h.update(json.dumps(settings.__dict__, sort_keys=True).encode())
    return h.hexdigest()[:24]


def _whole(png: Path) -> bool:
    """Whether a cached picture is all there: a PNG ends with its IEND chunk (length, name, CRC)."""
    try:
        with open(png, "rb") as f:
            f.seek(-12, 2)
            return f.read(12)[4:8] == b"IEND"
    except OSError:
        return False


def sample_set(pipe_for, model: Path, style: torch.Tensor | None, prompts: list[str], settings: SamplerSettings,
               batch_size: int, label: str) -> SampleSet:
    """The cached set, completing whatever is missing; `pipe_for()` loads the pipeline only if needed."""
    folder = state.home() / "samples" / sample_key(model, style, prompts, settings)
    result = SampleSet(folder, prompts)
    done = folder / "done.json"
    missing = [k for k, p in enumerate(result.paths()) if not _whole(p)]
    if done.is_file():
        if not missing:
            return result
        damaged = f"{len(missing)} cached picture{'s are' if len(missing) > 1 else ' is'} damaged"
        console.warn(f"samples {label}: {damaged} in {folder}; making {'them' if len(missing) > 1 else 'it'} again")
        for stale in [done, *folder.glob("features-*.safetensors")]:
            stale.unlink()
    state.store(str(folder.relative_to(state.home())))
    if missing:
        pipe = pipe_for()
        pipe.set_progress_bar_config(disable=True)  # one bar per sample set is enough
        bar = tqdm(total=len(prompts), initial=len(prompts) - len(missing), desc=f"samples {label}",
                   disable=console.progress_disabled(), leave=False)
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            images = generate(pipe, [prompts[k] for k in chunk], steps=settings.steps, guidance=settings.guidance,
                              negative=settings.negative,
                              width=settings.width, height=settings.height, style=style, batch_size=len(chunk),
                              seeds=[settings.seed + k for k in chunk])
            for k, image in zip(chunk, images):
                save_png(image, result.paths()[k])
            bar.update(len(chunk))
        bar.close()
    with atomic_file(done) as tmp:
        record = {"prompts": prompts, "settings": settings.__dict__, "label": label}
        tmp.write_text(json.dumps(record), encoding="utf-8")
    return result
