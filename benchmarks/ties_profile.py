"""Where TIES spends its time against `average`, on one SD1.5-sized tensor (no disk, no I/O).

Times `dmm_cli.merge`'s own functions on random fp16 teachers around an fp16 base (best of --repeats):
the whole `ties` and `average` calls, then each stage of TIES for one teacher (the fp16 → fp32 task vector,
its magnitude, the k-th largest magnitude, the trim) and the disjoint mean over all teachers. Prints JSON.

  python benchmarks/ties_profile.py                      # 1280×1280×3×3, the largest SD1.5 UNet convs
  python benchmarks/ties_profile.py --numel 100000       # a quick look
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dmm_cli.merge.linear import average  # noqa: E402
from dmm_cli.merge.registry import MergeParams  # noqa: E402
from dmm_cli.merge.ties import disjoint_mean, kth_largest, ties, trim_  # noqa: E402


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(min(times), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=1280 * 1280 * 9)
    parser.add_argument("--teachers", type=int, default=4)
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()

    torch.manual_seed(0)
    base = torch.randn(a.numel).half()
    teachers = [(base.float() + 0.01 * torch.randn(a.numel)).half() for _ in range(a.teachers)]
    params = MergeParams((1.0,) * a.teachers, a.density, 1.0)
    base32 = base.float()
    delta = teachers[0].float() - base32
    magnitude = delta.abs()
    k = max(1, int(a.density * a.numel))
    below = float(kth_largest(magnitude, k))
    stack = torch.stack([t.float() - base32 for t in teachers])
    stages = {
        "task_vector_fp16_to_fp32": best(lambda: torch.sub(teachers[0], base32), a.repeats),
        "magnitude": best(lambda: delta.abs(), a.repeats),
        "kth_largest": best(lambda: kth_largest(magnitude, k), a.repeats),
        "trim": best(lambda: trim_(delta.clone(), below, magnitude.clone()), a.repeats),
        "copy_for_trim": best(lambda: (delta.clone(), magnitude.clone()), a.repeats),
        "disjoint_mean_all_teachers": best(lambda: disjoint_mean(stack.clone(), params.weights), a.repeats),
        "copy_for_disjoint_mean": best(lambda: stack.clone(), a.repeats),
    }
    whole = {"average": best(lambda: average(None, teachers, params, "t"), a.repeats),
             "ties": best(lambda: ties(base32, teachers, params, "t"), a.repeats)}
    print(json.dumps({"numel": a.numel, "teachers": a.teachers, "threads": torch.get_num_threads(),
                      "seconds": whole, "ties_over_average": round(whole["ties"] / whole["average"], 2),
                      "ties_stage_seconds": stages}, indent=2))


if __name__ == "__main__":
    main()
