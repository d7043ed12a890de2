"""`dmm distill` on 1, 2 and 4 processes, for each teacher placement and student sharding: the step time, and the
peak memory of the busiest process beside the dry run's plan for it (distill/memory.py).

Writes random-weight SD1.5 folders (or tiny ones with --tiny), a folder of captioned pictures and a recipe, then
for each row runs `dmm distill --dry-run --json --num-processes N` and the run itself under torchrun, and prints
one JSON line per row. On CUDA, N is at most the GPU count; on the CPU the processes talk over gloo.

  python benchmarks/scale.py --work /tmp/scale --processes 1 2 4 --teachers 4 --steps 20
  python benchmarks/scale.py --work /tmp/scale --tiny --processes 1 2        # the CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sd15  # noqa: E402

LAYOUTS = [("replicate", "none"), ("shard", "none"), ("replicate", "fsdp"), ("shard", "fsdp")]


def rows_to_run(processes: list[int], teachers: int) -> list[tuple[int, str, str]]:
    """One row on one process (every layout is the same there); each layout that can run on more."""
    rows = []
    for n in processes:
        for placement, sharding in LAYOUTS[:1] if n == 1 else LAYOUTS:
            if placement == "shard" and n > teachers:
                continue
            rows.append((n, placement, sharding))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--teachers", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="per process")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--timeout", type=int, default=600, help="seconds for each row's run")
    a = p.parse_args()
    if torch.cuda.is_available():
        a.processes = [n for n in a.processes if n <= torch.cuda.device_count()]
    recipe_path = sd15.write_recipe(a.work, "scale", a.teachers, a.images, a.tiny, {
        "max_steps": a.steps, "batch_size": a.batch, "precision": a.precision,
        "log_every": max(a.steps // 2, 1), "checkpoint_every": 10_000})
    env = dict(os.environ, DMM_HOME=str(a.work / "home"), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for n, placement, sharding in rows_to_run(a.processes, a.teachers):
        settings = ["--set", f"train.teacher_placement={placement}", "--set", f"train.student_sharding={sharding}",
                    "-o", str(a.work / "run"), "--overwrite"]
        dry = subprocess.run([sys.executable, "-m", "dmm_cli", "distill", str(recipe_path), *settings, "--dry-run",
                              "--json", "--num-processes", str(n)], capture_output=True, text=True, env=env)
        plan = json.loads(dry.stdout)["memory"] if dry.returncode == 0 else None
        started = time.perf_counter()
        try:
            real = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                   str(n), "-m", "dmm_cli", "distill", str(recipe_path), *settings],
                                  capture_output=True, text=True, env=env, timeout=a.timeout)
            rc, err = real.returncode, real.stderr
        except subprocess.TimeoutExpired:
            rc, err = 124, f"no result after {a.timeout} s"
        metrics = a.work / "run" / "logs" / "metrics.jsonl"
        logged = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() and rc == 0 \
            else []
        last = logged[-1] if logged else {}
        peak = last.get("gpu_peak_gib")
        estimate = plan and plan["estimate_bytes"] / 2**30
        print(json.dumps({
            "processes": n, "teacher_placement": placement, "student_sharding": sharding, "rc": rc,
            "wall_s": round(time.perf_counter() - started, 1),
            "samples_per_s": last.get("samples_per_s"),
            "step_s": last.get("samples_per_s") and round(a.batch * n / last["samples_per_s"], 4),
            "peak_gib_busiest_process": peak, "estimate_gib": estimate and round(estimate, 2),
            "estimate_over_peak": peak and estimate and round(estimate / peak, 3),
            "plan": plan and plan["summary"], "stderr": err[-600:] if rc else None,
        }), flush=True)


if __name__ == "__main__":
    main()
