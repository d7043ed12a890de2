"""The paper's ablations on the toy zoo, through the real CLI; writes docs/ablation.md and docs/ablation.json.

Table 1 analogue: score only → + feature → + adversarial → + synthesized, 4 teachers, FID_t and style
accuracy (held-out prompts). Table 2 analogue: 2 teachers, then 2 more added incrementally without the
old-student regulariser (old_style_fraction 0) and with it (proportional), against all 4 at once.

  python benchmarks/ablation.py --work /tmp/ablation          # about 40 minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from toy_acceptance import measure  # noqa: E402

TEACHERS = ["night", "outline", "stripes", "checker"]
SAMPLE = ["--steps", "20", "--guidance", "4"]


def dmm(*args: str, env: dict) -> str:
    p = subprocess.run([sys.executable, "-m", "dmm_cli", "-q", *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"dmm {' '.join(map(str, args))} failed:\n{p.stderr[-2000:]}")
    return p.stdout.strip()


def recipe(work: Path, name: str, teachers: list[str], steps: int, train: dict | None = None,
           data: dict | None = None, init_from: Path | None = None) -> Path:
    spec = {"name": name, "base": "toy:base", "teachers": [{"name": t, "model": f"toy:{t}"} for t in teachers],
            "data": data or {"folder": "toy:shapes"},
            "train": {"max_steps": steps, "batch_size": 32, "lr": 5.0e-4, "warmup_steps": 50, "checkpoint_every": 400,
                      "log_every": 50, "feature_loss": {"weight": 0.001, "reduce": "mean", "type": "l2"},
                      **(train or {})},
            "output": str(work / name)}
    if init_from is not None:
        spec["init_from"] = str(init_from)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run(work: Path, path: Path, env: dict) -> Path:
    folder = work / path.stem
    if not (folder / "model_index.json").is_file():
        dmm("distill", path, *(["--resume"] if (folder / "checkpoints").is_dir() else []), env=env)
    return folder


def evaluate(models: list[Path], teachers_recipe: Path, out: Path, env: dict) -> dict:
    dmm("eval", *models, "--recipe", teachers_recipe, "-k", "100", "--batch-size", "100", *SAMPLE, "-o", out, env=env)
    return {Path(m["name"]).name: m for m in json.loads((out / "metrics.json").read_text())["models"]}


def table1(work: Path, steps: int, env: dict) -> tuple[list[dict], float]:
    adversarial = {"weight": 0.01, "lr": 1e-4, "start_step": steps // 3}
    synthesize = {"images_per_teacher": 128, "after_step": steps * 2 // 3, "steps": 20, "guidance": 4.0}
    settings = [
        ("score only", recipe(work, "t1-score", TEACHERS, steps, {"feature_loss": {"weight": 0.0}})),
        ("+ feature", recipe(work, "t1-feature", TEACHERS, steps)),
        ("+ adversarial", recipe(work, "t1-adversarial", TEACHERS, steps, {"adversarial_loss": adversarial})),
        ("+ synthesized", recipe(work, "t1-synthesized", TEACHERS, steps, {"adversarial_loss": adversarial},
                                 {"folder": "toy:shapes", "synthesize": synthesize})),
    ]
    folders = [run(work, path, env) for _, path in settings]
    metrics = evaluate(folders, settings[1][1], work / "eval-table1", env)
    rows = []
    for (label, _), folder in zip(settings, folders):
        acc = measure(folder, 25, 20, 4.0, 123)["student_style_accuracy"]
        m = metrics[folder.name]
        rows.append({"setting": label, "fid_t": m["fid_t"], "fid_t_over_reference": m["fid_t_over_reference"],
                     "style_accuracy_held_out": sum(acc.values()) / len(acc), "per_style": acc})
    return rows, metrics["reference"]["fid_t"]


def table2(work: Path, steps: int, env: dict) -> tuple[list[dict], dict]:
    half = steps // 2
    together_recipe = recipe(work, "t1-feature", TEACHERS, steps)  # the same run as Table 1's "+ feature"
    first = run(work, recipe(work, "t2-first-two", TEACHERS[:2], half), env)
    without = run(work, recipe(work, "t2-plus-two-unregularised", TEACHERS, half,
                               {"old_style_fraction": 0.0}, init_from=first), env)
    regularised = run(work, recipe(work, "t2-plus-two-regularised", TEACHERS, half, init_from=first), env)
    together = run(work, together_recipe, env)
    metrics = evaluate([without, regularised, together], together_recipe, work / "eval-table2", env)
    rows = []
    for label, folder in (("2 + 2, no regulariser", without), ("2 + 2, old-student regulariser", regularised),
                          ("all 4 at once", together)):
        acc = measure(folder, 25, 20, 4.0, 123)["student_style_accuracy"]
        diag = metrics[folder.name]["diag"]
        rows.append({"setting": label, "old_style_accuracy": (acc["night"] + acc["outline"]) / 2,
                     "new_style_accuracy": (acc["stripes"] + acc["checker"]) / 2, "per_style": acc,
                     "fid_per_style": dict(zip(TEACHERS, diag)), "fid_t": metrics[folder.name]["fid_t"]})
    return rows, measure(first, 25, 20, 4.0, 123)["student_style_accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--tables", type=int, nargs="+", choices=[1, 2], default=[1, 2])
    p.add_argument("--docs", type=Path, default=ROOT / "docs")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DMM_HOME=str(a.work / "home"))
    os.environ["DMM_HOME"] = env["DMM_HOME"]
    result = {"steps": a.steps}
    lines = ["# Ablations on the toy zoo", "",
             f"`python benchmarks/ablation.py --work DIR` ({a.steps} steps per 4-teacher run, batch 32; style accuracy"
             " on prompts held out of the distillation captions; FID in the toy classifier's feature space).", ""]
    if 1 in a.tables:
        rows1, reference = table1(a.work, a.steps, env)
        result.update(table1=rows1, reference_fid_t=reference)
        lines += ["## Table 1 analogue", "", f"Reference FID_t (teacher against teacher, other seeds): {reference:.2f}.",
                  "", "| setting | FID_t | FID_t / reference | style accuracy |", "|---|---|---|---|"]
        lines += [f"| {r['setting']} | {r['fid_t']:.2f} | {r['fid_t_over_reference']:.3f} | "
                  f"{r['style_accuracy_held_out']:.1%} |" for r in rows1]
        lines.append("")
    if 2 in a.tables:
        rows2, first_acc = table2(a.work, a.steps, env)
        result.update(table2=rows2, first_two_alone=first_acc)
        lines += ["## Table 2 analogue", "",
                  f"First stage: night + outline, {a.steps // 2} steps (alone: night {first_acc['night']:.0%}, outline "
                  f"{first_acc['outline']:.0%}). Then stripes + checker added for {a.steps // 2} steps.", "",
                  "| setting | old styles (night, outline) | new styles (stripes, checker) | FID night / outline /"
                  " stripes / checker |", "|---|---|---|---|"]
        lines += [f"| {r['setting']} | {r['old_style_accuracy']:.1%} | {r['new_style_accuracy']:.1%} | "
                  + " / ".join(f"{v:.1f}" for v in r["fid_per_style"].values()) + " |" for r in rows2]
    a.docs.mkdir(parents=True, exist_ok=True)
    (a.docs / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.docs / "ablation.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
