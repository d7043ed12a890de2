"""One summary of `gpu_run.sh`'s step outputs: ratios to the released step, teacher-count flatness, compile times,
generation parity and memory plan errors, with the issue's goals beside them. Prints JSON.

  python benchmarks/gpu_summary.py /tmp/dmm-gpu/steps       # gpu_run.sh's $WORK/steps, or steps.tgz unpacked
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(folder: Path, name: str) -> list[dict]:
    path = folder / f"{name}.jsonl"
    if not path.is_file():
        return []
    text, found = path.read_text(), []
    if text.lstrip().startswith("{"):  # one indented object (sd15_distill_smoke.py) or one object a line
        try:
            return [json.loads(text[text.index("{"):])]
        except json.JSONDecodeError:
            pass
    for line in text.splitlines():
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in found if isinstance(r, dict)]


def last_line(path: Path) -> str | None:
    lines = path.read_text().strip().splitlines() if path.is_file() else []
    return lines[-1] if lines else None


def throughput(found: list[dict], **match) -> float | None:
    hits = [r["samples_per_s"] for r in found if "samples_per_s" in r and all(r.get(k) == v for k, v in match.items())]
    return hits[0] if hits else None


def ratio(a, b, digits=3):
    return round(a / b, digits) if a and b else None


def summarize(folder: Path) -> dict:
    eager, cold, warm, other_counts = (rows(folder, n) for n in ("distill_eager", "compile_cold", "compile_warm",
                                                                  "compile_teachers"))
    # a compile stage that failed or overran --compile-budget timed the step eagerly: not a compiled figure
    stopped = [{"step": name, "teachers": r.get("teachers"), "compile_s": r.get("compile_s")}
               for name, found in (("compile_cold", cold), ("compile_warm", warm), ("compile_teachers", other_counts))
               for r in found if r.get("compiled") is False]
    cold, warm, other_counts = ([r for r in found if r.get("compiled") is not False]
                                for found in (cold, warm, other_counts))
    steps = {}
    for batch in (16, 32):
        official = throughput(eager, variant="official", batch=batch)
        entry = {"official": official}
        for teachers in (1, 4, 8):
            for label, found, compile_ in (("eager", eager, "off"), ("compiled", warm + cold + other_counts, "on")):
                value = throughput(found, variant="dmm", batch=batch, teachers=teachers, compile=compile_)
                if value:
                    entry[f"dmm_{teachers}t_{label}"] = value
                    entry[f"dmm_{teachers}t_{label}_vs_official"] = ratio(value, official)
        steps[f"b{batch}"] = entry
    b16 = steps["b16"]
    flat = {label: ratio(b16.get(f"dmm_8t_{label}"), b16.get(f"dmm_1t_{label}")) for label in ("eager", "compiled")}
    compile_s = {"cold": next((r.get("compile_s") for r in cold if "compile_s" in r), None),
                 "warm": next((r.get("compile_s") for r in warm if "compile_s" in r), None),
                 "other_teacher_counts": [r.get("compile_s") for r in other_counts if "compile_s" in r],
                 "stopped": stopped}
    generate = next(iter(rows(folder, "generate")), {})
    memory = []
    for r in eager + cold + warm + other_counts + rows(folder, "sdxl_step"):
        if r.get("peak_gib") and r.get("estimate_gib"):
            memory.append({k: r.get(k) for k in ("teachers", "batch", "compile", "gradient_checkpointing",
                                                  "checkpointing", "peak_gib", "estimate_gib")}
                          | {"estimate_over_peak": ratio(r["estimate_gib"], r["peak_gib"])})
    for name in ("sd15_cli", "sd15_cli_again", "sd15_lora_cli"):
        for r in rows(folder, name):
            memory.append({"cli": name, "rc": r.get("distill", {}).get("rc"),
                           "peak_gb": r.get("memory_measured_gb"), "estimate_gb": r.get("memory_estimate_gb"),
                           "estimate_over_peak": ratio(r.get("memory_estimate_gb"), r.get("memory_measured_gb"))})
    return {
        "gpu": last_line(folder / "gpu.txt"),
        "commit": (folder / "commit.txt").read_text().strip() if (folder / "commit.txt").is_file() else None,
        "steps": steps,
        "b16_4t_best_vs_official": max(filter(None, [b16.get("dmm_4t_eager_vs_official"),
                                                     b16.get("dmm_4t_compiled_vs_official")]), default=None),
        "eight_over_one_teacher_b16": flat,
        "compile_s": compile_s,
        "generate_dmm_over_diffusers_time": generate.get("dmm_over_diffusers_time"),
        "memory": memory,
        "sdxl": [r for r in rows(folder, "sdxl_step")],
        "scale": [{k: r.get(k) for k in ("processes", "teacher_placement", "student_sharding", "rc", "samples_per_s",
                                         "peak_gib_busiest_process", "estimate_gib", "estimate_over_peak")}
                  for r in rows(folder, "scale")],
        "goals": {"b16_4t_vs_official": ">= 2.0", "eight_over_one_teacher_b16": ">= 0.95",
                  "compile_cold_s": "<= 90", "compile_warm_s": "<= 15", "generate_time_ratio": "<= 1.02",
                  "estimate_over_peak": "0.85 - 1.15"},
    }


if __name__ == "__main__":
    print(json.dumps(summarize(Path(sys.argv[1] if len(sys.argv) > 1 else "steps")), indent=1))
