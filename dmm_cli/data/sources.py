"""Captioned pictures: folders, parquet shards, and named image sets that plug-ins register (the toy
zoo's `toy:shapes`), each read as a stream of (picture, caption) pairs.

Folders follow the Hugging Face imagefolder convention: `metadata.jsonl` lines with `file_name` and
`text`, or an `image.txt` caption beside each `image.png`. Parquet shards (how most Hub datasets are
stored) hold an image column (the `datasets` Image struct, raw bytes, or a path in the repo) and a
caption column; they are read a batch of rows at a time, so a large set never sits in memory whole.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image, ImageOps, UnidentifiedImageError

from .. import plugins
from ..errors import BadInput
from ..files.hashing import cached_sha256
from ..files.images import IMAGE_SUFFIXES
from ..models.folders import model_root

IMAGE_SETS: dict[str, Callable[[], Path]] = {}


def register_image_set(name: str, folder: Callable[[], Path]) -> None:
    """`data.folder: NAME` in a recipe means the captioned folder `folder()` makes (or finds)."""
    IMAGE_SETS[name] = folder


def resolve_data(ref: str) -> Path:
    """The folder of `data.folder`: a registered image set's, a Hub dataset's (downloaded), or the local folder."""
    from .hub_datasets import fetch_dataset, is_dataset_ref

    plugins.load()
    if ref in IMAGE_SETS:
        return IMAGE_SETS[ref]()
    if is_dataset_ref(ref):
        return fetch_dataset(ref)
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        raise BadInput(f"data.folder {ref}: no such folder")
    return folder


def read_captioned_folder(folder: Path) -> list[tuple[Path, str]]:
    """(image path, caption) pairs, in a stable order."""
    meta = folder / "metadata.jsonl"
    items: list[tuple[Path, str]] = []
    if meta.is_file():
        for n, line in enumerate(_text(meta).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row["file_name"], row["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise BadInput(f"{meta}: line {n} needs JSON with file_name and text") from None
            if not isinstance(text, str):
                raise BadInput(f"{meta}: line {n}: text must be a string (got {text!r:.40})")
            path = inside(folder, name, f"{meta}: line {n}")
            if not path.is_file():
                raise BadInput(f"{meta}: line {n}: {name} is listed but is not a file in the folder")
            items.append((path, text))
    else:
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.with_suffix(".txt").is_file():
                items.append((inside(folder, path.relative_to(folder).as_posix(), f"data folder {folder}"),
                              _text(path.with_suffix(".txt")).strip()))
    if not items:
        raise BadInput(f"data folder {folder}: no captioned images (need metadata.jsonl or .txt captions "
                       "beside the images)")
    return items


def inside(folder: Path, name: object, where: str) -> Path:
    """`folder / name` for a picture a listing names, refused unless it is inside the data folder: no absolute
    path, `..` or link leading out of it (a Hub snapshot's links into its own blobs are inside)."""
    if not isinstance(name, str) or not name:
        raise BadInput(f"{where}: a picture's path must be a non-empty string (got {name!r:.40})")
    path = folder / name
    if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(model_root(folder))):
        raise BadInput(f"{where}: {name} leads outside the data folder {folder}; dmm reads pictures only inside it")
    return path


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not UTF-8 text") from None


def _decoded(data: bytes | None = None, path: Path | None = None) -> Image.Image | None:
    """An 8-bit RGB picture the right way up (its EXIF orientation applied), or None when it does not decode."""
    try:
        with warnings.catch_warnings():
            # PIL warns, as a raw Python warning, of pictures past 89 megapixels, and refuses those past twice that
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data) if data is not None else path) as image:
                return _eight_bit(ImageOps.exif_transpose(image)).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


def _eight_bit(image: Image.Image) -> Image.Image:
    """Greys of more than 8 bits scaled to 8: PIL's own conversion clips them (a mid-grey 16-bit PNG turns white).
    Integer greys are taken as 16-bit; float greys as 0..1 when they stay within it, else as 0..255."""
    if image.mode.startswith("I"):
        return image.convert("I").point(lambda v: v / 257).convert("L")
    if image.mode == "F":
        scale = 255 if image.getextrema()[1] <= 1 else 1
        return image.point(lambda v: v * scale).convert("L")
    return image


class CaptionedImages:
    """Captioned pictures read as a stream: (picture or None when it does not decode, caption), in a stable
    order. `fingerprint()` changes whenever the pictures or captions do; caches are keyed by it."""

    description: str

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[Image.Image | None, str]]:
        raise NotImplementedError

    def name_of(self, index: int) -> str:
        """Where the stream's picture number `index` comes from, for a message."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def size_bytes(self) -> int:
        raise NotImplementedError


class FolderImages(CaptionedImages):
    def __init__(self, items: list[tuple[Path, str]], description: str):
        self.items, self.description = items, description

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        for path, caption in self.items:
            yield _decoded(path=path), caption

    def name_of(self, index: int) -> str:
        return str(self.items[index][0])

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for path, text in self.items:
            st = path.stat()
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}:{text}\n".encode())
        return h.hexdigest()

    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path, _ in self.items)


class ParquetImages(CaptionedImages):
    def __init__(self, folder: Path, shards: list[Path], image_column: str, caption_column: str):
        import pyarrow.parquet as pq

        self.folder, self.shards, self.columns = folder, shards, (image_column, caption_column)
        self.description = f"data {folder}"
        self.shard_rows = []
        for shard in shards:
            try:
                meta = pq.ParquetFile(shard).metadata
            except Exception as e:  # pyarrow raises several kinds for a file that is not parquet
                raise BadInput(f"{shard}: not a readable parquet file ({e.__class__.__name__})") from None
            names = meta.schema.to_arrow_schema().names
            for column, field in ((image_column, "image_column"), (caption_column, "caption_column")):
                if column not in names:
                    raise BadInput(f"{shard}: no column {column!r} for data.{field} (its columns: "
                                   f"{', '.join(names)})")
            self.shard_rows.append(meta.num_rows)

    def __len__(self) -> int:
        return sum(self.shard_rows)

    def name_of(self, index: int) -> str:
        for shard, rows in zip(self.shards, self.shard_rows):
            if index < rows:
                return f"{shard} row {index}"
            index -= rows
        raise IndexError(index)

    def __iter__(self):
        import pyarrow.parquet as pq

        for shard in self.shards:
            for batch in pq.ParquetFile(shard).iter_batches(batch_size=64, columns=list(self.columns)):
                images, captions = batch.column(self.columns[0]).to_pylist(), batch.column(self.columns[1])
                for image, caption in zip(images, captions.to_pylist()):
                    yield self._picture(image), "" if caption is None else str(caption)

    def _picture(self, cell) -> Image.Image | None:
        if isinstance(cell, dict):  # the datasets library's Image feature: {"bytes": ..., "path": ...}
            data, path = cell.get("bytes"), cell.get("path")
            return _decoded(data=data) if data else (self._file(path) if path else None)
        if isinstance(cell, (bytes, bytearray)):
            return _decoded(data=bytes(cell))
        return self._file(cell) if isinstance(cell, str) else None

    def _file(self, name: str) -> Image.Image | None:
        return _decoded(path=inside(self.folder, name, f"data {self.folder}: image column {self.columns[0]!r}"))

    def fingerprint(self) -> str:
        key = [cached_sha256(s) for s in self.shards] + list(self.columns)
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()

    def size_bytes(self) -> int:
        return sum(s.stat().st_size for s in self.shards)


def open_images(folder: Path, image_column: str = "image", caption_column: str = "text") -> CaptionedImages:
    """The captioned pictures of a folder: its parquet shards if it has any, else an imagefolder."""
    shards = sorted(folder.rglob("*.parquet"))
    if shards:
        return ParquetImages(folder, shards, image_column, caption_column)
    return FolderImages(read_captioned_folder(folder), f"data {folder}")
