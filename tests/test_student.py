"""The style-promptable student: exact base at init, style vectors, --style parsing, feature taps."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from dmm_cli.errors import BadInput
from dmm_cli.models.references import resolve
from dmm_cli.models.student import FeatureTaps, make_student, num_styles
from dmm_cli.models.styles import mix, one_hot, parse_style

NAMES = ["night", "outline", "stripes", "checker"]


@pytest.fixture(scope="module")
def base():
    return UNet2DConditionModel.from_pretrained(resolve("toy:base") / "unet", torch_dtype=torch.float32).eval()


def inputs(unet, batch=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ctx = torch.randn(batch, 8, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 500, 990]), ctx


def test_untrained_student_is_exactly_the_base(base):
    student = make_student(base, 4).eval()
    assert num_styles(student) == 4 and num_styles(base) == 0
    x, t, ctx = inputs(base)
    with torch.no_grad():
        expected = base(x, t, encoder_hidden_states=ctx).sample
        for style in (one_hot(0, 4), one_hot(3, 4), mix({1: 0.3, 2: 0.7}, 4)):
            got = student(x, t, encoder_hidden_states=ctx, class_labels=style.expand(3, -1)).sample
            assert torch.equal(got, expected)


def test_trained_style_mlp_changes_the_output(base):
    student = make_student(base, 2).eval()
    torch.nn.init.normal_(student.class_embedding.linear_2.weight, std=0.1)
    x, t, ctx = inputs(base)
    with torch.no_grad():
        a = student(x, t, encoder_hidden_states=ctx, class_labels=one_hot(0, 2).expand(3, -1)).sample
        b = student(x, t, encoder_hidden_states=ctx, class_labels=one_hot(1, 2).expand(3, -1)).sample
    assert not torch.allclose(a, b)


def test_style_specs():
    assert [label for label, _ in parse_style("all", NAMES)] == NAMES
    (label, v), = parse_style("2", NAMES)
    assert label == "stripes" and v.tolist() == [0, 0, 1, 0]
    (label, v), = parse_style("outline", NAMES)
    assert v.tolist() == [0, 1, 0, 0]
    (_, v), = parse_style("night:0.7,checker:0.3", NAMES)
    assert torch.allclose(v, torch.tensor([0.7, 0, 0, 0.3]))
    (_, v), = parse_style("0:1,1:3", NAMES)
    assert torch.allclose(v, torch.tensor([0.25, 0.75, 0, 0]))


@pytest.mark.parametrize("spec, fragment", [
    ("4", "style index 4 is out of range"),
    ("anime", "unknown style 'anime'"),
    ("night:x", "mix weight 'x'"),
    ("night:-1,outline:1", "must be 0 or more"),
    ("night:0,outline:0", "add up to more than 0"),
])
def test_bad_style_specs(spec, fragment):
    with pytest.raises(BadInput, match=fragment):
        parse_style(spec, NAMES)


def test_feature_taps_see_every_block(base):
    taps = FeatureTaps(base)
    x, t, ctx = inputs(base)
    with torch.no_grad():
        base(x, t, encoder_hidden_states=ctx)
    features = taps.take()
    n_down, n_up = len(base.down_blocks), len(base.up_blocks)
    assert list(features) == [f"down{i}" for i in range(n_down)] + ["mid"] + [f"up{i}" for i in range(n_up)]
    assert features["up2"].shape[-1] == 8 and features["mid"].shape[-1] == 2
    taps.remove()
    with torch.no_grad():
        base(x, t, encoder_hidden_states=ctx)
    assert taps.take() == {}


def test_a_random_style_embedding_starts_the_student_away_from_its_base(base):
    """`train.style_init: random`, as the released code initialises it: seeded, and no longer the base exactly."""
    x, t, ctx = inputs(base)
    a, b = make_student(base, 2, seed=3, zero_last=False).eval(), make_student(base, 2, seed=3, zero_last=False)
    assert torch.equal(a.class_embedding.linear_2.weight, b.class_embedding.linear_2.weight)
    with torch.no_grad():
        got = a(x, t, encoder_hidden_states=ctx, class_labels=one_hot(0, 2).expand(3, -1)).sample
        assert not torch.allclose(got, base(x, t, encoder_hidden_states=ctx).sample)


def test_the_feature_loss_reduces_over_blocks_and_its_cosine_is_per_pixel_over_channels():
    from torch.nn import functional as F

    from dmm_cli.distill.losses import feature_loss

    g = torch.Generator().manual_seed(0)
    student = {f"b{i}": torch.randn(2, 8, 4, 4, generator=g) for i in range(3)}
    teacher = {k: torch.randn(2, 8, 4, 4, generator=g) for k in student}
    per_block = torch.stack([F.mse_loss(student[k], teacher[k]) for k in student])
    assert torch.allclose(feature_loss(student, teacher, "l2", "mean"), per_block.mean())
    assert torch.allclose(feature_loss(student, teacher, "l2", "sum"), per_block.sum())
    s, t = student["b0"], teacher["b0"]
    by_pixel = 1 - (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))  # over channels, at each of the 4x4 pixels
    one = feature_loss({"b0": s}, {"b0": t}, "cos")
    assert torch.allclose(one, by_pixel.mean(), atol=1e-6)
    assert not torch.allclose(one, (1 - F.cosine_similarity(s.flatten(1), t.flatten(1))).mean(), atol=1e-3)
