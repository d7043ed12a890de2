"""Load any Stable Diffusion family folder as a ready diffusers pipeline: samplers, attention backend, components."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from .. import console
from ..errors import BadInput, ModelError
from ..files.safetensors_header import weight_files
from ..files.safetensors_io import TensorReader, check_finite
from ..files.text import read_json
from .attention import use_attention
from .folders import check_pipeline_folder, check_text_to_image
from .student import holds_style_mlp, load_style_mlp

PIPELINE_CLASSES = {cls.__name__: cls for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline)}
console.quiet_loading()
SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpm++-karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
}


def pipeline_class(folder: Path) -> type:
    """The diffusers pipeline class of a checked SD-family folder."""
    return PIPELINE_CLASSES[check_pipeline_folder(folder)]


def load_pipeline(
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    *,
    scheduler: str | None = None,
    attention: str = "auto",
):
    """A ready pipeline on `device`: safetensors weights only, no safety checker, no remote code."""
    cls = pipeline_class(folder)
    check_text_to_image(folder)
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if cls is StableDiffusionXLPipeline:
        extra = {}
    if holds_style_mlp(read_json(folder / "unet" / "config.json")):
        extra["unet"] = load_component(UNet2DConditionModel, folder, "unet", dtype)
    try:
        pipe = cls.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True, **extra)
    except (OSError, ValueError, TypeError) as e:  # a config entry of the wrong kind is a TypeError
        raise ModelError(f"{folder}: cannot load the model ({str(e).splitlines()[0]})") from e
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.to(device)
    use_attention(pipe, attention, device, dtype)
    pipe.set_progress_bar_config(disable=console.progress_disabled(), leave=False)
    return pipe


def make_scheduler(name: str, config):
    if name not in SCHEDULERS:
        raise BadInput(f"--scheduler: unknown scheduler {name!r} (use {', '.join(SCHEDULERS)})")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)


def load_component(cls, folder: Path, part: str, dtype: torch.dtype | None = None):
    """One pipeline component (unet, vae, text_encoder...) from safetensors, taking the fp16 variant if it is the
    only one present."""
    sub = Path(folder) / part
    try:
        files = weight_files(sub)
    except FileNotFoundError:
        raise ModelError(f"{sub}: no .safetensors weights (pickle weights are not loaded)") from None
    variant = files[0].name.split(".")[1].split("-")[0] if files[0].name.count(".") >= 2 else None
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        model = cls.from_pretrained(sub, use_safetensors=True, variant=variant, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"{sub}: cannot load ({str(e).splitlines()[0]})") from e
    if isinstance(model, UNet2DConditionModel) and holds_style_mlp(model.config):
        load_style_mlp(model, _tensors(files, "class_embedding."))
    for name, tensor in model.state_dict().items():
        check_finite(tensor, sub, name)
    return model


def _tensors(files: list[Path], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with `prefix`, from weight files (a UNet's shards)."""
    found = {}
    for file in files:
        reader = TensorReader(file)
        try:
            found.update({k: reader.get(k) for k in reader.header if k.startswith(prefix)})
        finally:
            reader.close()
    return found
