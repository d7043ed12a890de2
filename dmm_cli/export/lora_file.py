"""A LoRA student's style (or mix) as one ordinary LoRA file on its base.

The student's adapter is the same for every style; what a style adds is its style-MLP output c, a constant
added to the timestep embedding (export/bake.py), so it is a bias difference on `time_embedding.linear_2`.
Two layouts carry it:
- kohya/A1111 (`--format lora`): `lora_unet_<layer>` down/up/alpha, and c as `..._time_embedding_linear_2.diff_b`
  beside a zero `.diff` of its weight: ComfyUI applies a `diff_b` alone, A1111 only inside such a whole-weight
  difference (its ModuleTypeFull). diffusers' kohya converter drops both.
- diffusers/PEFT (`--format lora-diffusers`): `unet.<layer>.lora_A/lora_B`, α/r folded into lora_B, and c as
  `unet.time_embedding.linear_2.lora_B.bias` (PEFT's lora_bias) on a zero update, which `load_lora_weights` applies.
A student that trained norms or biases whole (train.student.extras) adds their changes: a norm layer's as
`w_norm`/`b_norm` (LyCORIS' keys, which A1111 and ComfyUI apply), any other bias's as `diff_b` (ComfyUI applies it;
A1111 does not, having no whole-weight difference beside it). The PEFT layout has no place for them.
"""
from __future__ import annotations

import torch

from ..errors import BadInput
from ..files.safetensors_header import component_shapes
from ..models.lora_student import EXTRAS_PREFIX, is_norm_layer, read_adapter
from .bake import TIME_BIAS, style_constant

FORMATS = ("lora", "lora-diffusers")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
TIME_LAYER = TIME_BIAS.removesuffix(".bias")


def _pairs(weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Layer -> (down, up) from peft's adapter keys."""
    return {key.removesuffix(".lora_A.weight"): (tensor, weights[key.replace(".lora_A.", ".lora_B.")])
            for key, tensor in weights.items() if key.endswith(".lora_A.weight")}


def style_lora(student, vector: torch.Tensor, fmt: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The tensors of the LoRA file of style `vector` of the LoRA student folder `student`."""
    config, weights = read_adapter(student)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    extras = {k.removeprefix(EXTRAS_PREFIX).replace(".base_layer.", "."): v.float() for k, v in weights.items()
              if k.startswith(EXTRAS_PREFIX)}
    if extras and fmt != "lora":
        raise BadInput(f"--format {fmt}: {student} trained its {' and '.join(config['dmm']['extras'])} whole, "
                       "which the diffusers/PEFT layout cannot carry; use --format lora (kohya and LyCORIS keys)")
    constant = style_constant(weights, vector)
    pairs = _pairs(weights)
    dtype = dtype or next(iter(weights.values())).dtype
    out = {}
    if fmt == "lora":
        for layer, (down, up) in pairs.items():
            key = "lora_unet_" + layer.replace(".", "_")
            out.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(alpha)})
        time_key = f"lora_unet_{TIME_LAYER.replace('.', '_')}"
        out[f"{time_key}.diff_b"] = constant + extras.pop(TIME_BIAS, 0)  # and a trained change of that bias
        if TIME_LAYER not in pairs:  # (beside a LoRA on the layer, ComfyUI would take the diff for the LoRA)
            out[f"{time_key}.diff"] = torch.zeros(component_shapes(student / "unet")[f"{TIME_LAYER}.weight"])
        for name, change in extras.items():
            layer, kind = name.rsplit(".", 1)
            suffix = ("w_norm" if kind == "weight" else "b_norm") if is_norm_layer(layer) else "diff_b"
            out[f"lora_unet_{layer.replace('.', '_')}.{suffix}"] = change
    else:
        for layer, (down, up) in pairs.items():  # PEFT's lora_bias is all layers or none: the others' are zero
            out.update({f"unet.{layer}.lora_A.weight": down, f"unet.{layer}.lora_B.weight": up * (alpha / rank),
                        f"unet.{layer}.lora_B.bias": torch.zeros(up.shape[0])})
        width = component_shapes(student / "unet")[f"{TIME_LAYER}.weight"]
        out.update({f"unet.{TIME_LAYER}.lora_A.weight": torch.zeros(rank, width[1]),
                    f"unet.{TIME_LAYER}.lora_B.weight": torch.zeros(width[0], rank),
                    f"unet.{TIME_LAYER}.lora_B.bias": constant})
    return {k: v.to(dtype).contiguous() for k, v in out.items()}
