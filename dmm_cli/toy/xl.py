"""The toy zoo's SDXL family: a base and two style teachers with SDXL's topology at toy widths.

SDXL's parts, as diffusers builds them: two text encoders (the zoo's CLIP, then a wider one with a pooled
projection) whose penultimate hidden states sit side by side as the cross-attention context, the text-time
embedding of the pooled projection and the size conditioning, no attention at the highest resolution, deeper
transformers further down, and zeroed conditioning for a dropped caption. The VAE, the first text encoder and
the tokenizer are the SD1.x toy base's, linked, so the family adds a few MB to the zoo.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .. import console
from . import components, shapes
from .training import save_model, style_latents, train_denoiser

BASE = "xl-base"
TEACHER_STYLES = ("night", "checker")
TEXT_2_WIDTH, POOLED_WIDTH, TIME_WIDTH = 96, 32, 8
UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64, 64],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 1, 2],
    attention_head_dim=[2, 4, 8], use_linear_projection=True, norm_num_groups=16,
    cross_attention_dim=components.TEXT_WIDTH + TEXT_2_WIDTH, addition_embed_type="text_time",
    addition_time_embed_dim=TIME_WIDTH, projection_class_embeddings_input_dim=6 * TIME_WIDTH + POOLED_WIDTH,
)
# Parts an XL model links to instead of holding: (its part, the SD1.x toy base's part it is).
FROM_SD_BASE = (("vae", "vae"), ("text_encoder", "text_encoder"), ("tokenizer", "tokenizer"),
                ("tokenizer_2", "tokenizer"))


def teacher_name(style: str) -> str:
    return f"xl-{style}"


def text_encoder_2(tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_2_WIDTH, intermediate_size=2 * TEXT_2_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=components.MAX_TOKENS, projection_dim=POOLED_WIDTH,
        hidden_act="gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def xl_conditioning(encoders, tokenizer, captions: list[str], size: int):
    """SDXL's conditioning of dataset items: both encoders' penultimate hidden states side by side, the second's
    pooled projection, the size conditioning of an uncropped `size` picture; all zeros for a dropped caption."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)

    def condition(idx: torch.Tensor, drop: torch.Tensor) -> dict:
        hidden, pooled = [], None
        for encoder in encoders:
            out = encoder(ids[idx], output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        keep = (~drop).float()
        return {"encoder_hidden_states": torch.cat(hidden, -1) * keep[:, None, None],
                "added_cond_kwargs": {"text_embeds": pooled * keep[:, None], "time_ids": time_ids.expand(len(idx), -1)}}
    return condition


def build(out: Path, plan, seed: int) -> dict:
    """Train the XL base (with its second text encoder) and its teachers next to the SD1.x toy base in `out`."""
    sd_base = out / "base"
    vae = AutoencoderKL.from_pretrained(sd_base / "vae", torch_dtype=torch.float32).eval()
    text_encoder = CLIPTextModel.from_pretrained(sd_base / "text_encoder", torch_dtype=torch.float32).eval()
    text_encoder.requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(sd_base / "tokenizer")
    latents, captions = {}, {}
    for style in (shapes.BASE_STYLE, *TEACHER_STYLES):
        latents[style], captions[style] = style_latents(vae, style, plan, seed)

    torch.manual_seed(seed)
    text_2 = text_encoder_2(tokenizer)
    unet = UNet2DConditionModel(**UNET)
    console.say("toy zoo: training the SDXL-shaped base model")
    encoders = [text_encoder, text_2]
    unet = train_denoiser(unet, xl_conditioning(encoders, tokenizer, captions[shapes.BASE_STYLE], shapes.SIZE),
                          latents[shapes.BASE_STYLE], plan.base_steps, plan, seed, "xl base", text_2.parameters())
    shared = {part: f"base/{target}" for part, target in FROM_SD_BASE}

    def pipeline(unet):
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_2, tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=unet, scheduler=components.scheduler())

    save_model(pipeline(unet), out / BASE, shared)
    for i, style in enumerate(TEACHER_STYLES):
        console.say(f"toy zoo: fine-tuning SDXL-shaped teacher {style!r}")
        teacher = UNet2DConditionModel(**UNET)
        teacher.load_state_dict(unet.state_dict())
        teacher = train_denoiser(teacher, xl_conditioning(encoders, tokenizer, captions[style], shapes.SIZE),
                                 latents[style], plan.teacher_steps, plan, seed + 11 + i, f"xl {style}")
        save_model(pipeline(teacher), out / teacher_name(style),
              {**shared, "text_encoder_2": f"{BASE}/text_encoder_2", "scheduler": f"{BASE}/scheduler"})
    return {"base": BASE, "teachers": [teacher_name(s) for s in TEACHER_STYLES]}
