"""SD1.5-shaped random-weight models and pipeline folders for benchmarks: shapes are real, weights are not.

The configs are Stable Diffusion 1.5's public ones. The tokenizer is the toy zoo's (real CLIP BPE
files cannot be downloaded here) padded to CLIP's 77 tokens, so text encoding costs what it costs in SD1.5.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import yaml
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from dmm_cli.toy import components

# The shipped SD1.5 UNet config, the same shapes as UNET below: what the dry run's memory plan reads.
UNET_CONFIG = Path(components.__file__).resolve().parents[1] / "models" / "configs" / "sd15" / "unet" / "config.json"

UNET = dict(sample_size=64, in_channels=4, out_channels=4,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
            cross_attention_dim=768, attention_head_dim=8)
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
           layers_per_block=2, latent_channels=4, sample_size=512)
CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
TINY_UNET = dict(UNET, sample_size=8, block_out_channels=[32, 32, 64, 64], layers_per_block=1,
                 cross_attention_dim=32, attention_head_dim=4)
TINY_VAE = dict(VAE, norm_num_groups=8, block_out_channels=[16, 16, 32, 32], layers_per_block=1, sample_size=64)
TINY_CLIP = dict(CLIP, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=32)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)

FLOP_PER_SAMPLE = 2.71e12  # distillation step without VAE: student fwd+bwd + teacher fwd (DESIGN.md)


def configs(tiny: bool):
    return (TINY_UNET, TINY_VAE, TINY_CLIP) if tiny else (UNET, VAE, CLIP)


def tokenizer():
    tok = components.tokenizer()
    tok.model_max_length = 77
    return tok


def unet(tiny: bool, dtype=torch.float32, device="cpu", seed=0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DConditionModel(**configs(tiny)[0]).to(dtype)


def text_encoder(tiny: bool, dtype=torch.float32, device="cpu") -> CLIPTextModel:
    torch.manual_seed(1)
    with torch.device(device):
        return CLIPTextModel(CLIPTextConfig(**configs(tiny)[2])).to(dtype)


def vae(tiny: bool, dtype=torch.float32, device="cpu") -> AutoencoderKL:
    torch.manual_seed(2)
    with torch.device(device):
        return AutoencoderKL(**configs(tiny)[1]).to(dtype)


def pipeline(unet_model, tiny: bool, dtype, device) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(vae=vae(tiny, dtype, device), text_encoder=text_encoder(tiny, dtype, device),
                                   tokenizer=tokenizer(), unet=unet_model, scheduler=DDIMScheduler(**SCHEDULER),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def write_model_folders(root: Path, teachers: int, tiny: bool) -> dict[str, Path]:
    """A base and `teachers` fine-tune folders in fp16 sharing one VAE and text encoder (linked)."""
    root.mkdir(parents=True, exist_ok=True)
    base = root / "base"
    pipeline(unet(tiny, seed=0), tiny, torch.float16, "cpu").save_pretrained(base, safe_serialization=True)
    folders = {"base": base}
    for i in range(teachers):
        folder = root / f"teacher{i}"
        unet(tiny, torch.float16, seed=i + 1).save_pretrained(folder / "unet", safe_serialization=True)
        for part in ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
            if not (folder / part).is_symlink():  # a second run into the same folder keeps the links it made
                os.symlink(base / part, folder / part)
        folders[f"teacher{i}"] = folder
    return folders


def write_recipe(work: Path, name: str, teachers: int, images: int, tiny: bool, train: dict) -> Path:
    """work/recipe.yaml: `teachers` random-weight fine-tunes of a random-weight base (work/models), trained on
    `images` random captioned pictures (work/data) with these `train` settings into work/run."""
    folders = write_model_folders(work / "models", teachers, tiny)
    size = 64 if tiny else 512
    recipe = {
        "name": name, "base": str(folders["base"]),
        "teachers": [{"name": f"style{i}", "model": str(folders[f"teacher{i}"])} for i in range(teachers)],
        "data": {"folder": str(write_data(work / "data", images, size)), "resolution": size},
        "train": {"lr": 1e-5, **train},
        "output": str(work / "run"),
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def write_data(folder: Path, count: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for k in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{k:04d}.png")
        lines.append(json.dumps({"file_name": f"{k:04d}.png", "text": f"a photo of a red circle number {k}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
