"""The attention backend: forced kernels, refusals, the model's own attention shapes, and the remembered
micro-benchmark (timed here on the CPU kernels; on CUDA it picks among flash, cuDNN, efficient and xformers)."""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from conftest import assert_one_sentence_error
from dmm_cli.models import attention
from dmm_cli.models.references import resolve

FAST = ("--steps", "2", "--width", "32", "--height", "32")


def toy_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(resolve("toy:base") / "unet")


def test_attention_shapes_are_the_models_own():
    unet = toy_unet()
    shapes = attention.attention_shapes(unet, 8, 8)
    # 8 heads of 32 channels at 8x8 latents, of 64 at 4x4 and 2x2 (mid block); self- and cross-attention
    assert shapes == [(8, 4, 4, 8), (8, 4, 77, 8), (8, 16, 16, 8), (8, 16, 77, 8), (8, 64, 64, 4), (8, 64, 77, 4)]
    wide = attention.attention_shapes(unet, 8, 16)
    assert max(q for _, q, _, _ in wide) == 2 * max(q for _, q, _, _ in shapes)


def test_an_sdxl_students_attention_shapes_are_its_bases():
    """Its style MLP sits in diffusers' identity class-embedding slot, which the meta run must feed too."""
    from dmm_cli.models.student import make_student

    base = UNet2DConditionModel.from_pretrained(resolve("toy:xl-base") / "unet")
    assert attention.attention_shapes(make_student(base, 2), 8, 8) == attention.attention_shapes(base, 8, 8)


def test_the_benchmark_runs_once_and_is_remembered(monkeypatch):
    shapes = attention.attention_shapes(toy_unet(), 8, 8)
    cpu = torch.device("cpu")
    choice, seconds = attention.fastest_backend(["flash", "cudnn"], shapes, 2, cpu, torch.float32, True)
    assert choice == "flash" and seconds["flash"] > 0 and seconds["cudnn"] is None  # no cuDNN kernel on a CPU

    def not_again(*args, **kwargs):
        raise AssertionError("timed again")

    monkeypatch.setattr(attention, "time_backend", not_again)
    assert attention.fastest_backend(["flash", "cudnn"], shapes, 2, cpu, torch.float32, True)[0] == "flash"
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()  # switches restored


def test_a_forced_kernel_is_used_and_a_gpu_only_one_refused_on_a_cpu(dmm, tmp_path):
    try:
        r = dmm("generate", "a red circle", "--model", "toy:base", "--attention", "flash", "-o", tmp_path, *FAST)
        assert r.code == 0, r
        assert "attention: PyTorch SDPA (flash kernel)" in r.err
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()  # only flash (and the math fallback) left
    finally:
        attention._kernel_only(None)
    r = dmm("generate", "a red circle", "--model", "toy:base", "--attention", "cudnn", "-o", tmp_path / "b", *FAST)
    assert_one_sentence_error(r, 2, "--attention cudnn", "CUDA GPUs only")
