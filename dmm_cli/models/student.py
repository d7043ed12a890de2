"""The style-promptable student: a stock diffusers UNet whose class embedding is an MLP of the style vector.

`class_embed_type="projection"` maps an N-dim style vector through Linear → SiLU → Linear to the
timestep-embedding width and adds it to the timestep embedding, which is what the paper's style
embedding + MLP computes. Zeroing the last Linear makes the untrained student the base model exactly.

SDXL's text-time embedding already owns `projection_class_embeddings_input_dim`, so an SDXL student
declares `class_embed_type="identity"` (diffusers adds whatever the class embedding returns to the
timestep embedding) and holds the same MLP in that slot; `load_style_mlp` restores it on loading.
"""
from __future__ import annotations

import math

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import TimestepEmbedding

from ..errors import ModelError


def make_student(base: UNet2DConditionModel, num_styles: int, seed: int = 0,
                 zero_last: bool = True) -> UNet2DConditionModel:
    """A copy of `base` that also takes an N-dim style vector as `class_labels`; the same seed, the same student.

    With `zero_last` the style embedding's last layer starts at zero, so the student is its base exactly;
    otherwise it starts at nn.Linear's random range too, as the released code's does."""
    if base.config.class_embed_type is not None:
        raise ModelError(f"the base UNet already has a class embedding ({base.config.class_embed_type!r})")
    student = styled_unet(base.config, num_styles).to(base.dtype)
    missing, unexpected = student.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("class_embedding.") for k in missing), (missing, unexpected)
    first, last = student.class_embedding.linear_1, student.class_embedding.linear_2
    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(first.in_features)  # nn.Linear's own default range, drawn from our generator
    with torch.no_grad():
        first.weight.copy_(torch.rand(first.weight.shape, generator=g, device="cpu") * 2 * bound - bound)
        first.bias.copy_(torch.rand(first.bias.shape, generator=g, device="cpu") * 2 * bound - bound)
        if zero_last:
            last.weight.zero_()
            last.bias.zero_()
        else:
            bound = 1 / math.sqrt(last.in_features)
            last.weight.copy_(torch.rand(last.weight.shape, generator=g, device="cpu") * 2 * bound - bound)
            last.bias.copy_(torch.rand(last.bias.shape, generator=g, device="cpu") * 2 * bound - bound)
    return student


def grow_student(student: UNet2DConditionModel, total: int, init: str, seed: int = 0) -> UNet2DConditionModel:
    """The same student with `total` style inputs: old columns kept, new ones `mean` of the old, `zero`, or
    `random` (nn.Linear's range). Everything else, the rest of the style MLP included, is copied."""
    old = num_styles(student)
    grown = styled_unet(student.config, total).to(student.dtype)
    weights = dict(student.state_dict())
    w = weights["class_embedding.linear_1.weight"]
    if init == "mean":
        new = w.mean(1, keepdim=True).expand(-1, total - old)
    elif init == "zero":
        new = torch.zeros(w.shape[0], total - old, dtype=w.dtype)
    else:
        bound = 1 / math.sqrt(total)
        g = torch.Generator().manual_seed(seed)
        new = (torch.rand(w.shape[0], total - old, generator=g, device="cpu") * 2 * bound - bound).to(w.dtype)
    weights["class_embedding.linear_1.weight"] = torch.cat([w, new.to(w.device)], 1)
    grown.load_state_dict(weights)
    return grown


def styled_unet(config, styles: int) -> UNet2DConditionModel:
    """A fresh UNet of `config` whose class embedding is the style MLP of `styles` inputs."""
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if config.get("addition_embed_type") != "text_time":
        config.update(class_embed_type="projection", projection_class_embeddings_input_dim=styles)
        return UNet2DConditionModel.from_config(config)
    config.update(class_embed_type="identity")
    unet = UNet2DConditionModel.from_config(config)
    unet.class_embedding = TimestepEmbedding(styles, unet.time_embedding.linear_2.out_features)
    return unet


def holds_style_mlp(config) -> bool:
    """Whether a UNet config is an SDXL-form student's, whose style MLP diffusers does not build by itself."""
    return config.get("class_embed_type") == "identity" and config.get("addition_embed_type") == "text_time"


def load_style_mlp(unet: UNet2DConditionModel, weights: dict[str, torch.Tensor]) -> UNet2DConditionModel:
    """Put an SDXL-form student's style MLP, from its `class_embedding.*` weights, into a UNet loaded by diffusers
    (which built a parameter-less identity in its place)."""
    w1, w2 = weights["class_embedding.linear_1.weight"], weights["class_embedding.linear_2.weight"]
    mlp = TimestepEmbedding(w1.shape[1], w2.shape[0]).to(w1.device, unet.dtype)
    mlp.load_state_dict({k.removeprefix("class_embedding."): v for k, v in weights.items()})
    unet.class_embedding = mlp.to(unet.device)
    return unet


def num_styles(unet: UNet2DConditionModel) -> int:
    """How many styles a UNet takes (0 for a plain, style-less UNet)."""
    if unet.config.class_embed_type == "projection":
        return int(unet.config.projection_class_embeddings_input_dim)
    if isinstance(unet.class_embedding, TimestepEmbedding):
        return unet.class_embedding.linear_1.in_features
    return 0


class FeatureTaps:
    """Forward hooks that keep the output of every down block, the mid block and every up block.

    Works on a stock (or compiled) diffusers UNet; `features` holds the latest call's outputs in order.
    """

    def __init__(self, unet: UNet2DConditionModel):
        self.features: dict[str, torch.Tensor] = {}
        blocks = [(f"down{i}", b) for i, b in enumerate(unet.down_blocks)]
        blocks.append(("mid", unet.mid_block))
        blocks += [(f"up{i}", b) for i, b in enumerate(unet.up_blocks)]
        self._handles = [block.register_forward_hook(self._keep(name)) for name, block in blocks]

    def _keep(self, name: str):
        def hook(module, args, output):
            self.features[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        features, self.features = self.features, {}
        return features

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
