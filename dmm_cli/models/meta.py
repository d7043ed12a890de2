"""A diffusers UNet on meta tensors: what a forward pass does (its attention shapes, the tensors autograd
keeps) without memory or arithmetic, for any SD-family UNet config, a student's included."""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

TOKENS = 77  # the text encoders' context length


def meta_unet(config: dict) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def meta_inputs(unet: UNet2DConditionModel, batch: int, height: int, width: int) -> tuple[tuple, dict]:
    """Arguments of one forward of `unet` on `batch` latents of `height` x `width`, with the pooled text and size
    conditioning SDXL takes and the style vector a student takes."""
    config = unet.config
    with torch.device("meta"):
        args = (torch.empty(batch, config.in_channels, height, width), torch.zeros(batch, dtype=torch.long))
        kwargs = {"encoder_hidden_states": torch.empty(batch, TOKENS, config.cross_attention_dim)}
        if config.addition_embed_type == "text_time":
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, pooled), "time_ids": torch.empty(batch, 6)}
        if config.class_embed_type == "projection":
            kwargs["class_labels"] = torch.empty(batch, config.projection_class_embeddings_input_dim)
        elif config.class_embed_type == "identity":  # an SDXL student's slot: its output is added as is
            kwargs["class_labels"] = torch.empty(batch, unet.time_embedding.linear_2.out_features)
    return args, kwargs
