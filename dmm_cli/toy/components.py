"""Configurations of the toy zoo's components: real diffusers/transformers classes, SD-shaped, tiny.

Same classes and block layout as Stable Diffusion 1.5 (cross-attention down/up blocks, a VAE with
4 latent channels, a causal CLIP text encoder), scaled down so that a 32×32 picture becomes an
8×8×4 latent and a training step takes about a tenth of a second on two CPU cores.
"""
from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import shapes

MAX_TOKENS = 8
TEXT_WIDTH = 64

UNET = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[32, 64, 64], layers_per_block=1, norm_num_groups=16,
    cross_attention_dim=TEXT_WIDTH, attention_head_dim=8,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=shapes.SIZE,
    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[16, 32, 64], layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False,
)
# Stable Diffusion's training schedule.
SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


def vocabulary() -> list[str]:
    """Every token the toy tokenizer knows: CLIP's specials, single characters, and the zoo's words."""
    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-:"
    words = ["a", "an", "the", "of", "picture", "photo", "drawing", *shapes.COLOURS, *shapes.SHAPES]
    vocab = ["<|startoftext|>", "<|endoftext|>"]
    vocab += list(chars) + [c + "</w>" for c in chars]
    for word in words:
        # every left-to-right prefix, so the BPE merges below can build the word
        for end in range(2, len(word) + 1):
            piece = word[:end] + ("</w>" if end == len(word) else "")
            if piece not in vocab:
                vocab.append(piece)
    return vocab


def _merges() -> list[tuple[str, str]]:
    words = ["a", "an", "the", "of", "picture", "photo", "drawing", *shapes.COLOURS, *shapes.SHAPES]
    merges: list[tuple[str, str]] = []
    for word in words:
        left = word[0]
        for end in range(2, len(word) + 1):
            right = word[end - 1] + ("</w>" if end == len(word) else "")
            merge = (left, right)
            if merge not in merges:
                merges.append(merge)
            left = left + right
    return merges


def tokenizer() -> CLIPTokenizer:
    vocab = {token: i for i, token in enumerate(vocabulary())}
    return CLIPTokenizer(vocab=vocab, merges=_merges(), model_max_length=MAX_TOKENS)


def text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_WIDTH, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def vae() -> AutoencoderKL:
    return AutoencoderKL(**VAE)


def unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**UNET)


def scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULER)
