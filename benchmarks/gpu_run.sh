#!/usr/bin/env bash
# Every GPU measurement of the distillation step in one go, sized for a short turn on a bare H100 or H200 (<= 8 min,
# installs and compiles included): the released step against dmm's at 1, 4 and 8 teachers (b16, b32), compile
# off and on (cold, then warm from the same $DMM_HOME), generation parity, the CLI's peak memory against the
# dry run's plan (run twice into one work folder, then as a LoRA student), and the SDXL step with and without
# checkpointing (a configuration that does not fit the card is measured at half its batch).
# Each step has its own time limit and the script goes on past a failure; a compile stage past its --compile-budget
# times the step eagerly (its row says compiled: false) rather than leave no row. Results land in $OUT (or ./gpu-out) as
# three files, refreshed after every step so that a run cut short still leaves them: steps.tgz (one JSON-lines file
# per step, the GPU's name, the commit), errors.log (every step's stderr) and summary.json
# (benchmarks/gpu_summary.py over the steps so far). The device tool brings back at most 8 files.
# On a bare machine, run benchmarks/gpu_prepare.sh here first and carry .gpu/: the wheels the image lacks and the
# released step's script.
# Usage: benchmarks/gpu_run.sh [path/to/official_step.py]
#        ONLY="compile_cold compile_warm" benchmarks/gpu_run.sh   # just these steps
#        ONLY=merge_bench benchmarks/gpu_run.sh                   # the weight-space merges (not in the default set)
#        ONLY=scale benchmarks/gpu_run.sh     # 1, 2, 4 processes x placement x sharding, on as many GPUs as there
#                                             # are (not in the default set: one GPU gives only the 1-process row)
set -u
out=${OUT:-gpu-out}
mkdir -p "$out"
official=${1:-../shared/bench/official_step.py}
[ $# -eq 0 ] && [ -f .gpu/official_step.py ] && official=.gpu/official_step.py  # carried by gpu_prepare.sh
work=${WORK:-/tmp/dmm-gpu}
export PYTHONUNBUFFERED=1 DMM_HOME=$work/home  # one compile cache for the cold and the warm run
if [ -d .gpu/wheels ]; then  # packages the GPU image lacks (benchmarks/gpu_prepare.sh)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || exit 1
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
steps=$work/steps  # this run's step outputs only; an earlier run's are dropped
rm -rf "$steps" && mkdir -p "$steps" && : > "$out/errors.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$steps/gpu.txt"
git rev-parse --short HEAD > "$steps/commit.txt" 2>/dev/null
pack() {
  tar -czf "$out/steps.tgz.part" -C "$work" steps && mv "$out/steps.tgz.part" "$out/steps.tgz"
  python3 benchmarks/gpu_summary.py "$steps" > "$out/summary.json.part" \
    && mv "$out/summary.json.part" "$out/summary.json" || rm -f "$out/summary.json.part"
}
step() {
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  if [ -z "${ONLY:-}" ] && { [ "$name" = merge_bench ] || [ "$name" = scale ]; }; then return; fi
  echo "== $name" | tee -a "$out/errors.log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>>"$out/errors.log" | tee "$steps/$name.jsonl"
  echo "rc=${PIPESTATUS[0]} seconds=$((SECONDS - t0))" | tee -a "$out/errors.log"
  pack
}
step distill_eager 95 python3 benchmarks/distill_throughput.py --batch 16 32 --teachers 1 4 8 --compile off \
  --steps 5 --warmup 2 --official-step "$official"
step compile_cold 95 python3 benchmarks/distill_throughput.py --batch 16 --teachers 4 --compile on --steps 5 \
  --warmup 2 --no-official --compile-budget 65
step compile_warm 30 python3 benchmarks/distill_throughput.py --batch 16 --teachers 4 --compile on --steps 5 \
  --warmup 2 --no-official --compile-budget 18
step compile_teachers 60 python3 benchmarks/distill_throughput.py --batch 16 --teachers 1 8 --compile on \
  --steps 5 --warmup 2 --no-official --compile-budget 20
step generate 35 python3 benchmarks/generate_throughput.py --repeats 3
step sd15_cli 40 python3 benchmarks/sd15_distill_smoke.py --work "$work/sd15" --teachers 2 --steps 10
step sd15_cli_again 30 python3 benchmarks/sd15_distill_smoke.py --work "$work/sd15" --teachers 2 --steps 10
step sd15_lora_cli 30 python3 benchmarks/sd15_distill_smoke.py --work "$work/sd15" --teachers 2 --steps 10 \
  --student lora
step sdxl_step 60 python3 benchmarks/sdxl_memory.py --measure --teachers 2 --batch 4 --checkpointing on off --steps 2
step scale 500 python3 benchmarks/scale.py --work "$work/scale" --processes 1 2 4 --teachers 4 --steps 20 --timeout 150
step merge_bench 300 python3 benchmarks/merge_bench.py --work "$work/merge-bench" --devices cpu cuda
pack && cat "$out/summary.json"
