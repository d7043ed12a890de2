"""What a Stable Diffusion pipeline folder must hold, its weights' headers checked; it loads no ML library."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .. import console
from ..errors import ModelError
from ..files.safetensors_header import component_header
from ..files.text import read_json
from .config_rules import (check_entries, check_float_weights, check_matches_weights, check_part_classes,
                           check_tokenizer)

PIPELINE_CLASS_NAMES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
XL_PARTS = ("text_encoder_2", "tokenizer_2")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")  # weights that can run code when loaded


def parts_besides_unet(folder: Path) -> tuple[str, ...]:
    """The parts a model derived from `folder` (a student, a baked style) copies: all but the UNet and SD1.x's
    safety checker."""
    return REQUIRED_PARTS[1:] + tuple(part for part in XL_PARTS if (Path(folder) / part).is_dir())


def read_config(path: Path) -> dict:
    """A model's JSON config file, which must hold one object."""
    try:
        config = read_json(path)
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: a config must be a JSON object (got {type(config).__name__})")
    return config


def check_pipeline_folder(folder: Path) -> str:
    """The pipeline class a model folder declares, after checking it is a complete SD-family folder whose configs
    read and say what `config_rules` asks, and whose weights' headers are sound and agree with them."""
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such model folder")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        above = f"; it is the {folder.name}/ part of a model: give the folder above it" if (
            (folder / "config.json").is_file() and (folder.parent / "model_index.json").is_file()) else ""
        raise ModelError(f"{folder}: not a diffusers pipeline folder (no model_index.json){above}")
    index = read_config(index_file)
    name = index.get("_class_name")
    if name not in PIPELINE_CLASS_NAMES:
        raise ModelError(f"{index_file}: pipeline class {name!r} is not a Stable Diffusion family pipeline")
    check_part_classes(index_file, index)
    for part in REQUIRED_PARTS:
        if not (folder / part).is_dir():
            raise ModelError(f"{folder}: model folder has no {part}/")
    configs = {path.parent.name: (path, read_config(path))
               for path in sorted([*folder.glob("*/config.json"), *folder.glob("scheduler/scheduler_config.json")])}
    for path, config in configs.values():
        check_entries(path, config)
    for tokenizer, encoder in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        if (folder / tokenizer).is_dir():
            config_file = folder / tokenizer / "tokenizer_config.json"
            config = read_config(config_file) if config_file.is_file() else None
            check_tokenizer(folder / tokenizer, config, configs.get(encoder, (None, None))[1])
    for part in ("unet", "vae", "text_encoder", *XL_PARTS[:1]):
        if (folder / part).is_dir() and not any((folder / part).glob("*.safetensors")):
            pickles = any(f.suffix.lower() in PICKLE_SUFFIXES for f in (folder / part).iterdir())
            why = " (only pickle weights, which a model folder may not use: save it with safetensors)"
            raise ModelError(f"{folder / part}: no .safetensors weights{why if pickles else ''}")
    for part in sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob("*.safetensors"))):
        tensors = component_header(part)
        if part.name in configs:
            check_matches_weights(*configs[part.name], {k: v["shape"] for k, v in tensors.items()})
        check_float_weights(part, tensors)
    return name


def reusable(folder: Path, what: str) -> bool:
    """Whether a model dmm made earlier under $DMM_HOME (`what`: a conversion, a fused LoRA teacher) is there and
    whole. A damaged one is said and removed, so that the caller makes it again."""
    if not (folder / "model_index.json").is_file():
        return False
    try:
        check_pipeline_folder(folder)
        return True
    except ModelError as e:
        console.warn(f"{what} {folder} is damaged ({e}); making it again")
        shutil.rmtree(folder)
        return False


def check_text_to_image(folder: Path) -> None:
    """A model that draws from a prompt alone: its UNet takes just the latents its VAE makes. An inpainting model's
    UNet also takes a masked picture and its mask (9 channels against the VAE's 4)."""
    takes = read_config(folder / "unet" / "config.json").get("in_channels", 4)
    makes = read_config(folder / "vae" / "config.json").get("latent_channels", 4)
    if takes != makes:
        raise ModelError(f"{folder}: its UNet takes {takes} input channels and its VAE makes {makes}: an inpainting "
                         "or other picture-conditioned model, which dmm does not sample from a prompt alone or distill")


def is_open_clip(text_config: dict) -> bool:
    """SD2.x's text encoder is OpenCLIP's (GELU); SD1.x's is OpenAI CLIP (quick GELU)."""
    return text_config.get("hidden_act") == "gelu"


def model_family(folder: Path) -> str:
    """SDXL by its pipeline; SD2.x by its OpenCLIP text encoder, else SD1.x."""
    if read_json(folder / "model_index.json")["_class_name"] == "StableDiffusionXLPipeline":
        return "SDXL"
    return "SD2.x" if is_open_clip(read_json(folder / "text_encoder" / "config.json")) else "SD1.x"


def derived_model_index(source: Path, **changes) -> str:
    """model_index.json for a folder made from `source`: the same parts (with `changes`), no safety checker."""
    index = {**read_json(source / "model_index.json"), **changes}
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
