"""`dmm distill` end to end on the toy zoo: output folder, generation after it, resume, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from conftest import TOY_TEACHERS, assert_one_sentence_error, tiny_recipe, torchrun
from dmm_cli.distill import plan_run, plan_text
from dmm_cli.main import main
from dmm_cli.models.references import resolve
from dmm_cli.models.styles import StyleTable

def unet_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "unet" / "diffusion_pytorch_model.safetensors")


def test_distill_writes_a_student_pipeline_then_generate_uses_it(dmm, tmp_path):
    recipe = tiny_recipe(tmp_path)
    r = dmm("distill", recipe)
    assert r.code == 0, r
    run = Path(r.lines[0])
    assert run == tmp_path / "run"
    pipe = StableDiffusionPipeline.from_pretrained(run)
    assert pipe.unet.config.class_embed_type == "projection"
    assert pipe.unet.config.projection_class_embeddings_input_dim == 4
    table = StyleTable.read(run)
    assert table.names == ["night", "outline", "stripes", "checker"]
    assert all(len(s.sha256) == 64 and s.teacher.startswith("toy:") for s in table.styles)
    card = (run / "README.md").read_text()
    assert "toy:night" in card and "Trained for 6 steps" in card
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6] and all(row["loss"] > 0 for row in rows)
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-0000003", "step-0000006"]
    # the student moved away from the base
    base = load_file(resolve("toy:base") / "unet" / "diffusion_pytorch_model.safetensors")
    student = unet_weights(run)
    assert not torch.equal(student["conv_in.weight"], base["conv_in.weight"].float())

    g = dmm("generate", "--style", "all", "a red circle", "--steps", "3", "-o", tmp_path / "pics")
    assert g.code == 0, g
    assert "the last model dmm distill wrote" in g.err
    assert len(g.lines) == 5 and g.lines[-1].endswith("-styles.png")


def test_dry_run_prints_the_plan_and_writes_nothing(dmm, tmp_path):
    recipe = tiny_recipe(tmp_path)
    r = dmm("distill", recipe, "--dry-run", "--json", "--set", "train.lr=2e-5", "--max-steps", "9")
    assert r.code == 0, r
    plan = json.loads(r.out)
    assert plan["train"]["lr"] == 2e-5 and plan["train"]["max_steps"] == 9
    assert [t["name"] for t in plan["teachers"]] == ["night", "outline", "stripes", "checker"]
    assert plan["data"]["images"] > 100
    assert not (tmp_path / "run").exists()
    # the text form is the Python API's: a notebook prints what the CLI prints
    r = dmm("distill", recipe, "--dry-run", "--max-steps", "9")
    assert r.code == 0, r
    assert r.out.strip() == plan_text(plan_run(recipe, [], max_steps=9).describe())
    assert "train  9 steps x batch" in r.out


def test_shipped_recipes_validate(dmm):
    from dmm_cli.recipe import load_recipe

    recipes = Path(__file__).parent.parent / "recipes"
    anime = load_recipe(recipes / "anime_realism.yaml")
    assert len(anime.teachers) >= 2 and all("/" in t.model for t in anime.teachers)
    incremental = load_recipe(recipes / "toy_incremental.yaml")
    assert incremental.init_from and incremental.data.synthesize and incremental.train.adversarial_loss


def bad(tmp_path, **changes):
    return tiny_recipe(tmp_path, **changes)


def shape_mismatched_teacher(tmp_path) -> str:
    import shutil

    folder = tmp_path / "odd-teacher"
    shutil.copytree(resolve("toy:night"), folder, symlinks=False)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["block_out_channels"] = [32, 64, 96]
    unet = UNet2DConditionModel.from_config(config)
    for f in (folder / "unet").iterdir():
        f.unlink()
    unet.save_pretrained(folder / "unet")
    return str(folder)


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p / "missing.yaml", "missing.yaml: no such recipe file"),
    (lambda p: (p / "recipes.yaml").mkdir() or p / "recipes.yaml", "recipes.yaml: a folder, not a recipe file"),
    (lambda p: (p / "r.yaml", (p / "r.yaml").write_text("name: x\nteachers: [\n  {name: a\nbase: b\n"))[0],
     "malformed YAML at line"),
    (lambda p: (p / "r.yaml", (p / "r.yaml").write_text(Path(bad(p)).read_text() + "base: toy:night\n"))[0],
     "the key 'base' is given twice"),
    (lambda p: bad(p, **{"train.learning_rate": 1}), "train.learning_rate: unknown key"),
    (lambda p: bad(p, **{"train.max_steps": "lots"}), "train.max_steps: must be an integer (got 'lots')"),
    (lambda p: bad(p, **{"train.lr": -1}), "train.lr: must be > 0 (got -1)"),
    (lambda p: bad(p, **{"train.lr": float("inf")}), "train.lr: must be a finite number (got inf)"),
    (lambda p: bad(p, **{"train.compile": "maybe"}), "train.compile: must be 'auto' or true or false (got 'maybe')"),
    (lambda p: bad(p, teachers=[]), "teachers: needs at least one teacher"),
    (lambda p: bad(p, teachers=[TOY_TEACHERS[0], dict(TOY_TEACHERS[1], name="night")]), "duplicate style name 'night'"),
    (lambda p: bad(p, teachers=[TOY_TEACHERS[0], {"name": "odd", "model": shape_mismatched_teacher(p)}]),
     "teacher 'odd'"),
    (lambda p: (p / "empty").mkdir() or bad(p, data={"folder": str(p / "empty")}), "no captioned images"),
    (lambda p: bad(p, teachers=[{"name": "x", "model": "toy:nope"}]), "teacher 'x': toy:nope: no such toy model"),
    (lambda p: bad(p, base="toy:nope"), "base: toy:nope: no such toy model"),
    (lambda p: bad(p, data={"folder": "toy:shapes", "synthesize": {"images_per_teacher": 2, "steps": 1001}}),
     "data.synthesize.steps: 1001 is more than the 1000 timesteps the base toy:base was trained on"),
    (lambda p: bad(p, **{"train.ema": {"decay": 1.0}}), "train.ema.decay: must be between 0 and 1, exclusive"),
    (lambda p: bad(p, **{"train.ema": {"decay": 0}}), "train.ema.decay: must be between 0 and 1, exclusive"),
    (lambda p: bad(p, **{"train.ema": {"start_step": 6}}), "ema.start_step (6) is not before max_steps (6)"),
    (lambda p: bad(p, **{"train.lr_schedule": "cosine", "train.warmup_steps": 7}),
     "warmup_steps (7) exceeds max_steps (6), so the cosine schedule would never decay"),
])
def test_bad_recipes(dmm, tmp_path, make, fragment):
    recipe = make(tmp_path)
    r = dmm("distill", recipe)
    assert_one_sentence_error(r, 2, fragment)
    assert not (tmp_path / "run").exists()


def test_a_bad_set_value_is_blamed_on_set_not_the_file(dmm, tmp_path):
    recipe = tiny_recipe(tmp_path)
    r = dmm("distill", recipe, "--set", "train.lr=abc")
    assert_one_sentence_error(r, 2, "--set train.lr: must be a number (got 'abc')")
    assert str(recipe) not in r.err
    assert_one_sentence_error(dmm("distill", recipe, "--max-steps", "0"), 2, "'--max-steps'", "greater than or equal to 1")
    r = dmm("distill", recipe, "--set", "train.lr=1e-4", "--set", "train.nope=1")
    assert_one_sentence_error(r, 2, "--set train.nope: unknown key")
    r = dmm("distill", tiny_recipe(tmp_path, **{"train.max_steps": "lots"}), "--set", "train.lr=1e-4")
    assert_one_sentence_error(r, 2, f"{recipe}: train.max_steps: must be an integer")


def test_keys_merged_in_from_a_yaml_anchor_may_be_overridden(dmm, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: m\nbase: toy:base\ndata: {folder: toy:shapes}\noutput: run\nteachers:\n"
                      "  - &night {name: night, model: toy:night}\n  - <<: *night\n    name: night2\n")
    r = dmm("distill", recipe, "--dry-run", "--json")
    assert r.code == 0, r.err
    assert [(t["name"], t["ref"]) for t in json.loads(r.out)["teachers"]] == [("night", "toy:night"),
                                                                             ("night2", "toy:night")]


def test_resume_without_checkpoint_and_foreign_output(dmm, tmp_path):
    recipe = tiny_recipe(tmp_path)
    r = dmm("distill", recipe, "--resume")
    assert_one_sentence_error(r, 2, "--resume: no checkpoint")
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    r = dmm("distill", recipe)
    assert_one_sentence_error(r, 2, "is not a dmm run")
    assert sorted(os.listdir(tmp_path / "run")) == ["notes.txt"]


def test_resume_skips_a_damaged_checkpoint_and_a_damaged_run_file_is_one_sentence(dmm, tmp_path):
    recipe = tiny_recipe(tmp_path, **{"train.max_steps": 4, "train.checkpoint_every": 2})
    assert dmm("distill", recipe).code == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "step-0000004" / "student.safetensors").write_bytes(b"cut")
    r = dmm("distill", tiny_recipe(tmp_path, **{"train.max_steps": 6, "train.checkpoint_every": 2}), "--resume")
    assert r.code == 0, r
    assert "checkpoint " + str(checkpoints / "step-0000004") + " is damaged" in r.err
    assert f"resuming from {checkpoints / 'step-0000002'} (step 2)" in r.err
    assert "Trained for 6 steps" in (tmp_path / "run" / "README.md").read_text()
    for kept in checkpoints.iterdir():
        (kept / "state.pt").write_bytes(b"cut")
    r = dmm("distill", recipe, "--resume")
    assert_one_sentence_error(r, 2, "every checkpoint under", "is damaged", "--overwrite")
    (tmp_path / "run" / "run.json").write_text("{cut")
    assert_one_sentence_error(dmm("distill", recipe, "--resume"), 2, "run.json: damaged", "--overwrite")
    assert dmm("distill", recipe, "--overwrite").code == 0


def test_rerun_needs_resume_or_overwrite_and_other_recipes_are_refused(dmm, tmp_path):
    recipe = tiny_recipe(tmp_path, **{"train.max_steps": 2})
    assert dmm("distill", recipe).code == 0
    assert_one_sentence_error(dmm("distill", recipe), 2, "--resume", "--overwrite")
    other = tiny_recipe(tmp_path, teachers=TOY_TEACHERS[:2], **{"train.max_steps": 2})
    assert_one_sentence_error(dmm("distill", other), 2, "another recipe")
    r = dmm("distill", tiny_recipe(tmp_path, **{"train.max_steps": 4}), "--resume")
    assert r.code == 0, r
    assert "Trained for 4 steps" in (tmp_path / "run" / "README.md").read_text()


def cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dmm_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"), **kw)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until `path` exists, and holds something when it is a file (metrics.jsonl is opened before the first step)."""
    end = time.monotonic() + timeout
    while not path.exists() or path.is_file() and path.stat().st_size == 0:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.02)


def whole_and_killed_then_resumed(tmp_path: Path, **train) -> tuple[dict, dict]:
    """The students of one run straight through, and of the same recipe SIGKILLed after its step-8 checkpoint
    and continued with --resume."""
    steps = {"train.max_steps": 20, "train.checkpoint_every": 4, **train}
    whole = tiny_recipe(tmp_path / "a", **steps, output=str(tmp_path / "a" / "run"))
    assert main(["-q", "distill", str(whole)]) == 0  # in this process: the same threads, so the same sums

    broken = tiny_recipe(tmp_path / "b", **steps, output=str(tmp_path / "b" / "run"))
    p = cli("distill", str(broken))
    wait_for(tmp_path / "b" / "run" / "checkpoints" / "step-0000008", p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "b" / "run" / "model_index.json").exists(), "the run finished before it was killed"
    p = cli("distill", str(broken), "--resume")
    out, err = p.communicate()
    assert p.returncode == 0, err
    assert "resuming from" in err
    a, b = unet_weights(tmp_path / "a" / "run"), unet_weights(tmp_path / "b" / "run")
    assert a.keys() == b.keys()
    return a, b


def test_sigkill_then_resume_is_bit_identical_with_ema_and_a_cosine_schedule_and_saves_the_average(tmp_path):
    """The weights, optimizer, RNG, EMA (kept in each checkpoint) and the schedule's place come back on --resume;
    the saved student is the average, not the last weights. The SDXL and adversarial-loss tests resume exactly
    without an EMA."""
    a, b = whole_and_killed_then_resumed(tmp_path, **{"train.lr_schedule": "cosine", "train.warmup_steps": 2,
                                                      "train.ema": {"decay": 0.8, "start_step": 3}})
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = load_file(tmp_path / "a" / "run" / "checkpoints" / "step-0000020" / "student.safetensors")
    ema = load_file(tmp_path / "a" / "run" / "checkpoints" / "step-0000020" / "ema.safetensors")
    assert all(torch.equal(a[k], ema[k].to(a[k].dtype)) for k in a)  # the student written is the average
    assert any(not torch.equal(last[k], ema[k]) for k in ema)  # which is not the last weights


def test_lr_schedules_warm_up_then_decay_to_zero():
    from dmm_cli.distill.trainer import lr_factor

    factors = {shape: [lr_factor(s, warmup=2, total=10, shape=shape) for s in range(11)]
               for shape in ("constant", "cosine", "linear")}
    assert factors["constant"][:3] == [1 / 3, 2 / 3, 1.0] and set(factors["constant"][2:]) == {1.0}
    for shape in ("cosine", "linear"):
        assert factors[shape][:3] == [1 / 3, 2 / 3, 1.0] and factors[shape][10] == 0
        assert all(x > y for x, y in zip(factors[shape][2:10], factors[shape][3:11]))  # strictly decaying
    assert abs(factors["cosine"][6] - 0.5) < 1e-12 and factors["linear"][6] == 0.5


def test_logit_normal_timesteps_favour_the_middle_of_the_schedule(dmm, tmp_path):
    from dmm_cli.distill.draws import timesteps
    from dmm_cli.recipe import Train

    draws = {}
    for sampling in ("uniform", "logit_normal"):
        spec = Train(timesteps={"sampling": sampling}).timesteps
        draws[sampling] = timesteps(spec, 1000, 20000, torch.Generator().manual_seed(0))
        assert 0 <= int(draws[sampling].min()) and int(draws[sampling].max()) <= 999
    middle = {k: float(((v >= 250) & (v < 750)).float().mean()) for k, v in draws.items()}
    assert abs(middle["uniform"] - 0.5) < 0.02 and middle["logit_normal"] > 0.7
    r = dmm("distill", tiny_recipe(tmp_path, **{"train.timesteps": {"sampling": "logit_normal", "std": 0}}))
    assert r.code == 2 and "train.timesteps.std" in r.err


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    recipe = tiny_recipe(tmp_path, **{"train.max_steps": 400, "train.checkpoint_every": 1000})
    p = cli("distill", str(recipe))
    wait_for(tmp_path / "run" / "logs" / "metrics.jsonl", p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "checkpoint saved" in err and "Traceback" not in err
    saved = list((tmp_path / "run" / "checkpoints").iterdir())
    assert len(saved) == 1 and (saved[0] / "student.safetensors").is_file()


@pytest.mark.slow  # 12 s of start-ups; the default suite runs a full student on 2 processes (test_scale_out.py)
def test_a_lora_student_on_two_cpu_processes_with_torchrun(tmp_path):
    recipe = tiny_recipe(tmp_path, **{"train.max_steps": 4, "train.log_every": 1, "train.lr_schedule": "linear",
                                      "train.ema": {"decay": 0.9},  # both ranks keep the same average
                                      "train.student": {"type": "lora", "rank": 4}})
    p = torchrun(2, "distill", recipe, timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines() == [str(tmp_path / "run")]  # only rank 0 prints
    rows = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["processes"] == 2 for r in rows)
    assert rows[-1]["lr"] < rows[0]["lr"]  # the linear schedule decays
    assert StableDiffusionPipeline.from_pretrained(tmp_path / "run").unet.config.class_embed_type == "projection"
    assert (tmp_path / "run" / "student_lora").is_dir()


def test_a_resume_with_other_train_settings_says_which_once(dmm, tmp_path):
    recipe = tiny_recipe(tmp_path, **{"train.max_steps": 3})
    assert dmm("distill", recipe).code == 0
    r = dmm("distill", recipe, "--resume", "--max-steps", "4", "--set", "train.lr=3e-4")
    assert r.code == 0, r
    assert "train settings changed since the last start (train.lr 0.0001 -> 0.0003)" in r.err
    r = dmm("distill", recipe, "--resume", "--max-steps", "5", "--set", "train.lr=3e-4")  # its last start's settings
    assert r.code == 0, r
    assert "settings changed" not in r.err
