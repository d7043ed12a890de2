"""Training data: an image-caption folder, encoded once by the VAE into a latent cache on disk.

Folders follow the Hugging Face imagefolder convention: `metadata.jsonl` lines with `file_name` and
`text`, or an `image.txt` caption beside each `image.png`. `toy:shapes` is the toy zoo's own set.
"""
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

from .. import console, state
from ..checkpoint import atomic_file, atomic_folder
from ..errors import BadInput

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
TOY_DATA = "toy:shapes"
TOY_IMAGES_PER_PAIR = 12


def toy_folder() -> Path:
    """The toy zoo's image set, written on first use: like a web-scale set it mixes every rendering style,
    and it leaves the held-out colour/shape pairs out."""
    from ..toy import shapes

    folder = state.home() / "toy-data" / f"shapes-all-styles-{TOY_IMAGES_PER_PAIR}"
    if (folder / "metadata.jsonl").is_file():
        return folder
    with atomic_folder(folder) as tmp:
        lines = []
        items = [item for style in shapes.STYLES
                 for item in shapes.dataset(style, shapes.training_pairs(), TOY_IMAGES_PER_PAIR, seed=1234)]
        for k, (image, text) in enumerate(items):
            name = f"{k:05d}.png"
            image.save(tmp / name)
            lines.append(json.dumps({"file_name": name, "text": text}))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def resolve_data(ref: str) -> Path:
    if ref == TOY_DATA:
        return toy_folder()
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        raise BadInput(f"data.folder {ref}: no such folder")
    return folder


def read_captioned_folder(folder: Path) -> list[tuple[Path, str]]:
    """(image path, caption) pairs, in a stable order."""
    meta = folder / "metadata.jsonl"
    items: list[tuple[Path, str]] = []
    if meta.is_file():
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                items.append((folder / row["file_name"], str(row["text"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise BadInput(f"{meta}: line {n} needs JSON with file_name and text") from None
        for path, _ in items:
            if not path.is_file():
                raise BadInput(f"{meta}: {path.name} is listed but missing")
    else:
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.with_suffix(".txt").is_file():
                items.append((path, path.with_suffix(".txt").read_text().strip()))
    if not items:
        raise BadInput(f"data folder {folder}: no captioned images (need metadata.jsonl or .txt captions "
                       "beside the images)")
    return items


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
    with atomic_file(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(captions))
    with atomic_file(path) as tmp:
        save_file({"latents": latents.contiguous()}, tmp)
    return LatentSet(latents, captions)
