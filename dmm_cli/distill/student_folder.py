"""The run folder becomes the student's pipeline: its UNet, the base's other parts, styles.json and a model card,
naming every model as files meant for sharing do."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ..data.prompts import prompt_digest
from ..errors import DMMError
from ..files.atomic import atomic_file, atomic_folder
from ..files.hashing import component_sha256
from ..models import lora, lora_student, references
from ..models.folders import copy_part, derived_model_index, model_family, model_root, parts_besides_unet
from ..models.schedule import read_schedule
from ..models.styles import STYLES_FILE, Style, StyleTable
from ..recipe import Recipe
from .plan import RunPlan, synthesis_settings


def write_student(plan: RunPlan, student, last: dict) -> None:
    """The run folder becomes a diffusers pipeline: student unet/, the base's other parts, styles.json, a card.

    Each part is replaced atomically; model_index.json goes last, so a folder with one is complete.
    """
    out, recipe = plan.output, plan.recipe
    dtype = torch.float32 if recipe.train.precision == "no" else torch.float16
    if recipe.train.student.type == "lora":  # the adapter as trained, and folded into the base for every tool
        with atomic_folder(out / lora_student.ADAPTER_FOLDER) as tmp:
            lora_student.save_adapter(student, tmp, component_sha256(plan.base / "unet"), dtype)
        student = lora_student.merged(student)
    with atomic_folder(out / "unet") as tmp:
        student.to(dtype).save_pretrained(tmp, safe_serialization=True)
        student.to(torch.float32)
    for part in parts_besides_unet(plan.base):
        with atomic_folder(out / part) as tmp:
            copy_part(plan.base / part, tmp, model_root(plan.base))
    trained = read_schedule(plan.base)
    if read_schedule(out) != trained:  # the student samples with what it was trained to predict
        raise DMMError(f"{out / 'scheduler'}: does not match the base's scheduler the student was trained with")
    earlier = plan.previous_styles
    old = earlier.styles if earlier else []
    old = [Style(s.name, lora.shareable(s.teacher), s.sha256, s.extra) for s in old]
    styles = old + [Style(t.name, lora.shareable(t.ref), component_sha256(folder / "unet"))
                    for t, folder in zip(recipe.teachers[len(old):], plan.teachers[len(old):])]
    entry = {"recipe": recipe.name, "base": references.shareable(recipe.base), "steps": last.get("step"),
             "styles": [t.name for t in recipe.teachers], "prediction_type": trained.prediction_type}
    synth = recipe.data.synthesize
    if synth is not None:  # what eval must not measure this student on
        first = synthesis_settings(synth).seed
        entry["synthesis"] = {"prompts_sha256": sorted({prompt_digest(p) for p in plan.synthesis_prompts}),
                              "seeds": [first, first + synth.images_per_teacher]}
    if earlier:
        entry.update(init_from=references.shareable(recipe.init_from), new_styles=[s.name for s in styles[len(old):]],
                     old_style_fraction=recipe.train.old_style_fraction)
    table = StyleTable(styles, lineage=(earlier.lineage if earlier else []) + [entry])
    with atomic_file(out / STYLES_FILE) as tmp:
        tmp.write_text(table.to_json(), encoding="utf-8")
    with atomic_file(out / "README.md") as tmp:
        tmp.write_text(model_card(plan, last), encoding="utf-8")
    with atomic_file(out / "model_index.json") as tmp:
        tmp.write_text(derived_model_index(plan.base), encoding="utf-8")


def shared_recipe(recipe: Recipe) -> dict:
    """The recipe as files meant for sharing show it: every model, data folder and output by its reference or
    name (models.references.shareable), no path of this machine."""
    data = recipe.model_dump()
    data["base"], data["output"] = references.shareable(recipe.base), Path(recipe.output).name
    if recipe.init_from:
        data["init_from"] = references.shareable(recipe.init_from)
    for teacher in data["teachers"]:
        teacher["model"] = lora.shareable(teacher["model"])  # MODEL+LORA part by part
        for one in teacher["loras"]:
            one["model"] = references.shareable(one["model"])
    if recipe.data.folder:
        data["data"]["folder"] = references.shareable(recipe.data.folder)
    if recipe.data.synthesize and recipe.data.synthesize.prompts:
        data["data"]["synthesize"]["prompts"] = Path(recipe.data.synthesize.prompts).name
    return data


def model_card(plan: RunPlan, last: dict) -> str:
    recipe = plan.recipe
    rows = "\n".join(f"| {i} | {t.name} | `{lora.shareable(t.ref)}` |" for i, t in enumerate(recipe.teachers))
    losses = ", ".join(f"{k} {last[k]:.5g}" for k in ("loss", "score_loss", "feature_loss") if k in last)
    first = recipe.teachers[0].name
    if model_family(plan.base) == "SDXL":
        loading = ("In Python, load it with `dmm_cli.models.pipeline.load_pipeline` (a `StableDiffusionXLPipeline` "
                   "whose UNet\nkeeps its style MLP in the `identity` class-embedding slot, which diffusers alone "
                   "leaves empty) and pass the\nstyle vector as the UNet's `class_labels` (see "
                   "`dmm_cli.generate.sampling.style_conditioning`),\nor bake a style into a plain SDXL model "
                   f"with `dmm export {plan.output.name} --style {first}`.")
    else:
        loading = ("In Python, load it with `StableDiffusionPipeline.from_pretrained` and pass the style vector as "
                   "the\nUNet's `class_labels` (see `dmm_cli.generate.sampling.style_conditioning`).")
    spec = recipe.train.student
    if spec.type == "lora":
        loading += (f"\n\nA LoRA student: a rank-{spec.rank} adapter and the style MLP trained on the frozen base. "
                    f"`unet/` is the adapter\nfolded into the base; `{lora_student.ADAPTER_FOLDER}/` holds the adapter "
                    "itself (PEFT layout) and the style MLP.\nEach style, or a mix, becomes one LoRA file on the "
                    f"base: `dmm export {plan.output.name} --style all --format lora` (kohya/A1111,\nfor ComfyUI, "
                    "A1111 and Forge) or `--format lora-diffusers` (for diffusers' `load_lora_weights`).")
    return f"""---
library_name: diffusers
tags: [stable-diffusion, dmm, model-merging, distillation]
---

# {recipe.name}: a DMM style-promptable student

Distilled with [dmm](https://arxiv.org/abs/2504.12364) from {len(recipe.teachers)} teachers into one UNet
that takes a style vector. Base: `{references.shareable(recipe.base)}`.

| style | name | teacher |
|---|---|---|
{rows}

Trained for {last.get("step", "?")} steps; final losses: {losses or "n/a"}.

## Generate

```bash
dmm generate --model {plan.output.name} --style {first} "a photo of a cat"
dmm generate --model {plan.output.name} --style all "a photo of a cat"
dmm generate --model {plan.output.name} --style {first}:0.5,{recipe.teachers[-1].name}:0.5 "a photo of a cat"
```

{loading}

## Recipe

```yaml
{yaml.safe_dump(shared_recipe(recipe), sort_keys=False).strip()}
```
"""
