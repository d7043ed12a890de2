"""Small facts dmm keeps between runs, under $DMM_HOME (default ~/.cache/dmm)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic import atomic_file


def home() -> Path:
    return Path(os.environ.get("DMM_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "dmm").expanduser()


def read_record(name: str) -> dict:
    """The JSON object in $DMM_HOME/`name`; empty when missing or unreadable, since these are caches and records."""
    try:
        return json.loads((home() / name).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_record(name: str, record: dict) -> None:
    with atomic_file(home() / name) as tmp:
        tmp.write_text(json.dumps(record, indent=2))


def remember_last_model(folder: Path) -> None:
    """Record the model `dmm distill` just wrote, so `dmm generate` can default to it."""
    with atomic_file(home() / "last_model") as tmp:
        tmp.write_text(str(Path(folder).resolve()) + "\n")


def last_model() -> str | None:
    path = home() / "last_model"
    return path.read_text().strip() or None if path.is_file() else None
