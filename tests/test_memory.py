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
    assert parts["gradients"] == 4 * unet and parts["optimizer"] == 8 * unet and parts["teachers"] == 4 * 4 * unet
    assert plain["estimate_bytes"] == int(sum(parts.values()) * 1.1)
    assert set(plain["fits"]) == {"24 GB", "48 GB", "80 GB"} and plain["fits"]["24 GB"] == "as it is"
    checkpointed = plan(dmm, "train.gradient_checkpointing=true")["parts_bytes"]
    assert checkpointed["activations"] < parts["activations"] / 4
    half = plan(dmm, "train.precision=bf16", "train.teacher_offload=cpu")["parts_bytes"]
    assert half["teachers"] == 2 * unet  # one bf16 slot
    double = plan(dmm, "train.batch_size=64")["parts_bytes"]
    assert double["activations"] == 2 * parts["activations"]


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
    assert_one_sentence_error(r, 2, "train.optimizer adamw-8bit")
