"""Interrupts tell the truth and lose nothing: exit 130, no temporaries, and resume exact at every instant.

The interrupt is a real signal sent to this process at a chosen point of the work (a wrapper around
one of dmm's own functions sends it, then lets the function run): the code under test sees exactly
what a Ctrl-C or `kill` at that instant would give it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CLIResult, tiny_recipe


def interrupt_on_call(monkeypatch, owner, name: str, call: int = 1, sig=signal.SIGINT, after: bool = False):
    """Make the `call`-th call of owner.name send `sig` to this process, before the call (or after it)."""
    original = getattr(owner, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call and not after:
            os.kill(os.getpid(), sig)
        result = original(*args, **kwargs)
        if len(calls) == call and after:
            os.kill(os.getpid(), sig)
        return result

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def interrupted(r: CLIResult) -> None:
    assert r.code == 130, r
    assert "Traceback" not in r.err
    assert [line for line in r.err.splitlines() if line.startswith("dmm: ")][-1].startswith("dmm: interrupted"), r


def litter(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.name.endswith((".tmp", ".old", ".lock"))]


def test_baseline_merge_interrupted(dmm, tmp_path, monkeypatch):
    from dmm_cli.merge import stream

    interrupt_on_call(monkeypatch, stream, "check_finite", call=20)
    interrupted(dmm("baseline-merge", "toy:night", "toy:outline", "-o", tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not litter(tmp_path)


def test_a_second_interrupt_as_the_cleanup_starts_leaves_no_litter(dmm, tmp_path, monkeypatch):
    from dmm_cli.files import atomic
    from dmm_cli.merge import stream

    interrupt_on_call(monkeypatch, stream, "check_finite", call=20)
    interrupt_on_call(monkeypatch, atomic.shutil, "rmtree", call=1, sig=signal.SIGTERM)
    interrupted(dmm("baseline-merge", "toy:night", "toy:outline", "-o", tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not litter(tmp_path)


def test_generate_interrupted_keeps_the_pictures_it_made(dmm, tmp_path, monkeypatch):
    from dmm_cli.generate import run

    interrupt_on_call(monkeypatch, run, "save_png", call=3, sig=signal.SIGTERM, after=True)
    r = dmm("generate", "a red circle", "--model", "toy:night", "-n", "8", "--batch-size", "2", "--steps", "2",
            "-o", tmp_path / "out")
    interrupted(r)
    assert len(r.lines) == 3 and all(Path(p).is_file() for p in r.lines)  # printed as written, kept
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(Path(p).name for p in r.lines)


def test_eval_interrupted(dmm, tmp_path, monkeypatch):
    from dmm_cli.generate import samples

    recipe = tiny_recipe(tmp_path)
    interrupt_on_call(monkeypatch, samples, "save_png", call=2)
    interrupted(dmm("eval", "toy:night", "--recipe", recipe, "-k", "4", "--steps", "2", "-o", tmp_path / "report"))
    assert not (tmp_path / "report").exists()


def test_fetch_interrupted(dmm, tmp_path, monkeypatch):
    from dmm_cli.models import references

    interrupt_on_call(monkeypatch, references, "check_pipeline_folder", sig=signal.SIGTERM)
    interrupted(dmm("fetch", "toy:night"))


class RowsThatGetInterrupted:
    """A sequence whose rows are read while torch builds a tensor from it, and a SIGTERM arrives meanwhile."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        os.kill(os.getpid(), signal.SIGTERM)
        return [0.0, 1.0]


def test_an_interrupt_torch_swallows_while_loading_still_reads_interrupted(dmm, tmp_path, monkeypatch):
    """safetensors builds tensors through torch's C++, which turns a KeyboardInterrupt raised in there into a
    ValueError that does not mention it; diffusers then reports the weights as unreadable."""
    import safetensors.torch

    real, calls = safetensors.torch.load_file, []

    def load_file_interrupted_once(*args, **kwargs):  # a module first imported now keeps this function: once only
        calls.append(1)
        return torch.tensor(RowsThatGetInterrupted()) if len(calls) == 1 else real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", load_file_interrupted_once)
    r = dmm("distill", tiny_recipe(tmp_path))
    interrupted(r)
    assert "cannot load" not in r.err


INTERRUPT_INSIDE_EXEC = """
import sys
from dmm_cli.files import safetensors_io
original = safetensors_io.StreamingWriter.__init__
def start(*args, **kwargs):  # the signal arrives as the output is started, while a dataclass is made, say
    exec("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    original(*args, **kwargs)
safetensors_io.StreamingWriter.__init__ = start
from dmm_cli.main import entry
sys.exit(entry())
"""


def test_an_interrupt_inside_exec_still_exits_130(tmp_path):
    """CPython kills a process run with `python -m` by SIGINT at exit once an interrupt has escaped an exec() of
    source text, even after the program handled it."""
    (tmp_path / "interrupted_dmm.py").write_text(INTERRUPT_INSIDE_EXEC)
    p = subprocess.run([sys.executable, "-m", "interrupted_dmm", "baseline-merge", "toy:night", "toy:outline",
                        "-o", "out"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.returncode == 130, p.stderr
    assert p.stderr.splitlines()[-1] == "dmm: interrupted", p.stderr
    assert not (tmp_path / "out").exists() and not litter(tmp_path)


def test_distill_setup_interrupted_then_plain_rerun_works(dmm, tmp_path, monkeypatch):
    import importlib

    recipe = tiny_recipe(tmp_path)
    interrupt_on_call(monkeypatch, importlib.import_module("dmm_cli.distill.run"), "encode_items")
    interrupted(dmm("distill", recipe))
    monkeypatch.undo()
    r = dmm("-q", "distill", recipe)  # nothing was trained: no --resume or --overwrite needed
    assert r.code == 0, r


def test_second_ctrl_c_during_the_interrupt_checkpoint_keeps_it(dmm, tmp_path, monkeypatch):
    from dmm_cli.distill import checkpoint, trainer

    recipe = tiny_recipe(tmp_path, **{"train.max_steps": 50, "train.checkpoint_every": 100})
    interrupt_on_call(monkeypatch, trainer, "score_loss", call=4)
    interrupt_on_call(monkeypatch, checkpoint, "save_file", call=1)  # the interrupt checkpoint's first file
    r = dmm("distill", recipe)
    interrupted(r)
    assert "checkpoint saved" in r.err
    (checkpoint,) = (tmp_path / "run" / "checkpoints").iterdir()
    assert checkpoint.name == "step-0000004"
    assert {p.name for p in checkpoint.iterdir()} == {"student.safetensors", "state.pt", "layout.json"}
    assert not litter(tmp_path / "run")


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from dmm_cli.main import main

    folder = tmp_path_factory.mktemp("whole")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DMM_HOME", str(folder / "home"))
        assert main(["-q", "distill", str(tiny_recipe(folder))]) == 0
    return final_weights(folder / "run")


def _after_optimizer():
    """Interrupt right after the optimizer's 4th update (step index 3), before the step counter moves."""
    calls = []

    def hook(optimizer, args, kwargs):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)

    from torch.optim.optimizer import register_optimizer_step_post_hook

    return register_optimizer_step_post_hook(hook)


@pytest.mark.parametrize("phase", ["forward", "backward", "after the optimizer", "during the save"])
def test_resume_is_exact_whatever_the_instant_of_the_interrupt(dmm, tmp_path, monkeypatch, uninterrupted, phase):
    from accelerate import Accelerator

    from dmm_cli.distill import checkpoint, trainer

    recipe = tiny_recipe(tmp_path)
    handle = None
    if phase == "forward":
        interrupt_on_call(monkeypatch, trainer, "score_loss", call=5)
    elif phase == "backward":
        interrupt_on_call(monkeypatch, Accelerator, "backward", call=4, after=True)
    elif phase == "after the optimizer":
        handle = _after_optimizer()
    else:  # the periodic checkpoint after step 3
        interrupt_on_call(monkeypatch, checkpoint, "save_file", call=1, after=True)
    try:
        interrupted(dmm("distill", recipe))
    finally:
        if handle is not None:
            handle.remove()
    monkeypatch.undo()
    assert not litter(tmp_path / "run")
    r = dmm("-q", "distill", recipe, "--resume")
    assert r.code == 0, r
    resumed = final_weights(tmp_path / "run")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), f"resume after an interrupt {phase}"


KILL_MID_SAVE = """
import os, signal, sys
from dmm_cli.distill import checkpoint
original = checkpoint.save_file
def save_then_die(*args, **kwargs):
    original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_file = save_then_die
from dmm_cli.main import main
sys.exit(main(["-q", "distill", sys.argv[1]]))
"""


@pytest.mark.parametrize("rerun", [["--resume"], []])
def test_kill_during_the_first_checkpoint_leaves_a_run_that_continues(dmm, tmp_path, rerun):
    """SIGKILL in the middle of writing the first checkpoint, where no cleanup code can run."""
    recipe = tiny_recipe(tmp_path)
    p = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(recipe)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert litter(tmp_path / "run"), "the kill should have left a half-written checkpoint behind"
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*[0-9]"))
    r = dmm("-q", "distill", recipe, *rerun)
    assert r.code == 0, r  # neither needs --overwrite
    assert (tmp_path / "run" / "model_index.json").is_file()
    assert not litter(tmp_path / "run")
