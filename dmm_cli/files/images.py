"""Writing pictures: atomic PNG files, file names from prompts, and labelled grids."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from ..errors import BadInput
from .atomic import atomic_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # pictures dmm reads


def slug(text: str, limit: int = 48, fallback: str = "image") -> str:
    """A file name's worth of `text` in ASCII, which any locale can spell: accents dropped ("étoilée" is
    "etoilee"), anything else a dash; `fallback` where nothing is left ("夜")."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    s = re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")
    return s[:limit].rstrip("-") or fallback


def unique_slugs(texts: list[str], fallbacks: list[str] | None = None) -> list[str]:
    """`slug` of each text, with -2, -3, ... added where two would name one file ("Night" and "night")."""
    slugs = []
    for text, fallback in zip(texts, fallbacks or ["image"] * len(texts)):
        base = name = slug(text, fallback=fallback)
        copy = 1
        while name in slugs:
            copy += 1
            name = f"{base}-{copy}"
        slugs.append(name)
    return slugs


def save_png(image: Image.Image, path: Path) -> Path:
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def grid(images: list[Image.Image], labels: list[str] | None = None, columns: int | None = None,
         cell: int | None = None) -> Image.Image:
    """Tile pictures in rows of `columns`, each upscaled to `cell` pixels, with an optional label under each."""
    columns = columns or len(images)
    cell = cell or max(128, max(i.width for i in images))
    label_h = 14 if labels else 0
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, img in enumerate(images):
        x, y = (k % columns) * cell, (k // columns) * (cell + label_h)
        resample = Image.NEAREST if img.width * 2 <= cell else Image.LANCZOS
        sheet.paste(img.convert("RGB").resize((cell, cell), resample), (x, y))
        if labels:
            draw.text((x + 3, y + cell + 1), labels[k][: cell // 6], fill="black", font=font)
    return sheet


def grid_file(paths: list[Path], output: Path, labels: list[str] | None = None, columns: int | None = None,
              overwrite: bool = False) -> Path:
    """`dmm grid`: the pictures at `paths` tiled into the PNG `output`, which replaces a file only with
    `overwrite`."""
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise BadInput(f"--output {output}: a grid is a PNG file; name it .png")
    if output.exists() and not overwrite:
        raise BadInput(f"--output {output}: already exists; pass --overwrite to replace it")
    if labels is not None and len(labels) != len(paths):
        raise BadInput(f"--labels: {len(labels)} labels for {len(paths)} pictures")
    if columns is not None and columns < 1:
        raise BadInput(f"--columns must be at least 1 (got {columns})")
    pictures = []
    for path in paths:
        try:
            with Image.open(path) as picture:
                pictures.append(picture.convert("RGB"))
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
            raise BadInput(f"{path}: not a readable picture") from None
    return save_png(grid(pictures, labels, columns), output)
