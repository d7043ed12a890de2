"""The released DMM checkpoint (MCG-NJU/DMM) in our student format, exactly.

Its UNet adds `add_embedding(model_embedding[i])` to the timestep embedding: an N×D embedding table E
and an MLP Linear(D, D) → SiLU → Linear(D, D). Our student computes Linear(N, D) → SiLU → Linear(D, D)
of a style vector v. With W₁' = W₁·Eᵀ the first layers agree, W₁'v + b₁ = W₁(Eᵀv) + b₁, for one-hot
and mixed v alike, so the conversion is exact. The other way, E = W₁ᵀ with Linear₁ = I is exact too, so a
student exported to the released layout comes back identical.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..files import state
from ..files.atomic import atomic_folder
from ..files.hashing import component_sha256
from ..files.safetensors_io import read_component
from ..files.text import read_json
from .folders import copy_part, derived_model_index, model_root, read_config
from .styles import STYLES_FILE, Style, StyleTable

OFFICIAL_KEYS = ("model_embedding.weight", "add_embedding.linear_1.weight", "add_embedding.linear_1.bias",
                 "add_embedding.linear_2.weight", "add_embedding.linear_2.bias")


def is_official(folder: Path) -> bool:
    config = folder / "unet" / "config.json"
    return config.is_file() and read_config(config).get("addition_embed_type") == "model_merge"


def convert_unet(weights: dict[str, torch.Tensor], config: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Official-layout UNet weights and config → stock UNet2DConditionModel with a projection class embedding."""
    weights = dict(weights)
    table = weights.pop("model_embedding.weight").float()  # N × D
    w1, b1 = weights.pop("add_embedding.linear_1.weight"), weights.pop("add_embedding.linear_1.bias")
    w2, b2 = weights.pop("add_embedding.linear_2.weight"), weights.pop("add_embedding.linear_2.bias")
    dtype = w1.dtype
    weights["class_embedding.linear_1.weight"] = (w1.float() @ table.T).to(dtype)
    weights["class_embedding.linear_1.bias"] = b1
    weights["class_embedding.linear_2.weight"] = w2
    weights["class_embedding.linear_2.bias"] = b2
    config = {k: v for k, v in config.items() if k not in ("addition_embed_type", "num_models", "_class_name")}
    config.update(_class_name="UNet2DConditionModel", class_embed_type="projection",
                  projection_class_embeddings_input_dim=table.shape[0])
    return weights, config


def student_folder(folder: Path) -> Path:
    """A converted copy of an official DMM pipeline folder (made once, cached under $DMM_HOME)."""
    target = state.home() / "converted" / f"dmm-{component_sha256(folder / 'unet')[:24]}"
    if (target / "model_index.json").is_file():
        return target
    state.store("converted")
    config = read_json(folder / "unet" / "config.json")
    weights, config = convert_unet(read_component(folder / "unet"), config)
    n = config["projection_class_embeddings_input_dim"]
    with atomic_folder(target, keep_existing=True) as tmp:
        for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
            copy_part(folder / part, tmp / part, model_root(folder))
        (tmp / "unet").mkdir()
        (tmp / "unet" / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "unet" / "diffusion_pytorch_model.safetensors")
        index = derived_model_index(folder, _class_name="StableDiffusionPipeline",
                                    unet=["diffusers", "UNet2DConditionModel"])
        (tmp / "model_index.json").write_text(index, encoding="utf-8")
        known = StyleTable.read(folder)  # a dmm export keeps the style names beside the released layout
        table = known if known is not None and len(known.names) == n else StyleTable(
            [Style(f"style-{i}", folder.name) for i in range(n)],
            lineage=[{"converted_from": "MCG-NJU/DMM official layout", "source": folder.name}])
        (tmp / STYLES_FILE).write_text(table.to_json(), encoding="utf-8")
    return target


OFFICIAL_UNET_CLASS = "DMMUNet2DConditionModel"
OFFICIAL_PIPELINE_CLASS = "StableDiffusionDMMPipeline"


def official_unet(weights: dict[str, torch.Tensor], config: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Student UNet weights and config → the released layout: E = W₁ᵀ and an identity first layer."""
    weights = dict(weights)
    w1, b1 = weights.pop("class_embedding.linear_1.weight"), weights.pop("class_embedding.linear_1.bias")
    w2, b2 = weights.pop("class_embedding.linear_2.weight"), weights.pop("class_embedding.linear_2.bias")
    weights["model_embedding.weight"] = w1.T.contiguous()
    weights["add_embedding.linear_1.weight"] = torch.eye(w1.shape[0], dtype=w1.dtype)
    weights["add_embedding.linear_1.bias"] = b1
    weights["add_embedding.linear_2.weight"] = w2
    weights["add_embedding.linear_2.bias"] = b2
    config = {k: v for k, v in config.items()
              if k not in ("class_embed_type", "projection_class_embeddings_input_dim") and not k.startswith("_")}
    config.update(_class_name=OFFICIAL_UNET_CLASS, addition_embed_type="model_merge", num_models=w1.shape[1])
    return weights, config
