"""A style (or a mix) folded into a plain UNet, exactly.

A student adds its class embedding c = Linear₂(SiLU(Linear₁(v))) of the style vector v to the timestep
embedding, before any activation, and classifier-free guidance gives both halves of a batch the same v.
For a fixed v, c is a constant: adding it to the bias of the timestep embedding's last layer and
dropping the class embedding gives the same UNet, with no style input, that any SD tool can run.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..errors import ModelError
from ..models.student import holds_style_mlp

CLASS_KEYS = ("class_embedding.linear_1.weight", "class_embedding.linear_1.bias", "class_embedding.linear_2.weight",
              "class_embedding.linear_2.bias")
TIME_BIAS = "time_embedding.linear_2.bias"


def style_constant(weights: dict[str, torch.Tensor], vector: torch.Tensor) -> torch.Tensor:
    """The class embedding's output for style vector `vector`, in fp32."""
    w1, b1, w2, b2 = (weights[k].float() for k in CLASS_KEYS)
    return F.linear(F.silu(F.linear(vector.float(), w1, b1)), w2, b2)


def bake(weights: dict[str, torch.Tensor], config: dict, vector: torch.Tensor) -> tuple[dict, dict]:
    """UNet weights and config of the student's style `vector` as a plain UNet without a class embedding."""
    styled = config.get("class_embed_type") == "projection" or holds_style_mlp(config)
    if not styled or config.get("class_embeddings_concat") or CLASS_KEYS[0] not in weights:
        raise ModelError("this UNet does not add a projected style embedding to its timestep embedding")
    if config.get("timestep_post_act"):  # an activation after the timestep embedding's bias would not commute
        raise ModelError(f"a UNet with timestep_post_act={config['timestep_post_act']!r} cannot have a style baked in")
    baked = {k: v for k, v in weights.items() if not k.startswith("class_embedding.")}
    bias = weights[TIME_BIAS]
    baked[TIME_BIAS] = (bias.float() + style_constant(weights, vector)).to(bias.dtype)
    plain = {**config, "class_embed_type": None}
    if not holds_style_mlp(config):  # an SDXL UNet's text-time embedding keeps its own input width
        plain["projection_class_embeddings_input_dim"] = None
    return baked, plain
