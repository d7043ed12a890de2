"""Prediction types: ε, v and x₀ convert into one another exactly, and distillation trains in the base's type."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import assert_one_sentence_error
from dmm_cli.distill.prediction import convert, x0_and_eps
from dmm_cli.models.references import resolve

KINDS = ("epsilon", "v_prediction", "sample")


def quantities():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64), torch.randn(6, 4, 3, 3, generator=g,
                                                                                     dtype=torch.float64)
    alpha_bar = torch.tensor([0.9991, 0.9, 0.5, 0.1, 0.01, 0.0047], dtype=torch.float64)  # SD's range of ᾱ_t
    a, s = alpha_bar.sqrt().view(-1, 1, 1, 1), (1 - alpha_bar).sqrt().view(-1, 1, 1, 1)
    xt = a * x0 + s * eps
    return xt, alpha_bar, {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("to", KINDS)
def test_every_prediction_type_converts_to_every_other(kind, to):
    xt, alpha_bar, truth = quantities()
    assert torch.allclose(convert(truth[kind], kind, to, xt, alpha_bar), truth[to], atol=1e-9)
    x0, eps = x0_and_eps(truth[kind], kind, xt, alpha_bar)
    assert torch.allclose(x0, truth["sample"], atol=1e-9) and torch.allclose(eps, truth["epsilon"], atol=1e-9)


def retyped(name: str, folder: Path, **scheduler) -> Path:
    """A copy of a toy model whose scheduler says it predicts something else (or trains on another schedule)."""
    shutil.copytree(resolve(f"toy:{name}"), folder, symlinks=False)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **scheduler}))
    return folder


def recipe(tmp_path: Path, base: str, teachers: list[str]) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "types", "base": base, "data": {"folder": "toy:shapes"}, "output": str(tmp_path / "run"),
        "teachers": [{"name": f"t{i}", "model": m} for i, m in enumerate(teachers)],
        "train": {"max_steps": 1, "batch_size": 4}}))
    return path


def test_teachers_of_another_type_are_converted_into_the_bases(tmp_path):
    """The loss target for a v-prediction teacher under an ε base is that teacher's v, turned into ε."""
    from accelerate import Accelerator

    from dmm_cli.distill import plan_run
    from dmm_cli.distill.run import data_sources
    from dmm_cli.distill.text import Conditioning, load_tokenizers, tokenize
    from dmm_cli.distill.models import load_models
    from dmm_cli.distill.trainer import Trainer

    v_teacher = retyped("night", tmp_path / "v-night", prediction_type="v_prediction")
    plan = plan_run(recipe(tmp_path, "toy:base", ["toy:night", str(v_teacher)]))
    assert [t["prediction_type"] for t in plan.describe()["teachers"]] == ["epsilon", "v_prediction"]
    accelerator = Accelerator(cpu=True)
    tokenizers = load_tokenizers(plan.base)
    models = load_models(plan.recipe, plan.base, plan.teachers, accelerator.device)
    assert models.prediction == "epsilon" and models.teacher_predictions == ["epsilon", "v_prediction"]
    trainer = Trainer(plan.recipe.train, models, data_sources(plan, tokenizers, accelerator.device),
                      tokenize(tokenizers, [""])[0], accelerator)
    g = torch.Generator().manual_seed(1)
    xt, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([10, 300, 600, 990])
    ctx = {k: Conditioning(torch.randn(4, 8, 64, generator=g))
           for k in {models.student_text_key, *models.teacher_text_keys}}
    target, _ = trainer.teacher_targets(xt, t, ctx, [2, 2])
    with torch.inference_mode():
        raw = models.teachers[1](xt[2:], t[2:], encoder_hidden_states=ctx[models.teacher_text_keys[1]].context[2:]).sample
    alpha_bar = models.alphas_cumprod[t[2:]]
    a, s = alpha_bar.sqrt().view(-1, 1, 1, 1), (1 - alpha_bar).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(target[2:], s * xt[2:] + a * raw, atol=1e-5)  # ε = σ·x_t + α·v
    assert not torch.allclose(target[2:], raw, atol=1e-3)


def test_a_v_prediction_base_trains_a_v_prediction_student(dmm, tmp_path):
    base = retyped("base", tmp_path / "v-base", prediction_type="v_prediction")
    teacher = retyped("night", tmp_path / "v-night", prediction_type="v_prediction")
    r = dmm("distill", recipe(tmp_path, str(base), [str(teacher), "toy:outline"]))
    assert r.code == 0, r
    saved = json.loads((tmp_path / "run" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"
    assert json.loads((tmp_path / "run" / "styles.json").read_text())["lineage"][-1]["prediction_type"] == \
        "v_prediction"


def test_a_teacher_on_another_noise_schedule_is_refused(dmm, tmp_path):
    other = retyped("night", tmp_path / "odd", beta_end=0.02)
    r = dmm("distill", recipe(tmp_path, "toy:base", [str(other)]), "--dry-run")
    assert_one_sentence_error(r, 2, "teacher 't0'", "another noise schedule")
    zero_snr = retyped("base", tmp_path / "zsnr", prediction_type="v_prediction", rescale_betas_zero_snr=True)
    eps_teacher = retyped("night", tmp_path / "eps", rescale_betas_zero_snr=True)
    r = dmm("distill", recipe(tmp_path, str(zero_snr), [str(eps_teacher)]), "--dry-run")
    assert_one_sentence_error(r, 2, "predicts epsilon", "zero-SNR")
