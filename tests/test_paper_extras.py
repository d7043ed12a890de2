"""The rest of the paper: adversarial loss, incremental merging, synthesized fine-tuning (issue-level checks)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import assert_one_sentence_error
from dmm_cli.models.styles import StyleTable

UNET = Path("unet") / "diffusion_pytorch_model.safetensors"


def recipe(folder: Path, name: str = "recipe.yaml", teachers=("night", "checker"), **top) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"name": "extras", "base": "toy:base", "teachers": [{"name": t, "model": f"toy:{t}"} for t in teachers],
            "data": {"folder": "toy:shapes"},
            "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-4, "checkpoint_every": 2, "log_every": 1},
            "output": str(folder / "run"), **top}
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_adversarial_loss_trains_a_discriminator_and_resumes_exactly(dmm, tmp_path):
    adversarial = {"weight": 0.01, "lr": 1e-4, "start_step": 2}
    whole = recipe(tmp_path / "a")
    r = dmm("distill", whole, "--set", f"train.adversarial_loss={json.dumps(adversarial)}")
    assert r.code == 0, r
    rows = metrics(tmp_path / "a" / "run")
    assert "adversarial_loss" not in rows[1] and rows[2]["adversarial_loss"] > 0 and rows[3]["discriminator_loss"] > 0
    assert (tmp_path / "a" / "run" / "checkpoints" / "step-0000004" / "discriminator.safetensors").is_file()

    split = recipe(tmp_path / "b")
    flag = ["--set", f"train.adversarial_loss={json.dumps(adversarial)}"]
    assert dmm("distill", split, *flag, "--max-steps", "3").code == 0
    assert dmm("distill", split, *flag, "--resume").code == 0
    a, b = load_file(tmp_path / "a" / "run" / UNET), load_file(tmp_path / "b" / "run" / UNET)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_incremental_merging_grows_the_student_and_records_lineage(dmm, tmp_path):
    first = recipe(tmp_path / "first")
    assert dmm("distill", first).code == 0
    old = tmp_path / "first" / "run"
    grown = recipe(tmp_path / "second", teachers=("night", "checker", "outline"), init_from=str(old))
    r = dmm("distill", grown, "--set", "train.old_style_fraction=0.5")
    assert r.code == 0, r
    run = tmp_path / "second" / "run"
    table = StyleTable.read(run)
    assert table.names == ["night", "checker", "outline"]
    assert [entry["styles"] for entry in table.lineage] == [["night", "checker"], ["night", "checker", "outline"]]
    assert table.lineage[1]["new_styles"] == ["outline"] and table.lineage[1]["old_style_fraction"] == 0.5
    w = load_file(run / UNET)["class_embedding.linear_1.weight"]
    assert w.shape[1] == 3
    plan = json.loads(dmm("distill", grown, "--dry-run", "--json", "-o", tmp_path / "elsewhere").out)
    assert plan["teachers"][0]["folder"].startswith("old style of")
    g = dmm("generate", "--model", run, "--style", "outline", "a red circle", "--steps", "3", "-o", tmp_path / "p.png")
    assert g.code == 0, g


def test_synthesized_fine_tuning_trains_on_each_teachers_generations(dmm, tmp_path):
    synth = {"images_per_teacher": 6, "steps": 3, "guidance": 3.0}
    path = recipe(tmp_path, data={"synthesize": synth})
    r = dmm("distill", path)
    assert r.code == 0, r
    assert "synthesize night" not in r.out and len(metrics(tmp_path / "run")) == 4
    chained = recipe(tmp_path / "chained", data={"folder": "toy:shapes", "synthesize": dict(synth, after_step=2)})
    r = dmm("distill", chained)
    assert r.code == 0, r
    plan = json.loads(dmm("distill", chained, "--dry-run", "--json", "-o", tmp_path / "x").out)
    assert plan["data"]["images"] > 12 and plan["data"]["synthesize"]["after_step"] == 2


@pytest.mark.parametrize("change, fragment", [
    ({"init_from": "toy:base", "teachers": ["night", "outline"]}, "init_from toy:base: not a dmm student"),
    ({"init_from": "./no-such-run", "teachers": ["night", "outline"]}, "init_from: ./no-such-run: no such model"),
    ({"train.adversarial_loss": {"weight": -1}}, "train.adversarial_loss.weight: must be >= 0 (got -1)"),
    ({"data": {"synthesize": {"images_per_teacher": 0}}}, "data.synthesize.images_per_teacher: must be >= 1 (got 0)"),
    ({"data": {"synthesize": {"images_per_teacher": 2, "prompts": "./none.txt"}}},
     "data.synthesize.prompts none.txt: no such file"),
])
def test_bad_input(dmm, tmp_path, change, fragment):
    change = dict(change)
    teachers = change.pop("teachers", ("night", "checker"))
    train = change.pop("train.adversarial_loss", None)
    path = recipe(tmp_path, teachers=teachers, **change)
    args = ["--set", f"train.adversarial_loss={json.dumps(train)}"] if train else []
    assert_one_sentence_error(dmm("distill", path, *args), 2, fragment)
    assert not (tmp_path / "run").exists()


def test_old_teacher_names_must_match_the_student(dmm, tmp_path):
    first = recipe(tmp_path / "first", **{})
    assert dmm("distill", first, "--max-steps", "1").code == 0
    wrong = recipe(tmp_path / "second", teachers=("checker", "night", "outline"), init_from=str(tmp_path / "first" / "run"))
    assert_one_sentence_error(dmm("distill", wrong), 2, "must be init_from's styles in order (night, checker)")
    assert not (tmp_path / "second" / "run").exists()


def test_a_student_is_never_evaluated_on_its_synthesized_training_pictures(dmm, tmp_path):
    from dmm_cli.data.prompts import read_prompts

    toy = ["toy:night", "toy:checker"]
    for refs in (toy, ["org/anime"]):  # the default lists: the toy plug-in's and the shipped ones
        assert not set(read_prompts(None, refs, "eval")) & set(read_prompts(None, refs, "synthesis"))

    # distill refuses synthesis prompts that are eval prompts (here a held-out toy pair, spelt differently)
    prompts = tmp_path / "synthesis.txt"
    prompts.write_text("a red circle\nA  Blue triangle\n")
    synth = {"images_per_teacher": 4, "steps": 2, "after_step": 2, "prompts": str(prompts)}
    path = recipe(tmp_path, data={"folder": "toy:shapes", "synthesize": synth})
    assert_one_sentence_error(dmm("distill", path), 2, str(prompts), "'A  Blue triangle' is an eval prompt")
    assert not (tmp_path / "run").exists()

    prompts.write_text("a red circle\na green circle\n")
    assert dmm("distill", path).code == 0
    student = tmp_path / "run"
    record = StyleTable.read(student).lineage[-1]["synthesis"]
    assert len(record["prompts_sha256"]) == 2

    # eval refuses the prompts the student's synthesized data used, in any spelling; they come through a pipe,
    # as from `--prompts <(grep circle prompts.txt)`
    read, write = os.pipe()
    os.write(write, b"a blue triangle\nA RED circle\n")
    os.close(write)
    assert_one_sentence_error(dmm("eval", student, "--recipe", path, "--prompts", f"/dev/fd/{read}", "-k", "2"), 2,
                              str(student), "'A RED circle'")
    os.close(read)
    assert_one_sentence_error(dmm("eval", student, "--recipe", path, "-k", "4", "--seed", str(2**62 - 10)), 2,
                              "--seed")

    # every picture eval compared, against every picture the student trained on: no prompt or seed in common
    r = dmm("eval", student, "--recipe", path, "-k", "4", "--steps", "2", "--features", "pixels",
            "-o", tmp_path / "eval")
    assert r.code == 0, r
    sets = [json.loads(p.read_text()) for p in Path(os.environ["DMM_HOME"]).glob("samples/*/done.json")]
    trained = [s for s in sets if s["label"].startswith("synthesize")]
    measured = [s for s in sets if not s["label"].startswith("synthesize")]
    assert len(trained) == 2 and len(measured) == 6  # 2 teachers, 2 references, 2 student styles
    seeds = lambda s: range(s["settings"]["seed"], s["settings"]["seed"] + len(s["prompts"]))  # noqa: E731
    for t in trained:
        assert seeds(t)[0] == record["seeds"][0] and seeds(t)[-1] < record["seeds"][1]
        for m in measured:
            assert not set(seeds(t)) & set(seeds(m)) and not set(t["prompts"]) & set(m["prompts"])
