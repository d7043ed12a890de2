"""`dmm distill` at SD1.5 scale through the real CLI: random-weight SD1.5 folders, a --dry-run, then real steps.

Writes a base and N teacher folders (fp16, shared VAE and text encoder), a folder of random 512 px
captioned images and a recipe, runs `python -m dmm_cli distill --dry-run` and `--max-steps`, and
prints JSON with the run's samples/s and peak GPU memory from its metrics log, beside the dry run's
estimate of that peak (distill/memory.py), so the estimate can be checked against a real GPU.

  python benchmarks/sd15_distill_smoke.py --work /tmp/sd15 --teachers 4 --steps 20
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sd15  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--teachers", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--compile", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--student", default="full", choices=["full", "lora"], help="lora: a rank-16 LoRA student")
    a = p.parse_args()
    started = time.perf_counter()
    recipe_path = sd15.write_recipe(a.work, "sd15_smoke", a.teachers, a.images, a.tiny, {
        "max_steps": a.steps, "batch_size": a.batch, "precision": a.precision, "log_every": 5,
        "checkpoint_every": 1000, "compile": {"auto": "auto", "true": True, "false": False}[a.compile],
        "student": {"type": a.student, "rank": 16}})
    prepared = time.perf_counter() - started
    env = dict(os.environ, DMM_HOME=str(a.work / "home"))
    cmd = [sys.executable, "-m", "dmm_cli", "distill", str(recipe_path)]  # --overwrite: a rerun starts over
    dry = subprocess.run([*cmd, "--dry-run", "--json", "--overwrite"], capture_output=True, text=True, env=env)
    estimate = json.loads(dry.stdout)["memory"] if dry.returncode == 0 else None
    t0 = time.perf_counter()
    real = subprocess.run([*cmd, "--overwrite"], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    rows = []
    metrics = a.work / "run" / "logs" / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    print(json.dumps({
        "teachers": a.teachers, "batch": a.batch, "steps": a.steps, "precision": a.precision,
        "prepare_s": round(prepared, 1),
        "dry_run": {"rc": dry.returncode, "stdout": dry.stdout[-1500:], "stderr": dry.stderr[-800:]},
        "distill": {"rc": real.returncode, "wall_s": round(seconds, 1), "stdout": real.stdout[-300:],
                    "stderr": real.stderr[-1500:] if real.returncode else real.stderr[-300:]},
        "metrics": rows,
        "memory_estimate_gb": estimate and round(estimate["estimate_bytes"] / 1e9, 2),
        "memory_measured_gb": max((r["gpu_peak_gib"] * 2**30 / 1e9 for r in rows if "gpu_peak_gib" in r), default=None),
    }, indent=1), flush=True)


if __name__ == "__main__":
    main()
