"""The LoRA student against the full one on the toy zoo: ranks 4, 16 and 64; writes docs/lora_student.md and .json.

Each row trains through the real CLI (recipes/toy_styles_lora.yaml's settings at its rank; the full student is the
convergence study's first row: the demo recipe with uniform timesteps) and is measured as the convergence study
measures (benchmarks/convergence.py): FID_t over the held-out colour/shape pairs and held-out style accuracy, with
the trainable parameters, the size of one exported style LoRA (kohya layout) and of the adapter folder, and the
training speed on this machine.

  python benchmarks/lora_ranks.py --work /tmp/convergence      # shares the convergence study's runs and samples
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from ablation import dmm, kept_section, study_env  # noqa: E402
from convergence import ROWS as CONVERGENCE  # noqa: E402
from convergence import measure_row  # noqa: E402

LORA = yaml.safe_load((ROOT / "recipes" / "toy_styles_lora.yaml").read_text())["train"]
ROWS = {"base-1k2": ("full student (1,200 steps, uniform timesteps)", *CONVERGENCE["base-1k2"][1:])}
for rank in (4, 16, 64):
    ROWS[f"lora-r{rank}"] = (f"LoRA student, rank {rank}", LORA["max_steps"],
                             {"lr": LORA["lr"], "student": {**LORA["student"], "rank": rank}})
ROWS["lora-r16-1k2"] = ("LoRA student, rank 16, the full student's 1,200 steps", 1200,
                        {"lr": LORA["lr"], "student": LORA["student"]})


def sizes(folder: Path, env: dict) -> dict:
    """Trainable parameters, and the bytes of one style's LoRA file and of the adapter (of the UNet: full)."""
    from safetensors.torch import load_file

    adapter = folder / "student_lora" / "adapter_model.safetensors"
    if not adapter.is_file():
        unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
        return {"trainable_parameters": sum(t.numel() for t in unet.values()),
                "file_bytes": sum(p.stat().st_size for p in (folder / "unet").iterdir())}
    file = folder.parent / f"{folder.name}-night.safetensors"
    dmm("export", folder, "--style", "night", "--format", "lora", "-o", file, "--overwrite", env=env)
    return {"trainable_parameters": sum(t.numel() for t in load_file(adapter).values()),
            "file_bytes": file.stat().st_size, "adapter_bytes": adapter.stat().st_size}


def speed(work: Path, key: str, env: dict) -> float:
    """Median training samples a second over 60 steps of the row's recipe (the first 10 are left out)."""
    out = work / f"speed-{key}"
    dmm("distill", work / f"{key}.yaml", "--max-steps", "60", "--set", "train.log_every=10", "--set",
        "train.warmup_steps=0", "--set", "train.ema=null", "-o", out, "--overwrite", env=env)
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["samples_per_s"] for r in rows[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--docs", type=Path, default=ROOT / "docs")
    a = p.parse_args()
    env = study_env(a.work)
    results = a.docs / "lora_student.json"
    done = {r["key"]: r for r in json.loads(results.read_text())} if results.is_file() else {}
    for key in ROWS:
        if key not in done:
            print(f"lora_ranks: {key}", file=sys.stderr, flush=True)
            done[key] = {**measure_row(a.work, key, env, rows=ROWS), **sizes(a.work / key, env)}
            results.write_text(json.dumps([done[k] for k in ROWS if k in done], indent=2) + "\n")
    if any("samples_per_s" not in done[key] for key in ROWS):  # every row, back to back: one load on the machine
        for key in ROWS:
            done[key]["samples_per_s"] = speed(a.work, key, env)
    results.write_text(json.dumps([done[k] for k in ROWS], indent=2) + "\n")
    lines = ["# The LoRA student against the full student", "",
             "`python benchmarks/lora_ranks.py --work DIR`: the toy zoo's four styles; the full student is the "
             "convergence study's first row (the demo recipe with uniform timesteps), "
             f"the LoRA students `recipes/toy_styles_lora.yaml` ({LORA['max_steps']} steps, lr {LORA['lr']}) "
             "at each rank. FID_t and style accuracy as in [faithfulness.md](faithfulness.md) (held-out pairs, eval "
             "seed 0). File: one style's kohya LoRA for a LoRA student, the UNet for the full one. Speed: median "
             "training samples a second over 60 steps of each row's recipe, the rows timed back to back on this "
             "machine's CPU (2 cores).", "",
             "| student | steps | trainable parameters | file | FID_t | FID_t / reference | style accuracy | samples/s |",
             "|---|---|---|---|---|---|---|---|"]
    for key in ROWS:
        if key in done:
            r = done[key]
            lines.append(f"| {r['setting']} | {r['steps']} | {r['trainable_parameters']:,} | "
                         f"{r['file_bytes'] / 1e6:.2f} MB | {r['fid_t']:.2f} | {r['fid_t_over_reference']:.2f} | "
                         f"{r['style_accuracy_held_out']:.1%} | {r['samples_per_s']:.0f} |")
    doc = a.docs / "lora_student.md"
    doc.write_text("\n".join(lines) + "\n" + kept_section(doc, "\n## What it shows"))


if __name__ == "__main__":
    main()
