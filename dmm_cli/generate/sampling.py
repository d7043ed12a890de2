"""Sampling with a stock diffusers pipeline, under a style vector for a DMM student, with per-picture seeds."""
from __future__ import annotations

import contextlib

import torch
from PIL import Image

from ..errors import BadInput


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
