"""The paper's ablations on the toy zoo, through the real CLI; writes docs/ablation.md and docs/ablation.json.

Table 1 analogue: score only → + feature → + adversarial → + synthesized, 4 teachers, FID_t and style
accuracy (held-out prompts), with what FID_t is made of (mean distance against spread). Probes: the
synthesized stage with one setting changed at a time. Table 2 analogue: 2 teachers, then 2 more added
incrementally without the old-student regulariser (old_style_fraction 0) and with it (proportional), against
all 4 at once.

  python benchmarks/ablation.py --work /tmp/ablation          # about 2 hours on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

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


def study_env(work: Path) -> dict:
    """The work folder made, and an environment whose $DMM_HOME (also this process's) is inside it."""
    work.mkdir(parents=True, exist_ok=True)
    os.environ["DMM_HOME"] = str(work / "home")
    return dict(os.environ)


def kept_section(doc: Path, heading: str) -> str:
    """The hand-written part of a generated doc, from `heading` on, so regenerating its tables keeps it."""
    text = doc.read_text() if doc.is_file() else ""
    return text[text.index(heading):] if heading in text else ""


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


def sample_features(home: Path) -> dict[str, torch.Tensor]:
    """The cached eval features of every sample set, by the label eval gave it ("teacher night", "RUN style night")."""
    found = {}
    for done in home.glob("samples/*/done.json"):
        features = list(done.parent.glob("features-*.safetensors"))
        if features:
            found[json.loads(done.read_text())["label"]] = load_file(features[0])["features"]
    return found


def anatomy(folder: Path, features: dict[str, torch.Tensor]) -> dict:
    """FID = |mu_s - mu_t|^2 + a covariance term. `mean_share`: the first term's share of FID_t; `spread`: the
    student's feature variance (trace of its covariance) over the teacher's, averaged over styles (< 1: the student
    draws a narrower range of pictures than its teacher)."""
    mean_terms, spreads = 0.0, []
    for style in TEACHERS:
        s, t = features[f"{folder} style {style}"], features[f"teacher {style}"]
        mean_terms += float((s.mean(0) - t.mean(0)).square().sum())
        spreads.append(float(torch.cov(s.T).trace() / torch.cov(t.T).trace()))
    return {"mean_term": mean_terms, "spread": sum(spreads) / len(spreads)}


def adversarial(steps: int) -> dict:
    return {"weight": 0.01, "lr": 1e-4, "start_step": steps // 3}


def synthesized(steps: int, **change) -> dict:
    """Data for the last third of a run: each teacher's own pictures (128 each), after the toy shapes."""
    synthesize = {"images_per_teacher": 128, "steps": 20, "guidance": 4.0, "after_step": steps * 2 // 3, **change}
    return {"folder": "toy:shapes", "synthesize": synthesize}


def measured(settings: list[tuple[str, Path]], work: Path, steps: int, env: dict, eval_name: str
             ) -> tuple[list[dict], float]:
    """Train (or reuse) each setting's run, evaluate them together, and measure each one."""
    folders = [run(work, path, env) for _, path in settings]
    metrics = evaluate(folders, recipe(work, "t1-feature", TEACHERS, steps), work / eval_name, env)
    features = sample_features(Path(env["DMM_HOME"]))
    rows = []
    for (label, _), folder in zip(settings, folders):
        acc = measure(folder, 25, 20, 4.0, 123)["student_style_accuracy"]
        m = metrics[folder.name]
        parts = anatomy(folder, features)
        rows.append({"setting": label, "fid_t": m["fid_t"], "fid_t_over_reference": m["fid_t_over_reference"],
                     "kid_t": m["kid_t"], "mean_share": parts["mean_term"] / m["fid_t"], "spread": parts["spread"],
                     "style_accuracy_held_out": sum(acc.values()) / len(acc), "per_style": acc})
    return rows, metrics["reference"]["fid_t"]


def table1(work: Path, steps: int, env: dict) -> tuple[list[dict], float]:
    return measured([
        ("score only", recipe(work, "t1-score", TEACHERS, steps, {"feature_loss": {"weight": 0.0}})),
        ("+ feature", recipe(work, "t1-feature", TEACHERS, steps)),
        ("+ adversarial", recipe(work, "t1-adversarial", TEACHERS, steps, {"adversarial_loss": adversarial(steps)})),
        ("+ synthesized", recipe(work, "t1-synthesized", TEACHERS, steps, {"adversarial_loss": adversarial(steps)},
                                 synthesized(steps))),
    ], work, steps, env, "eval-table1")


def probes(work: Path, steps: int, env: dict) -> list[dict]:
    """The synthesized stage without the adversarial loss, and with four times the pictures."""
    return measured([  # one change at a time from Table 1's "+ synthesized"
        ("+ synthesized, no adversarial", recipe(work, "p-synth-no-adv", TEACHERS, steps, None, synthesized(steps))),
        ("+ synthesized, 512 pictures per teacher", recipe(work, "p-synth-512", TEACHERS, steps,
                                                           {"adversarial_loss": adversarial(steps)},
                                                           synthesized(steps, images_per_teacher=512))),
    ], work, steps, env, "eval-probes")[0]


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


HEADER = ["| setting | FID_t | FID_t / reference | KID_t | mean share | spread | style accuracy |",
          "|---|---|---|---|---|---|---|"]


def table_row(r: dict) -> str:
    return (f"| {r['setting']} | {r['fid_t']:.2f} | {r['fid_t_over_reference']:.3f} | {r['kid_t']:.4f} | "
            f"{r['mean_share']:.0%} | {r['spread']:.2f} | {r['style_accuracy_held_out']:.1%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--tables", type=int, nargs="+", choices=[1, 2, 3], default=[1, 2, 3],
                   help="1: Table 1; 2: Table 2; 3: the probes")
    p.add_argument("--docs", type=Path, default=ROOT / "docs")
    a = p.parse_args()
    env = study_env(a.work)
    a.docs.mkdir(parents=True, exist_ok=True)
    analysis = kept_section(a.docs / "ablation.md", "\n## Analysis")
    result = {"steps": a.steps}
    lines = ["# Ablations on the toy zoo", "",
             f"`python benchmarks/ablation.py --work DIR` ({a.steps} steps per 4-teacher run, batch 32; FID_t over the "
             "toy zoo's held-out colour/shape pairs, K = 100, in the toy classifier's feature space; style accuracy on "
             "the same held-out pairs). Mean share: the part of FID_t that is the distance between mean features; "
             "spread: the student's feature variance over its teacher's, averaged over styles (1 = as varied).", ""]

    def write() -> None:  # after every stage, so a long run keeps what it has measured
        (a.docs / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
        (a.docs / "ablation.md").write_text("\n".join(lines) + "\n" + analysis)

    if 1 in a.tables:
        rows1, reference = table1(a.work, a.steps, env)
        result.update(table1=rows1, reference_fid_t=reference)
        lines += ["## Table 1 analogue", "", f"Reference FID_t (teacher against teacher, other seeds): {reference:.2f}.",
                  "", *HEADER, *map(table_row, rows1), ""]
        write()
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
        lines.append("")
        write()
    if 3 in a.tables:
        result["probes"] = probes(a.work, a.steps, env)
        lines += ["## Probes: the synthesized stage, one setting changed at a time", "", *HEADER,
                  *map(table_row, result["probes"]), ""]
        write()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
