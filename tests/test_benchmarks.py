"""The GPU benchmarks run on the CPU with --tiny shapes: a smoke test of their code paths, no timing checked.
The slow ones run in `make test-slow` and in benchmarks/gpu_prepare.sh, before a GPU turn is spent on them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OFFICIAL = ROOT.parent / "shared" / "bench" / "official_step.py"


def run(*args: str) -> list[dict]:
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def test_distill_throughput_tiny():
    rows = run("benchmarks/distill_throughput.py", "--tiny", "--batch", "2", "--teachers", "2", "--offload",
               "--compile", "off", "--official-step", str(OFFICIAL))
    assert not [r for r in rows if "error" in r], rows
    ours = [r for r in rows if r.get("variant") == "dmm"]
    assert [r["offload"] for r in ours] == [False, True]
    assert all(r["samples_per_s"] > 0 and r["loss"] > 0 and r["compiled"] is False for r in ours)
    if OFFICIAL.is_file():
        official = [r for r in rows if r.get("variant") == "official"]
        assert official and "samples_per_s" in official[0] and "speedup_vs_official" in ours[0]


def test_generate_throughput_tiny():
    result, = run("benchmarks/generate_throughput.py", "--tiny")
    assert set(result["images_per_s"]) == {"diffusers", "dmm"} and result["dmm_over_diffusers_time"] > 0


@pytest.mark.slow
def test_sd15_distill_smoke_tiny_reports_the_memory_estimate_and_reruns_into_its_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("sd15_cli", "sd15_cli_again"):  # gpu_run.sh runs it twice into one work folder
        p = subprocess.run([sys.executable, "benchmarks/sd15_distill_smoke.py", "--work", str(tmp_path / "work"),
                            "--tiny", "--teachers", "2", "--steps", "2", "--batch", "2", "--images", "8",
                            "--precision", "no", "--compile", "false"], capture_output=True, text=True, cwd=ROOT,
                           timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        result = json.loads(p.stdout[p.stdout.index("{"):])
        assert result["dry_run"]["rc"] == 0 and result["distill"]["rc"] == 0, result
        assert result["memory_estimate_gb"] > 0 and result["memory_measured_gb"] is None  # no GPU here
        (out / f"{name}.jsonl").write_text(p.stdout)
    summary = subprocess.run([sys.executable, "benchmarks/gpu_summary.py", str(out)], capture_output=True, text=True,
                             cwd=ROOT, timeout=60)
    assert summary.returncode == 0, summary.stderr
    memory = json.loads(summary.stdout)["memory"]
    assert [m["cli"] for m in memory] == ["sd15_cli", "sd15_cli_again"] and all(m["rc"] == 0 for m in memory)


@pytest.mark.slow
def test_ties_profile_tiny():
    p = subprocess.run([sys.executable, "benchmarks/ties_profile.py", "--numel", "300000", "--repeats", "1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout)
    assert result["numel"] == 300000 and result["ties_over_average"] > 0
    assert all(seconds > 0 for seconds in result["ties_stage_seconds"].values())


def test_sdxl_memory_estimates_real_size():
    row, = run("benchmarks/sdxl_memory.py", "--teachers", "4", "--batch", "4")
    assert 2.5e9 < row["unet_parameters"] < 2.6e9  # SDXL 1.0's UNet, from its shipped config
    assert row["fits"]["24 GB"].startswith("does not fit") and "adamw-8bit" in row["fits"]["48 GB"]
    assert row["fits"]["80 GB"] == "train.gradient_checkpointing=True"


@pytest.mark.slow
def test_sdxl_memory_smoke_runs_its_gpu_step():
    for offload in ([], ["--offload"]):
        row, = run("benchmarks/sdxl_memory.py", "--measure", "--tiny", "--teachers", "2", "--batch", "2", *offload)
        assert row["samples_per_s"] > 0 and row["loss"] > 0 and row["offload"] == bool(offload)


def test_gpu_summary_turns_a_run_folder_into_ratios_and_goals(tmp_path):
    """gpu_run.sh's summary over hand-made step outputs of the shapes its benchmarks print."""
    lines = {
        "distill_eager": [{"variant": "official", "batch": 16, "samples_per_s": 40.0},
                          {"variant": "dmm", "batch": 16, "teachers": 1, "compile": "off", "samples_per_s": 80.0},
                          {"variant": "dmm", "batch": 16, "teachers": 4, "compile": "off", "samples_per_s": 78.0,
                           "peak_gib": 30.0, "estimate_gib": 33.0},
                          {"variant": "dmm", "batch": 16, "teachers": 8, "compile": "off", "samples_per_s": 76.0}],
        "compile_cold": [{"variant": "dmm", "batch": 16, "teachers": 4, "compile": "on", "compiled": True,
                          "samples_per_s": 90.0, "compile_s": 70.0}],
        "compile_warm": [{"variant": "dmm", "batch": 16, "teachers": 4, "compile": "on", "samples_per_s": 91.0,
                          "compile_s": 9.0}],
        "compile_teachers": [{"variant": "dmm", "batch": 16, "teachers": 1, "compile": "on", "samples_per_s": 92.0,
                              "compile_s": 20.0},
                             {"variant": "dmm", "batch": 16, "teachers": 8, "compile": "on", "samples_per_s": 90.0,
                              "compile_s": 25.0},
                             # its compile overran --compile-budget: an eager figure, not a compiled one
                             {"variant": "dmm", "batch": 32, "teachers": 1, "compile": "on", "compiled": False,
                              "samples_per_s": 50.0, "compile_s": 40.1}],
        "generate": [{"dmm_over_diffusers_time": 1.01}],
    }
    for name, rows in lines.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = subprocess.run([sys.executable, "benchmarks/gpu_summary.py", str(tmp_path)], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    b16 = summary["steps"]["b16"]
    assert b16["dmm_4t_eager_vs_official"] == 1.95 and b16["dmm_4t_compiled"] == 91.0  # the warm run's figure
    assert summary["b16_4t_best_vs_official"] == 2.275
    assert summary["eight_over_one_teacher_b16"] == {"eager": 0.95, "compiled": 0.978}
    assert summary["compile_s"] == {"cold": 70.0, "warm": 9.0, "other_teacher_counts": [20.0, 25.0],
                                    "stopped": [{"step": "compile_teachers", "teachers": 1, "compile_s": 40.1}]}
    assert "dmm_1t_compiled" not in summary["steps"]["b32"]
    assert summary["generate_dmm_over_diffusers_time"] == 1.01
    assert summary["memory"] == [{"teachers": 4, "batch": 16, "compile": "off", "gradient_checkpointing": None,
                                  "checkpointing": None, "peak_gib": 30.0, "estimate_gib": 33.0,
                                  "estimate_over_peak": 1.1}]


@pytest.mark.slow
def test_scale_tiny_runs_every_layout_on_cpu_processes(tmp_path):
    p = subprocess.run([sys.executable, "benchmarks/scale.py", "--work", str(tmp_path), "--tiny", "--processes", "1",
                        "2", "--teachers", "2", "--steps", "2", "--batch", "2", "--images", "8", "--precision", "no"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert [(r["processes"], r["teacher_placement"], r["student_sharding"]) for r in rows] == [
        (1, "replicate", "none"), (2, "replicate", "none"), (2, "shard", "none"), (2, "replicate", "fsdp"),
        (2, "shard", "fsdp")]
    assert all(r["rc"] == 0 and r["samples_per_s"] > 0 and r["estimate_gib"] > 0 for r in rows), rows
