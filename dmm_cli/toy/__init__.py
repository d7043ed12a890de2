"""The toy zoo: a tiny, offline, SD-shaped model family shipped with the package (see build.py)."""
from __future__ import annotations

import json
from pathlib import Path

ZOO = Path(__file__).parent / "zoo"


def manifest(zoo: Path = ZOO) -> dict:
    return json.loads((zoo / "zoo.json").read_text())


def model_names(zoo: Path = ZOO) -> list[str]:
    m = manifest(zoo)
    return [m["base"], *m["teachers"]]


def lora_names(zoo: Path = ZOO) -> list[str]:
    return manifest(zoo).get("loras", {}).get("names", [])


def classifier_folder(zoo: Path = ZOO) -> Path:
    return zoo / "classifier"
