"""What a Stable Diffusion pipeline folder must hold, its weights' headers checked; it loads no ML library."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import ModelError
from ..files.safetensors_header import check_component

PIPELINE_CLASS_NAMES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
XL_PARTS = ("text_encoder_2", "tokenizer_2")


def parts_besides_unet(folder: Path) -> tuple[str, ...]:
    """The parts a model derived from `folder` (a student, a baked style) copies: all but the UNet and SD1.x's
    safety checker."""
    return REQUIRED_PARTS[1:] + tuple(part for part in XL_PARTS if (Path(folder) / part).is_dir())


def check_pipeline_folder(folder: Path) -> str:
    """The pipeline class a model folder declares, after checking it is a complete SD-family folder."""
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such model folder")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{index_file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    name = index.get("_class_name")
    if name not in PIPELINE_CLASS_NAMES:
        raise ModelError(f"{index_file}: pipeline class {name!r} is not a Stable Diffusion family pipeline")
    for part in REQUIRED_PARTS:
        if not (folder / part).is_dir():
            raise ModelError(f"{folder}: model folder has no {part}/")
    for part in sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob("*.safetensors"))):
        check_component(part)
    return name


def is_open_clip(text_config: dict) -> bool:
    """SD2.x's text encoder is OpenCLIP's (GELU); SD1.x's is OpenAI CLIP (quick GELU)."""
    return text_config.get("hidden_act") == "gelu"


def model_family(folder: Path) -> str:
    """SDXL by its pipeline; SD2.x by its OpenCLIP text encoder, else SD1.x."""
    if json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline":
        return "SDXL"
    return "SD2.x" if is_open_clip(json.loads((folder / "text_encoder" / "config.json").read_text())) else "SD1.x"


def derived_model_index(source: Path, **changes) -> str:
    """model_index.json for a folder made from `source`: the same parts (with `changes`), no safety checker."""
    index = {**json.loads((source / "model_index.json").read_text()), **changes}
    for optional in ("safety_checker", "feature_extractor", "image_encoder"):
        if optional in index:
            index[optional] = [None, None]
    if "requires_safety_checker" in index:
        index["requires_safety_checker"] = False
    return json.dumps(index, indent=2) + "\n"


STORES: list[Path] = []  # trees whose models link to each other (a plug-in's store, like the toy zoo)


def register_store(root: Path) -> None:
    STORES.append(Path(root).absolute())


def model_root(folder: Path) -> Path:
    """The tree a model's symlinks may point into: its Hub cache repo for a cache snapshot (whose files link
    to ../../blobs), a registered store, else the model folder itself."""
    folder = Path(folder).absolute()
    if folder.parent.name == "snapshots":
        return folder.parent.parent
    return next((root for root in STORES if folder.is_relative_to(root)), folder)


def _followed(source: Path, root: Path) -> Path:
    """Where `source` really is; a link out of `root` is refused."""
    real = Path(os.path.realpath(source))
    if source.is_symlink() and not real.is_relative_to(os.path.realpath(root)):
        raise ModelError(f"{source}: links to {real}, outside the model; dmm does not follow links out of a model")
    return real


def check_links(source: Path, root: Path) -> None:
    """Refuse, before any work, a model part with a link out of `root` (what copy_part would refuse)."""
    if _followed(Path(source), root).is_dir():
        for entry in sorted(Path(source).iterdir()):
            check_links(entry, root)


def copy_part(source: Path, target: Path, root: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy a model's folder (or file) `source` to `target` as regular files, following only links that stay
    inside `root`: a link out of the model is refused, never copied into an output. Names ending in `skip`
    are left out."""
    source = Path(source)
    if skip and source.name.endswith(skip):
        return
    real = _followed(source, root)
    if real.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for entry in sorted(source.iterdir()):
            copy_part(entry, target / entry.name, root, skip)
    elif real.is_file():
        shutil.copyfile(real, target)
