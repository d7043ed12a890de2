#!/usr/bin/env bash
# The main job on the embedded toy zoo. Prints the paths of what it made; logs go to stderr.
set -euo pipefail
out=${DEMO_OUT:-demo-out}
mkdir -p "$out"

prompt="a blue triangle"
pictures=()
labels=()
for name in $(dmm toy list); do
  pictures+=("$(dmm generate "$prompt" --model "$name" --steps 20 --guidance 4 --seed 7 -o "$out/${name#toy:}.png")")
  labels+=("${name#toy:}")
done
dmm grid "${pictures[@]}" --labels "$(IFS=,; echo "${labels[*]}")" -o "$out/teachers.png"
