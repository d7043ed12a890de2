"""Fitting the GPU people have: the dry run's memory estimate, gradient checkpointing, 8-bit AdamW's refusal."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import assert_one_sentence_error

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "toy_styles.yaml"


def plan(dmm, *sets: str) -> dict:
    r = dmm("distill", RECIPE, "--dry-run", "--json", *[x for s in sets for x in ("--set", s)])
    assert r.code == 0, r
    return json.loads(r.out)["memory"]


def test_the_dry_run_estimates_memory_and_what_each_setting_saves(dmm):
    plain = plan(dmm)
    parts = plain["parts_bytes"]
    unet = parts["weights"] // 4  # fp32 master weights: 4 bytes per parameter
    assert parts["optimizer"] == 8 * unet and parts["teachers"] == 4 * 4 * unet
    # the peak is at the end of the forward: gradients (4 B a parameter) count where they outgrow the activations
    assert parts["gradients beyond activations"] == max(4 * unet - parts["activations"], 0)
    assert plain["estimate_bytes"] == int(sum(parts.values()) * 1.1)
    assert set(plain["fits"]) == {"24 GB", "48 GB", "80 GB"} and plain["fits"]["24 GB"] == "as it is"
    checkpointed = plan(dmm, "train.gradient_checkpointing=true")["parts_bytes"]
    assert checkpointed["activations"] < parts["activations"] / 2
    half = plan(dmm, "train.precision=bf16", "train.teacher_offload=cpu")["parts_bytes"]
    assert half["teachers"] == 2 * unet  # one bf16 slot
    sixteen, double = (plan(dmm, f"train.batch_size={b}")["parts_bytes"]["activations"] for b in (16, 64))
    assert double - parts["activations"] == 2 * (parts["activations"] - sixteen) > 0  # linear in the batch


def test_gradient_checkpointing_trains_to_the_same_student(dmm, tmp_path):
    runs = []
    for name, value in (("plain", "false"), ("checkpointed", "true")):
        out = tmp_path / name
        r = dmm("-q", "distill", RECIPE, "--max-steps", "2", "--set", "train.batch_size=8", "--set",
                f"train.gradient_checkpointing={value}", "-o", out)
        assert r.code == 0, r
        from safetensors.torch import load_file
        runs.append(load_file(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.allclose(runs[0][k], runs[1][k], atol=1e-5) for k in runs[0])


def test_8bit_adamw_says_what_it_needs(dmm, tmp_path):
    r = dmm("distill", RECIPE, "--dry-run", "--set", "train.optimizer=adamw-8bit")
    assert_one_sentence_error(r, 1, "train.optimizer adamw-8bit")  # the machine's lack, not the recipe's fault


def test_activations_are_counted_as_cuda_autocast_keeps_them():
    """bf16 autocast keeps half-precision matmul inputs and weight copies but float32 norm outputs: less than
    fp32 per sample, more than half of it; the weight copies are a fixed cost, kept under checkpointing too."""
    from dmm_cli.distill.memory import _saved, activation_bytes, parameters
    from dmm_cli.models.references import resolve

    config = resolve("toy:base") / "unet" / "config.json"
    fp32, bf16 = (activation_bytes(config, 8, p) for p in ("no", "bf16"))
    assert fp32.per_sample / 2 < bf16.per_sample < fp32.per_sample
    weights = 2 * parameters(config.parent)
    assert fp32.fixed < weights / 10 and 0.8 * weights < bf16.fixed <= weights
    checkpointed = activation_bytes(config, 8, "bf16", True)
    assert checkpointed.per_sample < bf16.per_sample / 2 and 0 < checkpointed.transient < bf16.per_sample
    assert 0.8 * weights < checkpointed.fixed <= weights * 1.1
    # counted on one sample: what autograd saves grows with the batch, the weight copies do not
    for precision, checkpointing, lora in (("bf16", True, None), ("no", False, (4, ("to_q", "to_v")))):
        one = activation_bytes(config, 8, precision, checkpointing, lora)
        assert _saved(config, 8, precision, checkpointing, lora, batch=3) == (
            3 * one.per_sample, one.fixed, 3 * one.transient)
