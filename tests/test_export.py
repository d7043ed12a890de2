"""`dmm export`: styles baked into plain checkpoints that stock diffusers runs, and the released DMM layout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import assert_one_sentence_error

UNET = Path("unet") / "diffusion_pytorch_model.safetensors"
SAMPLING = {"steps": 6, "guidance": 3.0, "seed": 11}


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A briefly trained three-style student: enough for its style embedding to matter."""
    from dmm_cli.cli import main

    folder = tmp_path_factory.mktemp("student")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "trio", "base": "toy:base", "data": {"folder": "toy:shapes"}, "output": str(folder / "run"),
        "teachers": [{"name": n, "model": f"toy:{n}"} for n in ("night", "outline", "checker")],
        "train": {"max_steps": 20, "batch_size": 12, "lr": 2e-3, "checkpoint_every": 1000}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DMM_HOME", str(folder / "home"))
        assert main(["-q", "distill", str(recipe)]) == 0
    return folder / "run"


def stock_picture(pipe, prompt: str) -> np.ndarray:
    """A picture from plain diffusers, no dmm code: the generator and sampler `dmm generate` uses."""
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=[prompt], num_inference_steps=SAMPLING["steps"], guidance_scale=SAMPLING["guidance"],
                 generator=[torch.Generator("cpu").manual_seed(SAMPLING["seed"])]).images[0]
    return np.asarray(image, dtype=np.int16)


def dmm_picture(dmm, model: Path, style: str, prompt: str, out: Path) -> np.ndarray:
    r = dmm("generate", prompt, "--model", model, "--style", style, "--steps", SAMPLING["steps"], "--guidance",
            SAMPLING["guidance"], "--seed", SAMPLING["seed"], "--dtype", "fp32", "-o", out)
    assert r.code == 0, r
    return np.asarray(Image.open(r.lines[0]), dtype=np.int16)


@pytest.mark.parametrize("style", ["night", "1", "checker", "night:0.6,checker:0.4"])
def test_a_baked_style_draws_what_the_student_draws(dmm, tmp_path, student, style):
    from diffusers import StableDiffusionPipeline

    r = dmm("export", student, "--style", style, "-o", tmp_path / "baked")
    assert r.code == 0, r
    assert r.lines == [str(tmp_path / "baked")]
    baked = StableDiffusionPipeline.from_pretrained(tmp_path / "baked", torch_dtype=torch.float32)
    assert baked.unet.config.class_embed_type is None and baked.unet.class_embedding is None
    for prompt in ("a red circle", "a blue triangle"):
        expected = dmm_picture(dmm, student, style, prompt, tmp_path / f"{prompt}.png")
        assert np.abs(stock_picture(baked, prompt) - expected).max() <= 1, (style, prompt)
    card = (tmp_path / "baked" / "README.md").read_text()
    assert str(student) in card and "baked into a plain checkpoint" in card


def test_baked_single_files_load_with_diffusers_from_single_file(dmm, tmp_path, student):
    from diffusers import StableDiffusionPipeline

    r = dmm("export", student, "--style", "all", "--single-file", "-o", tmp_path / "files")
    assert r.code == 0, r
    assert [Path(p).name for p in r.lines] == ["night.safetensors", "outline.safetensors", "checker.safetensors"]
    assert dmm("export", student, "--style", "outline", "-o", tmp_path / "config").code == 0  # configs only
    single = StableDiffusionPipeline.from_single_file(r.lines[1], config=str(tmp_path / "config"),
                                                      local_files_only=True, torch_dtype=torch.float32,
                                                      safety_checker=None, requires_safety_checker=False)
    expected = dmm_picture(dmm, student, "outline", "a green square", tmp_path / "g.png")
    assert np.abs(stock_picture(single, "a green square") - expected).max() <= 1
    from dmm_cli.files.safetensors_header import read_metadata

    meta = read_metadata(Path(r.lines[0]))
    assert meta["dmm.style"] == "night" and json.loads(meta["dmm.style_vector"])["night"] == 1.0


def test_official_layout_round_trips_exactly(dmm, tmp_path, student):
    r = dmm("export", student, "--format", "dmm-official", "-o", tmp_path / "official")
    assert r.code == 0, r
    official = tmp_path / "official"
    config = json.loads((official / "unet" / "config.json").read_text())
    assert config["addition_embed_type"] == "model_merge" and config["num_models"] == 3
    weights = load_file(official / UNET)
    assert weights["model_embedding.weight"].shape[0] == 3 and "class_embedding.linear_1.weight" not in weights
    back = dmm("fetch", official)
    assert back.code == 0, back
    original, again = load_file(student / UNET), load_file(Path(back.lines[0]) / UNET)
    assert original.keys() == again.keys()
    assert all((original[k].float() - again[k].float()).abs().max() == 0 for k in original)
    from dmm_cli.models.styles import StyleTable

    assert StyleTable.read(Path(back.lines[0])).names == ["night", "outline", "checker"]


def test_fetch_export_single_file_still_works_and_says_it_moved(dmm, tmp_path):
    r = dmm("fetch", "toy:night", "--export-single-file", tmp_path / "night.safetensors")
    assert r.code == 0, r
    assert "moved to `dmm export" in r.err and (tmp_path / "night.safetensors").is_file()


@pytest.mark.parametrize("args, fragment", [
    (["toy:night", "--style", "0"], "not a DMM student"),
    (["STUDENT", "--style", "sunset"], "unknown style 'sunset'"),
    (["STUDENT", "--style", "night:-1,checker:2"], "must be 0 or more"),
    (["STUDENT", "--style", "night:0,checker:0"], "add up to more than 0"),
    (["STUDENT"], "nothing to export"),
    (["STUDENT", "--format", "onnx"], "unknown format 'onnx'"),
    (["STUDENT", "--style", "night", "--single-file", "-o", "OUT/x.ckpt"], "must end in .safetensors"),
])
def test_bad_exports_write_nothing(dmm, tmp_path, student, args, fragment):
    out = tmp_path / "out"
    args = [str(student) if a == "STUDENT" else a.replace("OUT", str(out)) for a in args]
    if "-o" not in args:
        args += ["-o", str(out)]
    assert_one_sentence_error(dmm("export", *args), 2, fragment)
    assert not out.exists()


def test_an_existing_output_needs_overwrite_and_only_an_export_is_replaced(dmm, tmp_path, student):
    out = tmp_path / "night"
    assert dmm("export", student, "--style", "night", "-o", out).code == 0
    assert_one_sentence_error(dmm("export", student, "--style", "night", "-o", out), 2, "already exists")
    assert dmm("export", student, "--style", "night", "-o", out, "--overwrite").code == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    assert_one_sentence_error(dmm("export", student, "--style", "night", "-o", mine, "--overwrite"), 2,
                              "not written by dmm export")
    assert list(mine.iterdir()) == []
