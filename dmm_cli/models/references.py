"""Turn a model reference into a local diffusers folder, fetching from the Hugging Face Hub when needed.

References: a local diffusers folder, a local single-file `.safetensors`, a Hub repo `org/name` or
`org/name@revision`, a single file inside a repo `org/name/sub/file.safetensors`, or `SCHEME:NAME`
for a scheme a plug-in registered (the toy zoo's `toy:<name>`). Only what an SD pipeline needs is
downloaded, safetensors first; LFS files are checked against the Hub's sha256; nothing from a repo
is executed; pickle weights are refused unless allowed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import plugins
from ..errors import ModelError
from .folders import check_pipeline_folder, register_store
from .hub import Fetched, fetch_hub
from .local import single_file_folder, usable_folder

HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<rev>[\w.-]+))?(?:/(?P<path>.+))?$")


@dataclass(frozen=True)
class Scheme:
    """Models named `prefix:NAME`: `folder(NAME)` gives the model's folder (or raises ModelError naming it)."""

    folder: Callable[[str], Path]
    names: Callable[[], list[str]]


SCHEMES: dict[str, Scheme] = {}


def register_scheme(prefix: str, folder: Callable[[str], Path], names: Callable[[], list[str]],
                    store: Path | None = None) -> None:
    """`store`: the tree the scheme's models live in, inside which their symlinks may point."""
    SCHEMES[prefix] = Scheme(folder, names)
    if store is not None:
        register_store(store)


def scheme_of(ref: str) -> str | None:
    """The registered scheme a reference uses (`toy` for `toy:base`), or None."""
    prefix, sep, _ = ref.partition(":")
    if not sep:
        return None
    plugins.load()
    return prefix if prefix in SCHEMES else None


def shareable(ref: str) -> str:
    """A model reference as files meant for sharing name it: a Hub id (with its revision) or a plug-in's
    reference as given, a local folder or file by its name alone, never by where it lies on this machine.
    (`lora.shareable` names a `MODEL+LORA[:SCALE]` reference part by part.)"""
    local = Path(ref).expanduser()
    if not ref or scheme_of(ref) is not None or not (local.exists() or ref.startswith((".", "/", "~"))):
        return ref
    return local.resolve().name or ref


def resolve(ref: str, *, allow_pickle: bool = False, variant: str | None = None, store: Path | None = None,
            prediction_type: str | None = None) -> Path:
    """The local folder of a model reference, checked to be a complete SD-family pipeline folder."""
    return Path(fetch(ref, allow_pickle=allow_pickle, variant=variant, store=store,
                      prediction_type=prediction_type).folder)


def fetch(ref: str, *, allow_pickle: bool = False, variant: str | None = None, store: Path | None = None,
          prediction_type: str | None = None) -> Fetched:
    """`prediction_type`: what a foreign single-file checkpoint predicts, when it does not say."""
    if not ref.strip():  # Path("") is the current folder, which the user did not name
        raise ModelError("an empty model reference (give a Hub name, a folder or a file)")
    scheme = scheme_of(ref)
    if scheme is not None:
        folder = SCHEMES[scheme].folder(ref[len(scheme) + 1:])
        check_pipeline_folder(folder)
        return Fetched(ref, str(folder.resolve()), scheme)
    local = Path(ref).expanduser()
    if local.is_dir():
        folder = usable_folder(local)
        return Fetched(ref, str(folder.resolve()), "local")
    if local.is_file():
        return Fetched(ref, str(single_file_folder(local, allow_pickle, prediction_type)), "single-file")
    match = HUB_REF.match(ref)
    if match is None or ref.startswith((".", "/", "~")) or ".." in ref.split("/"):
        raise ModelError(f"{ref}: no such model folder or file, and not a Hub reference (org/name[@revision])")
    return fetch_hub(ref, match["repo"], match["rev"], match["path"], allow_pickle=allow_pickle, variant=variant,
                     store=store, prediction_type=prediction_type)
