"""Sampling with a stock diffusers pipeline, under a style vector for a DMM student, with per-picture seeds."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from .. import console
from ..errors import BadInput, ModelError, OutOfMemory


@contextlib.contextmanager
def style_conditioning(unet, style: torch.Tensor | None):
    """Feed a style vector to a style-promptable UNet on every call, through a forward pre-hook.

    The pipeline itself stays stock diffusers; both halves of a classifier-free-guidance batch get the style.
    """
    if style is None:
        yield
        return

    on_device = {}  # one copy per device, dtype and batch: a copy at every step would stall the GPU queue

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        key = (sample.device, sample.dtype, sample.shape[0])
        if key not in on_device:
            on_device[key] = style.to(sample.device, sample.dtype).expand(sample.shape[0], -1)
        kwargs["class_labels"] = on_device[key]
        return args, kwargs

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def default_size(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def batches(
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
) -> Iterator[list[Image.Image]]:
    """The pictures of one prompt each, a batch at a time; picture i is seeded with seeds[i] (default seed + i),
    whatever the batch size."""
    trained = pipe.scheduler.config.num_train_timesteps
    if steps > trained:  # past it, diffusers fails at the first step or repeats timesteps
        raise BadInput(f"--steps {steps} is more than the {trained} timesteps {pipe.name_or_path} was trained on")
    size = default_size(pipe)
    _check_host_memory(pipe, width or size, height or size, min(batch_size, len(prompts)))
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        chunk_seeds = seeds[start:start + batch_size] if seeds is not None else range(seed + start, seed + start
                                                                                       + len(chunk))
        generators = [torch.Generator("cpu").manual_seed(s) for s in chunk_seeds]
        with style_conditioning(pipe.unet, style), torch.inference_mode():
            out = pipe(
                prompt=chunk,
                negative_prompt=[negative] * len(chunk) if negative else None,
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width or size,
                height=height or size,
                generator=generators,
                output_type="np",
            )
        _check_finite(pipe, out.images)
        yield pipe.numpy_to_pil(out.images)


def warn_if_cut(pipe, what: str, text: str | None) -> None:
    """diffusers cuts a prompt to the text encoder's length with a log line that dmm keeps quiet: say so."""
    limit = pipe.tokenizer.model_max_length
    tokens = len(pipe.tokenizer(text).input_ids) if text else 0
    if tokens > limit:
        console.warn(f"the {what} is {tokens} tokens long, and the text encoder reads the first {limit}; the rest "
                     "is left out")


def _host_memory_available() -> int | None:
    """Bytes the kernel can still hand out (MemAvailable), or None where /proc/meminfo is not there."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _check_host_memory(pipe, width: int, height: int, pictures: int) -> None:
    """On the CPU, the kernel kills a process that touches more memory than there is before torch can fail
    cleanly (a GPU's allocator just fails, and that is said in one sentence elsewhere). So refuse pictures that
    cannot fit. A lower bound of what decoding needs: the VAE decoder's last upsampler holds its input, enlarged to
    full size, and its convolution's output at once, each as wide as the encoder's second block."""
    if pipe.device.type != "cpu" or (available := _host_memory_available()) is None:
        return
    widths = pipe.vae.config.block_out_channels
    needs = 2 * widths[min(1, len(widths) - 1)] * width * height * pictures * pipe.vae.dtype.itemsize
    if needs > available:
        fewer = " or fewer at once (--batch-size)" if pictures > 1 else ""
        raise OutOfMemory(f"decoding {pictures} picture{'s' if pictures > 1 else ''} of {width}x{height} at once "
                          f"needs at least {needs / 2**30:.1f} GiB of host memory, and {available / 2**30:.1f} GiB is "
                          f"available; draw smaller pictures (--width, --height){fewer}")


def _check_finite(pipe, pictures: np.ndarray) -> None:
    """diffusers turns a NaN picture into a black one without a word; say why it is NaN instead."""
    if np.isfinite(pictures).all():
        return
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, part, None)
        for name, weight in module.named_parameters() if module is not None else ():
            if not torch.isfinite(weight).all():
                raise ModelError(f"{pipe.name_or_path}: its {part} weight {name} holds NaN or Inf, so every picture "
                                 "it draws is NaN")
    dtype = str(pipe.unet.dtype).removeprefix("torch.")
    cure = ("draw them with --dtype fp32 (or bf16)" if pipe.unet.dtype == torch.float16 else
            "the weights (or a LoRA's scale) are too large to sample with")
    raise BadInput(f"the pictures came out NaN: a value overflowed {dtype} while sampling; {cure}")


def generate(pipe, prompts: list[str], **kwargs) -> list[Image.Image]:
    """All the pictures of `batches`, in one list."""
    return [image for batch in batches(pipe, prompts, **kwargs) for image in batch]


SEED_LIMIT = 2**63  # torch generators take seeds below this
# Disjoint by construction: pictures that eval measures take seeds below SYNTHESIS_SEEDS, a student's synthesized
# training pictures take seeds from it up, so a student is never trained on a picture eval compares it with.
SYNTHESIS_SEEDS = 2**62


def check_generation_args(*, steps: int, guidance: float, width: int | None, height: int | None,
                          num_images: int, batch_size: int, seed: int = 0, seed_span: int = 0,
                          seed_limit: int = SEED_LIMIT) -> None:
    """Refuse bad sampling arguments in one sentence; `seed_span`: how far past seed + num_images seeds reach;
    every seed used stays below `seed_limit`."""
    if steps < 1:
        raise BadInput(f"--steps must be at least 1 (got {steps})")
    if not (math.isfinite(guidance) and guidance >= 0):
        raise BadInput(f"--guidance must be a finite number, 0 or more (got {guidance})")
    for flag, value in (("--width", width), ("--height", height)):
        if value is not None and (value <= 0 or value % 8):
            raise BadInput(f"{flag} must be a positive multiple of 8 (got {value})")
    if num_images < 1:
        raise BadInput(f"--num-images must be at least 1 (got {num_images})")
    if batch_size < 1:
        raise BadInput(f"--batch-size must be at least 1 (got {batch_size})")
    if not 0 <= seed <= seed_limit - 1 - num_images - seed_span:
        raise BadInput(f"--seed must be between 0 and {seed_limit - 1 - num_images - seed_span} (got {seed})")
