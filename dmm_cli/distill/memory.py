"""An estimate of a run's peak GPU memory, before anything is loaded, and the settings that would fit a card.

    student weights    4 B x P            (fp32 master weights, whatever train.precision says)
    gradients          4 B x P
    optimizer state    8 B x P for AdamW, 2 B x P for 8-bit AdamW (two moments)
    teachers           b x P x distinct teacher UNets   (b = 2 B in bf16/fp16, 4 B in fp32; one slot with
                                                          train.teacher_offload: cpu)
    text encoders      b x their parameters, once per distinct encoder
    discriminator      b x the UNet's encoder half, with train.adversarial_loss
    activations        what the student's forward keeps for its backward, per sample, times the batch;
                       counted by running the UNet on meta tensors (no memory, no weights), at 1/5 of that
                       with train.gradient_checkpointing
    + 10 % for the allocator and workspaces.

P is the UNet's parameter count, read from its weights files' headers. The estimate leaves out the
latent and text-context caches (at most 2 GB and 1 GB, kept on the GPU only when they fit).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from torch.nn import functional as F

from ..files.hashing import component_sha256
from ..files.safetensors_header import component_shapes

CARDS_GB = (24, 48, 80)
ENCODER_PARTS = ("text_encoder", "text_encoder_2")  # an SDXL model has both
CHECKPOINTED = 0.2  # the share of activations gradient checkpointing keeps (block inputs only)


def parameters(component: Path) -> int:
    total = 0
    for shape in component_shapes(component).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


@functools.cache
def activation_bytes(unet_config: Path, side: int, dtype_bytes: int) -> int:
    """Bytes the student's forward saves for its backward, for one sample with latents `side` x `side`."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in json.loads(unet_config.read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        x = torch.empty(1, unet.config.in_channels, side, side)
        context = torch.empty(1, 77, unet.config.cross_attention_dim)
        t = torch.zeros(1, dtype=torch.long)
        extra = {}
        if unet.config.addition_embed_type == "text_time":  # SDXL: the pooled text and the size conditioning
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            extra["added_cond_kwargs"] = {"text_embeds": torch.empty(1, pooled), "time_ids": torch.empty(1, 6)}
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    fused = mock.patch.object(F, "scaled_dot_product_attention", lambda q, k, v, *a, **kw: _FusedAttention.apply(q, k, v))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), fused:
        unet(x, t, encoder_hidden_states=context, **extra)
    return sum(saved) * dtype_bytes


class _FusedAttention(torch.autograd.Function):
    """Attention as the fused GPU kernels (flash, memory-efficient) keep it for the backward: q, k, v and the
    output, not the attention matrix the plain formula materialises."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        ctx.save_for_backward(query, key, value, out)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the forward is only counted
        raise NotImplementedError


@dataclass
class Estimate:
    parts: dict[str, int]  # bytes

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()) * 1.1)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {_size(v)}" for k, v in self.parts.items() if v)
        return f"~{_size(self.total)} per GPU ({parts}, +10%)"


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


@dataclass
class ModelSizes:
    """What the estimate needs to know of a run's models."""

    unet: int  # UNet parameters
    text: int  # parameters of every distinct text encoder
    teachers: int  # distinct teacher UNets on the device (a previous student counts once)
    unet_config: Path  # the UNet's config.json, for its activations


def model_sizes(base: Path, teachers: list[Path | None], previous: Path | None = None) -> ModelSizes:
    """Sizes read from the weights files' headers: nothing is loaded."""
    distinct = {component_sha256(f / "unet") for f in teachers if f is not None} | ({"previous"} if previous else set())
    encoders = {}  # one of each distinct text encoder (SDXL has two per model)
    for folder in [base, *(t for t in teachers if t is not None)]:
        for part in ENCODER_PARTS:
            if (folder / part).is_dir():
                encoders.setdefault(component_sha256(folder / part), folder / part)
    return ModelSizes(parameters(base / "unet"), sum(parameters(c) for c in encoders.values()), len(distinct),
                      base / "unet" / "config.json")


def estimate(train, sizes: ModelSizes, side: int) -> Estimate:
    """The peak GPU memory of one process of a run with these `train` settings."""
    p = sizes.unet
    b = 4 if train.precision == "no" else 2
    activations = activation_bytes(sizes.unet_config, side, b) * train.batch_size
    if train.gradient_checkpointing:
        activations = int(activations * CHECKPOINTED)
    parts = {"weights": 4 * p, "gradients": 4 * p, "optimizer": (2 if train.optimizer == "adamw-8bit" else 8) * p,
             "teachers": b * p * (1 if train.teacher_offload == "cpu" else sizes.teachers),
             "text encoders": b * sizes.text, "discriminator": b * p // 2 if train.adversarial_loss else 0,
             "activations": activations}
    return Estimate(parts)


def fitting_settings(train, sizes: ModelSizes, side: int) -> dict[int, str]:
    """For each card size, the first of ever thriftier settings whose estimate fits, or a note that none does."""
    ladder = [{}, {"gradient_checkpointing": True}, {"gradient_checkpointing": True, "optimizer": "adamw-8bit"},
              {"gradient_checkpointing": True, "optimizer": "adamw-8bit", "teacher_offload": "cpu"}]
    answers = {}
    for card in CARDS_GB:
        answers[card] = "does not fit even with gradient checkpointing, 8-bit AdamW and teacher offload"
        for changes in ladder:
            trial = train.model_copy(update=changes)
            if estimate(trial, sizes, side).total <= card * 1e9:
                answers[card] = ", ".join(f"train.{k}={v}" for k, v in changes.items()) or "as it is"
                break
    return answers
