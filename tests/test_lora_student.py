"""The LoRA student: an adapter and the style MLP trained on a frozen base, through every distill feature, and
each style exported as a LoRA file that stock diffusers (and dmm's own MODEL+LORA path) loads with the same
pictures as `dmm generate --style` on the student."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import assert_one_sentence_error, tiny_recipe
from dmm_cli.models.references import resolve

UNET = Path("unet") / "diffusion_pytorch_model.safetensors"
LORA = {"type": "lora", "rank": 4}
SAMPLE = ("--steps", "8", "--guidance", "4", "--seed", "7")
PROMPT = "a blue triangle"


def lora_recipe(folder: Path, **changes) -> Path:
    # A high learning rate, so six steps move the pictures well away from the base's.
    return tiny_recipe(folder, **{"train.student": LORA, "train.lr": 3e-2, **changes})


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def stock_pictures(base: Path, lora_folders: list[Path], pipeline_cls: str = "StableDiffusionPipeline",
                   **call) -> list[np.ndarray]:
    """Each LoRA through stock diffusers alone: the base pipeline, load_lora_weights, the same seed."""
    import diffusers

    pipe = getattr(diffusers, pipeline_cls).from_pretrained(base, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for folder in lora_folders:
        pipe.load_lora_weights(folder, adapter_name=folder.name.replace(".", "_").replace("-", "_"))
        image = pipe(PROMPT, num_inference_steps=8, guidance_scale=4, generator=torch.Generator().manual_seed(7),
                     **call).images[0]
        out.append(np.asarray(image).astype(int))
        pipe.unload_lora_weights()
    return out


def test_a_lora_student_trains_only_its_adapter_and_each_style_exports_as_a_lora_stock_diffusers_loads(dmm, tmp_path):
    recipe = lora_recipe(tmp_path, **{"train.adversarial_loss": {"weight": 0.01, "lr": 1e-4, "start_step": 2},
                                      "train.ema": {"decay": 0.5}})
    r = dmm("distill", recipe)
    assert r.code == 0, r
    run, base = tmp_path / "run", resolve("toy:base")
    config = json.loads((run / "student_lora" / "adapter_config.json").read_text())
    assert config["r"] == 4 and "to_q" in config["target_modules"]
    saved = load_file(run / "checkpoints" / "step-0000006" / "student.safetensors")
    assert saved and all(".lora_" in k or k.startswith("class_embedding.") for k in saved)  # only what trains

    student, plain = load_file(run / UNET), load_file(base / UNET)
    changed = {k for k in plain if not torch.equal(student[k], plain[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0", "proj_in", "proj_out", "proj", "2")
                           for k in changed), sorted(changed)[:5]  # the adapted layers, and only those
    assert not any("resnets" in k for k in changed)

    styles = ["night", "outline", "stripes", "checker", "night:0.5,checker:0.5"]
    ours = []
    for i, style in enumerate(styles):
        out = tmp_path / f"dmm-{i}.png"
        assert dmm("generate", "--model", run, "--style", style, PROMPT, *SAMPLE, "-o", out).code == 0
        ours.append(pixels(out))
    loras = [Path(dmm("-q", "export", run, "--style", s, "--format", "lora-diffusers",
                      "-o", tmp_path / "diffusers" / f"s{i}").out.strip()) for i, s in enumerate(styles)]
    for mine, theirs in zip(ours, stock_pictures(base, loras)):
        assert np.abs(mine - theirs).max() <= 1
    assert dmm("generate", "--model", "toy:base", PROMPT, *SAMPLE, "-o", tmp_path / "base.png").code == 0
    assert all(np.abs(mine - pixels(tmp_path / "base.png")).mean() > 2 for mine in ours)  # far from the base

    kohya = dmm("-q", "export", run, "--style", "all", "--format", "lora", "-o", tmp_path / "kohya")
    assert kohya.code == 0, kohya
    files = [Path(line) for line in kohya.lines]
    assert [f.name for f in files] == ["night.safetensors", "outline.safetensors", "stripes.safetensors",
                                      "checker.safetensors"]
    tensors = load_file(files[0])
    assert "lora_unet_time_embedding_linear_2.diff_b" in tensors and float(tensors[next(
        k for k in tensors if k.endswith(".alpha"))]) == 4
    assert not tensors["lora_unet_time_embedding_linear_2.diff"].any()  # A1111 applies a diff_b only beside it
    for i, lora in ((0, files[0]), (4, loras[4])):  # dmm's own LoRA path reads both layouts, bias included
        out = tmp_path / f"own-{i}.png"
        assert dmm("generate", "--model", f"toy:base+{lora}", PROMPT, *SAMPLE, "-o", out).code == 0
        assert np.abs(pixels(out) - ours[i]).max() <= 1

    evaluated = dmm("eval", run, "--recipe", recipe, "-k", "4", "--steps", "3", "--batch-size", "8",
                    "-o", tmp_path / "eval", "--json")
    assert evaluated.code == 0, evaluated
    assert [m["kind"] for m in json.loads(evaluated.out)["models"]].count("student") == 1


def test_a_lora_student_resumes_bit_exactly_and_grows_by_incremental_merging(dmm, tmp_path):
    whole = lora_recipe(tmp_path / "a", **{"train.ema": {"decay": 0.8, "start_step": 2}})
    assert dmm("distill", whole).code == 0
    split = lora_recipe(tmp_path / "b", **{"train.ema": {"decay": 0.8, "start_step": 2}})
    assert dmm("distill", split, "--max-steps", "3").code == 0
    assert dmm("distill", split, "--resume").code == 0
    for part in (UNET, Path("student_lora") / "adapter_model.safetensors"):
        a, b = load_file(tmp_path / "a" / "run" / part), load_file(tmp_path / "b" / "run" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    old = tmp_path / "a" / "run"
    teachers = [{"name": n, "model": f"toy:{n}"} for n in ("night", "outline", "stripes", "checker")]
    grown = lora_recipe(tmp_path / "c", init_from=str(old), teachers=teachers + [{"name": "again",
                                                                                  "model": "toy:night"}],
                        **{"data": {"folder": "toy:shapes", "synthesize": {"images_per_teacher": 4, "steps": 2,
                                                                           "after_step": 3}}})
    r = dmm("distill", grown)
    assert r.code == 0, r
    adapter = load_file(tmp_path / "c" / "run" / "student_lora" / "adapter_model.safetensors")
    assert adapter["class_embedding.linear_1.weight"].shape[1] == 5
    before = load_file(old / "student_lora" / "adapter_model.safetensors")
    key = next(k for k in before if ".lora_B." in k)
    assert adapter[key].shape == before[key].shape and not torch.equal(adapter[key], before[key])  # it went on
    as_full = lora_recipe(tmp_path / "d", init_from=str(old), teachers=teachers + [{"name": "again",
                                                                                    "model": "toy:night"}],
                          **{"train.student": {"type": "full"}})
    assert_one_sentence_error(dmm("distill", as_full), 2, "train.student.type full", "is a LoRA student")
    assert not (tmp_path / "d" / "run").exists()


def test_lora_student_refusals(dmm, tmp_path):
    r = dmm("distill", lora_recipe(tmp_path / "a", **{"train.student": {"type": "lora", "rank": 0}}))
    assert_one_sentence_error(r, 2, "train.student.rank")
    r = dmm("distill", lora_recipe(tmp_path / "b", **{"train.student": {"type": "lora", "targets": ["to_qq"]}}))
    assert_one_sentence_error(r, 2, "train.student.targets", "'to_qq' matches no")
    assert not (tmp_path / "b" / "run").exists()

    full = tiny_recipe(tmp_path / "full", **{"train.max_steps": 2})
    assert dmm("distill", full).code == 0
    r = dmm("export", tmp_path / "full" / "run", "--style", "night", "--format", "lora")
    assert_one_sentence_error(r, 2, "--format lora", "full student")
    r = dmm("export", "toy:night", "--style", "0", "--format", "lora")
    assert_one_sentence_error(r, 2, "toy:night", "not a DMM student")
    r = dmm("distill", lora_recipe(tmp_path / "e", init_from=str(tmp_path / "full" / "run"),
                                   teachers=[{"name": n, "model": f"toy:{n}"} for n in
                                             ("night", "outline", "stripes", "checker")] + [{"name": "again", "model": "toy:night"}]))
    assert_one_sentence_error(r, 2, "train.student.type lora", "is a full student")


def test_the_memory_plan_fits_a_4_teacher_sdxl_lora_student_on_24_gb_where_a_full_one_does_not():
    """SDXL's own UNet and text encoders, on meta tensors: the plan a dry run prints for 1024 px, bf16."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from sdxl_memory import SDXL, SIDE, _models

    from dmm_cli.distill.memory import ModelSizes, estimate, fitting_settings
    from dmm_cli.recipe import Train

    unet, text, text_2 = _models("meta", torch.float32)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    sizes = ModelSizes(count(unet), count(text) + count(text_2), 4, SDXL / "unet" / "config.json",
                       {n: list(p.shape) for n, p in unet.state_dict().items()})
    lora = Train(batch_size=4, precision="bf16", student={"type": "lora", "rank": 16})
    full = lora.model_copy(update={"student": Train().student})
    assert "does not fit" not in fitting_settings(lora, sizes, SIDE)[24]
    assert "does not fit" in fitting_settings(full, sizes, SIDE)[24]
    plan, whole = estimate(lora, sizes, SIDE), estimate(full, sizes, SIDE)
    assert plan.parts["optimizer"] < whole.parts["optimizer"] / 30
    assert plan.parts["activations"] < whole.parts["activations"]  # a frozen base keeps less for its backward


def test_an_sdxl_lora_student_exports_a_lora_stock_diffusers_loads(dmm, tmp_path):
    import yaml

    recipe = yaml.safe_load((Path(__file__).resolve().parent.parent / "recipes" / "toy_styles_xl.yaml").read_text())
    recipe["train"].update(max_steps=4, batch_size=8, checkpoint_every=2, lr=3e-2, student=LORA)
    recipe["output"] = str(tmp_path / "run")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert dmm("distill", path).code == 0
    out = tmp_path / "dmm.png"
    assert dmm("generate", "--model", tmp_path / "run", "--style", "checker", PROMPT, *SAMPLE, "-o", out).code == 0
    lora = Path(dmm("-q", "export", tmp_path / "run", "--style", "checker", "--format", "lora-diffusers",
                    "-o", tmp_path / "checker").out.strip())
    (theirs,) = stock_pictures(resolve("toy:xl-base"), [lora], "StableDiffusionXLPipeline")
    assert np.abs(pixels(out) - theirs).max() <= 1


@pytest.mark.slow  # 400 steps at batch 32: two minutes on 2 cores
def test_the_shipped_lora_recipe_shows_every_style_on_held_out_prompts(dmm, tmp_path):
    """recipes/toy_styles_lora.yaml as shipped; eval's toy prompts are the colour/shape pairs no training picture
    shows, and its style accuracy is the toy classifier's."""
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "toy_styles_lora.yaml"
    r = dmm("distill", recipe, "-o", tmp_path / "run")
    assert r.code == 0, r
    r = dmm("eval", tmp_path / "run", "--recipe", recipe, "-k", "48", "--steps", "20", "--guidance", "4",
            "--batch-size", "96", "--json", "-o", tmp_path / "eval")
    assert r.code == 0, r
    student = next(m for m in json.loads(r.out)["models"] if m["kind"] == "student")
    assert student["style_accuracy"] >= 0.9, student


def test_a_lora_student_trains_norms_and_biases_whole_and_exports_them_as_kohya_differences(dmm, tmp_path):
    recipe = lora_recipe(tmp_path, **{"train.student": {**LORA, "extras": ["norms", "biases"]}})
    planned = dmm("distill", recipe, "--dry-run", "--json")
    bare = dmm("distill", lora_recipe(tmp_path / "bare"), "--dry-run", "--json")
    assert json.loads(planned.out)["memory"]["trainable_parameters"] > \
        json.loads(bare.out)["memory"]["trainable_parameters"]
    assert "biases whole, norms whole" in dmm("distill", recipe, "--dry-run").out
    assert dmm("distill", recipe).code == 0
    run, base = tmp_path / "run", resolve("toy:base")
    student, plain = load_file(run / UNET), load_file(base / UNET)
    for name in ("down_blocks.0.resnets.0.norm1.weight", "mid_block.attentions.0.transformer_blocks.0.norm1.bias",
                 "conv_in.bias", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.bias"):
        assert not torch.equal(student[name], plain[name]), name
    saved = load_file(run / "checkpoints" / "step-0000006" / "student.safetensors")
    assert "conv_in.bias" in saved and "conv_in.weight" not in saved  # what trains, and only that

    mine = tmp_path / "dmm.png"
    assert dmm("generate", "--model", run, "--style", "stripes", PROMPT, *SAMPLE, "-o", mine).code == 0
    exported = dmm("-q", "export", run, "--style", "stripes", "--format", "lora", "-o", tmp_path / "s.safetensors")
    assert exported.code == 0, exported
    tensors = load_file(Path(exported.out.strip()))
    assert {"lora_unet_down_blocks_0_resnets_0_norm1.w_norm", "lora_unet_down_blocks_0_resnets_0_norm1.b_norm",
            "lora_unet_conv_in.diff_b", "lora_unet_time_embedding_linear_2.diff_b"} <= tensors.keys()
    own = tmp_path / "own.png"
    assert dmm("generate", "--model", f"toy:base+{exported.out.strip()}", PROMPT, *SAMPLE, "-o", own).code == 0
    assert np.abs(pixels(own) - pixels(mine)).max() <= 1
    refused = dmm("export", run, "--style", "stripes", "--format", "lora-diffusers", "-o", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    assert_one_sentence_error(refused, 2, "--format lora-diffusers", "biases and norms", "--format lora")
