"""Where TIES spends its time against `average`, on one SD1.5-sized tensor (no disk, no I/O).

Times `dmm_cli.merge`'s own functions on random fp16 teachers around an fp32 base (best of --repeats, after
one untimed call that compiles): the whole `ties` and `average` calls, then each stage of TIES: sampling the
brackets, the compiled merge-and-mark pass, finding the marked entries, and merging them again. Prints JSON.
glibc is set to keep freed memory, as `dmm baseline-merge` does.

  python benchmarks/ties_profile.py                      # 1280×1280×3×3, the largest SD1.5 UNet convs
  python benchmarks/ties_profile.py --numel 300000       # a quick look
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dmm_cli.merge import fused  # noqa: E402
from dmm_cli.merge.linear import average  # noqa: E402
from dmm_cli.merge.registry import MergeParams  # noqa: E402
from dmm_cli.merge.stream import keep_freed_memory  # noqa: E402
from dmm_cli.merge.ties import _brackets, _merge_and_mark, ties, trimmed_merge  # noqa: E402


def best(fn, repeats: int) -> float:
    fn()
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
    if a.numel < fused.COMPILE_FROM:
        parser.error(f"--numel must be at least {fused.COMPILE_FROM}, where TIES takes its compiled path")

    keep_freed_memory()
    torch.manual_seed(0)
    base = torch.randn(a.numel).half().float()
    teachers = [(base + 0.01 * torch.randn(a.numel)).half() for _ in range(a.teachers)]
    params = MergeParams((1.0,) * a.teachers, a.density, 1.0)
    weights = torch.tensor(params.weights)
    k = math.ceil(a.density * a.numel)
    lows, highs = _brackets(base, teachers, k)
    _, marked, _ = fused.run(_merge_and_mark, a.numel, base, teachers, lows, highs, weights, 1.0)
    where = marked.nonzero().squeeze(1)
    gathered = base[where], [t[where] for t in teachers]
    stages = {
        "brackets_from_samples": best(lambda: _brackets(base, teachers, k), a.repeats),
        "merge_and_mark": best(lambda: fused.run(_merge_and_mark, a.numel, base, teachers, lows, highs, weights, 1.0),
                               a.repeats),
        "find_marked": best(lambda: marked.nonzero(), a.repeats),
        "gather_marked": best(lambda: (base[where], [t[where] for t in teachers]), a.repeats),
        "merge_marked_again": best(lambda: fused.run(trimmed_merge, where.numel(), *gathered, lows, weights, 1.0),
                                   a.repeats),
    }
    whole = {"average": best(lambda: average(None, teachers, params, "t"), a.repeats),
             "ties": best(lambda: ties(base, teachers, params, "t"), a.repeats)}
    print(json.dumps({"numel": a.numel, "teachers": a.teachers, "threads": torch.get_num_threads(),
                      "marked_fraction": round(where.numel() / a.numel, 4),
                      "seconds": whole, "ties_over_average": round(whole["ties"] / whole["average"], 2),
                      "ties_stage_seconds": stages}, indent=2))


if __name__ == "__main__":
    main()
