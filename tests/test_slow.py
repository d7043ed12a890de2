"""Long checks, opt-in with `make test-slow`: SD1.5-sized single-file round trip, and the toy acceptance bars
(the SDXL-shaped student, the demo, then incremental merging with and without the old-student regulariser), a full
disk, the Inception FID against torch-fidelity, and a compiled run started warm from $DMM_HOME's compile cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_sd15_shaped_checkpoint_round_trips_through_a_single_file(tmp_path):
    """diffusers → one original-layout file → diffusers, with the shipped SD1.5 configs only (no network)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dmm_cli.models.single_file import CONFIGS, convert_to_diffusers, export_single_file

    sd = CONFIGS / "sd15"
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(sd / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(sd / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(sd / "tokenizer"),
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sd / "unet")),
        scheduler=PNDMScheduler.from_pretrained(sd / "scheduler"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).to(torch.float16)
    pipe.save_pretrained(tmp_path / "sd15", safe_serialization=True)
    single = export_single_file(tmp_path / "sd15", tmp_path / "sd15.safetensors")
    back = convert_to_diffusers(single, tmp_path / "back")
    for part in ("unet", "vae", "text_encoder"):
        a = load_file(next((tmp_path / "sd15" / part).glob("*.safetensors")))
        b = load_file(next((back / part).glob("*.safetensors")))
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), part


def test_toy_xl_student_meets_the_acceptance_bars(tmp_path):
    """recipes/toy_styles_xl.yaml as it ships, measured as the SD1.x toy is: held-out style accuracy and a mix."""
    env = dict(os.environ, DMM_HOME=str(tmp_path / "home"))
    run = tmp_path / "toy_styles_xl"
    subprocess.run([sys.executable, "-m", "dmm_cli", "-q", "distill", "recipes/toy_styles_xl.yaml", "-o", str(run)],
                   cwd=ROOT, env=env, check=True, timeout=1800)
    figures = json.loads(subprocess.run([sys.executable, "benchmarks/toy_acceptance.py", str(run)], cwd=ROOT, env=env,
                                        capture_output=True, text=True, check=True).stdout)
    assert figures["student_mean_style_accuracy"] >= 0.90
    assert figures["base_mean_as_teacher"] < 0.10
    assert figures["mix"]["monotonic"]


def test_toy_demo_meets_the_acceptance_bars(tmp_path):
    """The README's main job, then the distill and eval acceptance figures on held-out prompts."""
    env = dict(os.environ, DEMO_OUT=str(tmp_path / "demo"), DMM_HOME=str(tmp_path / "home"),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, check=True, timeout=1800)
    figures = subprocess.run([sys.executable, "benchmarks/toy_acceptance.py", str(tmp_path / "demo" / "toy_styles")],
                             cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    figures = json.loads(figures)
    assert figures["student_mean_style_accuracy"] >= 0.90
    assert figures["base_mean_as_teacher"] < 0.10
    assert figures["mix"]["monotonic"]
    metrics = json.loads((tmp_path / "demo" / "eval" / "metrics.json").read_text())
    rows = {Path(m["name"]).name: m for m in metrics["models"]}
    assert rows["toy_styles"]["fid_t"] < rows["ties"]["fid_t"] and rows["toy_styles"]["fid_t"] < rows["average"]["fid_t"]
    assert rows["toy_styles"]["style_accuracy"] >= 0.90
    assert rows["toy_styles"]["style_accuracy"] > rows["ties"]["style_accuracy"] + 0.3
    assert rows["toy_styles"]["style_accuracy"] > rows["average"]["style_accuracy"] + 0.3


def test_incremental_merging_keeps_old_styles_only_with_the_regulariser(tmp_path):
    """2 styles, then 2 more: old styles kept (≥ 90%, ≥ 20 points above no regulariser), new ones learnt (≥ 90%)."""
    p = subprocess.run([sys.executable, "benchmarks/ablation.py", "--work", str(tmp_path / "work"), "--tables", "2",
                        "--docs", str(tmp_path / "docs")], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {r["setting"]: r for r in json.loads((tmp_path / "docs" / "ablation.json").read_text())["table2"]}
    without, regularised = rows["2 + 2, no regulariser"], rows["2 + 2, old-student regulariser"]
    assert regularised["old_style_accuracy"] >= 0.90
    assert regularised["old_style_accuracy"] >= without["old_style_accuracy"] + 0.20
    assert without["new_style_accuracy"] >= 0.90 and regularised["new_style_accuracy"] >= 0.90


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB filesystem (tmpfs): needs root and permission to mount, as on our CI machines."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root?)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_is_one_sentence_and_leaves_no_half_written_output(tmp_path, small_disk):
    import yaml

    env = dict(os.environ, DMM_HOME=str(tmp_path / "home"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "full", "base": "toy:base", "teachers": [{"name": "night", "model": "toy:night"}],
        "data": {"folder": "toy:shapes"}, "output": str(small_disk / "run"),
        "train": {"max_steps": 4, "batch_size": 4, "checkpoint_every": 1, "keep_checkpoints": 4}}))
    for args in (["distill", str(recipe)],
                 ["baseline-merge", "toy:night", "toy:outline", "-o", str(small_disk / "merge")]):
        p = subprocess.run([sys.executable, "-m", "dmm_cli", "-q", *args], capture_output=True, text=True, env=env,
                           timeout=600)
        assert p.returncode == 1, p.stderr
        lines = [line for line in p.stderr.splitlines() if line.startswith("dmm: ")]
        assert len(lines) == 1 and "no space left on the device" in lines[0] and "Traceback" not in p.stderr, p.stderr
        litter = [q for q in small_disk.rglob(".*") if q.name.endswith((".tmp", ".old", ".lock"))]
        assert not litter, litter
    assert not (small_disk / "merge").exists()


def test_inception_fid_matches_torch_fidelity(tmp_path):
    """dmm's Inception FID against the reference implementation on the same pictures and weights (issue 15: within
    1e-3 relative). Needs the `inception` extra, which this project's CPU machines cannot install beside their torch."""
    pytest.importorskip("torch_fidelity", reason="needs pip install 'dmm-cli[inception]'", exc_type=ImportError)
    p = subprocess.run([sys.executable, "benchmarks/inception_check.py", "--work", str(tmp_path), "--images", "24"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((tmp_path / "inception_check.json").read_text())
    assert result["torch_fidelity"] > 1 and result["dmm_relative_difference"] < 1e-3


def test_a_second_compiled_run_starts_warm_from_the_cache_in_dmm_home(tmp_path):
    """Inductor on the CPU (a C++ compiler), two `dmm distill` runs of one model into one $DMM_HOME: the first
    compiles, the second reads every compiled graph from $DMM_HOME/compile and compiles none."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_recipe

    env = dict(os.environ, DMM_HOME=str(tmp_path / "home"))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    script = ("import json, sys; from torch._dynamo.utils import counters; from dmm_cli.main import main; "
              "code = main(['distill', sys.argv[1]]); "
              "print(json.dumps({k: dict(v) for k, v in counters.items() if k in ('inductor', 'aot_autograd')})); "
              "sys.exit(code)")
    found = {}
    for run in ("cold", "warm"):
        recipe = tiny_recipe(tmp_path / run, **{"train.compile": True, "train.max_steps": 2})
        p = subprocess.run([sys.executable, "-c", script, str(recipe)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=1800)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "warning: compile stopped" not in p.stderr and "compile: done in" in p.stderr, p.stderr[-3000:]
        found[run] = json.loads(p.stdout.strip().splitlines()[-1])

    def count(run, *names):
        return sum(found[run].get(group, {}).get(name, 0) for group in ("inductor", "aot_autograd") for name in names)

    assert count("cold", "fxgraph_cache_miss", "autograd_cache_miss") > 0, found
    assert count("warm", "fxgraph_cache_hit", "autograd_cache_hit") > 0, found
    assert count("warm", "fxgraph_cache_miss", "autograd_cache_miss") == 0, found
    assert len(list((tmp_path / "home" / "compile").iterdir())) == 1  # one model: one cache folder
