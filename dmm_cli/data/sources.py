"""Captioned image folders, and named image sets that plug-ins register (the toy zoo's `toy:shapes`).

Folders follow the Hugging Face imagefolder convention: `metadata.jsonl` lines with `file_name` and
`text`, or an `image.txt` caption beside each `image.png`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .. import plugins
from ..errors import BadInput

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
IMAGE_SETS: dict[str, Callable[[], Path]] = {}


def register_image_set(name: str, folder: Callable[[], Path]) -> None:
    """`data.folder: NAME` in a recipe means the captioned folder `folder()` makes (or finds)."""
    IMAGE_SETS[name] = folder


def resolve_data(ref: str) -> Path:
    """The folder of `data.folder`: a registered image set's, or the local folder itself."""
    plugins.load()
    if ref in IMAGE_SETS:
        return IMAGE_SETS[ref]()
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        raise BadInput(f"data.folder {ref}: no such folder")
    return folder


def read_captioned_folder(folder: Path) -> list[tuple[Path, str]]:
    """(image path, caption) pairs, in a stable order."""
    meta = folder / "metadata.jsonl"
    items: list[tuple[Path, str]] = []
    if meta.is_file():
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                items.append((folder / row["file_name"], str(row["text"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise BadInput(f"{meta}: line {n} needs JSON with file_name and text") from None
        for path, _ in items:
            if not path.is_file():
                raise BadInput(f"{meta}: {path.name} is listed but missing")
    else:
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.with_suffix(".txt").is_file():
                items.append((path, path.with_suffix(".txt").read_text().strip()))
    if not items:
        raise BadInput(f"data folder {folder}: no captioned images (need metadata.jsonl or .txt captions "
                       "beside the images)")
    return items
