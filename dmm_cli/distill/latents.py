"""Training images encoded once by the VAE into a latent cache on disk, keyed by VAE, size and files."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import console
from ..errors import BadInput, DMMError
from ..files import state
from ..files.atomic import atomic_file


def _load_image(path: Path, resolution: int) -> torch.Tensor:
    """Resize the short side to `resolution`, centre-crop, scale to [-1, 1]."""
    try:
        image = Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError):
        raise BadInput(f"{path}: not a readable image") from None
    scale = resolution / min(image.size)
    image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))),
                         Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)


@dataclass
class LatentSet:
    latents: torch.Tensor  # (N, C, h, w), already multiplied by the VAE's scaling factor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def cache_key(items: list[tuple[Path, str]], vae_sha256: str, resolution: int) -> str:
    h = hashlib.sha256(f"{vae_sha256}:{resolution}".encode())
    for path, text in items:
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}:{text}\n".encode())
    return h.hexdigest()[:24]


@torch.inference_mode()
def encode_items(items: list[tuple[Path, str]], vae, vae_sha256: str, resolution: int, device: torch.device,
                 batch_size: int = 16) -> LatentSet:
    """Latents of captioned images, from the cache when the VAE, size and files are unchanged."""
    key = cache_key(items, vae_sha256, resolution)
    path = state.home() / "latents" / f"{key}.safetensors"
    if path.is_file():
        console.say(f"data: {len(items)} images, latents from cache {path}")
        return LatentSet(load_file(path)["latents"], json.loads(path.with_suffix(".json").read_text()))
    console.say(f"data: encoding {len(items)} images at {resolution}px into the latent cache")
    chunks = []
    param = next(vae.parameters())
    for start in tqdm(range(0, len(items), batch_size), desc="encode", disable=console.progress_disabled(),
                      leave=False):
        pixels = torch.stack([_load_image(p, resolution) for p, _ in items[start:start + batch_size]])
        mean = vae.encode(pixels.to(device, param.dtype)).latent_dist.mode()
        chunks.append((mean.float() * vae.config.scaling_factor).cpu())
    latents = torch.cat(chunks)
    captions = [text for _, text in items]
    try:  # a cache: a read-only or full $DMM_HOME costs a warning, not the run
        with atomic_file(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(captions))
        with atomic_file(path) as tmp:
            save_file({"latents": latents.contiguous()}, tmp)
    except (OSError, DMMError) as e:
        console.warn(f"latent cache not written ({e}); the images will be encoded again next time")
    return LatentSet(latents, captions)
