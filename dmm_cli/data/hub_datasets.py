"""Captioned image sets from Hugging Face dataset repos (`datasets/ORG/NAME[@revision]`), fetched like models:
pinned to a commit, every LFS file checked against the Hub's sha256, cached by huggingface_hub, offline
from the cache (verified once). Only data files are fetched: parquet shards, or an imagefolder's
pictures with their metadata.jsonl or .txt captions."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput
from ..models.hub import fetch_files, hub_error, offline
from ..files.images import IMAGE_SUFFIXES

DATASET_REF = re.compile(r"^datasets/(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<rev>[\w.-]+))?$")
DATA_SUFFIXES = (".parquet", ".jsonl", ".txt", *IMAGE_SUFFIXES)


def is_dataset_ref(ref: str) -> bool:
    return DATASET_REF.match(ref) is not None


@dataclass
class Listing:
    """What a dataset repo holds, before downloading it: for the dry run."""

    files: list[str]
    bytes: int
    images: int | None  # picture files, for an imagefolder; None for parquet, whose rows are counted on download


def _data_files(names) -> list[str]:
    return sorted(n for n in names if n.lower().endswith(DATA_SUFFIXES) and not n.startswith(".")
                  and Path(n).name.lower() != "readme.md")


def list_dataset(ref: str) -> Listing:
    """The dataset's data files and their size, from the Hub's file list (nothing is downloaded)."""
    from huggingface_hub import HfApi

    match = DATASET_REF.match(ref)
    if offline():
        folder = fetch_dataset(ref)
        files = _data_files(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        return Listing(files, sum((folder / f).stat().st_size for f in files), _image_count(files))
    try:
        info = HfApi().dataset_info(match["repo"], revision=match["rev"], files_metadata=True)
    except Exception as e:  # every huggingface_hub failure becomes one sentence
        raise hub_error(ref, e) from e
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    files = _data_files(sizes)
    if not files:
        raise BadInput(f"{ref}: the dataset repo holds no parquet shards or captioned pictures")
    return Listing(files, sum(sizes[f] for f in files), _image_count(files))


def _image_count(files: list[str]) -> int | None:
    return None if any(f.endswith(".parquet") for f in files) else sum(f.lower().endswith(IMAGE_SUFFIXES)
                                                                       for f in files)


def fetch_dataset(ref: str) -> Path:
    """The local folder of a dataset repo's data files (downloaded if missing, each one verified)."""
    match = DATASET_REF.match(ref)
    return fetch_files(ref, match["repo"], match["rev"], _data_files, [f"*{s}" for s in DATA_SUFFIXES],
                       "the dataset repo holds no parquet shards or captioned pictures", repo_type="dataset")
