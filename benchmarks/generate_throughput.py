"""Generation parity: `dmm generate`'s code path (a student, one style) against plain diffusers.

Same SD1.5-shaped random weights, fp16, 25 steps, 512², batch 4, CFG 7, interleaved runs; prints
images/s for each and the ratio of median times.

  python benchmarks/generate_throughput.py          # on a GPU
  python benchmarks/generate_throughput.py --tiny   # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sd15  # noqa: E402
from dmm_cli.console import quiet_loading, set_debug  # noqa: E402
from dmm_cli.generate.sampling import generate  # noqa: E402
from dmm_cli.models.pipeline import make_scheduler  # noqa: E402
from dmm_cli.models.student import make_student  # noqa: E402
from dmm_cli.models.styles import one_hot  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json-out", type=Path)
    a = p.parse_args()
    set_debug(False)
    quiet_loading()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    steps, batch, repeats = (3, 2, 2) if a.tiny else (25, 4, a.repeats)
    plain_unet = sd15.unet(a.tiny, dtype, device)
    student = make_student(plain_unet, 8)
    torch.nn.init.normal_(student.class_embedding.linear_2.weight, std=0.02)  # a trained student's MLP is not zero
    pipes = {"diffusers": sd15.pipeline(plain_unet, a.tiny, dtype, device),
             "dmm": sd15.pipeline(student.to(device, dtype), a.tiny, dtype, device)}
    for pipe in pipes.values():
        pipe.scheduler = make_scheduler("dpm++", pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of a cat on a red sofa"] * batch
    size = 64 if a.tiny else 512
    style = one_hot(3, 8)

    def run(name: str) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if name == "diffusers":
            with torch.inference_mode():
                pipes[name](prompt=prompts, num_inference_steps=steps, guidance_scale=7.0, width=size, height=size,
                            generator=torch.Generator("cpu").manual_seed(0))
        else:
            generate(pipes[name], prompts, steps=steps, guidance=7.0, seed=0, width=size, height=size, style=style,
                     batch_size=batch)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for name in pipes:
        run(name)
    times = {name: [] for name in pipes}
    for _ in range(repeats):
        for name in pipes:
            times[name].append(run(name))
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    result = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", tiny=a.tiny, batch=batch,
                  steps=steps, size=size, images_per_s={k: round(batch / v, 3) for k, v in median.items()},
                  dmm_over_diffusers_time=round(median["dmm"] / median["diffusers"], 4))
    print(json.dumps(result), flush=True)
    if a.json_out:
        a.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
