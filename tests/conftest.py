from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import diffusers.utils.logging
import pytest
import torch
import transformers.utils.logging
import yaml

from dmm_cli.main import main

TOY_TEACHERS = [{"name": n, "model": f"toy:{n}"} for n in ("night", "outline", "stripes", "checker")]


def tiny_recipe(folder: Path, **changes) -> Path:
    """folder/recipe.yaml: 6 steps distilling the four toy teachers into folder/run. `changes` set dotted keys
    (tiny_recipe(p, **{"train.max_steps": 2})), or delete them when None."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {"name": "tiny", "base": "toy:base", "teachers": TOY_TEACHERS, "data": {"folder": "toy:shapes"},
              "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-4, "checkpoint_every": 3, "log_every": 2},
              "output": str(folder / "run")}
    for key, value in changes.items():
        node = recipe
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        if value is None:
            del node[last]
        else:
            node[last] = value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# Tests run on whatever cores CI has; pinning the thread count keeps CPU numerics repeatable.
torch.set_num_threads(2)


class _CurrentStderr:
    """diffusers' and transformers' log handlers bind sys.stderr when first used; in-process CLI runs swap it for
    each test (capsys), so a later warning went to a closed stream as a 'Logging error' traceback. They write
    through this to whichever stream is current, as in a real process."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


for _logs in (diffusers.utils.logging, transformers.utils.logging):
    for _handler in _logs.get_logger().handlers:
        _handler.setStream(_CurrentStderr())


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Each test gets its own $DMM_HOME, no $DMM_MODEL, and no network access to the real Hub."""
    monkeypatch.setenv("DMM_HOME", str(tmp_path_factory.mktemp("dmm-home")))
    monkeypatch.delenv("DMM_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class CLIResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    @property
    def lines(self) -> list[str]:
        return [line for line in self.out.splitlines() if line]

    def __repr__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


@pytest.fixture
def dmm(capsys):
    """Run the real `dmm` CLI in-process: dmm("generate", "a cat", ...) -> CLIResult."""

    def run(*args: str) -> CLIResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return CLIResult(code, out, err)

    return run


def assert_one_sentence_error(result: CLIResult, code: int, *fragments: str) -> None:
    """Failures print one line on stderr naming the culprit, no traceback, nothing on stdout."""
    assert result.code == code, result
    assert "Traceback" not in result.err, result
    lines = [line for line in result.err.splitlines() if line.startswith("dmm: ")]
    assert len(lines) == 1, result
    for fragment in fragments:
        assert fragment in lines[0], result
    assert result.out == "", result


def dmm_cli(tmp_path: Path, endpoint: str | None, *args: str, offline: bool = False) -> subprocess.CompletedProcess:
    """Run `dmm` in a subprocess with its own $DMM_HOME and Hub cache, against `endpoint` (a local FakeHub)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(DMM_HOME=str(tmp_path / "home"), HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "dmm_cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def torchrun(processes: int, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """`processes` processes on this host, at a free port (--standalone), not at 29500, which another run may hold."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), "-m", "dmm_cli", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=timeout)


def one_sentence(p: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    assert p.returncode == code, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("dmm: ")]
    assert len(lines) == 1 and fragment in lines[0], p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
