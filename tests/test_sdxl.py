"""SDXL end to end on the toy zoo's SDXL-shaped family (two text encoders, pooled text, size conditioning):
distill and resume exactly, generate styles and mixes, bake and export styles, evaluate, and the refusals."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import assert_one_sentence_error
from dmm_cli.distill.text import TextContexts, load_text_encoders, load_tokenizers, tokenize
from dmm_cli.models.references import resolve

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "toy_styles_xl.yaml"


def recipe_file(tmp_path: Path, teachers=None, base=None, **train) -> Path:
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["train"].update(batch_size=8, checkpoint_every=2, **train)
    if teachers is not None:
        recipe["teachers"] = [{"name": ref.split(":")[1], "model": ref} for ref in teachers]
    recipe["base"] = base or recipe["base"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def unet_weights(run: Path) -> dict:
    return load_file(run / "unet" / "diffusion_pytorch_model.safetensors")


def test_toy_xl_student_distils_resumes_exactly_generates_bakes_and_evaluates(dmm, tmp_path):
    recipe = recipe_file(tmp_path)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert dmm("-q", "distill", recipe, "--max-steps", "4", "-o", straight).code == 0
    assert dmm("-q", "distill", recipe, "--max-steps", "2", "-o", resumed).code == 0
    r = dmm("-q", "distill", recipe, "--max-steps", "4", "-o", resumed, "--resume")
    assert r.code == 0, r
    a, b = unet_weights(straight), unet_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["class_embedding.linear_1.weight"].shape[1] == 2 and "add_embedding.linear_1.weight" in a
    assert a["class_embedding.linear_2.weight"].abs().sum() > 0  # trained away from its zero start

    index = json.loads((straight / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert (straight / "text_encoder_2").is_dir() and (straight / "tokenizer_2").is_dir()
    assert [s["name"] for s in json.loads((straight / "styles.json").read_text())["styles"]] == ["night", "checker"]
    assert "dmm_cli.models.pipeline.load_pipeline" in (straight / "README.md").read_text()  # how to load it

    r = dmm("-q", "generate", "--model", straight, "--style", "all", "a blue triangle", "--steps", "4", "--seed", "3",
            "-o", tmp_path / "styles")
    assert r.code == 0, r
    assert all(len(list((tmp_path / "styles").glob(f"*-{style}-*.png"))) == 1 for style in ("night", "checker"))
    r = dmm("-q", "generate", "--model", straight, "--style", "night:0.5,checker:0.5", "a red circle", "--steps", "4",
            "-o", tmp_path / "mix.png")
    assert r.code == 0 and (tmp_path / "mix.png").is_file(), r

    # a baked style is a plain SDXL model; stock diffusers draws what `dmm generate --style` draws
    r = dmm("-q", "export", straight, "--style", "checker", "-o", tmp_path / "baked")
    assert r.code == 0, r
    r = dmm("-q", "generate", "--model", tmp_path / "baked", "a blue triangle", "--steps", "4", "--seed", "3",
            "-o", tmp_path / "baked.png")
    assert r.code == 0, r
    ours = np.asarray(Image.open(next((tmp_path / "styles").glob("*-checker-*.png"))), np.int16)
    baked = np.asarray(Image.open(tmp_path / "baked.png"), np.int16)
    assert np.abs(ours - baked).max() <= 1

    # the same bake as one A1111/ComfyUI file reads back exactly through diffusers' SDXL single-file loader
    single = tmp_path / "checker.safetensors"
    assert dmm("-q", "export", straight, "--style", "checker", "--single-file", "-o", single).code == 0
    r = dmm("fetch", single)
    assert r.code == 0, r
    for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
        ours = {k: v for f in (tmp_path / "baked" / part).glob("*.safetensors") for k, v in load_file(f).items()}
        back = {k: v for f in (Path(r.lines[0]) / part).glob("*.safetensors") for k, v in load_file(f).items()}
        assert ours.keys() == back.keys() and all(torch.equal(ours[k], back[k]) for k in ours), part

    r = dmm("eval", straight, "--recipe", recipe, "-k", "8", "--steps", "20", "--guidance", "4", "--json", "-o",
            tmp_path / "eval")
    assert r.code == 0, r
    reference, student = json.loads(r.out)["models"]
    assert len(student["M"]) == 2 and reference["style_accuracy"] >= 0.9  # the SDXL teachers, sampled by eval


def test_caption_dropout_zeroes_both_encoders_and_the_pooled_text_alike_for_every_model(tmp_path):
    base, teacher = resolve("toy:xl-base"), resolve("toy:xl-night")
    tokenizers = load_tokenizers(base)
    ids = tokenize(tokenizers, ["a red circle", "a blue square", "a red circle"])
    assert ids.shape[:2] == (3, 2)
    key_of, encoders = load_text_encoders({"base": base, "teacher": teacher}, "cpu", torch.float32)
    assert key_of["base"] == key_of["teacher"] and len(encoders) == 1  # fine-tunes share their encoders
    empty = tokenize(tokenizers, [""])[0]
    cached = TextContexts(encoders, ids, empty, torch.device("cpu"))
    streamed = TextContexts(encoders, ids, empty, torch.device("cpu"), budget_bytes=0)
    assert cached.cache is not None and streamed.cache is None
    idx, drop = torch.tensor([0, 1, 2, 1]), torch.tensor([False, True, False, False])
    for contexts in (cached(idx, drop), streamed(idx, drop)):
        cond = contexts[key_of["base"]]
        assert cond.context.shape[-1] == 64 + 96 and cond.pooled.shape == (4, 32)
        assert not cond.context[1].any() and not cond.pooled[1].any()
        assert cond.context[0].abs().sum() > 0 and torch.equal(cond.context[0], cond.context[2])
        assert cond.pooled[0].abs().sum() > 0 and torch.equal(cond.pooled[0], cond.pooled[2])
        assert not torch.equal(cond.pooled[0], cond.pooled[3])  # another caption
    a, b = cached(idx, drop)[key_of["base"]], streamed(idx, drop)[key_of["base"]]
    assert torch.allclose(a.context, b.context, atol=1e-6) and torch.allclose(a.pooled, b.pooled, atol=1e-6)


@pytest.mark.parametrize("base, teachers, fragments", [
    ("toy:base", ["toy:night", "toy:xl-night"], ("xl-night", "SDXL", "SD1.x")),  # two families in one recipe
    ("toy:base", ["toy:xl-night", "toy:xl-checker"], ("xl-night", "SDXL", "SD1.x base")),
    ("toy:xl-base", ["toy:xl-night", "toy:checker"], ("toy:checker", "SD1.x", "SDXL base")),
])
def test_teachers_of_another_family_than_the_base_are_refused(dmm, tmp_path, base, teachers, fragments):
    r = dmm("distill", recipe_file(tmp_path, teachers, base), "--dry-run")
    assert_one_sentence_error(r, 2, *fragments)


def test_sdxl_generate_refuses_a_width_that_is_not_a_multiple_of_8(dmm, tmp_path):
    r = dmm("generate", "--model", "toy:xl-base", "a red circle", "--width", "100", "-o", tmp_path / "x.png")
    assert_one_sentence_error(r, 2, "--width", "100")
    assert not (tmp_path / "x.png").exists()


def test_the_dry_run_of_the_toy_xl_recipe_counts_both_text_encoders(dmm):
    r = dmm("distill", RECIPE, "--dry-run", "--json")
    assert r.code == 0, r
    plan = json.loads(r.out)
    text = sum(v.numel() for part in ("text_encoder", "text_encoder_2")
               for f in (resolve("toy:xl-base") / part).glob("*.safetensors") for v in load_file(f).values())
    assert plan["memory"]["parts_bytes"]["text encoders"] == 4 * text  # fp32 training: 4 bytes a parameter


def test_aspect_ratio_buckets_are_sdxls_and_each_picture_takes_its_nearest():
    from dmm_cli.distill.latents import buckets, nearest_bucket

    shapes = buckets(1024, 32)
    assert {(1024, 1024), (896, 1152), (832, 1216), (768, 1344), (1152, 896)} <= set(shapes)
    assert all(h * w <= 1024 * 1024 and h % 32 == 0 and w % 32 == 0 and 0.5 <= w / h <= 2 for h, w in shapes)
    assert nearest_bucket(600, 800, shapes) == (864, 1184)  # 4:3 landscape: 1.37 is the nearest ratio
    assert nearest_bucket(1000, 1000, shapes) == (1024, 1024)


def test_pictures_of_other_shapes_train_in_buckets_with_their_size_conditioning(dmm, tmp_path):
    from dmm_cli.toy import shapes

    folder = tmp_path / "pictures"
    folder.mkdir()
    lines = []
    for k, (size, (colour, shape)) in enumerate(zip([(64, 64)] * 4 + [(120, 60)] * 3 + [(50, 100)] * 2,
                                                    shapes.all_pairs())):
        image = shapes.dataset("plain", [(colour, shape)], 1, seed=k)[0][0].resize(size)
        image.save(folder / f"{k}.png")
        lines.append(json.dumps({"file_name": f"{k}.png", "text": shapes.caption(colour, shape)}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["data"] = {"folder": str(folder), "resolution": 64, "buckets": True}
    recipe["train"].update(max_steps=3, batch_size=4, checkpoint_every=10)
    path = tmp_path / "buckets.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = dmm("distill", path, "-o", tmp_path / "run")
    assert r.code == 0, r
    assert "buckets 48x80: 3, 64x64: 4, 80x48: 2" in r.err  # wide pictures to 48x80, tall ones to 80x48
    cache, = (Path(os.environ["DMM_HOME"]) / "latents").glob("*.safetensors")
    latents = load_file(cache)
    assert latents["latents.0"].shape[-2:] == (12, 20) and latents["latents.2"].shape[-2:] == (20, 12)
    # original size (h, w), crop top and left, target size (h, w): SDXL's size conditioning of each picture
    assert latents["time_ids.0"][0].tolist() == [60, 120, 0, 8, 48, 80]  # 96 x 48 after the resize: 8 px cut each side
    assert latents["time_ids.2"][0].tolist() == [100, 50, 8, 0, 80, 48]


def test_sdxl_runs_the_rest_of_the_paper_adversarial_synthesized_and_incremental(dmm, tmp_path):
    """The adversarial loss on the SDXL encoder (text-time embedding included), the teachers' own SDXL
    generations as data, then a third style grown onto the student with its old styles answered by it."""
    first = yaml.safe_load(RECIPE.read_text())
    first["data"]["synthesize"] = {"images_per_teacher": 4, "after_step": 2, "steps": 2, "guidance": 4.0}
    first["train"].update(max_steps=4, batch_size=4, checkpoint_every=10,
                          adversarial_loss={"weight": 0.01, "lr": 1e-4, "start_step": 1})
    first["output"] = str(tmp_path / "first")
    path = tmp_path / "first.yaml"
    path.write_text(yaml.safe_dump(first))
    r = dmm("distill", path)
    assert r.code == 0, r
    rows = [json.loads(line) for line in (tmp_path / "first" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["adversarial_loss"] > 0 and rows[-1]["discriminator_loss"] > 0

    second = dict(first, init_from=str(tmp_path / "first"), output=str(tmp_path / "second"),
                  teachers=first["teachers"] + [{"name": "plain", "model": "toy:xl-base"}])
    second["train"] = dict(first["train"], old_style_fraction=0.5)
    path = tmp_path / "second.yaml"
    path.write_text(yaml.safe_dump(second))
    r = dmm("distill", path)
    assert r.code == 0, r
    assert [s["name"] for s in json.loads((tmp_path / "second" / "styles.json").read_text())["styles"]] == [
        "night", "checker", "plain"]
    assert unet_weights(tmp_path / "second")["class_embedding.linear_1.weight"].shape[1] == 3


def test_an_empty_caption_keeps_its_encoding_and_only_a_dropped_one_is_zeroed():
    base = resolve("toy:xl-base")
    tokenizers = load_tokenizers(base)
    key_of, encoders = load_text_encoders({"base": base}, "cpu", torch.float32)
    ids, empty = tokenize(tokenizers, ["", "a red circle"]), tokenize(tokenizers, [""])[0]
    for budget in (1 << 30, 0):
        cond = TextContexts(encoders, ids, empty, torch.device("cpu"), budget_bytes=budget)(
            torch.tensor([0, 0]), torch.tensor([False, True]))[key_of["base"]]
        assert cond.context[0].abs().sum() > 0 and not cond.context[1].any() and not cond.pooled[1].any()


def test_an_sdxl_student_goes_into_one_file_only_a_style_at_a_time(dmm, tmp_path):
    assert dmm("-q", "distill", recipe_file(tmp_path), "--max-steps", "1", "-o", tmp_path / "run").code == 0
    r = dmm("export", tmp_path / "run", "--single-file", "-o", tmp_path / "student.safetensors")
    assert_one_sentence_error(r, 2, "export --style", "label_emb")
    r = dmm("export", tmp_path / "run", "--format", "dmm-official", "-o", tmp_path / "official")
    assert_one_sentence_error(r, 2, "dmm-official", "SDXL")
    assert not (tmp_path / "student.safetensors").exists() and not (tmp_path / "official").exists()
