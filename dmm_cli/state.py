"""Small facts dmm keeps between runs, under $DMM_HOME (default ~/.cache/dmm)."""
from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import atomic_file


def home() -> Path:
    return Path(os.environ.get("DMM_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "dmm").expanduser()


def remember_last_model(folder: Path) -> None:
    """Record the model `dmm distill` just wrote, so `dmm generate` can default to it."""
    with atomic_file(home() / "last_model") as tmp:
        tmp.write_text(str(Path(folder).resolve()) + "\n")


def last_model() -> str | None:
    path = home() / "last_model"
    return path.read_text().strip() or None if path.is_file() else None
