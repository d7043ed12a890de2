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
from dmm_cli.models.styles import Style, StyleTable

UNET = Path("unet") / "diffusion_pytorch_model.safetensors"
SAMPLING = {"steps": 6, "guidance": 3.0, "seed": 11}


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A briefly trained three-style student: enough for its style embedding to matter."""
    from dmm_cli.main import main

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
    assert f"from `{student.name}`" in card and str(student) not in card and "baked into a plain checkpoint" in card


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
    (["STUDENT", "--style", "all", "--single-file", "-o", "OUT/x.safetensors"], "one file per style, into a folder"),
    (["STUDENT", "--single-file", "-o", "OUT/x.safetensors"], "no single-file form that A1111, ComfyUI or Forge"),
    (["STUDENT", "--format", "dmm-official", "--style", "night"], "leave out --style"),
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


OFFICIAL_UNET_KEYS = {"model.diffusion_model.model_embedding.weight",
                      *(f"model.diffusion_model.add_embedding.linear_{i}.{kind}" for i in (1, 2)
                        for kind in ("weight", "bias"))}


def test_the_released_single_file_is_the_plain_layout_plus_the_style_table_and_comes_back_identical(
        dmm, tmp_path, student):
    """The ComfyUI-DMM nodes load one original-layout file whose UNet also holds `model_embedding` (8 rows) and
    `add_embedding`: exactly a baked file's keys plus those five, the three styles padded to 8 rows."""
    r = dmm("export", student, "--format", "dmm-official", "--single-file", "-o", tmp_path / "dmm.safetensors")
    assert r.code == 0, r
    assert "rows 3-7 of the style table are zero padding" in r.err and "indices 0-2" in r.err
    official = load_file(tmp_path / "dmm.safetensors")
    assert dmm("export", student, "--style", "night", "--single-file", "-o", tmp_path / "baked.safetensors").code == 0
    assert set(official) == set(load_file(tmp_path / "baked.safetensors")) | OFFICIAL_UNET_KEYS
    table = official["model.diffusion_model.model_embedding.weight"]
    assert table.shape[0] == 8 and not table[3:].any() and table[:3].abs().sum() > 0
    assert not [k for k in official if "label_emb" in k]

    back = dmm("fetch", tmp_path / "dmm.safetensors")
    assert back.code == 0, back
    folder = Path(back.lines[0])
    assert StyleTable.read(folder).names == ["night", "outline", "checker"]  # the padding rows dropped
    ours, theirs = load_file(student / UNET), load_file(folder / UNET)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # max abs difference 0


def test_a_released_file_from_elsewhere_imports_as_eight_styles(dmm, tmp_path, student):
    """Without dmm's style names (the released checkpoint itself), every row of the table is a style."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    ours = tmp_path / "d.safetensors"
    assert dmm("export", student, "--format", "dmm-official", "--single-file", "-o", ours).code == 0
    with safe_open(str(ours), framework="pt") as handle:  # the toy widths still need their configs
        configs = handle.metadata()["dmm.configs"]
    bare = tmp_path / "released.safetensors"
    save_file(load_file(ours), bare, metadata={"dmm.configs": configs})
    back = dmm("fetch", bare)
    assert back.code == 0, back
    assert StyleTable.read(Path(back.lines[0])).names == [f"style-{i}" for i in range(8)]


def test_more_styles_than_the_nodes_take_are_refused(dmm, tmp_path, student):
    import shutil

    from diffusers import UNet2DConditionModel

    from dmm_cli.models.student import grow_student

    nine = tmp_path / "nine"
    shutil.copytree(student, nine, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    grow_student(UNet2DConditionModel.from_pretrained(student / "unet"), 9, "zero").save_pretrained(nine / "unet")
    table = StyleTable.read(student)
    (nine / "styles.json").write_text(StyleTable(table.styles + [Style(f"extra{i}") for i in range(6)]).to_json())
    r = dmm("export", nine, "--format", "dmm-official", "--single-file", "-o", tmp_path / "x.safetensors")
    assert_one_sentence_error(r, 2, "has 9 styles", "holds 8")
    assert not (tmp_path / "x.safetensors").exists()
