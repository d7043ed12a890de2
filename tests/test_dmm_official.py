"""The released DMM checkpoint's layout converts exactly into our student format."""
from __future__ import annotations

import json
import shutil

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from dmm_cli.models.official import convert_unet
from dmm_cli.models.references import resolve
from dmm_cli.models.styles import StyleTable

N = 3


def official_weights(seed=0):
    """Toy-sized UNet weights in the official layout: E (N×D) feeding add_embedding's Linear-SiLU-Linear."""
    base = UNet2DConditionModel.from_pretrained(resolve("toy:base") / "unet", torch_dtype=torch.float32)
    d = base.config.block_out_channels[0] * 4
    g = torch.Generator().manual_seed(seed)
    weights = dict(base.state_dict())
    weights.update({
        "model_embedding.weight": torch.randn(N, d, generator=g),
        "add_embedding.linear_1.weight": torch.randn(d, d, generator=g) * 0.05,
        "add_embedding.linear_1.bias": torch.randn(d, generator=g) * 0.05,
        "add_embedding.linear_2.weight": torch.randn(d, d, generator=g) * 0.05,
        "add_embedding.linear_2.bias": torch.randn(d, generator=g) * 0.05,
    })
    config = dict(base.config, addition_embed_type="model_merge", num_models=N)
    return weights, config


def official_formula(weights, config):
    """emb += add_embedding(Eᵀv): a stock UNet whose projection input is the embedding itself."""
    d = weights["model_embedding.weight"].shape[1]
    cfg = {k: v for k, v in config.items() if k not in ("addition_embed_type", "num_models") and not k.startswith("_")}
    unet = UNet2DConditionModel.from_config({**cfg, "class_embed_type": "projection",
                                              "projection_class_embeddings_input_dim": d})
    state = {k: v for k, v in weights.items() if not k.startswith(("model_embedding", "add_embedding"))}
    for layer in ("linear_1", "linear_2"):
        for p in ("weight", "bias"):
            state[f"class_embedding.{layer}.{p}"] = weights[f"add_embedding.{layer}.{p}"]
    unet.load_state_dict(state)
    return unet.eval()


def test_converted_student_matches_the_official_formula():
    weights, config = official_weights()
    converted_weights, converted_config = convert_unet(weights, config)
    student = UNet2DConditionModel.from_config({k: v for k, v in converted_config.items() if not k.startswith("_")})
    student.load_state_dict(converted_weights)
    student.eval()
    reference = official_formula(weights, config)
    table = weights["model_embedding.weight"]
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 8, 64, generator=g)
    t = torch.tensor([20, 700])
    for v in (torch.eye(N)[0], torch.eye(N)[2], torch.tensor([0.2, 0.5, 0.3])):
        with torch.no_grad():
            ours = student(x, t, encoder_hidden_states=ctx, class_labels=v.expand(2, -1)).sample
            theirs = reference(x, t, encoder_hidden_states=ctx, class_labels=(v @ table).expand(2, -1)).sample
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)


def test_fetch_converts_an_official_layout_folder(dmm, tmp_path):
    weights, config = official_weights()
    folder = tmp_path / "official"
    shutil.copytree(resolve("toy:base"), folder, symlinks=False)
    for f in (folder / "unet").iterdir():
        f.unlink()
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "DMMUNet2DConditionModel", **config}))
    save_file(weights, folder / "unet" / "diffusion_pytorch_model.safetensors")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionDMMPipeline", unet=["dmm_unet", "DMMUNet2DConditionModel"])
    (folder / "model_index.json").write_text(json.dumps(index))
    r = dmm("fetch", folder)
    assert r.code == 0, r
    student = r.lines[0]
    assert StyleTable.read(__import__("pathlib").Path(student)).names == [f"style-{i}" for i in range(N)]
    converted = load_file(f"{student}/unet/diffusion_pytorch_model.safetensors")
    assert converted["class_embedding.linear_1.weight"].shape[1] == N
    g = dmm("generate", "--model", folder, "--style", "2", "a red circle", "--steps", "3", "-o", tmp_path / "o.png")
    assert g.code == 0, g
