#!/usr/bin/env bash
# Readies .gpu/ for benchmarks/gpu_run.sh on a bare GPU machine, where neither PyPI nor ../shared can be reached:
# wheels of the packages its image lacks (diffusers, pydantic and what pydantic needs) at the versions installed in
# this checkout's .venv, built for that machine's Python 3.12 on x86-64, and a copy of the released step's timing
# script (../shared/bench/official_step.py). Carry .gpu along with the working tree.
# It first runs every benchmark's CPU smoke test (tests/test_benchmarks.py, slow ones included), so that a broken
# script is found here rather than on a scarce GPU turn; SKIP_TESTS=1 skips them.
# Usage: benchmarks/gpu_prepare.sh          (PYTHON=path/to/python picks the installation to match)
set -eu
py=${PYTHON:-.venv/bin/python}
if [ -z "${SKIP_TESTS:-}" ]; then
  "$py" -m pytest -q -m "slow or not slow" tests/test_benchmarks.py \
    || { echo "gpu_prepare: a benchmark fails on CPU; see above" >&2; exit 1; }
fi
rm -rf .gpu && mkdir -p .gpu/wheels
for name in diffusers pydantic pydantic-core annotated-types typing-inspection importlib-metadata typing-extensions; do
  version=$("$py" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "gpu_prepare: $name is not installed in $py; run make install first" >&2; exit 1; }
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels "$name==$version" 2> >(grep -v "is ignored: it is neither" >&2)
done
cp ../shared/bench/official_step.py .gpu/
du -sh .gpu
