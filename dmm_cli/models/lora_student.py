"""A LoRA student: the base UNet frozen, one low-rank adapter (peft) on its chosen layers, and the style MLP.

It trains only the adapter and the style MLP, so its optimizer holds a few percent of a full student's state.
The run folder keeps two forms of it: `unet/`, the adapter folded into the base (a student every dmm tool
loads like a full one), and `student_lora/`, the adapter with the style MLP (tens of MB: what incremental
merging grows and what `dmm export --format lora` turns into one LoRA file per style).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ..errors import ModelError
from ..files.safetensors_header import read_header
from ..files.text import read_json
from .student import styled_unet

ADAPTER_FOLDER = "student_lora"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
STYLE_MLP = ("class_embedding.linear_1", "class_embedding.linear_2")
EXTRAS_PREFIX = "extras."  # in the adapter file: an extra's change from the base, by its name in the student


def is_norm_layer(layer: str) -> bool:
    """A UNet's norm layers (GroupNorm, LayerNorm) by name: norm, norm1..3, conv_norm_out."""
    return "norm" in layer.rsplit(".", 1)[-1]


def extra_weights(weight_shapes: dict, extras: list[str]) -> list[str]:
    """The base weights `train.student.extras` trains whole: the norm layers' weights and biases, every bias."""
    found = []
    for name in weight_shapes:
        layer, kind = name.rsplit(".", 1)
        if name.startswith("class_embedding.") or ".lora_" in name:
            continue
        if "norms" in extras and is_norm_layer(layer) or "biases" in extras and kind == "bias":
            found.append(name)
    return found


def layer_names(weight_shapes: dict) -> list[str]:
    """The Linear and Conv layers a LoRA can target, from a UNet's weight names and shapes."""
    return [n[:-len(".weight")] for n, s in weight_shapes.items()
            if n.endswith(".weight") and len(s) in (2, 4) and not n.startswith("class_embedding.")]


def matches(layer: str, target: str) -> bool:
    """peft's rule for a target name: the whole module name, or its last dotted parts."""
    return layer == target or layer.endswith("." + target)


def adapter_parameters(weight_shapes: dict, rank: int, targets: list[str], extras: list[str] = ()) -> int:
    """How many weights a LoRA of `rank` on `targets` has: rank x (inputs x kernel + outputs) per layer, and the
    extras it trains whole."""
    total = sum(math.prod(weight_shapes[n]) for n in extra_weights(weight_shapes, extras))
    for layer in layer_names(weight_shapes):
        if any(matches(layer, t) for t in targets):
            out, inputs, *kernel = weight_shapes[f"{layer}.weight"]
            total += rank * (inputs * math.prod(kernel) + out)
    return total


def add_adapter(student: UNet2DConditionModel, rank: int, alpha: float, targets: list[str], seed: int,
                frozen_dtype: torch.dtype, extras: list[str] = ()) -> UNet2DConditionModel:
    """Freeze `student` (kept in `frozen_dtype`) and give it a LoRA on `targets`; its adapter, style MLP and
    `extras` (trained whole, in fp32) are what train. The adapter's up weights start at zero, so the student
    starts as it was. `student.extras_base` keeps the extras' starting values: the adapter stores changes."""
    from peft import LoraConfig, inject_adapter_in_model

    student.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), exclude_modules=list(STYLE_MLP))
    with torch.random.fork_rng(devices=[]):  # the down weights' initial draw follows the run's seed
        torch.manual_seed(seed)
        inject_adapter_in_model(config, student)
    params = dict(student.named_parameters())
    chosen = extra_weights({n: p.shape for n, p in params.items()}, list(extras))
    for name in chosen:
        params[name].requires_grad_(True)
    for name, p in params.items():
        if not p.requires_grad and not name.startswith("class_embedding."):
            p.data = p.data.to(frozen_dtype)
    student.class_embedding.requires_grad_(True)
    student.extras_base = {name: params[name].detach().clone() for name in chosen}
    student.extras_kinds = sorted(extras)
    return student


def adapter_layers(unet: torch.nn.Module) -> dict:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in unet.named_modules() if isinstance(m, LoraLayer)}


def lora_factors(unet: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Layer name -> (down, up·α/r) in fp32: each layer's update is up @ down."""
    out = {}
    for name, layer in adapter_layers(unet).items():
        down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        out[name] = (down.detach().float().cpu(), up.detach().float().cpu() * layer.scaling["default"])
    return out


@torch.no_grad()
def merged(student: torch.nn.Module) -> UNet2DConditionModel:
    """The student as a plain style-promptable UNet (fp32): each adapted weight plus its update."""
    config = student.config
    plain = styled_unet(config, student.class_embedding.linear_1.in_features)
    factors = lora_factors(student)
    weights = {}
    for name, tensor in student.state_dict().items():
        if ".lora_" in name:
            continue
        weights[name.replace(".base_layer.", ".")] = tensor.float()
    for name, (down, up) in factors.items():
        w = weights[f"{name}.weight"]
        weights[f"{name}.weight"] = w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape).to(w.device)
    plain.load_state_dict(weights)
    return plain


def save_adapter(student: torch.nn.Module, folder: Path, base_sha256: str, dtype: torch.dtype) -> None:
    """peft's adapter config and weights (its key names), with the style MLP's weights beside the adapter's."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    weights = {k: v.detach().to(dtype).cpu().contiguous()
               for k, v in get_peft_model_state_dict(student, adapter_name="default").items()}
    weights.update({k: v.detach().to(dtype).cpu().contiguous() for k, v in student.state_dict().items()
                    if k.startswith("class_embedding.")})
    params = dict(student.named_parameters())
    weights.update({EXTRAS_PREFIX + name: (params[name].detach().float() - start.float()).to(dtype).cpu().contiguous()
                    for name, start in getattr(student, "extras_base", {}).items()})
    config = student.peft_config["default"].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    config["dmm"] = {"base_unet_sha256": base_sha256, "styles": student.class_embedding.linear_1.in_features,
                     "extras": sorted(getattr(student, "extras_kinds", []))}
    save_file(weights, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def is_lora_student(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_FOLDER / CONFIG_FILE).is_file()


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A LoRA student's adapter config and weights, checked."""
    sub = Path(folder) / ADAPTER_FOLDER
    try:
        config = read_json(sub / CONFIG_FILE)
        complete = {"r", "lora_alpha", "target_modules"} <= config.keys() and "base_unet_sha256" in config["dmm"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        complete = False
    if not complete:
        raise ModelError(f"{sub / CONFIG_FILE}: not a dmm LoRA student's adapter config")
    read_header(sub / WEIGHTS_FILE)
    from safetensors.torch import load_file

    return config, load_file(sub / WEIGHTS_FILE)


def load_adapter(student: UNet2DConditionModel, folder: Path) -> None:
    """Put a saved adapter's LoRA weights into `student`, which has an adapter of the same layers and rank."""
    from peft import set_peft_model_state_dict

    _, weights = read_adapter(folder)
    lora = {k: v for k, v in weights.items() if not k.startswith(("class_embedding.", EXTRAS_PREFIX))}
    result = set_peft_model_state_dict(student, lora, adapter_name="default")
    missing = [k for k in result.missing_keys if ".lora_" in k]
    changes = {k.removeprefix(EXTRAS_PREFIX): v for k, v in weights.items() if k.startswith(EXTRAS_PREFIX)}
    start = getattr(student, "extras_base", {})
    if result.unexpected_keys or missing or changes.keys() != start.keys():
        first = (result.unexpected_keys or missing or sorted(changes.keys() ^ start.keys()))[0]
        raise ModelError(f"{folder / ADAPTER_FOLDER}: its adapter does not fit the student ({first})")
    params = dict(student.named_parameters())
    with torch.no_grad():
        for name, change in changes.items():
            params[name].copy_(start[name] + change.to(start[name].dtype))
