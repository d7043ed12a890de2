"""The toy zoo: a tiny, offline, SD-shaped model family shipped with the package (see build.py)."""
from __future__ import annotations

from pathlib import Path

from ..files.text import read_json

ZOO = Path(__file__).parent / "zoo"


def manifest(zoo: Path = ZOO) -> dict:
    return read_json(zoo / "zoo.json")


def model_names(zoo: Path = ZOO, family: str | None = None) -> list[str]:
    """The zoo's models: its SD1.x-shaped family ("sd"), its SDXL-shaped one ("xl"), or both."""
    m = manifest(zoo)
    sd, xl = [m["base"], *m["teachers"]], [m["xl"]["base"], *m["xl"]["teachers"]] if "xl" in m else []
    return {"sd": sd, "xl": xl}.get(family, sd + xl)


def lora_names(zoo: Path = ZOO) -> list[str]:
    return manifest(zoo).get("loras", {}).get("names", [])


def lora_path(name: str, zoo: Path = ZOO) -> Path:
    """The file (kohya) or folder (PEFT) of a toy LoRA name."""
    return zoo / "loras" / (name if name.endswith("-peft") else f"{name}.safetensors")


def classifier_folder(zoo: Path = ZOO) -> Path:
    return zoo / "classifier"
