"""How the toy student's faithfulness moves with the training recipe; writes docs/faithfulness.md and .json.

Every row is the demo recipe (4 teachers, batch 32, lr 5e-4, feature loss 0.001) with one or two settings
changed, trained through the real CLI and measured as the ablations are: FID_t over the toy zoo's held-out
colour/shape pairs (K = 100, toy classifier features) and held-out style accuracy. The noise of the measure
comes from two rows: the reference at a second eval seed, and the demo recipe at a second training seed.

  python benchmarks/convergence.py --work /tmp/convergence                 # every row, a few hours on 2 cores
  python benchmarks/convergence.py --work /tmp/convergence --only base-1k2 ema-cosine-1k2

Rows already trained in --work are reused, and the results are written after every row.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from ablation import (TEACHERS, SAMPLE, anatomy, dmm, kept_section, recipe, run, sample_features,  # noqa: E402
                      study_env)
from toy_acceptance import measure  # noqa: E402

FEATURE = {"weight": 0.001, "reduce": "mean", "type": "l2"}
LOGIT_NORMAL = {"sampling": "logit_normal", "mean": 0.0, "std": 1.0}


def ema(steps: int) -> dict:  # an average over the last ~steps/6, starting once the warm-up's weights are gone
    return {"ema": {"decay": 1 - 6 / steps, "start_step": steps // 6}}


# key: (what changed, steps, train settings); in the order they run, most telling first.
ROWS = {
    "base-1k2": ("demo recipe: constant LR, no EMA", 1200, {}),
    "ema-cosine-1k2": ("+ EMA + cosine LR", 1200, {**ema(1200), "lr_schedule": "cosine"}),
    "ema-cosine-5k": ("+ EMA + cosine LR, 5k steps", 5000, {**ema(5000), "lr_schedule": "cosine"}),
    "base-5k": ("demo recipe, 5k steps", 5000, {}),
    "seed1-1k2": ("demo recipe, training seed 1", 1200, {"seed": 1}),
    "ema-1k2": ("+ EMA", 1200, ema(1200)),
    "cosine-1k2": ("+ cosine LR", 1200, {"lr_schedule": "cosine"}),
    "logit-normal-1k2": ("+ logit-normal timesteps (middle-weighted)", 1200,
                         {"timesteps": LOGIT_NORMAL}),
    "feature-0.01-1k2": ("feature loss 0.01 (10×)", 1200, {"feature_loss": {**FEATURE, "weight": 0.01}}),
    "batch64-1k2": ("batch 64", 1200, {"batch_size": 64}),
    "feature-0-1k2": ("feature loss 0 (score only)", 1200, {"feature_loss": {**FEATURE, "weight": 0.0}}),
    "logit-normal-seed1-1k2": ("+ logit-normal timesteps, training seed 1", 1200,
                               {"timesteps": LOGIT_NORMAL, "seed": 1}),
    "logit-normal-ema-cosine-5k": ("+ logit-normal timesteps + EMA + cosine LR, 5k steps", 5000,
                                   {**ema(5000), "lr_schedule": "cosine", "timesteps": LOGIT_NORMAL}),
    "ema-cosine-5k-seed1": ("+ EMA + cosine LR, 5k steps, training seed 1", 5000,
                            {**ema(5000), "lr_schedule": "cosine", "seed": 1}),
    "ema-cosine-10k": ("+ EMA + cosine LR, 10k steps", 10000, {**ema(10000), "lr_schedule": "cosine"}),
    "ema-cosine-10k-seed1": ("+ EMA + cosine LR, 10k steps, training seed 1", 10000,
                             {**ema(10000), "lr_schedule": "cosine", "seed": 1}),
}
SECOND_EVAL_SEED = ("base-1k2", "ema-cosine-5k", "ema-cosine-10k")


def evaluate(folder: Path, teachers_recipe: Path, out: Path, seed: int, env: dict) -> dict:
    dmm("eval", folder, "--recipe", teachers_recipe, "-k", "100", "--batch-size", "100", "--seed", seed, *SAMPLE,
        "-o", out, env=env)
    models = json.loads((out / "metrics.json").read_text())["models"]
    return {Path(m["name"]).name: m for m in models}


def measure_row(work: Path, key: str, env: dict, eval_seed: int = 0, rows: dict = ROWS) -> dict:
    """Train (or reuse) row `key` of `rows` and measure it."""
    label, steps, train = rows[key]
    folder = run(work, recipe(work, key, TEACHERS, steps, train), env)
    metrics = evaluate(folder, recipe(work, "teachers", TEACHERS, steps), work / f"eval-{key}-{eval_seed}",
                       eval_seed, env)
    m = metrics[folder.name]
    parts = anatomy(folder, sample_features(Path(env["DMM_HOME"])))
    acc = measure(folder, 25, 20, 4.0, 123)["student_style_accuracy"]
    return {"key": key, "setting": label, "steps": steps, "train": train, "seed": train.get("seed", 0),
            "eval_seed": eval_seed, "fid_t": m["fid_t"], "reference_fid_t": metrics["reference"]["fid_t"],
            "fid_t_over_reference": m["fid_t_over_reference"], "mean_share": parts["mean_term"] / m["fid_t"],
            "spread": parts["spread"], "style_accuracy_held_out": sum(acc.values()) / len(acc), "per_style": acc}


def markdown(rows: list[dict]) -> str:
    lines = ["# Faithfulness: the training recipe against FID_t", "",
             "`python benchmarks/convergence.py --work DIR`: the demo recipe (4 teachers, batch 32, lr 5e-4 with 50 "
             "warm-up steps, feature loss 0.001, training seed 0) with the named settings changed. FID_t over the "
             "toy zoo's held-out colour/shape pairs, K = 100, in the toy classifier's feature space, eval seed as "
             "stated; style accuracy on the same held-out pairs (25 pictures each). EMA: decay 1 − 6/steps from "
             "step steps/6. Mean share and spread as in [ablation.md](ablation.md).", "",
             "| setting | steps | train seed | eval seed | FID_t | reference | FID_t / reference | mean share | spread "
             "| style accuracy |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['steps']} | {r['seed']} | {r['eval_seed']} | {r['fid_t']:.2f} | "
                     f"{r['reference_fid_t']:.2f} | {r['fid_t_over_reference']:.2f} | {r['mean_share']:.0%} | "
                     f"{r['spread']:.2f} | {r['style_accuracy_held_out']:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--only", nargs="+", choices=list(ROWS), help="Rows to run (default: all, in order).")
    p.add_argument("--docs", type=Path, default=ROOT / "docs")
    a = p.parse_args()
    env = study_env(a.work)
    results = a.docs / "faithfulness.json"
    done = {(r["key"], r["eval_seed"]): r for r in json.loads(results.read_text())} if results.is_file() else {}
    todo = []
    for key in a.only or ROWS:  # the reference's and the students' noise: two rows at a second eval seed
        todo += [(key, 0), (key, 1)] if key in SECOND_EVAL_SEED else [(key, 0)]
    for key, seed in todo:
        if (key, seed) in done:
            continue
        print(f"convergence: {key}, eval seed {seed}", file=sys.stderr, flush=True)
        done[(key, seed)] = measure_row(a.work, key, env, seed)
        rows = [done[k] for k in sorted(done, key=lambda k: (list(ROWS).index(k[0]), k[1]))]
        results.write_text(json.dumps(rows, indent=2) + "\n")
        doc = a.docs / "faithfulness.md"
        doc.write_text(markdown(rows) + kept_section(doc, "\n## What it shows"))


if __name__ == "__main__":
    main()
