"""A hostile world: lying weight files, NaNs, symlinks, concurrent writers, odd arguments, an unwritable cache."""
from __future__ import annotations

import gc
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import TOY_TEACHERS, assert_one_sentence_error, one_sentence, tiny_recipe
from dmm_cli.errors import out_of_memory
from dmm_cli.models.references import resolve

UNET = "unet/diffusion_pytorch_model.safetensors"
FAST = ["--steps", "2", "--guidance", "3"]


def copy_model(name: str, folder: Path) -> Path:
    shutil.copytree(resolve(f"toy:{name}"), folder, symlinks=False)
    return folder


# --- weights are checked before they are trusted -------------------------------------------------------------

def _header(tensors: dict) -> bytes:
    raw = json.dumps(tensors).encode()
    return len(raw).to_bytes(8, "little") + raw


BAD_FILES = {
    "empty": b"",
    "garbage": b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage",
    "not UTF-8": (6).to_bytes(8, "little") + b"{\xff\xfe}  ",
    "oversized header": (200_000_000).to_bytes(8, "little") + b"{}",
    "lying length": _header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}) + bytes(8),
    "overlap": _header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}) + bytes(12),
    "unknown dtype": _header({"w": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}) + bytes(8),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_bad_weights_file_is_refused_in_one_sentence_naming_it(dmm, tmp_path, kind):
    model = copy_model("base", tmp_path / "model")
    (model / UNET).write_bytes(BAD_FILES[kind])
    r = dmm("generate", "a red circle", "--model", model, "-o", tmp_path / "out", *FAST)
    assert_one_sentence_error(r, 2, str(model / UNET), "not a valid safetensors file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_weights_that_are_not_floating_point_are_refused(dmm, tmp_path, dtype):
    """diffusers casts them to the model's dtype without a word: int8 weights drew noise, booleans NaN."""
    model = copy_model("night", tmp_path / "model")
    save_file({k: v.to(dtype) for k, v in load_file(model / UNET).items()}, model / UNET)
    for args in (["generate", "a red circle", "--model", model, "-o", tmp_path / "out", *FAST],
                 ["baseline-merge", "toy:outline", model, "-o", tmp_path / "merged"]):
        assert_one_sentence_error(dmm(*args), 2, str(model / "unet"), "a model's weights must be floating point")


@pytest.mark.parametrize("given, said", [("loras/night-lora.safetensors", "it holds LoRA weights: give it with --lora"),
                                         ("night/unet", "it is the unet/ part of a model: give the folder above it")])
def test_a_lora_or_a_part_given_as_a_model_says_what_to_give(dmm, tmp_path, given, said):
    model = resolve("toy:night").parent / given
    r = dmm("generate", "a red circle", "--model", model, "-o", tmp_path / "out.png", *FAST)
    assert_one_sentence_error(r, 2, str(model), said)


def test_a_model_given_as_a_lora_says_what_to_give(dmm, tmp_path):
    whole = tmp_path / "night.safetensors"
    assert dmm("export", "toy:night", "--single-file", "-o", whole).code == 0
    for lora, said in ((whole, "is a whole checkpoint, not a LoRA"), ("toy:night", "is a whole model, not a LoRA")):
        r = dmm("generate", "a red circle", "--model", f"toy:base+{lora}", "-o", tmp_path / "out.png", *FAST)
        assert_one_sentence_error(r, 2, f"{lora}: {said}; give it as the model")


def _set(key, value):
    def change(config: dict) -> dict:
        return {**config, key: value}
    return change


BAD_CONFIGS = {  # file, what to write there (text, or a change to its JSON), what the error says
    "index not JSON": ("model_index.json", "{not json", "not valid JSON"),
    "index a list": ("model_index.json", "[1, 2]", "must be a JSON object (got list)"),
    # diffusers builds a part with the class the index names, whatever the weights are
    "vae built as a UNet": ("model_index.json", _set("vae", ["diffusers", "UNet2DConditionModel"]),
                            'vae must be ["diffusers", "AutoencoderKL"]'),
    "text encoder of images": ("model_index.json", _set("text_encoder", ["transformers", "CLIPVisionModel"]),
                               'text_encoder must be ["transformers", "CLIPTextModel"]'),
    "unet config not JSON": ("unet/config.json", "{not json", "not valid JSON"),
    "unet config empty": ("unet/config.json", "", "not valid JSON"),
    "channels a string": ("unet/config.json", _set("block_out_channels", "abc"), "block_out_channels must be"),
    "huge sample size": ("unet/config.json", _set("sample_size", 10**9), "sample_size must be"),
    "scheduler not JSON": ("scheduler/scheduler_config.json", "{bad", "not valid JSON"),
    "vae config a number": ("vae/config.json", "7", "must be a JSON object (got int)"),
    # a config that the weights do not match: diffusers would first try to allocate 149 GiB
    "widths not the weights'": ("unet/config.json", _set("block_out_channels", [100000, 200000, 200000]),
                                "block_out_channels[0] is 100000, but its weights have 32"),
    "depth not the weights'": ("text_encoder/config.json", _set("num_hidden_layers", 5),
                               "num_hidden_layers is 5, but its weights have 2"),
    "vae latents not the weights'": ("vae/config.json", _set("latent_channels", 16), "latent_channels is 16"),
    # scheduler entries that diffusers takes in and fails on only when sampling starts
    "unknown prediction": ("scheduler/scheduler_config.json", _set("prediction_type", "flow"),
                           "prediction_type must be one of epsilon, v_prediction, sample"),
    "no training steps": ("scheduler/scheduler_config.json", _set("num_train_timesteps", 0),
                          "num_train_timesteps must be a whole number"),
    "betas of another length": ("scheduler/scheduler_config.json", _set("trained_betas", [0.1, 0.2]),
                                "trained_betas has 2 values for num_train_timesteps 1000"),
    # transformers pads every prompt to model_max_length: 10**9 tokens killed the process for its memory
    "prompts past the positions": ("tokenizer/tokenizer_config.json", _set("model_max_length", 10**9),
                                   "model_max_length must be a whole number of 1 to 8"),
}


@pytest.mark.parametrize("kind", list(BAD_CONFIGS))
def test_a_bad_config_is_refused_in_one_sentence_naming_it(dmm, tmp_path, kind):
    """Every command that takes a model checks its configs first: generate, merge and export alike."""
    name, content, said = BAD_CONFIGS[kind]
    model = copy_model("night", tmp_path / "model")
    path = model / name
    path.write_text(content if isinstance(content, str) else json.dumps(content(json.loads(path.read_text()))))
    for args in (["generate", "a red circle", "--model", model, "-o", tmp_path / "out", *FAST],
                 ["baseline-merge", "toy:outline", model, "-o", tmp_path / "merged"],
                 ["export", model, "--single-file", "-o", tmp_path / "one.safetensors"]):
        r = dmm(*args)
        assert_one_sentence_error(r, 2, str(path), said)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("left, said", [(None, "has neither tokenizer.json nor vocab.json and merges.txt"),
                                         ("tokenizer.json", "has no tokenizer_config.json")])
def test_a_tokenizer_that_would_load_broken_is_refused(dmm, tmp_path, left, said):
    model = copy_model("night", tmp_path / "model")
    for f in (model / "tokenizer").iterdir():
        if f.name != left:
            f.unlink()
    r = dmm("generate", "a red circle", "--model", model, "-o", tmp_path / "out", *FAST)
    assert_one_sentence_error(r, 2, str(model / "tokenizer"), said)


@pytest.mark.parametrize("left, said", [(None, "no .safetensors weights"), ("weights.bin", "only pickle weights")])
def test_a_part_without_weights_is_refused_in_one_sentence(dmm, tmp_path, left, said):
    model = copy_model("night", tmp_path / "model")
    (model / UNET).unlink()
    if left:
        (model / "unet" / left).write_bytes(b"pickle")
    for args in (["generate", "a red circle", "--model", model, "-o", tmp_path / "out", *FAST],
                 ["baseline-merge", "toy:outline", model, "-o", tmp_path / "merged"]):
        assert_one_sentence_error(dmm(*args), 2, str(model / "unet"), said)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_an_inpainting_model_is_refused_before_any_sampling_or_training(dmm, tmp_path):
    """Its UNet also takes a masked picture and the mask: 9 input channels against the VAE's 4."""
    model = copy_model("night", tmp_path / "inpainting")
    config = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 9}))
    weights = load_file(model / UNET)
    conv = weights["conv_in.weight"]
    weights["conv_in.weight"] = torch.cat([conv, torch.zeros(conv.shape[0], 5, *conv.shape[2:], dtype=conv.dtype)], 1)
    save_file(weights, model / UNET)
    recipe = tiny_recipe(tmp_path / "recipe", base=str(model))
    for args in (["generate", "a red circle", "--model", model, *FAST, "-o", tmp_path / "out"],
                 ["eval", model, "--recipe", tiny_recipe(tmp_path / "eval"), "-k", "2", *FAST, "-o", tmp_path / "out"],
                 ["distill", recipe]):
        r = dmm(*args)
        assert_one_sentence_error(r, 2, str(model), "takes 9 input channels and its VAE makes 4", "inpainting")
        assert "attention:" not in r.err  # no pipeline was loaded to sample with: not even the teachers'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "inpainting", "recipe"]


def test_a_truncated_teacher_is_refused_by_the_merge(dmm, tmp_path):
    teacher = copy_model("night", tmp_path / "teacher")
    data = (teacher / UNET).read_bytes()
    (teacher / UNET).write_bytes(data[:-100])
    r = dmm("baseline-merge", "toy:outline", teacher, "-o", tmp_path / "out")
    assert_one_sentence_error(r, 2, str(teacher / UNET), "truncated")
    assert not (tmp_path / "out").exists()


def nan_teacher(tmp_path: Path) -> Path:
    teacher = copy_model("night", tmp_path / "nan-teacher")
    weights = load_file(teacher / UNET)
    weights["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(weights, teacher / UNET)
    return teacher


def test_nan_weights_are_named_by_merge_distill_and_generate(dmm, tmp_path):
    teacher = nan_teacher(tmp_path)
    r = dmm("baseline-merge", "toy:outline", teacher, "-o", tmp_path / "out")
    assert_one_sentence_error(r, 2, str(teacher / UNET), "conv_in.weight", "NaN or Inf")
    r = dmm("generate", "a red circle", "--model", teacher, "-o", tmp_path / "out.png", *FAST)
    assert_one_sentence_error(r, 2, str(teacher), "unet weight conv_in.weight holds NaN or Inf")  # not a black picture
    assert not (tmp_path / "out.png").exists()
    recipe = tiny_recipe(tmp_path, teachers=[TOY_TEACHERS[0], {"name": "broken", "model": str(teacher)}])
    r = dmm("distill", recipe)
    assert_one_sentence_error(r, 2, str(teacher / "unet"), "conv_in.weight", "NaN or Inf")
    assert not (tmp_path / "run" / "model_index.json").exists()


def test_pictures_that_overflow_fp16_say_so_and_draw_in_fp32(dmm, tmp_path):
    """A VAE whose activations pass fp16's range (65,504) decodes NaN in fp16: said, where diffusers draws black."""
    model = copy_model("night", tmp_path / "model")
    vae = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights = {k: v.float() for k, v in load_file(vae).items()}
    for name in ("decoder.conv_in.weight", "decoder.conv_in.bias"):
        weights[name] *= 3e4
    save_file(weights, vae)
    r = dmm("generate", "a red circle", "--model", model, "-o", tmp_path / "half.png", "--dtype", "fp16", *FAST)
    assert_one_sentence_error(r, 2, "came out NaN", "overflowed float16", "--dtype fp32")
    assert not (tmp_path / "half.png").exists()
    assert dmm("generate", "a red circle", "--model", model, "-o", tmp_path / "full.png", "--dtype", "fp32",
               *FAST).code == 0


def test_a_nan_lora_is_named_by_generate_merge_and_distill(dmm, tmp_path):
    lora = tmp_path / "nan-lora.safetensors"
    weights = load_file(resolve("toy:base").parent / "loras" / "night-lora.safetensors")
    name = sorted(weights)[0]
    weights[name].view(-1)[0] = float("inf")
    save_file(weights, lora)
    ref = f"toy:base+{lora}"
    r = dmm("generate", "a red circle", "--model", ref, *FAST, "-o", tmp_path / "pic.png")
    assert_one_sentence_error(r, 2, str(lora), name, "NaN or Inf")
    r = dmm("baseline-merge", "--method", "ties", "--base", "toy:base", "toy:night", ref, "-o", tmp_path / "out")
    assert_one_sentence_error(r, 2, str(lora), name, "NaN or Inf")
    r = dmm("distill", tiny_recipe(tmp_path, teachers=[TOY_TEACHERS[0], {"name": "broken", "model": ref}]))
    assert_one_sentence_error(r, 2, str(lora), name, "NaN or Inf")
    assert not (tmp_path / "out").exists() and not (tmp_path / "pic.png").exists()


def test_a_lora_scale_that_overflows_the_weights_is_named(dmm, tmp_path):
    """Fused in memory (generate) or into a cached folder (fetch, teachers): a scale of 1e40 is finite, and so is
    the LoRA, but their update is not; the pictures would only have come out NaN, blamed on the model."""
    ref = "toy:base+toy:night-lora:1e40"
    r = dmm("generate", "a red circle", "--model", ref, *FAST, "-o", tmp_path / "pic.png")
    assert_one_sentence_error(r, 2, "toy:night-lora:1e40: fused into unet.", "the update overflows float")
    r = dmm("fetch", ref)
    assert_one_sentence_error(r, 2, "toy:night-lora:1e40: fused into unet.", "the update overflows float")
    fused = Path(os.environ["DMM_HOME"]) / "fused"
    assert not (tmp_path / "pic.png").exists() and not any(fused.iterdir())
    # 1e20 fits fp32's weights, and sampling overflows: no --dtype cures that
    r = dmm("generate", "a red circle", "--model", "toy:base+toy:night-lora:1e20", *FAST, "-o", tmp_path / "pic.png")
    assert_one_sentence_error(r, 2, "overflowed float32 while sampling; the weights (or a LoRA's scale) are too large")


def test_a_non_finite_loss_stops_distillation_and_writes_no_student(dmm, tmp_path):
    recipe = tiny_recipe(tmp_path, **{"train.lr": 1e30, "train.checkpoint_every": 1, "train.max_steps": 20})
    r = dmm("distill", recipe)
    assert_one_sentence_error(r, 1, "the loss became", "lower train.lr")
    assert not (tmp_path / "run" / "model_index.json").exists() and not (tmp_path / "run" / "unet").exists()
    for checkpoint in (tmp_path / "run" / "checkpoints").glob("step-*"):  # what was kept was finite
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "student.safetensors").values())


def within_memory(tmp_path: Path, limit_gib: float, *args) -> subprocess.CompletedProcess:
    """`dmm` in a process whose address space is capped: an allocation past the cap fails as it does on a full GPU
    or host, whatever the machine's overcommit policy."""
    import resource

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (int(limit_gib * 2**30),) * 2)

    env = dict(os.environ, DMM_HOME=str(tmp_path / "home"), DMM_COMPILE_BACKEND="aot_eager")
    return subprocess.run([sys.executable, "-m", "dmm_cli", "-q", *map(str, args)], capture_output=True, text=True,
                          env=env, preexec_fn=cap, timeout=300)


def test_running_out_of_memory_is_one_sentence_that_says_what_needs_less(dmm, tmp_path):
    p = within_memory(tmp_path, 3, "generate", "a cat", "--model", "toy:night", "-o", tmp_path / "big.png",
                      "--width", "4096", "--height", "4096", "--steps", "1")
    one_sentence(p, 1, "the host ran out of memory in `dmm generate` (an allocation of")
    assert "--batch-size" in p.stderr and not (tmp_path / "big.png").exists()
    # Pictures that cannot fit in the host's memory are refused before sampling: past a cap like this one, the
    # kernel would kill the process while it touched the memory, with no sentence at all.
    p = within_memory(tmp_path, 3, "generate", "a cat", "--model", "toy:night", "-o", tmp_path / "big", "-n", "2",
                      "--width", "100000", "--height", "100000", *FAST)
    one_sentence(p, 1, "decoding 2 pictures of 100000x100000 at once needs at least 4768.4 GiB of host memory")
    assert "--batch-size" in p.stderr and not (tmp_path / "big").exists()
    # one picture: fewer at once is no way out, so only the size is named (refused before sampling, so in-process)
    r = dmm("generate", "a cat", "--model", "toy:night", "-o", tmp_path / "one.png", "--width", "100000",
            "--height", "100000", *FAST)
    assert_one_sentence_error(r, 1, "decoding 1 picture of 100000x100000 at once needs at least 2384.2 GiB",
                              "draw smaller pictures (--width, --height)")
    assert "--batch-size" not in r.err and not (tmp_path / "one.png").exists()

    distill_out_of_memory(tmp_path, compile=False, doing="at step 1")

    # CUDA's own words, as torch raises them
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of "
                                  "79.19 GiB of which 1.06 GiB is free.")
    assert str(out_of_memory(cuda, "at step 7", "hint")) == (
        "the GPU ran out of memory at step 7 (an allocation of 2.50 GiB failed); hint")
    assert out_of_memory(RuntimeError("shape mismatch"), "at step 7", "hint") is None


@pytest.mark.slow  # 11 s: a process of its own
def test_running_out_of_memory_while_compiling_is_not_taken_for_a_compiler_bug(tmp_path):
    distill_out_of_memory(tmp_path, compile=True, doing="in the compile stage")


def distill_out_of_memory(tmp_path: Path, compile: bool, doing: str) -> None:
    recipe = tiny_recipe(tmp_path, **{"train.batch_size": 65536,  # gigabytes of activations
                                      "train.compile": compile})
    p = within_memory(tmp_path, 3, "distill", recipe, "--overwrite")
    one_sentence(p, 1, f"the host ran out of memory {doing} (an allocation of")
    assert f"`dmm distill {recipe} --dry-run` plans this run's memory" in p.stderr
    assert not (tmp_path / "run" / "unet").exists()


def test_offline_use_of_a_corrupted_cache_is_refused(tmp_path):
    from hub_server import FakeHub

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(DMM_HOME=str(tmp_path / "home"), HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1")

    def fetch(*extra, offline=False):
        e = dict(env, HF_HUB_OFFLINE="1") if offline else env
        return subprocess.run([sys.executable, "-m", "dmm_cli", "fetch", "toy-org/night", *extra],
                              capture_output=True, text=True, env=e, timeout=300)

    with FakeHub() as hub:
        hub.add("toy-org/night", copy_model("night", tmp_path / "repo"))
        env["HF_ENDPOINT"] = hub.url
        folder = Path(fetch().stdout.strip())
    assert fetch(offline=True).returncode == 0
    blob = Path(os.path.realpath(folder / UNET))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit of rot
    blob.write_bytes(bytes(data))
    p = fetch(offline=True)
    assert p.returncode == 1 and p.stdout == "", p.stderr
    assert p.stderr.strip().startswith("dmm: error: toy-org/night: the cached unet/") and "corrupt" in p.stderr


# --- generation keeps what it made and never overwrites silently -------------------------------------------

def test_generate_never_overwrites_silently(dmm, tmp_path):
    out = tmp_path / "out"
    first = dmm("generate", "a cat!", "--model", "toy:night", "-o", out, *FAST)
    other = dmm("generate", "a cat?", "--model", "toy:night", "-o", out, *FAST)  # same slug, other prompt
    model = dmm("generate", "a cat!", "--model", "toy:outline", "-o", out, *FAST)  # same prompt, other model
    assert first.code == other.code == model.code == 0
    assert len({*first.lines, *other.lines, *model.lines}) == 3 and len(list(out.iterdir())) == 3
    before = Path(first.lines[0]).read_bytes()
    again = dmm("generate", "a cat!", "--model", "toy:night", "-o", out, *FAST)
    assert_one_sentence_error(again, 2, first.lines[0], "already exists", "--overwrite")
    assert Path(first.lines[0]).read_bytes() == before
    single = tmp_path / "one.png"
    assert dmm("generate", "a dog", "--model", "toy:night", "-o", single, *FAST).code == 0
    assert_one_sentence_error(dmm("generate", "a dog", "--model", "toy:night", "-o", single, *FAST), 2,
                              "already exists")
    assert dmm("generate", "a dog", "--model", "toy:night", "-o", single, "--overwrite", *FAST).code == 0


def test_grid_never_writes_over_a_file_silently(dmm, tmp_path):
    for k in range(2):
        Image.new("RGB", (8, 8), (80 * k, 0, 0)).save(tmp_path / f"{k}.png")
    pictures = [tmp_path / "0.png", tmp_path / "1.png"]
    recipe = tiny_recipe(tmp_path)
    before = recipe.read_bytes()
    assert_one_sentence_error(dmm("grid", *pictures, "-o", recipe), 2, "a grid is a PNG file")
    assert recipe.read_bytes() == before
    r = dmm("grid", *pictures, "--labels", "a,b", "--columns", "1", "-o", tmp_path / "grid.png")
    assert r.code == 0 and r.lines == [str(tmp_path / "grid.png")], r
    assert Image.open(tmp_path / "grid.png").height > Image.open(tmp_path / "grid.png").width  # one column
    assert_one_sentence_error(dmm("grid", *pictures, "-o", tmp_path / "grid.png"), 2, "already exists", "--overwrite")
    assert dmm("grid", *pictures, "-o", tmp_path / "grid.png", "--overwrite").code == 0
    assert_one_sentence_error(dmm("grid", *pictures, "--columns", "-1", "-o", tmp_path / "g.png"), 2,
                              "--columns must be at least 1")
    assert_one_sentence_error(dmm("grid", recipe, "-o", tmp_path / "g.png"), 2, "recipe.yaml: not a readable picture")


def test_eval_writes_its_report_only_into_an_eval_folder(dmm, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "report.md").write_text("# my notes")
    args = ("eval", "toy:night", "--recipe", tiny_recipe(tmp_path), "-k", "2", *FAST)
    assert_one_sentence_error(dmm(*args, "-o", project), 2, "exists and is not a dmm eval report folder")
    assert (project / "report.md").read_text() == "# my notes"
    for _ in range(2):  # a report folder is its own to replace
        r = dmm(*args, "-o", tmp_path / "report")
        assert r.code == 0 and r.lines == [str(tmp_path / "report" / "report.md")], r


def test_many_pictures_stream_in_constant_memory(tmp_path):
    from dmm_cli.generate.run import GRID_ROWS, run

    written, alive = [], []

    def count(path):
        written.append(path)
        if len(written) % 16 == 0:
            gc.collect()
            alive.append(sum(isinstance(o, Image.Image) for o in gc.get_objects()))

    paths = run("a red circle", model="toy:base", num_images=64, batch_size=4, steps=1, output=tmp_path,
                on_written=count)
    assert len(paths) == 64 and len(list(tmp_path.iterdir())) == 64 and len(alive) == 4
    assert max(alive) <= 4 + GRID_ROWS + 4, alive  # a batch and the grid's share, not all 64


@pytest.mark.parametrize("args, fragment", [
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--guidance", "inf"], "--guidance must be a finite number"),
    (["--seed", str(2**63)], "--seed must be between 0 and"),
    (["--seed", "-1"], "--seed must be between 0 and"),
    (["--steps", "1001"], "--steps 1001 is more than the 1000 timesteps"),  # diffusers fails at the first step
])
def test_bad_numbers_for_generate(dmm, tmp_path, args, fragment):
    r = dmm("generate", "a red circle", "--model", "toy:base", *args, "-o", tmp_path / "out")
    assert_one_sentence_error(r, 2, fragment)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from dmm_cli.main import main

    folder = tmp_path_factory.mktemp("student")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DMM_HOME", str(folder / "home"))
        assert main(["-q", "distill", str(tiny_recipe(folder, **{"train.max_steps": 2}))]) == 0
    return folder / "run"


@pytest.mark.parametrize("spec", ["night:nan,outline:1", "night:inf,outline:1"])
def test_non_finite_style_weights_are_refused(dmm, tmp_path, student, spec):
    r = dmm("generate", "a red circle", "--model", student, "--style", spec, "-o", tmp_path / "out")
    assert_one_sentence_error(r, 2, "--style: mix weight for 'night'", "finite")


def test_text_that_is_not_utf8_is_named(dmm, tmp_path, student):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a caf\xe9\n")
    r = dmm("eval", "toy:night", "--recipe", tiny_recipe(tmp_path), "--prompts", prompts, "-o", tmp_path / "report")
    assert_one_sentence_error(r, 2, "--prompts", "prompts.txt: not UTF-8 text")
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_bytes(b'{"model_type": "\xff"}')
    r = dmm("eval", "toy:night", "--recipe", tiny_recipe(tmp_path), "--clip", clip, "-o", tmp_path / "report")
    assert_one_sentence_error(r, 2, "--clip", "not a CLIP model (no readable config.json)")
    metrics = tmp_path / "metrics.json"
    metrics.write_bytes(b'{"models": "\xff"}')
    r = dmm("export", student, "--style", "night", "--metrics", metrics, "-o", tmp_path / "night")
    assert_one_sentence_error(r, 2, "metrics.json: not a dmm eval metrics.json")
    broken = shutil.copytree(student, tmp_path / "broken", symlinks=True)
    (broken / "styles.json").write_bytes(b'{"styles": "\xff"}')
    r = dmm("generate", "a red circle", "--model", broken, "--style", "night", "-o", tmp_path / "out")
    assert_one_sentence_error(r, 2, "styles.json: not a valid styles table (not UTF-8 text)")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"name: caf\xe9\n")
    assert_one_sentence_error(dmm("distill", recipe), 2, f"{recipe}: not UTF-8 text")


def test_styles_whose_names_make_one_file_name_each_get_their_own_file(dmm, tmp_path, student):
    """"Night" and "night" (or "a b" and "a-b") are two styles; one file name for both kept only the last."""
    renamed = shutil.copytree(student, tmp_path / "renamed", symlinks=True)
    table = json.loads((renamed / "styles.json").read_text())
    for style, name in zip(table["styles"], ["Night", "night", "a b", "a-b"]):
        style["name"] = name
    (renamed / "styles.json").write_text(json.dumps(table))
    r = dmm("export", renamed, "--style", "all", "--single-file", "-o", tmp_path / "files")
    assert r.code == 0, r
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [
        "a-b-2.safetensors", "a-b.safetensors", "night-2.safetensors", "night.safetensors"]
    r = dmm("generate", "a red circle", "--model", renamed, "--style", "all", *FAST, "-o", tmp_path / "pictures")
    assert r.code == 0, r
    assert len(set(r.lines)) == 5 and all(Path(line).is_file() for line in r.lines)  # 4 styles and the grid


def test_a_styles_table_that_does_not_fit_its_unet_is_refused_before_any_work(dmm, tmp_path, student):
    broken = shutil.copytree(student, tmp_path / "broken", symlinks=True)
    table = json.loads((broken / "styles.json").read_text())
    table["styles"].append({**table["styles"][-1], "index": len(table["styles"]), "name": "extra"})
    (broken / "styles.json").write_text(json.dumps(table))
    n = len(table["styles"])
    said = f"{broken / 'styles.json'}: lists {n} styles but the UNet takes {n - 1}"
    recipe = tiny_recipe(tmp_path, teachers=[*TOY_TEACHERS, {"name": "extra", "model": "toy:base"}])
    for args in (["generate", "a red circle", "--model", broken, "--style", "extra", *FAST, "-o", tmp_path / "out"],
                 ["export", broken, "--style", "extra", "-o", tmp_path / "out"],
                 ["eval", broken, "--recipe", recipe, "-k", "2", *FAST, "-o", tmp_path / "out"]):
        r = dmm(*args)
        assert_one_sentence_error(r, 2, said)
        assert "attention:" not in r.err


@pytest.mark.parametrize("device, code, fragment", [  # a bad word is bad input; a device not here, the machine's
    ("tpu", 2, "--device: unknown device 'tpu'"),
    ("meta", 2, "--device: unknown device 'meta'"),  # a real torch device, but one that holds no numbers
    pytest.param("cuda", 1, "--device cuda: no CUDA GPU is visible to torch", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has a CUDA GPU")),
    pytest.param("cuda:7", 1, "--device cuda:7: ", marks=pytest.mark.skipif(
        torch.cuda.device_count() > 7, reason="this machine has a cuda:7")),
    pytest.param("mps", 1, "--device mps: this torch has no Apple GPU", marks=pytest.mark.skipif(
        torch.backends.mps.is_available(), reason="this machine has an Apple GPU")),
])
def test_a_device_that_is_not_here_is_one_sentence(dmm, tmp_path, device, code, fragment):
    for args in (["generate", "a red circle", "--model", "toy:night", *FAST, "-o", tmp_path / "out"],
                 ["baseline-merge", "toy:night", "toy:outline", "-o", tmp_path / "merged"]):
        assert_one_sentence_error(dmm(*args, "--device", device), code, fragment)
    assert not any(tmp_path.iterdir())


def test_non_ascii_style_names_where_the_locale_is_not_utf8(tmp_path):
    """Cards, style tables and reports are UTF-8 whatever the locale: here ASCII, as a Windows code page is not
    UTF-8. Accents fold into file names; a name with no ASCII left is named by its index."""
    names = ["nuit étoilée", "夜の線"]
    teachers = [{"name": n, "model": m} for n, m in zip(names, ("toy:night", "toy:outline"))]
    recipe = tiny_recipe(tmp_path, teachers=teachers, **{"train.max_steps": 2, "train.checkpoint_every": 2})
    env = dict(os.environ, LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")  # no coercion to C.UTF-8
    run = tmp_path / "run"
    commands = [["-q", "distill", recipe], ["-q", "export", run, "--style", "all", "-o", tmp_path / "export"],
                ["eval", run, "--recipe", recipe, "-k", "2", "--steps", "2", "-o", tmp_path / "eval"]]
    p = subprocess.run([sys.executable, "-c", IN_ONE_PROCESS, json.dumps([[str(a) for a in c] for c in commands])],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    encoding = p.stdout.splitlines()[0]
    assert encoding.lower().replace("-", "") not in ("utf8", ""), encoding  # else this test would prove nothing
    assert [s["name"] for s in json.loads((run / "styles.json").read_text(encoding="utf-8"))["styles"]] == names
    assert all(n in (run / "README.md").read_text(encoding="utf-8") for n in names)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["nuit-etoilee", "style-1"]
    assert names[0] in (tmp_path / "export" / "nuit-etoilee" / "README.md").read_text(encoding="utf-8")
    assert all(n in (tmp_path / "eval" / "report.md").read_text(encoding="utf-8") for n in names)
    assert "missing from font" not in p.stderr and p.stderr.count("plotting font") <= 1, p.stderr


IN_ONE_PROCESS = """
import json, locale, sys
from dmm_cli.main import main
print(locale.getpreferredencoding(False), flush=True)
for args in json.loads(sys.argv[1]):  # one process: the commands' imports once
    if main(args):
        sys.exit(1)
"""


def test_bad_seed_for_eval_and_merge(dmm, tmp_path):
    recipe = tiny_recipe(tmp_path)
    r = dmm("eval", "toy:night", "--recipe", recipe, "--seed", str(2**63), "-o", tmp_path / "report")
    assert_one_sentence_error(r, 2, "--seed must be between 0 and")
    r = dmm("baseline-merge", "--method", "dare", "--base", "toy:base", "toy:night", "toy:outline",
            "--seed", str(2**63), "-o", tmp_path / "out")
    assert_one_sentence_error(r, 2, "--seed must be between 0 and")


# --- outputs are private only when asked; links never lead out of a model --------------------------------------

def test_outputs_get_the_usual_permissions(dmm, tmp_path):
    old = os.umask(0o022)
    try:
        recipe = tiny_recipe(tmp_path, **{"train.max_steps": 2, "train.checkpoint_every": 1})
        assert dmm("-q", "distill", recipe).code == 0
        assert dmm("-q", "baseline-merge", "toy:night", "toy:outline", "-o", tmp_path / "merge").code == 0
        assert dmm("-q", "export", tmp_path / "run", "--style", "night", "--single-file", "-o",
                   tmp_path / "one.safetensors").code == 0
    finally:
        os.umask(old)
    files = [tmp_path / "run" / UNET, tmp_path / "merge" / UNET, tmp_path / "one.safetensors",
             *(tmp_path / "run" / "checkpoints").rglob("*.*")]
    assert len(files) > 4
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


@pytest.mark.parametrize("command", ["baseline-merge", "export", "export-single-file", "grid", "distill", "eval",
                                     "generate"])
def test_an_output_that_cannot_be_made_is_one_sentence_and_leaves_nothing(dmm, tmp_path, student, command):
    """An output inside a file: each command names it and writes nothing (eval before it samples anything)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("kept")
    out = blocker / "out"
    recipe = tiny_recipe(tmp_path / "recipe", output=str(out))
    args = {"baseline-merge": ["baseline-merge", "toy:night", "toy:outline", "-o", out],
            "export": ["export", student, "--style", "night", "-o", out],
            "export-single-file": ["export", student, "--style", "night", "--single-file", "-o",
                                   out.with_suffix(".safetensors")],
            "grid": ["grid", tmp_path / "recipe" / "night.png", "-o", out.with_suffix(".png")],
            "distill": ["distill", recipe],
            "eval": ["eval", student, "--recipe", recipe, "-k", "2", *FAST, "-o", out],
            "generate": ["generate", "a cat", "--model", "toy:night", *FAST, "-o", out.with_suffix(".png")]}[command]
    Image.new("RGB", (8, 8)).save(tmp_path / "recipe" / "night.png")
    r = dmm(*args)
    assert_one_sentence_error(r, 2, "a-file")
    assert "cannot write" in r.err
    assert blocker.read_text() == "kept" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "recipe"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_under_proc_is_refused_before_any_work(dmm, tmp_path, student):
    """Permission bits tell root that /proc is writable; the folder cannot be made there all the same."""
    out = Path("/proc/dmm-output")
    r = dmm("eval", student, "--recipe", tiny_recipe(tmp_path), "-k", "2", *FAST, "-o", out)
    assert_one_sentence_error(r, 2, "--output /proc/dmm-output: cannot write")
    assert "eval:" not in r.err  # refused before the sampling
    r = dmm("generate", "a cat", "--model", "toy:night", *FAST, "-o", out)
    assert_one_sentence_error(r, 2, "--output /proc/dmm-output: cannot write")


def test_a_link_out_of_the_model_is_never_followed_into_an_output(dmm, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text((resolve("toy:base") / "vae" / "config.json").read_text())  # passes as a config
    base = copy_model("base", tmp_path / "base")
    (base / "vae" / "config.json").unlink()
    (base / "vae" / "config.json").symlink_to(secret)
    r = dmm("baseline-merge", "--base", base, "--method", "task-arithmetic", "toy:night", "toy:outline",
            "-o", tmp_path / "out")
    assert_one_sentence_error(r, 2, str(base / "vae" / "config.json"), "outside the model")
    assert not (tmp_path / "out").exists()
    recipe = tiny_recipe(tmp_path, base=str(base), **{"train.max_steps": 1})
    r = dmm("distill", recipe)
    assert_one_sentence_error(r, 2, "outside the model")
    assert not (tmp_path / "run" / "vae").exists()


# --- one writer per output ----------------------------------------------------------------------------------

def test_a_second_writer_of_the_same_output_stops_at_once(dmm, tmp_path):
    recipe = tiny_recipe(tmp_path, **{"train.max_steps": 100000, "train.checkpoint_every": 100000})
    first = subprocess.Popen([sys.executable, "-m", "dmm_cli", "-q", "distill", str(recipe)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / ".run.lock"
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().strip()):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = dmm("distill", recipe)
        assert_one_sentence_error(r, 1, str(tmp_path / "run"), f"another dmm process (pid {first.pid})")
    finally:
        first.terminate()
        _, err = first.communicate(timeout=120)
    assert first.returncode == 130 and not lock.exists(), err

    from dmm_cli.files.atomic import output_lock

    with output_lock(tmp_path / "merge"):
        r = dmm("baseline-merge", "toy:night", "toy:outline", "-o", tmp_path / "merge")
        assert_one_sentence_error(r, 1, "another dmm process")
    assert not (tmp_path / "merge").exists()


def test_leftovers_of_a_killed_merge_are_cleared_by_the_next(dmm, tmp_path):
    out = tmp_path / "out"
    leftover = tmp_path / ".out.k1ll3d99.tmp"
    (leftover / "unet").mkdir(parents=True)
    (leftover / "unet" / "half.safetensors").write_bytes(b"half")
    assert dmm("baseline-merge", "toy:night", "toy:outline", "-o", out).code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- every expected failure is one sentence ---------------------------------------------------------------

def test_an_alias_bomb_recipe_is_refused_without_echoing_it(dmm, tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * 9)}]" for k in range(1, 9)]
    lines += ["name: *a8", "base: toy:base"]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    r = dmm("distill", bomb)
    assert_one_sentence_error(r, 2, str(bomb), "too large or too deeply nested")
    assert len(r.err) < 400
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: " + "[" * 100 + "]" * 100 + "\n")
    assert_one_sentence_error(dmm("distill", deep), 2, "too deeply nested")
    deeper = tmp_path / "deeper.yaml"  # past the YAML parser's own recursion: 100,000 brackets
    deeper.write_text("name: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert_one_sentence_error(dmm("distill", deeper), 2, str(deeper), "nested too deeply")
    huge = tiny_recipe(tmp_path / "huge", name="x" * 5000, **{"train.max_steps": "y" * 5000})
    r = dmm("distill", huge)
    assert_one_sentence_error(r, 2, "train.max_steps: must be an integer")
    assert len(r.err) < 400


def test_a_damaged_cache_is_made_again_with_a_warning(dmm, tmp_path):
    """Latents, FID features, sample pictures, fused LoRA models and conversions under $DMM_HOME are caches: one
    cut short is made again, never trusted or fatal."""
    home = Path(os.environ["DMM_HOME"])
    recipe = tiny_recipe(tmp_path, **{"train.max_steps": 2})
    assert dmm("distill", recipe).code == 0
    latents = next((home / "latents").glob("*.safetensors"))
    latents.write_bytes(latents.read_bytes()[:100])
    r = dmm("distill", recipe, "--overwrite")
    assert r.code == 0, r
    assert f"the latent cache {latents} does not read" in r.err and "encoding" in r.err
    assert "latents from cache" in dmm("distill", recipe, "--overwrite").err  # made whole again

    args = ("eval", "toy:night", "--recipe", recipe, "-k", "2", *FAST, "-o", tmp_path / "report")
    assert dmm(*args).code == 0
    features = next((home / "samples").rglob("features-*.safetensors"))
    features.write_bytes(b"\0" * 8)
    r = dmm(*args)
    assert r.code == 0, r
    assert f"the feature cache {features} does not read" in r.err
    picture = next(features.parent.glob("*.png"))
    picture.write_bytes(picture.read_bytes()[:100])
    r = dmm(*args)
    assert r.code == 0, r
    assert f"1 cached picture is damaged in {features.parent}; making it again" in r.err
    assert Image.open(picture).convert("RGB").size  # whole again

    one_file = tmp_path / "night.safetensors"
    assert dmm("export", "toy:night", "--single-file", "-o", one_file).code == 0
    for ref, what in (("toy:base+toy:night-lora", "the fused LoRA model"), (one_file, "the conversion")):
        made = Path(dmm("fetch", ref).lines[0])
        whole = (made / UNET).read_bytes()
        (made / UNET).write_bytes(whole[:1000])
        r = dmm("fetch", ref)
        assert r.code == 0 and r.lines == [str(made)], r
        assert f"{what} {made} is damaged" in r.err and (made / UNET).read_bytes() == whole


def test_an_unwritable_dmm_home_costs_caches_not_jobs(dmm, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("DMM_HOME cannot be created under a file")
    monkeypatch.setenv("DMM_HOME", str(blocker / "home"))
    r = dmm("generate", "a red circle", "--model", "toy:night", "-o", tmp_path / "pic.png", *FAST)
    assert r.code == 0, r
    r = dmm("baseline-merge", "toy:night", "toy:outline", "-o", tmp_path / "merge")  # hashes are cached there
    assert r.code == 0, r
    assert r.err.count("warning: cannot write to $DMM_HOME") == 1
    assert dmm("fetch", "toy:night", "--export-single-file", tmp_path / "night.safetensors").code == 0
    r = dmm("fetch", tmp_path / "night.safetensors")  # a conversion needs somewhere to live
    assert_one_sentence_error(r, 1, "cannot write to $DMM_HOME", "set DMM_HOME to a writable folder")


@pytest.mark.parametrize("ref, code, fragment", [
    ("org/name/../../etc/passwd.safetensors", 2, "no such model folder or file"),
    ("../missing.safetensors", 2, "no such model folder or file"),
    ("models/../missing.safetensors", 2, "no such model folder or file"),
])
def test_references_that_climb_out_are_not_sent_to_the_hub(dmm, ref, code, fragment):
    assert_one_sentence_error(dmm("fetch", ref), code, ref, fragment)


@pytest.mark.parametrize("ref", ["", " "])
def test_an_empty_model_reference_is_not_the_current_folder(dmm, tmp_path, ref):
    assert_one_sentence_error(dmm("fetch", ref), 2, "an empty model reference")
    r = dmm("baseline-merge", "toy:night", ref, "-o", tmp_path / "out")
    assert_one_sentence_error(r, 2, "an empty model reference")


@pytest.mark.parametrize("args", [
    ["generate", "a cat", "--model", "toy:night", "--steps", "1"],
    ["distill", "RECIPE"],
    ["baseline-merge", "toy:night", "toy:outline"],
    ["export", "toy:night"],
    ["eval", "toy:night", "--recipe", "RECIPE"],
    ["toy", "build"],
    ["fetch", "toy:night", "--store", ""],
    ["fetch", "toy:night", "--export-single-file", ""],
])
def test_an_empty_output_is_not_the_current_folder(dmm, tmp_path, monkeypatch, args):
    """`-o "$UNSET"` would have written into, or refused, whatever folder the shell was in."""
    recipe = tiny_recipe(tmp_path / "recipe")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    args = [str(recipe) if a == "RECIPE" else a for a in args]
    r = dmm(*args, *([] if args[0] == "fetch" else ["-o", ""]))
    assert_one_sentence_error(r, 2, "is empty")
    assert os.listdir(work) == []


# --- help and merge options say what they do ---------------------------------------------------------------

def test_help_examples_keep_their_lines(dmm):
    from dmm_cli import cli

    for command, function in [("generate", cli.generate), ("distill", cli.distill), ("eval", cli.eval_),
                              ("baseline-merge", cli.baseline_merge), ("fetch", cli.fetch)]:
        examples = function.__doc__.split("Examples:")[1].strip().splitlines()
        shown = [line.strip() for line in dmm(command, "--help").out.splitlines()]
        assert len(examples) >= 2 and all(example.strip() in shown for example in examples), command
    text = " ".join(dmm("baseline-merge", "--help").out.split())
    for convention in ("ties at the threshold kept", "a zero sign sum keeps the base value",
                       "a key missing in a teacher is an error", "non-float tensors are copied from the base"):
        assert convention in text


@pytest.mark.parametrize("args, fragment", [
    (["--method", "average", "--density", "0.3"], "--density has no effect on --method average"),
    (["--method", "average", "--lambda", "2"], "--lambda has no effect on --method average"),
    (["--method", "task-arithmetic", "--base", "toy:base", "--seed", "1"], "--seed has no effect"),
    (["--method", "ties", "--base", "toy:base", "--dare-sign"], "--dare-sign has no effect on --method ties"),
    (["--method", "ties", "--base", "toy:base", "--lambda", "nan"], "--lambda must be a finite number"),
])
def test_options_a_method_ignores_are_refused(dmm, tmp_path, args, fragment):
    r = dmm("baseline-merge", *args, "toy:night", "toy:outline", "-o", tmp_path / "out")
    assert_one_sentence_error(r, 2, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("teachers, vae, family", [(("toy:night", "toy:outline"), "toy:xl-base", "SDXL"),
                                                   (("toy:xl-night", "toy:xl-checker"), "toy:night", "SD1.x")])
def test_a_vae_of_another_latent_space_is_refused(dmm, tmp_path, teachers, vae, family):
    r = dmm("baseline-merge", *teachers, "--vae", vae, "-o", tmp_path / "out")
    assert_one_sentence_error(r, 2, f"--vae {vae}: an {family} model's VAE")
    assert not (tmp_path / "out").exists()


def test_the_metadata_records_only_what_the_method_used(dmm, tmp_path):
    from dmm_cli.files.safetensors_header import read_metadata

    assert dmm("baseline-merge", "toy:night", "toy:outline", "-o", tmp_path / "avg").code == 0
    meta = read_metadata(tmp_path / "avg" / UNET)
    assert json.loads(meta["dmm.params"]) == {"weights": [1.0, 1.0]} and "dmm.seed" not in meta


def test_dtype_auto_is_never_narrower_than_the_widest_input(dmm, tmp_path):
    wide = copy_model("outline", tmp_path / "wide")
    save_file({k: v.float() for k, v in load_file(wide / UNET).items()}, wide / UNET)
    assert dmm("baseline-merge", "toy:night", wide, "-o", tmp_path / "out").code == 0
    merged = load_file(tmp_path / "out" / UNET)
    assert all(v.dtype == torch.float32 for v in merged.values() if v.is_floating_point())
    assert dmm("baseline-merge", "toy:night", "toy:outline", "-o", tmp_path / "narrow").code == 0
    assert all(v.dtype == torch.float16 for v in load_file(tmp_path / "narrow" / UNET).values())
