"""The toy zoo's LoRA teachers: a low-rank adapter on the base UNet per style, trained like the full teachers.

Written in the two formats people publish, by turns: a kohya/A1111 single file (`<style>-lora.safetensors`,
with a per-layer alpha of rank/2 so readers must apply α/r) or a diffusers/PEFT folder (`<style>-lora-peft/`,
written by diffusers' own `save_lora_weights`). Deterministic for a given seed and thread count.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..files.atomic import atomic_file, atomic_folder
from . import shapes
from .training import style_latents, text_conditioning, train_denoiser

RANK = 8
# The layers kohya's sd-scripts trains (attention, feed-forward, projections; LoCon adds the ResNet convs).
LAYERS = (".to_q", ".to_k", ".to_v", ".to_out.0", ".ff.net.0.proj", ".ff.net.2", ".proj_in", ".proj_out",
          ".conv1", ".conv2", ".time_emb_proj", ".conv_shortcut")


def train(base: Path, style: str, plan, seed: int, rank: int) -> dict[str, tuple]:
    """layer -> (down, up): a rank-`rank` LoRA on the base UNet (peft), trained on the style's pictures the way its
    full teacher was."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(base / "vae", torch_dtype=torch.float32).eval()
    latents, captions = style_latents(vae, style, plan, seed)
    unet = UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=torch.float32)
    unet.requires_grad_(False)
    targets = sorted({name for name, module in unet.named_modules() if name.endswith(LAYERS)})
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder", torch_dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    text_encoder.requires_grad_(False)
    train_denoiser(unet, text_conditioning(text_encoder, tokenizer, captions), latents, plan.lora_steps,
                   dataclasses.replace(plan, lr=plan.lora_lr), seed, f"{style} LoRA")
    state = get_peft_model_state_dict(unet)
    return {layer: (state[f"{layer}.lora_A.weight"].half(), state[f"{layer}.lora_B.weight"].half())
            for layer in (k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight"))}


def write_kohya(layers: dict[str, tuple], path: Path) -> None:
    tensors = {}
    for layer, (down, up) in layers.items():
        key = "lora_unet_" + layer.replace(".", "_")
        rank = down.shape[0]
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = (up * 2).contiguous()  # alpha = rank / 2 halves it back
        tensors[f"{key}.alpha"] = torch.tensor(rank / 2)
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(RANK)})


def write_peft(layers: dict[str, tuple], folder: Path) -> None:
    from diffusers import StableDiffusionPipeline

    state = {}
    for layer, (down, up) in layers.items():
        state[f"{layer}.lora_A.weight"] = down.contiguous()
        state[f"{layer}.lora_B.weight"] = up.contiguous()
    with atomic_folder(folder) as tmp:  # replaces an older build's folder
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=state, safe_serialization=True)


def derive(zoo: Path, plan, seed: int = 0, rank: int = RANK) -> dict:
    """Train every style's LoRA on the zoo's base and write it under `zoo/loras`, in kohya and PEFT formats by
    turns (one format per style keeps the zoo small); return the manifest's entry."""
    out = zoo / "loras"
    out.mkdir(exist_ok=True)
    names = []
    for i, style in enumerate(shapes.TEACHER_STYLES):
        layers = train(zoo / "base", style, plan, seed + 101 + i, rank)
        if i % 2 == 0:
            write_kohya(layers, out / f"{style}-lora.safetensors")
            names.append(f"{style}-lora")
        else:
            write_peft(layers, out / f"{style}-lora-peft")
            names.append(f"{style}-lora-peft")
    return {"rank": rank, "names": names}
