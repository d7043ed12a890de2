"""Training images encoded once by the VAE into a latent cache on disk, keyed by VAE, size and files."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import console
from ..data.sources import CaptionedImages
from ..errors import BadInput, DMMError
from ..files import state
from ..files.atomic import atomic_file


def _pixels(image: Image.Image, resolution: int) -> tuple[torch.Tensor, list[int]]:
    """Resize the short side to `resolution`, centre-crop, scale to [-1, 1]; with SDXL's size conditioning of
    the result: original height and width, the crop's top and left, target height and width."""
    original = [image.height, image.width]
    scale = resolution / min(image.size)
    image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))),
                         Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)
    return pixels, original + [top, left, resolution, resolution]


@dataclass
class LatentSet:
    latents: torch.Tensor  # (N, C, h, w), already multiplied by the VAE's scaling factor
    captions: list[str]
    time_ids: torch.Tensor  # (N, 6): SDXL's size conditioning of each picture, as _pixels gives it

    def __len__(self) -> int:
        return len(self.captions)


@torch.inference_mode()
def encode_items(images: CaptionedImages, vae, vae_sha256: str, resolution: int, device: torch.device,
                 batch_size: int = 16, max_bad_fraction: float = 0.05) -> LatentSet:
    """Latents of captioned pictures, from the cache when the VAE, size and pictures are unchanged.

    Pictures stream through a batch at a time; those that do not decode are skipped and counted, and more
    than `max_bad_fraction` of them fails the run."""
    key = hashlib.sha256(f"2:{vae_sha256}:{resolution}:{images.fingerprint()}".encode()).hexdigest()[:24]
    path = state.home() / "latents" / f"{key}.safetensors"
    if path.is_file():
        console.say(f"data: {len(images)} images, latents from cache {path}")
        cached = load_file(path)
        return LatentSet(cached["latents"], json.loads(path.with_suffix(".json").read_text()), cached["time_ids"])
    console.say(f"data: encoding {len(images)} images at {resolution}px into the latent cache")
    chunks, captions, sizes, batch, bad = [], [], [], [], 0
    param = next(vae.parameters())

    def encode():
        mean = vae.encode(torch.stack(batch).to(device, param.dtype)).latent_dist.mode()
        chunks.append((mean.float() * vae.config.scaling_factor).cpu())
        batch.clear()

    for picture, caption in tqdm(images, total=len(images), desc="encode", disable=console.progress_disabled(),
                                 leave=False):
        if picture is None:
            bad += 1
            continue
        pixels, size = _pixels(picture, resolution)
        batch.append(pixels)
        sizes.append(size)
        captions.append(caption)
        if len(batch) == batch_size:
            encode()
    if batch:
        encode()
    total = len(captions) + bad
    if bad and (not captions or bad / total > max_bad_fraction):
        raise BadInput(f"{images.description}: {bad} of {total} pictures do not decode, more than "
                       f"data.max_bad_fraction ({max_bad_fraction:.0%})")
    if bad:
        console.warn(f"{images.description}: skipped {bad} of {total} pictures that do not decode")
    latents, time_ids = torch.cat(chunks), torch.tensor(sizes, dtype=torch.float32)
    try:  # a cache: a read-only or full $DMM_HOME costs a warning, not the run
        with atomic_file(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(captions))
        with atomic_file(path) as tmp:
            save_file({"latents": latents.contiguous(), "time_ids": time_ids}, tmp)
    except (OSError, DMMError) as e:
        console.warn(f"latent cache not written ({e}); the images will be encoded again next time")
    return LatentSet(latents, captions, time_ids)
