"""Load any Stable Diffusion family folder and generate pictures with it, optionally under a style vector."""
from __future__ import annotations

import contextlib
import functools
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
)
from PIL import Image

from . import console
from .errors import BadInput, ModelError
from .folders import check_pipeline_folder

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
ATTENTION_BACKENDS = ("auto", "sdpa", "xformers")


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
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if cls is StableDiffusionXLPipeline:
        extra = {}
    try:
        pipe = cls.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True, **extra)
    except (OSError, ValueError, EnvironmentError) as e:
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


@functools.cache
def xformers_failure(device: str, dtype: torch.dtype) -> str | None:
    """Why xformers cannot run here, or None if a real tiny attention op just succeeded.

    Importing is not enough: PyPI builds import fine on torch versions whose CUDA kernels they cannot load.
    """
    try:
        import xformers.ops
    except Exception as e:  # any import failure means "not usable", whatever its type
        return f"cannot import xformers: {e.__class__.__name__}"
    try:
        q = torch.randn(1, 16, 2, 8, device=device, dtype=dtype)
        xformers.ops.memory_efficient_attention(q, q, q)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    except Exception as e:  # same: any failure of the probe op rules xformers out
        return f"its attention op failed on {device}: {str(e).splitlines()[0][:120]}"
    return None


def choose_attention(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The attention backend to run ("xformers" or "sdpa"), said once on stderr."""
    if requested not in ATTENTION_BACKENDS:
        raise BadInput(f"--attention: unknown backend {requested!r} (use {', '.join(ATTENTION_BACKENDS)})")
    if requested == "sdpa":
        console.say("attention: PyTorch SDPA")
        return "sdpa"
    failure = xformers_failure(str(device), dtype)
    if failure is None:
        console.say("attention: xformers")
        return "xformers"
    if requested == "xformers":
        raise BadInput(f"--attention xformers: xformers is not usable ({failure})")
    console.say(f"attention: PyTorch SDPA (xformers not used: {failure})")
    return "sdpa"


def use_attention(pipe_or_model, requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Switch a pipeline or model to the chosen backend; SDPA is diffusers' default, so it needs no change."""
    backend = choose_attention(requested, device, dtype)
    if backend == "xformers":
        pipe_or_model.enable_xformers_memory_efficient_attention()
    return backend


@contextlib.contextmanager
def style_conditioning(unet, style: torch.Tensor | None):
    """Feed a style vector to a style-promptable UNet on every call, through a forward pre-hook.

    The pipeline itself stays stock diffusers; both halves of a classifier-free-guidance batch get the style.
    """
    if style is None:
        yield
        return

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        kwargs["class_labels"] = style.to(sample.device, sample.dtype).expand(sample.shape[0], -1)
        return args, kwargs

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def default_size(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def generate(
    pipe,
    prompts: list[str],
    *,
    negative: str | None = None,
    steps: int = 30,
    guidance: float = 7.5,
    seed: int = 0,
    width: int | None = None,
    height: int | None = None,
    style: torch.Tensor | None = None,
    batch_size: int = 8,
    seeds: list[int] | None = None,
) -> list[Image.Image]:
    """One picture per prompt; picture i is seeded with seeds[i] (default seed + i), whatever the batch size."""
    size = default_size(pipe)
    seeds = seeds if seeds is not None else [seed + i for i in range(len(prompts))]
    images: list[Image.Image] = []
    with style_conditioning(pipe.unet, style), torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[start:start + batch_size]]
            out = pipe(
                prompt=chunk,
                negative_prompt=[negative] * len(chunk) if negative else None,
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width or size,
                height=height or size,
                generator=generators,
            )
            images.extend(out.images)
    return images


def check_generation_args(*, steps: int, guidance: float, width: int | None, height: int | None,
                          num_images: int, batch_size: int) -> None:
    if steps < 1:
        raise BadInput(f"--steps must be at least 1 (got {steps})")
    if guidance < 0:
        raise BadInput(f"--guidance must be 0 or more (got {guidance})")
    for flag, value in (("--width", width), ("--height", height)):
        if value is not None and (value <= 0 or value % 8):
            raise BadInput(f"{flag} must be a positive multiple of 8 (got {value})")
    if num_images < 1:
        raise BadInput(f"--num-images must be at least 1 (got {num_images})")
    if batch_size < 1:
        raise BadInput(f"--batch-size must be at least 1 (got {batch_size})")


def output_paths(output: Path, names: list[str]) -> list[Path]:
    """Where pictures go: `output` itself if it names a .png (one picture only), else `names` inside it."""
    from .checkpoint import writable_folder

    if output.suffix.lower() == ".png":
        if len(names) != 1:
            raise BadInput(f"--output {output} names one file, but {len(names)} pictures will be made; give a folder")
        folder, paths = output.parent, [output]
    else:
        folder, paths = output, [output / name for name in names]
    if folder.exists() and not folder.is_dir() or not writable_folder(folder):
        raise BadInput(f"--output {output}: cannot write to {folder}")
    return paths


def load_component(cls, folder: Path, part: str, dtype: torch.dtype | None = None):
    """One pipeline component (unet, vae, text_encoder...) from safetensors, taking the fp16 variant if it is the
    only one present."""
    from .checkpoint import weight_files

    sub = Path(folder) / part
    try:
        files = weight_files(sub)
    except FileNotFoundError:
        raise ModelError(f"{sub}: no .safetensors weights (pickle weights are not loaded)") from None
    variant = files[0].name.split(".")[1].split("-")[0] if files[0].name.count(".") >= 2 else None
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        return cls.from_pretrained(sub, use_safetensors=True, variant=variant, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"{sub}: cannot load ({str(e).splitlines()[0]})") from e
