"""Beyond one GPU, on CPU processes talking over gloo: teachers sharded or replicated, the student replicated (DDP)
or sharded (FSDP2), planned per process, and a run that loses a process."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TOY_TEACHERS, assert_one_sentence_error, tiny_recipe, torchrun
from dmm_cli.models.references import resolve

FIVE_TEACHERS = TOY_TEACHERS + [{"name": "night_again", "model": "toy:night"}]


def recipe(folder: Path, batch_size: int, **changes) -> Path:
    """10 steps, checkpoints at 5 and 10, and an EMA: its average is the student saved."""
    return tiny_recipe(folder, **{"train.max_steps": 10, "train.batch_size": batch_size, "train.log_every": 5,
                                  "train.checkpoint_every": 5, "train.ema": {"decay": 0.9}, **changes})


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "unet" / "diffusion_pytorch_model.safetensors")


def relative_difference(a: Path, b: Path) -> float:
    """‖a − b‖ over how far a moved from the base: ~1e-5 for one training replayed, ~1 for another one."""
    start = load_file(resolve("toy:base") / "unet" / "diffusion_pytorch_model.safetensors")
    first, second = weights(a), weights(b)
    diff = torch.cat([(first[k] - second[k]).flatten() for k in start]).norm()
    moved = torch.cat([(first[k] - start[k]).flatten() for k in start]).norm()
    return float(diff / moved)


def test_one_seed_trains_one_student_whatever_the_placement_the_sharding_and_the_processes(dmm, tmp_path):
    """A step's batch is the same samples however it is spread: one process with batch 8 or two with 4 each
    (five teachers: 2 and 3 a process when sharded; four processes: the slow test below); teachers replicated and
    the student replicated, or both sharded. Sharded teachers with a replicated student: two machines, below."""
    assert dmm("distill", recipe(tmp_path / "one", 8, teachers=FIVE_TEACHERS)).code == 0
    runs = {"replicate": (2, {"train.teacher_placement": "replicate"}),
            "fsdp": (2, {"train.teacher_placement": "shard", "train.student_sharding": "fsdp"})}
    said = {}
    for name, (processes, changes) in runs.items():
        p = torchrun(processes, "distill", recipe(tmp_path / name, 8 // processes, teachers=FIVE_TEACHERS,
                                                  **changes))
        assert p.returncode == 0, p.stderr
        said[name] = p.stderr
        assert relative_difference(tmp_path / name / "run", tmp_path / "one" / "run") < 1e-3, name
        logged = [json.loads(line) for line in (tmp_path / name / "run" / "logs" / "metrics.jsonl").open()]
        alone = [json.loads(line) for line in (tmp_path / "one" / "run" / "logs" / "metrics.jsonl").open()]
        assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in alone], rel=1e-4)  # the step's mean
        layout = json.loads((tmp_path / name / "run" / "checkpoints" / "step-0000005" / "layout.json").read_text())
        assert layout == {"processes": processes, "teacher_placement": changes["train.teacher_placement"],
                          "student_sharding": changes.get("train.student_sharding", "none")}
    assert "teachers sharded (0-1, 2-4 by process), student sharded (FSDP2)" in said["fsdp"]

    # a sharded student resumes bit-exactly, its EMA included
    run = tmp_path / "fsdp" / "run"
    sharded = tmp_path / "fsdp" / "recipe.yaml"
    whole, ema = weights(run), load_file(run / "checkpoints" / "step-0000010" / "ema.safetensors")
    shutil.rmtree(run / "checkpoints" / "step-0000010")
    p = torchrun(2, "distill", sharded, "--resume")
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("resuming from") == 1  # the main process speaks
    resumed = weights(run)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert all(torch.equal(ema[k], v) for k, v in
               load_file(run / "checkpoints" / "step-0000010" / "ema.safetensors").items())

    # a checkpoint from one placement does not continue under another
    other = recipe(tmp_path / "fsdp", 4, teachers=FIVE_TEACHERS, **{"train.teacher_placement": "replicate",
                                                                     "train.student_sharding": "fsdp",
                                                                     "train.max_steps": 12})
    r = dmm("distill", other, "--resume", "--dry-run")
    assert_one_sentence_error(r, 2, "--resume", "train.teacher_placement shard", "replicate")


@pytest.mark.slow
def test_four_processes_train_the_student_of_one(dmm, tmp_path):
    """Four processes with 2 samples each (five teachers sharded 1, 1, 1, 2, the student under FSDP2) train what
    one process with 8 does."""
    assert dmm("distill", recipe(tmp_path / "one", 8, teachers=FIVE_TEACHERS)).code == 0
    p = torchrun(4, "distill", recipe(tmp_path / "four", 2, teachers=FIVE_TEACHERS,
                                      **{"train.teacher_placement": "shard", "train.student_sharding": "fsdp"}))
    assert p.returncode == 0, p.stderr
    assert "4 processes, teachers sharded (0, 1, 2, 3-4 by process), student sharded (FSDP2)" in p.stderr
    assert relative_difference(tmp_path / "four" / "run", tmp_path / "one" / "run") < 1e-3


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(tmp_path):
    """Checkpoints hold whole tensors, so four processes' checkpoint continues on two."""
    path = recipe(tmp_path, 2, **{"train.max_steps": 4, "train.checkpoint_every": 2, "train.log_every": 2,
                                  "train.teacher_placement": "shard", "train.student_sharding": "fsdp"})
    assert torchrun(4, "distill", path).returncode == 0
    p = torchrun(2, "distill", path, "--resume", "--max-steps", 6)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").open()]
    assert [r["processes"] for r in rows] == [4, 4, 2]


def test_two_machines_train_the_student_of_one(dmm, tmp_path):
    """Two launchers on one host standing for two machines (one process each, torchrun's static rendezvous), each
    with its own $DMM_HOME: the main process makes the latent cache first, the other machine's process its own
    copy after it, and the run is the one a single process trains."""
    assert dmm("distill", recipe(tmp_path / "one", 8)).code == 0
    path = recipe(tmp_path / "two", 4, **{"train.teacher_placement": "shard"})
    with socket.socket() as probe:  # a port free now, not a fixed one another run may hold
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    machines = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                                  str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
                                  port, "-m", "dmm_cli", "distill", str(path)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True,
                                 env=dict(os.environ, OMP_NUM_THREADS="1", DMM_HOME=str(tmp_path / f"home{rank}")))
                for rank in (0, 1)]
    results = [m.communicate(timeout=300) for m in machines]
    assert [m.returncode for m in machines] == [0, 0], results
    assert results[0][0].strip() == str(tmp_path / "two" / "run") and results[1][0] == ""  # the main one speaks
    assert "teachers sharded (0-1, 2-3 by process), student replicated (DDP)" in results[0][1]
    assert all(list((tmp_path / f"home{rank}" / "latents").glob("*.safetensors")) for rank in (0, 1))
    assert relative_difference(tmp_path / "two" / "run", tmp_path / "one" / "run") < 1e-3


def _workers(launcher: subprocess.Popen) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == launcher.pid:
            found.append(int(stat.parent.name))
    return found


def test_a_process_that_dies_stops_the_run_with_one_clear_error_and_resume_continues(tmp_path):
    path = recipe(tmp_path, 4, **{"train.max_steps": 5000, "train.checkpoint_every": 5})
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                 "-m", "dmm_cli", "distill", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 180
    while not list((tmp_path / "run" / "checkpoints").glob("step-*[0-9]")) and time.monotonic() < deadline:
        time.sleep(0.5)
    workers = _workers(launcher)
    assert len(workers) == 2
    os.kill(max(workers), signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)  # no hang
    assert launcher.returncode != 0
    said = [line for line in err.splitlines() if line.startswith("dmm: ")]
    assert len(said) == 1 and "another process of this run stopped" in said[0] and "--resume" in said[0], err
    assert "internal error" not in err
    last = int(sorted((tmp_path / "run" / "checkpoints").glob("step-*[0-9]"))[-1].name.split("-")[1])
    p = torchrun(2, "distill", path, "--resume", "--max-steps", last + 3)
    assert p.returncode == 0, p.stderr
    assert f"(step {last})" in p.stderr
    assert json.loads((tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == last + 3


def test_layouts_that_cannot_run_are_refused_in_one_sentence(dmm, tmp_path):
    path = recipe(tmp_path / "a", 4, **{"train.teacher_placement": "shard"})
    r = dmm("distill", path, "--dry-run", "--num-processes", 5)
    assert_one_sentence_error(r, 2, "train.teacher_placement shard", "5 processes but 4 teachers")
    r = dmm("distill", path, "--num-processes", 2)
    assert_one_sentence_error(r, 2, "--num-processes", "--dry-run")
    lora = recipe(tmp_path / "b", 4, **{"train.student_sharding": "fsdp", "train.student": {"type": "lora"}})
    assert_one_sentence_error(dmm("distill", lora, "--dry-run"), 2, "train.student_sharding fsdp", "LoRA")
    alone = dmm("distill", recipe(tmp_path / "c", 4, **{"train.student_sharding": "fsdp"}), "--dry-run")
    assert alone.code == 0 and "on one process: the student trains unsharded" in alone.err
    assert not (tmp_path / "a" / "run").exists() and not (tmp_path / "b" / "run").exists()


def test_the_dry_run_plans_memory_per_process(dmm, tmp_path):
    path = recipe(tmp_path, 4, **{"train.precision": "bf16", "train.ema": {"decay": 0.99}})
    plans = {}
    for placement, sharding in (("replicate", "none"), ("shard", "fsdp")):
        r = dmm("distill", path, "--dry-run", "--json", "--num-processes", 4, "--set",
                f"train.teacher_placement={placement}", "--set", f"train.student_sharding={sharding}")
        assert r.code == 0, r.err
        plans[placement] = json.loads(r.out)["memory"]
    alone, spread = plans["replicate"]["parts_bytes"], plans["shard"]["parts_bytes"]
    assert plans["shard"]["processes"] == 4 and plans["shard"]["student_sharding"] == "fsdp"
    assert spread["teachers"] * 4 == alone["teachers"]  # one toy teacher each instead of all four
    assert spread["optimizer"] == pytest.approx(alone["optimizer"] / 4, rel=1e-6)
    assert spread["ema"] == pytest.approx(alone["ema"] / 4, rel=1e-6) and spread["gathered weights"] > 0
    assert set(plans["shard"]["fits_by_processes"]) == {"1", "2", "4", "8"}
    text = dmm("distill", path, "--dry-run", "--num-processes", 4).out
    assert "layout 4 processes: teachers sharded" in text and "8 x 48 GB:" in text


def test_the_shipped_8_teacher_sdxl_recipe_fits_8_gpus_of_48_gb_without_offload():
    """SDXL's own UNet and text encoders, on meta tensors, with the recipe's own train settings."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from sdxl_memory import SDXL, SIDE, _models

    from dmm_cli.distill.memory import ModelSizes, estimate, fitting_layouts
    from dmm_cli.recipe import Recipe

    shipped = Recipe.model_validate(yaml.safe_load(
        (Path(__file__).resolve().parent.parent / "recipes" / "xl_styles_8.yaml").read_text()))
    assert len(shipped.teachers) == 8 and shipped.train.teacher_offload == "none"
    unet, text, text_2 = _models("meta", torch.float32)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    sizes = ModelSizes(count(unet), count(text) + count(text_2), 8, SDXL / "unet" / "config.json",
                       {n: list(p.shape) for n, p in unet.state_dict().items()}, [f"t{i}" for i in range(8)])
    assert estimate(shipped.train, sizes, SIDE, 8).total <= 48e9
    replicated = shipped.train.model_copy(update={"teacher_placement": "replicate", "student_sharding": "none"})
    assert estimate(replicated, sizes, SIDE, 8).total > 80e9
    assert fitting_layouts(shipped.train, sizes, SIDE, 8)[48] == "train.teacher_placement=shard, " \
                                                                 "train.student_sharding=fsdp"
    # teachers with text encoders of their own: a sharded process loads the student's and its teacher's only
    text = sizes.text
    own = replace(sizes, encoder_sizes={name: text for name in ["base", *sizes.teacher_ids]},
                  encoders_read=[["base"], *([t] for t in sizes.teacher_ids)])
    parts = estimate(shipped.train, own, SIDE, 8).parts
    assert parts["text encoders"] == 2 * 2 * text  # bf16, two models' encoders
    assert estimate(replicated, own, SIDE, 8).parts["text encoders"] == 9 * 2 * text


@pytest.mark.parametrize("told", ["during the failure", "after the error"])
def test_the_launchers_stop_signal_does_not_hide_a_lost_process(tmp_path, monkeypatch, capsys, told):
    """The launcher stops the other processes when one dies, and its signal may land while a process is already
    failing for that reason (here, deterministically): the user is told of the lost process, not an interrupt."""
    import dmm_cli.distill as distill
    from dmm_cli.main import main
    from dmm_cli.distill.run import _lost as lost_at_step

    def failing_run(plan):
        try:
            raise torch.distributed.DistNetworkError("Connection closed by peer [127.0.0.1]:29500")
        except torch.distributed.DistNetworkError as e:
            if told == "after the error":
                try:
                    raise lost_at_step(e, 7, tmp_path) from None  # as distill's loop makes it
                finally:
                    os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("the signal did not land")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distill, "run", failing_run)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert main(["distill", str(recipe(tmp_path, 4))]) == 1
    finally:  # the CLI ignores signals once its outcome is decided; this test process must not
        for s, handler in handlers.items():
            signal.signal(s, handler)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dmm: error: distill: another process of this run stopped"), err
    assert "--resume" in err[0] and "Connection closed by peer" in err[0]
