"""`dmm generate` and `dmm fetch toy:` end to end through the real CLI, on the shipped toy zoo."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_sentence_error

FAST = ["--steps", "4", "--guidance", "3"]


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_generate_writes_pngs_and_prints_their_paths(dmm, tmp_path):
    r = dmm("generate", "a red circle", "--model", "toy:base", "-n", "3", "-o", tmp_path / "out", *FAST)
    assert r.code == 0, r
    assert len(r.lines) == 3
    for line in r.lines:
        img = Image.open(line)
        assert img.size == (32, 32) and img.mode == "RGB"
        assert Path(line).parent == tmp_path / "out"
    assert "model: toy:base" in r.err
    assert "attention:" in r.err


def test_dash_writes_the_png_to_stdout_for_a_pipeline(dmm, tmp_path):
    env = dict(os.environ, DMM_HOME=str(tmp_path / "home"))
    p = subprocess.run([sys.executable, "-m", "dmm_cli", "generate", "a red circle", "--model", "toy:night", "-o", "-",
                        *FAST], capture_output=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    r = dmm("generate", "a red circle", "--model", "toy:night", "-o", tmp_path / "file.png", *FAST)
    assert r.code == 0, r
    assert p.stdout == (tmp_path / "file.png").read_bytes()  # the same picture, and nothing else on stdout
    r = dmm("generate", "a red circle", "--model", "toy:night", "-n", "2", "-o", "-", *FAST)
    assert_one_sentence_error(r, 2, "--output -: writes one picture to stdout, and 2 will be made")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_a_stdout_that_fails_is_one_sentence_and_a_reader_that_left_is_quiet(tmp_path):
    env = dict(os.environ, DMM_HOME=str(tmp_path / "home"))
    dmm = [sys.executable, "-m", "dmm_cli"]
    with open("/dev/full", "wb") as full:  # every write fails with ENOSPC, as on a full disk
        p = subprocess.run([*dmm, "generate", "a red circle", "--model", "toy:night", "-o", "-", *FAST],
                           stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert p.returncode == 1, p.stderr
    said = [line for line in p.stderr.splitlines() if line.startswith("dmm: ")]
    assert said == ["dmm: error: cannot write to stdout: No space left on device"], p.stderr
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr  # nor a second failure at exit
    # `| head -1` closing early: the command stops quietly, as pipelines expect
    p = subprocess.Popen([*dmm, "fetch", "toy:night", "toy:outline"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=300) == 1 and err == "", err


def test_same_seed_same_image_whatever_the_batch(dmm, tmp_path):
    a = dmm("generate", "a green square", "--model", "toy:night", "--seed", "5", "-n", "2", "--batch-size", "2",
            "-o", tmp_path / "a", *FAST)
    b = dmm("generate", "a green square", "--model", "toy:night", "--seed", "5", "-n", "2", "--batch-size", "1",
            "-o", tmp_path / "b", *FAST)
    c = dmm("generate", "a green square", "--model", "toy:night", "--seed", "6", "-o", tmp_path / "c.png", *FAST)
    assert a.code == b.code == c.code == 0
    for pa, pb in zip(a.lines, b.lines):
        assert np.array_equal(pixels(pa), pixels(pb))
    assert not np.array_equal(pixels(a.lines[0]), pixels(c.lines[0]))
    assert c.lines == [str(tmp_path / "c.png")]


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler"])
def test_schedulers_and_sizes(dmm, tmp_path, scheduler):
    r = dmm("generate", "a blue circle", "--model", "toy:outline", "--scheduler", scheduler, "--width", "48",
            "--height", "32", "--attention", "sdpa", "-o", tmp_path, *FAST)
    assert r.code == 0, r
    assert Image.open(r.lines[0]).size == (48, 32)


def test_model_from_environment_and_local_folder(dmm, tmp_path, monkeypatch):
    folder = dmm("fetch", "toy:stripes").lines[0]
    monkeypatch.setenv("DMM_MODEL", folder)
    r = dmm("generate", "a cyan square", "-o", tmp_path, *FAST)
    assert r.code == 0, r
    assert f"model: {folder}" in r.err
    monkeypatch.setenv("DMM_MODEL", str(tmp_path / "gone"))
    r = dmm("generate", "a cyan square", "-o", tmp_path, *FAST)
    assert_one_sentence_error(r, 2, str(tmp_path / "gone"), "(from $DMM_MODEL)")
    monkeypatch.delenv("DMM_MODEL")
    from dmm_cli.files import state

    state.remember_last_model(tmp_path / "deleted-run")
    r = dmm("generate", "a cyan square", "-o", tmp_path, *FAST)
    assert_one_sentence_error(r, 2, "deleted-run", "(the last model dmm distill wrote)")


def test_a_prompt_past_the_text_encoders_length_is_said_to_be_cut(dmm, tmp_path):
    """The toy zoo's text encoder reads 8 tokens (SD's, 77); diffusers cuts the rest with a log line."""
    r = dmm("generate", "a red circle", "--negative", "a blue square on a green ground", "--model", "toy:night",
            "-o", tmp_path, *FAST)
    assert r.code == 0, r
    assert "warning: the prompt" not in r.err
    assert "warning: the --negative prompt is 17 tokens long, and the text encoder reads the first 8" in r.err


def test_no_model_is_a_clear_error(dmm, tmp_path):
    r = dmm("generate", "a cat", "-o", tmp_path / "x")
    assert_one_sentence_error(r, 2, "no model given")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--model", "toy:unicorn"], "toy:unicorn: no such toy model"),
    (["--model", "toy:base", "--steps", "0"], "--steps must be at least 1 (got 0)"),
    (["--model", "toy:base", "--steps", "-3"], "--steps must be at least 1 (got -3)"),
    (["--model", "toy:base", "--width", "30"], "--width must be a positive multiple of 8 (got 30)"),
    (["--model", "toy:base", "--height", "0"], "--height must be a positive multiple of 8 (got 0)"),
    (["--model", "toy:base", "--num-images", "0"], "--num-images must be at least 1"),
    (["--model", "toy:base", "--scheduler", "magic"], "--scheduler: unknown scheduler 'magic'"),
    (["--model", "toy:base", "--attention", "flash9"], "--attention: unknown backend 'flash9'"),
    (["--model", "toy:base", "--dtype", "fp8"], "--dtype: unknown dtype 'fp8'"),
    (["--model", "toy:base", "--steps", "many"], "Invalid value for '--steps'"),
])
def test_bad_arguments(dmm, tmp_path, args, fragment):
    out = tmp_path / "out"
    r = dmm("generate", "a red circle", *args, "-o", out)
    assert_one_sentence_error(r, 2, fragment)
    assert not out.exists()


def test_model_folder_without_unet(dmm, tmp_path):
    broken = tmp_path / "broken"
    (broken / "vae").mkdir(parents=True)
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    r = dmm("generate", "a red circle", "--model", broken, "-o", tmp_path / "out")
    assert_one_sentence_error(r, 2, str(broken), "no unet/")
    assert not (tmp_path / "out").exists()


def test_unwritable_output(dmm, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = dmm("generate", "a red circle", "--model", "toy:base", "-o", blocker / "sub", *FAST)
    assert_one_sentence_error(r, 2, "--output", "cannot write")
    assert blocker.read_text() == "not a folder"


def test_runtime_failure_is_one_sentence_and_traceback_only_with_debug(dmm, tmp_path):
    """Corrupt weights fail at load time: exit 1, one sentence; --debug adds the traceback."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(dmm("fetch", "toy:base").lines[0], model, symlinks=False)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    r = dmm("generate", "a red circle", "--model", model, "-o", tmp_path / "out", *FAST)
    assert r.code in (1, 2), r
    assert_one_sentence_error(r, r.code, str(model))
    d = dmm("--debug", "generate", "a red circle", "--model", model, "-o", tmp_path / "out", *FAST)
    assert d.code == r.code and "Traceback" in d.err


def test_fetch_toy_prints_loadable_folders(dmm):
    from diffusers import StableDiffusionPipeline

    names = dmm("toy", "list").lines
    assert len(names) >= 5 and names[0] == "toy:base"
    r = dmm("fetch", *names)
    assert r.code == 0 and len(r.lines) == len(names)
    pipe = StableDiffusionPipeline.from_pretrained(r.lines[1])
    assert pipe.unet.config.sample_size == 8 and pipe.vae_scale_factor == 4


def test_python_dash_m_and_console_script(tmp_path):
    env = dict(os.environ, DMM_HOME=str(tmp_path))
    for cmd in ([sys.executable, "-m", "dmm_cli"], [str(Path(sys.executable).parent / "dmm")]):
        p = subprocess.run([*cmd, "fetch", "toy:nope"], capture_output=True, text=True, env=env)
        assert p.returncode == 2 and p.stdout == ""
        assert p.stderr.strip().splitlines() == ["dmm: error: toy:nope: no such toy model "
                                                 "(the toy zoo has base, night, outline, stripes, checker, xl-base, "
                                                 "xl-night, xl-checker, and the LoRAs night-lora, outline-lora-peft, stripes-lora, "
                                                 "checker-lora-peft)"]
    p = subprocess.run([sys.executable, "-m", "dmm_cli", "generate", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "Examples" in p.stdout
