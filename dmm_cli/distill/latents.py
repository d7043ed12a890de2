"""Training images encoded once by the VAE into a latent cache on disk, keyed by VAE, size and files.

Pictures are cropped square, or with aspect-ratio buckets (as SDXL and its fine-tunes are trained) to the
bucket of about the same area whose shape is nearest theirs; each bucket's latents are one tensor.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import console
from ..data.sources import CaptionedImages
from ..errors import BadInput, DMMError
from ..files import state
from ..files.atomic import atomic_file
from ..files.text import read_json


def buckets(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """(height, width) shapes of at most resolution² pixels, sides multiples of `multiple`, from 1:2 to 2:1."""
    shapes = set()
    for width in range(multiple, 2 * resolution + 1, multiple):
        height = resolution * resolution // width // multiple * multiple
        if height and 0.5 <= width / height <= 2:
            shapes.add((height, width))
    return sorted(shapes)


def nearest_bucket(height: int, width: int, shapes: list[tuple[int, int]]) -> tuple[int, int]:
    """The shape whose aspect ratio is nearest the picture's (the squarer one, then the larger, on a tie)."""
    ratio = math.log(width / height)
    return min(shapes, key=lambda s: (round(abs(math.log(s[1] / s[0]) - ratio), 9), abs(s[0] - s[1]), -s[0] * s[1]))


def _pixels(image: Image.Image, height: int, width: int) -> tuple[torch.Tensor, list[int]]:
    """Resize to cover height x width, centre-crop, scale to [-1, 1]; with SDXL's size conditioning of the
    result: original height and width, the crop's top and left, target height and width."""
    original = [image.height, image.width]
    scale = max(width / image.width, height / image.height)
    image = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                         Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)
    return pixels, original + [top, left, height, width]


@dataclass
class LatentSet:
    latents: torch.Tensor  # (N, C, h, w), already multiplied by the VAE's scaling factor
    captions: list[str]
    time_ids: torch.Tensor  # (N, 6): SDXL's size conditioning of each picture, as _pixels gives it

    def __len__(self) -> int:
        return len(self.captions)


def _from_cache(path: Path) -> list[LatentSet] | None:
    """The latent sets cached at `path`, or None, with a warning, when the cache does not read whole (it is then
    made again)."""
    try:
        cached, captions = load_file(path), read_json(path.with_suffix(".json"))
        sets = [LatentSet(cached[f"latents.{i}"], group, cached[f"time_ids.{i}"]) for i, group in enumerate(captions)]
        if not sets or any(len(s.latents) != len(s.captions) or len(s.time_ids) != len(s.captions) for s in sets):
            raise ValueError("its latents and captions do not pair up")
        return sets
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        console.warn(f"data: the latent cache {path} does not read ({type(e).__name__}); encoding the images again")
        return None


@torch.inference_mode()
def encode_items(images: CaptionedImages, vae, vae_sha256: str, resolution: int, device: torch.device,
                 batch_size: int = 16, max_bad_fraction: float = 0.05,
                 bucket_multiple: int | None = None) -> list[LatentSet]:
    """Latents of captioned pictures, one set per shape, from the cache when the VAE, sizes and pictures are
    unchanged. Square crops, or with `bucket_multiple` aspect-ratio buckets whose sides are its multiples.

    Pictures stream through a batch at a time; those that do not decode are skipped and counted, and more
    than `max_bad_fraction` of them fails the run."""
    shapes = buckets(resolution, bucket_multiple) if bucket_multiple else [(resolution, resolution)]
    # The leading number changes whenever pictures decode differently (4: high-bit greys, EXIF orientation).
    key = hashlib.sha256(f"4:{vae_sha256}:{shapes}:{images.fingerprint()}".encode()).hexdigest()[:24]
    path = state.home() / "latents" / f"{key}.safetensors"
    if path.is_file():
        sets = _from_cache(path)
        if sets is not None:
            console.say(f"data: {len(images)} images, latents from cache {path}")
            return sets
    kind = f"{len(shapes)} aspect-ratio buckets of about {resolution}px" if bucket_multiple else f"{resolution}px"
    console.say(f"data: encoding {len(images)} images at {kind} into the latent cache")
    found: dict[tuple[int, int], dict] = {}  # per shape: encoded chunks, captions, sizes, and the pending batch
    bad, first_bad = 0, None
    param = next(vae.parameters())

    def encode(group):
        mean = vae.encode(torch.stack(group["batch"]).to(device, param.dtype)).latent_dist.mode()
        group["chunks"].append((mean.float() * vae.config.scaling_factor).cpu())
        group["batch"].clear()

    for index, (picture, caption) in enumerate(tqdm(images, total=len(images), desc="encode",
                                                    disable=console.progress_disabled(), leave=False)):
        if picture is None:
            bad, first_bad = bad + 1, first_bad or images.name_of(index)
            continue
        shape = nearest_bucket(picture.height, picture.width, shapes)
        group = found.setdefault(shape, {"chunks": [], "captions": [], "sizes": [], "batch": []})
        pixels, size = _pixels(picture, *shape)
        group["batch"].append(pixels)
        group["sizes"].append(size)
        group["captions"].append(caption)
        if len(group["batch"]) == batch_size:
            encode(group)
    total = sum(len(g["captions"]) for g in found.values()) + bad
    if not total:
        raise BadInput(f"{images.description}: no pictures")
    if bad and (bad == total or bad / total > max_bad_fraction):
        raise BadInput(f"{images.description}: {bad} of {total} pictures do not decode (the first: {first_bad}), "
                       f"more than data.max_bad_fraction ({max_bad_fraction:.0%})")
    if bad:
        console.warn(f"{images.description}: skipped {bad} of {total} pictures that do not decode (the first: "
                     f"{first_bad})")
    sets = []
    for shape in sorted(found):
        group = found[shape]
        if group["batch"]:
            encode(group)
        sets.append(LatentSet(torch.cat(group["chunks"]), group["captions"],
                              torch.tensor(group["sizes"], dtype=torch.float32)))
    if bucket_multiple:
        console.say("data: buckets " + ", ".join(f"{s.time_ids[0, 4]:.0f}x{s.time_ids[0, 5]:.0f}: {len(s)}"
                                                 for s in sets))
    try:  # a cache: a read-only or full $DMM_HOME costs a warning, not the run
        with atomic_file(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps([s.captions for s in sets]), encoding="utf-8")
        with atomic_file(path) as tmp:
            save_file({name: tensor.contiguous() for i, s in enumerate(sets)
                       for name, tensor in ((f"latents.{i}", s.latents), (f"time_ids.{i}", s.time_ids))}, tmp)
    except (OSError, DMMError) as e:
        console.warn(f"latent cache not written ({e}); the images will be encoded again next time")
    return sets
