"""Local models: a diffusers folder (the released DMM layout converted), or a single-file checkpoint."""
from __future__ import annotations

from pathlib import Path

from .. import console
from ..errors import ModelError
from ..files import state
from ..files.hashing import cached_sha256
from ..files.safetensors_header import read_header
from .config_rules import PREDICTION_TYPES
from .folders import PICKLE_SUFFIXES, check_pipeline_folder, reusable

WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


def usable_folder(folder: Path) -> Path:
    """`folder` itself, or its student-format conversion if it holds the released DMM checkpoint's layout."""
    from . import official

    if official.is_official(folder):
        console.say(f"fetch: {folder} is in the released DMM layout; converting it to a dmm student")
        folder = official.student_folder(folder)
    check_pipeline_folder(folder)
    return folder


def single_file_folder(path: Path, allow_pickle: bool, prediction_type: str | None = None) -> Path:
    """A diffusers folder converted (once, cached by content hash) from a single-file checkpoint; a foreign
    file's prediction type can be given (see single_file.py)."""
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelError(f"{path}: pickle checkpoints can run code when loaded; convert it to .safetensors or pass "
                         "--allow-pickle")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ModelError(f"{path}: not a model folder or a .safetensors checkpoint")
    from .single_file import convert_to_diffusers

    if path.suffix.lower() == ".safetensors":
        read_header(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ModelError(f"--prediction-type: {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
    suffix = f"-{prediction_type}" if prediction_type else ""
    folder = state.home() / "converted" / (cached_sha256(path)[:24] + suffix)
    if not reusable(folder, "the conversion"):  # a reusable one is checked already
        state.store("converted")
        console.say(f"fetch: converting single-file checkpoint {path} to diffusers layout")
        convert_to_diffusers(path, folder, prediction_type)
        check_pipeline_folder(folder)
    return folder
