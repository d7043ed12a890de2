"""Small facts dmm keeps between runs, under $DMM_HOME (default ~/.cache/dmm)."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from .. import console
from ..errors import DMMError
from .atomic import atomic_file
from .text import read_json


def home() -> Path:
    return Path(os.environ.get("DMM_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "dmm").expanduser()


def read_record(name: str) -> dict:
    """The JSON object in $DMM_HOME/`name`; empty when missing or unreadable, since these are caches and records."""
    try:
        return read_json(home() / name)
    except (OSError, json.JSONDecodeError):
        return {}


def _unwritable(error: Exception) -> str:
    return f"cannot write to $DMM_HOME ({home()}): {getattr(error, 'strerror', None) or error}"


def write_record(name: str, record: dict) -> None:
    """Write a record; records are caches, so a read-only or full $DMM_HOME costs a warning, not the job."""
    try:
        with atomic_file(home() / name) as tmp:
            tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    except (OSError, DMMError) as e:
        _warn_once(f"{_unwritable(e)}; continuing without caching")


def store(name: str) -> Path:
    """A folder under $DMM_HOME that dmm needs to write to (converted models, samples), created if missing."""
    folder = home() / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "permission denied")
    except OSError as e:
        raise DMMError(f"{_unwritable(e)}; set DMM_HOME to a writable folder") from None
    return folder


def remember_last_model(folder: Path) -> None:
    """Record the model `dmm distill` just wrote, so `dmm generate` can default to it."""
    try:
        with atomic_file(home() / "last_model") as tmp:
            tmp.write_text(str(Path(folder).resolve()) + "\n", encoding="utf-8")
    except (OSError, DMMError) as e:
        _warn_once(f"{_unwritable(e)}; `dmm generate` will not default to this model")


def last_model() -> str | None:
    path = home() / "last_model"
    return path.read_text(encoding="utf-8").strip() or None if path.is_file() else None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        console.warn(message)
