"""Tiny model families with real Stable Diffusion topology: SD1.5's blocks and SD2.x's (OpenCLIP text
encoder, linear attention projections, v-prediction), at small widths and random weights. Not the toy zoo:
nothing here knows it exists. Fine-tunes are the base plus seeded noise, so they differ like real ones."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dmm_cli.models.single_file import CONFIGS

UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[32, 32, 64, 64],
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=32, norm_num_groups=16)
FAMILIES = {
    "sd15": {"unet": dict(UNET, attention_head_dim=8),
             "text": dict(hidden_act="quick_gelu"),
             "scheduler": {}},
    "sd2": {"unet": dict(UNET, attention_head_dim=[2, 4, 8, 8], use_linear_projection=True),
            "text": dict(hidden_act="gelu"),
            "scheduler": dict(prediction_type="v_prediction", timestep_spacing="trailing")},
}
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=2, norm_num_groups=8,
           block_out_channels=[8, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4)
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=32)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build(folder: Path, family: str, seed: int = 0, base: Path | None = None, noise: float = 0.02,
          dtype: torch.dtype = torch.float32) -> Path:
    """A pipeline folder of `family`; with `base`, a fine-tune of it (its weights plus seeded noise)."""
    spec = FAMILIES[family]
    if base is None:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**VAE)
        text = CLIPTextModel(CLIPTextConfig(**TEXT, **spec["text"]))
    else:
        unet = UNet2DConditionModel.from_pretrained(base / "unet")
        vae = AutoencoderKL.from_pretrained(base / "vae")
        text = CLIPTextModel.from_pretrained(base / "text_encoder")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(torch.randn(p.shape, generator=g) * noise * (p.std() if p.numel() > 1 else 1))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(CONFIGS / family / "tokenizer"),
        unet=unet, scheduler=DDIMScheduler(**SCHEDULER, **spec["scheduler"]), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.to(dtype).save_pretrained(folder, safe_serialization=True)
    return folder


SDXL_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[32, 64, 64],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 transformer_layers_per_block=[1, 2, 2], attention_head_dim=[2, 4, 8], use_linear_projection=True,
                 cross_attention_dim=32 + 48, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 48, norm_num_groups=16)
# The second encoder is wider than the first, as in SDXL (768, 1280): diffusers' loader tells them apart by width.
TEXT_2 = dict(TEXT, hidden_size=48, intermediate_size=96, projection_dim=48)


def build_sdxl(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float16, base: Path | None = None,
               noise: float = 0.02) -> Path:
    """A pipeline folder of SDXL's topology at small widths: two text encoders (CLIP, then OpenCLIP-style with a
    projection) whose hidden states are concatenated for the cross-attention, and the text-time embedding; with
    `base`, a fine-tune of it (its UNet plus seeded noise, its other parts as they are)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    if base is not None:
        pipe = StableDiffusionXLPipeline.from_pretrained(base, torch_dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in pipe.unet.parameters():
                p.add_(torch.randn(p.shape, generator=g) * noise * (p.std() if p.numel() > 1 else 1))
        pipe.to(dtype).save_pretrained(folder, safe_serialization=True)
        return folder
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(**TEXT, hidden_act="quick_gelu"))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2, hidden_act="gelu"))
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**VAE, scaling_factor=0.13025), text_encoder=text, text_encoder_2=text_2,
        tokenizer=CLIPTokenizer.from_pretrained(CONFIGS / "sdxl" / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(CONFIGS / "sdxl" / "tokenizer_2"),
        unet=UNet2DConditionModel(**SDXL_UNET),
        scheduler=EulerDiscreteScheduler.from_pretrained(CONFIGS / "sdxl" / "scheduler"))
    pipe.to(dtype).save_pretrained(folder, safe_serialization=True)
    return folder
