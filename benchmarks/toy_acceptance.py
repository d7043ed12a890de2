"""Acceptance figures of a distilled toy student, on prompts held out of its training captions.

Prints JSON: per-style accuracy of the toy style classifier (student style i → teacher i's style),
the same for the base model (which should not look like any teacher), and the classifier's
probability of style A along a mix A:w,B:1-w for w = 1 … 0.

  python benchmarks/toy_acceptance.py runs/toy_styles --per-prompt 25
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dmm_cli import toy  # noqa: E402
from dmm_cli.console import quiet_loading, set_debug  # noqa: E402
from dmm_cli.console import set_quiet  # noqa: E402
from dmm_cli.generate.sampling import generate  # noqa: E402
from dmm_cli.models import references  # noqa: E402
from dmm_cli.models.pipeline import load_pipeline  # noqa: E402
from dmm_cli.models.styles import StyleTable, mix, one_hot  # noqa: E402
from dmm_cli.toy import shapes  # noqa: E402
from dmm_cli.toy.classifier import StyleClassifier, predict, to_pixels  # noqa: E402


def measure(student: Path, per_prompt: int, steps: int, guidance: float, seed: int) -> dict:
    set_debug(False)
    quiet_loading()
    set_quiet(True)
    cpu = torch.device("cpu")
    clf = StyleClassifier.load(toy.classifier_folder())
    prompts = [shapes.caption(c, s) for c, s in shapes.HELD_OUT for _ in range(per_prompt)]
    table = StyleTable.read(student)
    names = table.names
    base = table.lineage[0]["base"]  # the base the student was distilled from
    pipe = load_pipeline(student, cpu, torch.float32, attention="sdpa")

    def probabilities(p, style):
        images = generate(p, prompts, steps=steps, guidance=guidance, seed=seed, style=style, batch_size=100)
        return predict(clf, to_pixels(images))

    per_style = {}
    for i, name in enumerate(names):
        probs = probabilities(pipe, one_hot(i, len(names)))
        per_style[name] = float((probs.argmax(-1) == clf.styles.index(name)).float().mean())
    base_probs = probabilities(load_pipeline(references.resolve(base), cpu, torch.float32, attention="sdpa"), None)
    base_as = {name: float((base_probs.argmax(-1) == clf.styles.index(name)).float().mean()) for name in names}
    a, b = names[0], names[-1]
    curve = []
    for w in (1.0, 0.75, 0.5, 0.25, 0.0):
        probs = probabilities(pipe, mix({0: w, len(names) - 1: 1 - w}, len(names)))
        curve.append({"weight_a": w, "p_a": float(probs[:, clf.styles.index(a)].mean())})
    return {
        "held_out_prompts": sorted(set(prompts)), "images_per_style": len(prompts),
        "student_style_accuracy": per_style,
        "student_mean_style_accuracy": sum(per_style.values()) / len(per_style),
        "base_classified_as_teacher": base_as,
        "base_mean_as_teacher": sum(base_as.values()) / len(base_as),
        "mix": {"a": a, "b": b, "curve": curve,
                "monotonic": all(x["p_a"] > y["p_a"] for x, y in zip(curve, curve[1:]))},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("student", type=Path)
    p.add_argument("--per-prompt", type=int, default=25)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=123)
    a = p.parse_args()
    print(json.dumps(measure(a.student, a.per_prompt, a.steps, a.guidance, a.seed), indent=1))


if __name__ == "__main__":
    main()
