"""The models of a run, loaded from its folders: the student (full, or a LoRA on the base; grown from a previous
student in incremental merging), the teachers in the training dtype, their text encoders, the noise schedule and
the adversarial loss's frozen encoder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from ..models.lora_student import add_adapter, load_adapter
from ..models.pipeline import load_component
from ..models.schedule import read_schedule
from ..models.student import grow_student, make_student
from ..models.styles import one_hot
from ..recipe import Recipe
from .text import TextEncoders, load_text_encoders

TRAIN_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Models:
    """Everything a distillation step runs: built from folders by `load_models`, or in memory by benchmarks."""

    student: UNet2DConditionModel  # fp32 master weights, already style-promptable
    teachers: list[UNet2DConditionModel | None]  # None: held by another process (distill/placement.py)
    teacher_text_keys: list[str]  # which text encoder each teacher reads
    text_encoders: dict[str, TextEncoders]
    student_text_key: str
    alphas_cumprod: torch.Tensor
    teacher_dtype: torch.dtype
    teacher_styles: list[torch.Tensor | None] | None = None  # per teacher, for old-student slots
    discriminator_base: UNet2DConditionModel | None = None  # frozen encoder of the adversarial loss
    prediction: str = "epsilon"  # what the student predicts: its base's prediction type
    teacher_predictions: list[str] | None = None  # each teacher's (default: the student's)


def load_models(recipe: Recipe, base: Path, teachers: list[Path | None], device: torch.device,
                previous: Path | None = None, held: range | None = None) -> Models:
    """Models of a run. With `previous` (incremental merging), teachers given as None are the previous
    student's styles, in order, answered by a frozen copy of that student. Only the `held` teachers are loaded
    (default: all)."""
    held = range(len(teachers)) if held is None else held
    dtype = TRAIN_DTYPES[recipe.train.precision]
    new = {f"teacher{i}": f for i, f in enumerate(teachers) if f is not None and i in held}
    key_of, encoders = load_text_encoders({"base": base, **new}, device, dtype)
    teacher_device = "cpu" if recipe.train.teacher_offload == "cpu" else device
    old_count = sum(f is None for f in teachers)
    unets, keys, styles = [], [], []
    spec = recipe.train.student
    if previous is not None:
        earlier = load_component(UNet2DConditionModel, previous, "unet", torch.float32)
        student = grow_student(earlier, len(teachers), recipe.train.new_style_init, recipe.train.seed)
        frozen = earlier.to(dtype).to(teacher_device) if any(i in held for i in range(old_count)) else None
    else:
        base_unet = load_component(UNet2DConditionModel, base, "unet", torch.float32)
        student = make_student(base_unet, len(teachers), recipe.train.seed, recipe.train.style_init == "zero")
    if spec.type == "lora":  # the adapter goes on the base; a grown student's style MLP is kept
        grown_mlp = student.class_embedding.state_dict()
        if previous is not None:
            student = make_student(load_component(UNet2DConditionModel, base, "unet", torch.float32), len(teachers))
            student.class_embedding.load_state_dict(grown_mlp)
        student = add_adapter(student, spec.rank, spec.alpha or spec.rank, spec.targets, recipe.train.seed, dtype,
                              spec.extras)
        if previous is not None:
            load_adapter(student, previous)
    for i, folder in enumerate(teachers):
        if i not in held:
            unets.append(None)
            keys.append(key_of["base"])  # (never read: another process runs this teacher)
            styles.append(one_hot(i, old_count) if folder is None else None)
        elif folder is None:
            unets.append(frozen)
            keys.append(key_of["base"])
            styles.append(one_hot(i, old_count))
        else:
            unets.append(load_component(UNet2DConditionModel, folder, "unet", dtype).to(teacher_device))
            keys.append(key_of[f"teacher{i}"])
            styles.append(None)
    schedule = DDPMScheduler.from_pretrained(base / "scheduler")
    discriminator_base = None
    if recipe.train.adversarial_loss is not None:
        discriminator_base = load_component(UNet2DConditionModel, base, "unet", dtype)
    prediction = read_schedule(base).prediction_type
    predictions = [read_schedule(folder or previous).prediction_type for folder in teachers]
    return Models(student, unets, keys, encoders, key_of["base"], schedule.alphas_cumprod.clone(), dtype, styles,
                  discriminator_base, prediction, predictions)


def load_vae(base: Path, device) -> AutoencoderKL:
    return load_component(AutoencoderKL, base, "vae", torch.float32).to(device).eval()
