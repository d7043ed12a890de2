"""Weight-space merge benchmark: `dmm baseline-merge` against sd-mecha on the same SD1.5-sized weights.

Builds a base and 4 teachers with SD1.5's real shapes and random fp16 weights (a shared VAE, own
UNets and text encoders), as diffusers folders for dmm and, when sd-mecha runs too, as single-file
checkpoints (the format sd-mecha reads) holding the same tensors. Then, one after another on a warm
page cache, it times: reading every input once, then for each method (average, task arithmetic, TIES,
DARE) `dmm baseline-merge` on each of --devices and sd-mecha's nearest recipe. Wall time and the peak
RSS of each run (from wait4) go to stdout as JSON.

  python benchmarks/merge_bench.py --work /tmp/merge-bench --mecha-python /tmp/mecha/bin/python --repeats 2
  python benchmarks/merge_bench.py --work /tmp/merge-bench --devices cpu cuda   # dmm alone, on a GPU machine

sd-mecha must live in its own environment (it is not a dmm dependency):
  python -m venv /tmp/mecha && /tmp/mecha/bin/pip install torch==2.13.0 sd-mecha
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# sd-mecha's nearest recipes. Its TIES and DARE wrappers compare merge spaces that are not resolved yet and
# crash (sd-mecha 1.1.8), so the recipes are built from the merge methods underneath them. Its dropout
# ("n-supermario") normalises by the number of kept entries where DARE divides by the density: the same
# work per tensor, another formula.
MECHA_SCRIPT = r"""
import sys, sd_mecha
from sd_mecha.extensions.builtin.merge_methods import linear, ties
method, out, base, *teachers = sys.argv[1:]
models = [sd_mecha.model(t) for t in teachers]
base = sd_mecha.model(base)
deltas = [linear.subtract(m, base) for m in models]
if method == "average":
    recipe = sd_mecha.n_average(*models)
elif method == "task-arithmetic":
    recipe = linear.add_difference(base, sd_mecha.n_average(*deltas), alpha=1.0)
elif method == "ties":
    recipe = linear.add_difference(base, ties.ties_sum(*deltas, k=0.2), alpha=1.0)
else:
    recipe = linear.add_difference(base, ties.dropout(*deltas, probability=0.8, seed=0), alpha=1.0)
sd_mecha.merge(recipe, output=out, threads=2)
"""
METHODS = ("average", "task-arithmetic", "ties", "dare")


def build_inputs(work: Path, teachers: int, single_files: bool) -> None:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dmm_cli.models.single_file import CONFIGS, export_single_file

    sd = CONFIGS / "sd15"
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(sd / "vae")).to(torch.float16)
    for i in range(teachers + 1):
        name = "base" if i == 0 else f"teacher{i}"
        folder, single = work / name, work / f"{name}.safetensors"
        if not (folder / "model_index.json").is_file():
            torch.manual_seed(100 + i)
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(sd / "text_encoder")).half(),
                tokenizer=CLIPTokenizer.from_pretrained(sd / "tokenizer"),
                unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sd / "unet")).half(),
                scheduler=PNDMScheduler.from_pretrained(sd / "scheduler"), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
            pipe.save_pretrained(folder, safe_serialization=True)
            del pipe
        if single_files and not single.is_file():
            export_single_file(folder, single)


def measured(cmd: list[str], label: str) -> dict:
    """Run `cmd`, returning wall seconds and the child's peak RSS (wait4), or its error."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    row = {"run": label, "wall_s": round(time.perf_counter() - start, 2), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3)}
    if os.waitstatus_to_exitcode(status) != 0:
        row["error"] = err.decode(errors="replace").strip().splitlines()[-1:]
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--teachers", type=int, default=4)
    p.add_argument("--mecha-python", help="python of an environment with sd-mecha installed")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--devices", nargs="+", default=["cpu"], choices=["cpu", "cuda"], help="where dmm computes")
    p.add_argument("--repeats", type=int, default=1, help="runs of each tool and method; the fastest is kept")
    p.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.build_only:
        build_inputs(a.work, a.teachers, single_files=a.mecha_python is not None)
        return
    # Built in a child, so this process stays small: a child's peak RSS counts what it inherits at fork.
    subprocess.run([sys.executable, __file__, "--work", str(a.work), "--teachers", str(a.teachers), "--build-only",
                    *(["--mecha-python", a.mecha_python] if a.mecha_python else [])], check=True)
    folders = [a.work / "base", *(a.work / f"teacher{i}" for i in range(1, a.teachers + 1))]
    files = [f.with_suffix(".safetensors") for f in folders]
    inputs = [f for folder in folders for f in folder.rglob("*.safetensors")]
    reader = [sys.executable, "-c", "import sys\nfor f in sys.argv[1:]:\n with open(f,'rb') as h:\n"
              "  while h.read(1<<23): pass"]
    measured(reader + [str(f) for f in inputs], "read dmm inputs once (warm-up)")
    rows = [measured(reader + [str(f) for f in inputs], "read dmm inputs once")]
    if a.mecha_python:
        rows.append(measured(reader + [str(f) for f in files], "read single files once"))
    dmm = [sys.executable, "-m", "dmm_cli", "-q", "baseline-merge"]
    teachers = [str(f) for f in folders[1:]]
    # Both input sets do not fit in the page cache together: each tool's own inputs are read just before its run.
    # Each pair runs --repeats times, one tool after the other; the summary keeps each run's fastest.
    for method in a.methods:
        for _ in range(a.repeats):
            for device in a.devices:
                measured(reader + [str(f) for f in inputs], "warm dmm inputs")
                label = f"dmm {method}" + ("" if device == "cpu" else f" ({device})")
                rows.append(measured(dmm + ["--method", method, "--base", str(folders[0]), *teachers, "--device",
                                            device, "--overwrite", "-o", str(a.work / f"dmm-{method}")], label))
            if a.mecha_python:
                measured(reader + [str(f) for f in files], "warm single files")
                rows.append(measured([a.mecha_python, "-c", MECHA_SCRIPT, method,
                                      str(a.work / f"mecha-{method}.safetensors"), str(files[0]),
                                      *[str(f) for f in files[1:]]], f"sd-mecha {method}"))
    fastest = {}
    for row in rows:
        if row["run"] not in fastest or row["wall_s"] < fastest[row["run"]]["wall_s"]:
            fastest[row["run"]] = row
    rows = list(fastest.values())
    print(json.dumps({"summary": rows, "input_gb": round(sum(f.stat().st_size for f in inputs) / 1e9, 2),
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
