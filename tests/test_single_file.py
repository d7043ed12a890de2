"""Single files keep what they hold: every tensor, each component's dtype, the scheduler, SD2's OpenCLIP layout."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_sentence_error
from families import build

PARTS = ("unet", "vae", "text_encoder")


def tensors(folder: Path, part: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in (folder / part).glob("*.safetensors"):
        out.update({k.removeprefix("text_model."): v for k, v in load_file(f).items()})
    return out


@pytest.fixture(scope="module", params=["sd15", "sd2"])
def model(request, tmp_path_factory):
    """A real-topology model whose UNet is fp16 and the rest fp32, as many published checkpoints are."""
    from diffusers import UNet2DConditionModel

    folder = build(tmp_path_factory.mktemp(request.param) / "model", request.param)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").half()
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    return request.param, folder


def test_export_then_import_keeps_every_tensor_dtype_and_the_scheduler(dmm, tmp_path, model):
    family, folder = model
    single = tmp_path / "model.safetensors"
    assert dmm("export", folder, "--single-file", "-o", single).code == 0
    keys = load_file(single).keys()
    if family == "sd2":  # the layout A1111 and ComfyUI recognise SD2.x by
        assert "cond_stage_model.model.token_embedding.weight" in keys
        assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in keys
        assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    r = dmm("fetch", single)
    assert r.code == 0, r
    back = Path(r.lines[0])
    for part in PARTS:
        original, again = tensors(folder, part), tensors(back, part)
        assert original.keys() == again.keys(), part
        for k in original:
            assert original[k].dtype == again[k].dtype and torch.equal(original[k], again[k]), (part, k)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert json.loads((back / "scheduler" / "scheduler_config.json").read_text()) == scheduler
    assert json.loads((back / "model_index.json").read_text())["scheduler"] == ["diffusers", scheduler["_class_name"]]


def test_the_export_is_what_diffusers_own_loader_reads(dmm, tmp_path, model):
    from diffusers import StableDiffusionPipeline

    family, folder = model
    single = tmp_path / "model.safetensors"
    assert dmm("export", folder, "--single-file", "-o", single).code == 0
    pipe = StableDiffusionPipeline.from_single_file(str(single), config=str(folder), local_files_only=True,
                                                    torch_dtype=torch.float32, safety_checker=None,
                                                    requires_safety_checker=False)
    for part in PARTS:
        original = tensors(folder, part)
        loaded = {k.removeprefix("text_model."): v for k, v in getattr(pipe, part).state_dict().items()}
        assert all(torch.equal(original[k].float(), loaded[k]) for k in original), part
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")


def foreign(single: Path, target: Path) -> Path:
    """The same file without a scheduler config, as one from elsewhere comes. (The tiny widths' configs stay:
    the shipped SD2.1 ones fit real SD2.1 checkpoints only.)"""
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        configs = json.loads(f.metadata()["dmm.configs"])
    del configs["scheduler"]
    save_file(load_file(single), target, metadata={"dmm.configs": json.dumps(configs)})
    return target


def test_a_foreign_sd2_file_says_what_it_predicts_by_yaml_or_option(dmm, tmp_path):
    folder = build(tmp_path / "sd2", "sd2")
    assert dmm("export", folder, "--single-file", "-o", tmp_path / "ours.safetensors").code == 0
    plain = foreign(tmp_path / "ours.safetensors", tmp_path / "plain.safetensors")
    assert_one_sentence_error(dmm("fetch", plain), 2, str(plain), "--prediction-type")
    r = dmm("fetch", plain, "--prediction-type", "v_prediction")
    assert r.code == 0, r
    assert json.loads((Path(r.lines[0]) / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == \
        "v_prediction"
    yaml_file = foreign(tmp_path / "ours.safetensors", tmp_path / "with-yaml.safetensors").with_suffix(".yaml")
    yaml_file.write_text("model:\n  params:\n    parameterization: v\n")
    r = dmm("fetch", tmp_path / "with-yaml.safetensors")
    assert r.code == 0, r
    assert json.loads((Path(r.lines[0]) / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == \
        "v_prediction"
    assert_one_sentence_error(dmm("fetch", plain, "--prediction-type", "x0"), 2, "--prediction-type")


def test_sdxl_single_file_round_trip_is_exact_through_diffusers_loader(dmm, tmp_path):
    """SDXL in the A1111/ComfyUI layout: both text encoders (the second as OpenCLIP, projection transposed) and
    the text-time embedding as label_emb; diffusers' from_single_file reads back every tensor bit for bit."""
    from families import build_sdxl
    from dmm_cli.files.safetensors_header import read_header

    folder = build_sdxl(tmp_path / "xl")
    single = tmp_path / "xl.safetensors"
    r = dmm("export", folder, "--single-file", "-o", single)
    assert r.code == 0, r
    header = read_header(single)
    for key in ("model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.input_blocks.4.1.proj_in.weight",
                "model.diffusion_model.output_blocks.2.2.conv.weight",
                "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                "conditioner.embedders.1.model.text_projection", "first_stage_model.decoder.conv_out.weight"):
        assert key in header, key
    r = dmm("fetch", single)  # the import: diffusers' StableDiffusionXLPipeline.from_single_file
    assert r.code == 0, r
    back = Path(r.lines[0])
    assert json.loads((back / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = tensors(folder, part), tensors(back, part)
        assert ours.keys() == theirs.keys(), part
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), (part, key)


@pytest.mark.parametrize("drop, fragment", [
    ("first_stage_model.", "holds no vae weights (first_stage_model.*)"),
    ("cond_stage_model.", "holds no text_encoder weights (cond_stage_model.*)"),
    ("model.diffusion_model.input_blocks.", "are not a Stable Diffusion 1.x/2.x/XL UNet"),  # SD3, Flux
])
def test_a_file_without_a_whole_model_is_one_sentence(dmm, tmp_path, drop, fragment):
    """diffusers' own loader fails on these deep inside, with advice on how to call it."""
    whole = tmp_path / "night.safetensors"
    assert dmm("export", "toy:night", "--single-file", "-o", whole).code == 0
    part = tmp_path / "part.safetensors"
    save_file({k: v for k, v in load_file(whole).items() if not k.startswith(drop)}, part)
    assert_one_sentence_error(dmm("fetch", part), 2, str(part), fragment)
