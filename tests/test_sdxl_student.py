"""The SDXL-form student on a tiny model of SDXL's topology: exact base at init, its style MLP kept through
saving, loading and the stock pipeline, styles baked exactly, and feature taps on SDXL's blocks."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from dmm_cli.export.bake import bake
from dmm_cli.models.pipeline import load_component, load_pipeline
from dmm_cli.models.student import FeatureTaps, grow_student, make_student, num_styles
from dmm_cli.models.styles import mix, one_hot
from families import build_sdxl


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return build_sdxl(tmp_path_factory.mktemp("sdxl") / "base", dtype=torch.float32)


@pytest.fixture(scope="module")
def base(sdxl):
    return UNet2DConditionModel.from_pretrained(sdxl / "unet").eval()


def inputs(unet, batch=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ctx = torch.randn(batch, 8, unet.config.cross_attention_dim, generator=g)
    pooled_width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(batch, pooled_width, generator=g),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).expand(batch, -1)}
    return dict(sample=x, timestep=torch.tensor([10, 500, 990]), encoder_hidden_states=ctx,
                added_cond_kwargs=added)


def test_untrained_sdxl_student_is_exactly_its_base_and_keeps_the_text_time_embedding(base):
    student = make_student(base, 3).eval()
    assert num_styles(student) == 3 and num_styles(base) == 0
    assert student.add_embedding.linear_1.in_features == base.add_embedding.linear_1.in_features
    kwargs = inputs(base)
    with torch.no_grad():
        expected = base(**kwargs).sample
        for style in (one_hot(0, 3), one_hot(2, 3), mix({0: 0.4, 1: 0.6}, 3)):
            assert torch.equal(student(**kwargs, class_labels=style.expand(3, -1)).sample, expected)
        torch.nn.init.normal_(student.class_embedding.linear_2.weight, std=0.1)
        a = student(**kwargs, class_labels=one_hot(0, 3).expand(3, -1)).sample
        b = student(**kwargs, class_labels=one_hot(1, 3).expand(3, -1)).sample
    assert not torch.allclose(a, b)


def test_sdxl_student_survives_saving_loading_growing_and_baking(base, sdxl, tmp_path):
    student = make_student(base, 2, zero_last=False).eval()
    folder = tmp_path / "student"
    (folder / "unet").mkdir(parents=True)
    student.save_pretrained(folder / "unet", safe_serialization=True)
    assert json.loads((folder / "unet" / "config.json").read_text())["class_embed_type"] == "identity"
    loaded = load_component(UNet2DConditionModel, folder, "unet", torch.float32).eval()
    assert num_styles(loaded) == 2
    kwargs = inputs(base)
    style = one_hot(1, 2).expand(3, -1)
    with torch.no_grad():
        expected = student(**kwargs, class_labels=style).sample
        assert torch.equal(loaded(**kwargs, class_labels=style).sample, expected)
        grown = grow_student(loaded, 4, "zero").eval()
        assert num_styles(grown) == 4
        assert torch.equal(grown(**kwargs, class_labels=one_hot(1, 4).expand(3, -1)).sample, expected)
        weights, config = bake(student.state_dict(), dict(student.config), one_hot(1, 2))
        plain = UNet2DConditionModel.from_config(config)
        plain.load_state_dict(weights)
        assert plain.config.projection_class_embeddings_input_dim == base.config.projection_class_embeddings_input_dim
        assert torch.allclose(plain.eval()(**kwargs).sample, expected, atol=1e-5)


def test_the_stock_sdxl_pipeline_runs_a_loaded_student(base, sdxl, tmp_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    pipe.unet = make_student(base, 2)
    pipe.save_pretrained(tmp_path / "student", safe_serialization=True)
    loaded = load_pipeline(tmp_path / "student", torch.device("cpu"), torch.float32)
    assert isinstance(loaded, StableDiffusionXLPipeline) and num_styles(loaded.unet) == 2


def test_feature_taps_see_every_sdxl_block(base):
    taps = FeatureTaps(base)
    with torch.no_grad():
        base(**inputs(base))
    features = taps.take()
    assert list(features) == ["down0", "down1", "down2", "mid", "up0", "up1", "up2"]
    assert features["mid"].shape[1] == base.config.block_out_channels[-1]
