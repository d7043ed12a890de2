"""Files meant for sharing name models by reference (a Hub id, a plug-in's name, a file or folder name, with
sha256s), never by where they lie on the machine that wrote them."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from dmm_cli.files.safetensors_header import read_header_and_start
from dmm_cli.models.references import resolve


def readable_bytes(path: Path) -> bytes:
    """What a reader of the file sees as text: a safetensors file's header (names, shapes, metadata), and the
    whole of any other file (weights are numbers, where a path could only appear by chance)."""
    if path.suffix == ".safetensors":
        _, _, start = read_header_and_start(path)
        return path.read_bytes()[:start]
    return path.read_bytes()


def test_no_file_that_distill_export_or_merge_writes_holds_a_path_of_this_machine(dmm, tmp_path):
    models = tmp_path / "models"
    for name in ("base", "night", "outline"):
        shutil.copytree(resolve(f"toy:{name}"), models / name)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "local", "base": str(models / "base"), "data": {"folder": "toy:shapes"},
        "output": str(tmp_path / "run"),
        "teachers": [{"name": n, "model": str(models / n)} for n in ("night", "outline")],
        "train": {"max_steps": 2, "batch_size": 4, "checkpoint_every": 1}}))
    out = tmp_path / "out"
    for args in (["distill", recipe],
                 ["export", tmp_path / "run", "--style", "night", "-o", out / "baked"],
                 ["export", tmp_path / "run", "--style", "all", "--single-file", "-o", out / "files"],
                 ["export", tmp_path / "run", "--format", "dmm-official", "-o", out / "official"],
                 ["export", tmp_path / "run", "--format", "dmm-official", "--single-file", "-o",
                  out / "dmm.safetensors"],
                 ["export", models / "night", "--single-file", "-o", out / "night.safetensors"],
                 ["baseline-merge", models / "night", models / "outline", "--base", models / "base", "--method", "ties",
                  "-o", out / "merge"]):
        r = dmm(*args)
        assert r.code == 0, r
    written = [f for folder in (tmp_path / "run", out) for f in folder.rglob("*") if f.is_file()]
    assert len(written) > 30
    machine = {str(tmp_path.parent), str(Path.home()), os.getcwd(), str(Path(__file__).resolve().parents[1])}
    for f in written:
        text = readable_bytes(f)
        assert not [p for p in machine if p.encode() in text], (f, [p for p in machine if p.encode() in text])
    card = (tmp_path / "run" / "README.md").read_text()
    assert "| 0 | night | `night` |" in card and "dmm generate --model run " in card  # named, not placed
