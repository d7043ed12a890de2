#!/usr/bin/env bash
# Every GPU measurement in one go (device time is scarce): throughput vs the released step, generation
# parity, 8 teachers with offload, torch.compile, the SD1.5-scale CLI run, then real-size SDXL steps.
# Results land in $OUT (or ./gpu-out): one JSON-lines file per step, stderr of all steps in errors.log.
# Usage: benchmarks/gpu_run.sh [path/to/official_step.py]
#        ONLY="merge_bench sdxl_step" benchmarks/gpu_run.sh   # just these steps
set -u
out=${OUT:-gpu-out}
mkdir -p "$out"
official=${1:-../shared/bench/official_step.py}
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # packages the GPU image lacks, carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || exit 1
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
step() {
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "== $name" | tee -a "$out/errors.log"
  timeout "$limit" "$@" 2>>"$out/errors.log" | tee "$out/$name.jsonl"
  echo "rc=${PIPESTATUS[0]}" | tee -a "$out/errors.log"
}
step distill_b16_b32 120 python3 benchmarks/distill_throughput.py --batch 16 32 --teachers 4 --compile off \
  --official-step "$official"
step generate 60 python3 benchmarks/generate_throughput.py
step distill_8teachers_offload 80 python3 benchmarks/distill_throughput.py --batch 16 --teachers 8 --compile off \
  --offload --no-official
step distill_compile 120 python3 benchmarks/distill_throughput.py --batch 16 --teachers 4 --compile on \
  --no-official
step sd15_cli 90 python3 benchmarks/sd15_distill_smoke.py --work /tmp/sd15 --teachers 4 --steps 20 --compile false
step sdxl_step 300 python3 benchmarks/sdxl_memory.py --measure --teachers 2 --batch 1 4
step sdxl_step_offload 200 python3 benchmarks/sdxl_memory.py --measure --teachers 4 --batch 4 --offload
# The weight-space merges (dmm alone: sd-mecha is not in the GPU image) on this machine's cores and on its GPU.
step merge_bench 300 python3 benchmarks/merge_bench.py --work /tmp/merge-bench --devices cpu cuda
