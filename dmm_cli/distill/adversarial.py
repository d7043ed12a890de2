"""The multi-class adversarial loss (paper Eq. 11-12, Algorithm 1).

The discriminator is a frozen copy of the base UNet's encoder (input conv, timestep embedding, down
blocks, mid block) under a small trainable head of conv + GroupNorm + SiLU layers with 2N logits.
It sees one-step x̂0 estimates (from any prediction type, see prediction.py) re-noised to a random timestep: class i is "teacher i's", class N+i
is "the student's attempt at style i".
"""
from __future__ import annotations

import copy

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from torch.nn import functional as F


class Discriminator(nn.Module):
    def __init__(self, base: UNet2DConditionModel, num_styles: int, width: int = 256):
        super().__init__()
        encoder = copy.deepcopy(base)
        encoder.up_blocks = nn.ModuleList()  # only the encoder half is used
        encoder.conv_norm_out = encoder.conv_out = None
        self.encoder = encoder.eval().requires_grad_(False)
        channels = base.config.block_out_channels[-1]
        groups = 32 if width % 32 == 0 else 1
        self.head = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(groups, width), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(groups, width), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2 * num_styles),
        )

    def features(self, x: torch.Tensor, t: torch.Tensor, cond, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen encoder's mid-block output for text conditioning `cond` (and SDXL's size conditioning
        `time_ids`); gradients still flow back to `x`."""
        enc = self.encoder
        dtype = next(enc.parameters()).dtype
        x, cond = x.to(dtype), cond.to(dtype)
        context = cond.context
        emb = enc.time_embedding(enc.time_proj(t).to(dtype))
        if enc.config.addition_embed_type is not None:
            emb = emb + enc.get_aug_embed(emb=emb, encoder_hidden_states=context,
                                          added_cond_kwargs=cond.unet_kwargs(time_ids)["added_cond_kwargs"])
        h = enc.conv_in(x)
        for block in enc.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        return enc.mid_block(h, emb, encoder_hidden_states=context)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(x, t, cond, time_ids).float())


def generator_loss(logits: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
    """The student wants its style-i estimates taken for teacher i's: CE(D(x̂0_student), i)."""
    return F.cross_entropy(logits, styles)


def discriminator_loss(fake_logits: torch.Tensor, real_logits: torch.Tensor, styles: torch.Tensor,
                       num_styles: int) -> torch.Tensor:
    """CE(D(x̂0_student), N+i) + CE(D(x̂0_teacher), i)."""
    return F.cross_entropy(fake_logits, styles + num_styles) + F.cross_entropy(real_logits, styles)
