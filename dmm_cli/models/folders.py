"""What a Stable Diffusion pipeline folder must hold; plain JSON and paths, so it loads no ML library."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelError

PIPELINE_CLASS_NAMES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


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
    return name


def derived_model_index(source: Path, **changes) -> str:
    """model_index.json for a folder made from `source`: the same parts (with `changes`), no safety checker."""
    index = {**json.loads((source / "model_index.json").read_text()), **changes}
    for optional in ("safety_checker", "feature_extractor", "image_encoder"):
        if optional in index:
            index[optional] = [None, None]
    if "requires_safety_checker" in index:
        index["requires_safety_checker"] = False
    return json.dumps(index, indent=2) + "\n"
