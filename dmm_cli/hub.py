"""Turn a model reference into a local diffusers folder, fetching from the Hugging Face Hub when needed.

References: `toy:<name>`, a local diffusers folder, a local single-file `.safetensors`, a Hub repo
`org/name` or `org/name@revision`, or a single file inside a repo `org/name/sub/file.safetensors`.
Only what an SD pipeline needs is downloaded, safetensors first; LFS files are checked against the
Hub's sha256; nothing from a repo is executed; pickle weights are refused unless allowed.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from . import console, state, toy
from .checkpoint import sha256_file
from .errors import ModelError
from .folders import check_pipeline_folder

TOY_PREFIX = "toy:"
HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<rev>[\w.-]+))?(?:/(?P<path>.+))?$")
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


@dataclass
class Fetched:
    ref: str
    folder: str
    source: str  # toy | local | hub | single-file
    repo: str | None = None
    revision: str | None = None
    commit: str | None = None


def resolve(ref: str, *, allow_pickle: bool = False, variant: str | None = None, store: Path | None = None) -> Path:
    """The local folder of a model reference, checked to be a complete SD-family pipeline folder."""
    return Path(fetch(ref, allow_pickle=allow_pickle, variant=variant, store=store).folder)


def fetch(ref: str, *, allow_pickle: bool = False, variant: str | None = None, store: Path | None = None) -> Fetched:
    if ref.startswith(TOY_PREFIX):
        name = ref[len(TOY_PREFIX):]
        names = toy.model_names()
        if name not in names:
            raise ModelError(f"{ref}: no such toy model (the toy zoo has {', '.join(names)})")
        folder = toy.ZOO / name
        check_pipeline_folder(folder)
        return Fetched(ref, str(folder.resolve()), "toy")
    local = Path(ref).expanduser()
    if local.is_dir():
        folder = usable_folder(local)
        return Fetched(ref, str(folder.resolve()), "local")
    if local.is_file():
        return Fetched(ref, str(single_file_folder(local, allow_pickle)), "single-file")
    match = HUB_REF.match(ref)
    if match is None or ref.startswith((".", "/", "~")):
        raise ModelError(f"{ref}: no such model folder or file, and not a Hub reference (org/name[@revision])")
    from . import hub_download

    return hub_download.fetch_hub(ref, match["repo"], match["rev"], match["path"], allow_pickle=allow_pickle,
                                  variant=variant, store=store)


def usable_folder(folder: Path) -> Path:
    """`folder` itself, or its student-format conversion if it holds the released DMM checkpoint's layout."""
    from . import dmm_official

    if dmm_official.is_official(folder):
        console.say(f"fetch: {folder} is in the released DMM layout; converting it to a dmm student")
        folder = dmm_official.student_folder(folder)
    check_pipeline_folder(folder)
    return folder


def single_file_folder(path: Path, allow_pickle: bool) -> Path:
    """A diffusers folder converted (once, cached by content hash) from a single-file checkpoint."""
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelError(f"{path}: pickle checkpoints can run code when loaded; convert it to .safetensors or pass "
                         "--allow-pickle")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ModelError(f"{path}: not a model folder or a .safetensors checkpoint")
    from .single_file import convert_to_diffusers

    folder = state.home() / "converted" / sha256_file(path)[:24]
    if not (folder / "model_index.json").is_file():
        console.say(f"fetch: converting single-file checkpoint {path} to diffusers layout")
        convert_to_diffusers(path, folder)
    check_pipeline_folder(folder)
    return folder


def record(fetched: Fetched) -> None:
    """Remember where each reference came from (resolved commit included) in $DMM_HOME/fetched.json."""
    known = state.read_record("fetched.json")
    known[fetched.ref] = asdict(fetched)
    state.write_record("fetched.json", known)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")

