#!/usr/bin/env bash
# The main job on the embedded toy zoo: distill four style teachers into one student, draw every style,
# build the weight-space baselines, and evaluate all three against the reference. Prints what it wrote.
set -euo pipefail
out=${DEMO_OUT:-demo-out}
mkdir -p "$out"
export DMM_HOME=${DMM_HOME:-$out/.dmm-home}
sample=(--steps 20 --guidance 4)

# The teachers themselves, side by side.
pictures=() labels=()
for name in $(dmm toy list --family sd); do
  pictures+=("$(dmm -q generate "a blue triangle" --model "$name" "${sample[@]}" --seed 7 --overwrite -o "$out/${name#toy:}.png")")
  labels+=("${name#toy:}")
done
dmm grid "${pictures[@]}" --labels "$(IFS=,; echo "${labels[*]}")" --overwrite -o "$out/teachers.png"

# One student for all four styles (resumes if a previous demo was interrupted).
run="$out/toy_styles"
resume=(); [ -d "$run/checkpoints" ] && resume=(--resume)
[ -f "$run/model_index.json" ] || dmm distill recipes/toy_styles.yaml -o "$run" "${resume[@]}"
dmm -q generate --model "$run" --style all "a blue triangle" "${sample[@]}" --seed 7 --overwrite -o "$out/student" | tail -n 1
dmm -q generate --model "$run" --style night:0.5,checker:0.5 "a yellow square" "${sample[@]}" --overwrite -o "$out/mix.png"

# Every style baked into a plain checkpoint, drawn by stock diffusers: no dmm code on that side.
dmm -q export "$run" --style all -o "$out/baked" --overwrite > /dev/null
styles=(night outline stripes checker)
baked=(); for style in "${styles[@]}"; do baked+=("$out/baked-$style.png"); done
DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error python -W ignore::FutureWarning - "$out" "${styles[@]}" <<'PY'
import sys, torch, diffusers, transformers
from diffusers import StableDiffusionPipeline
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()
out = sys.argv[1]
for style in sys.argv[2:]:
    pipe = StableDiffusionPipeline.from_pretrained(f"{out}/baked/{style}", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe("a blue triangle", num_inference_steps=20, guidance_scale=4,
         generator=torch.Generator().manual_seed(7)).images[0].save(f"{out}/baked-{style}.png")
PY
dmm grid "${baked[@]}" --labels "$(IFS=,; echo "${styles[*]}")" --overwrite -o "$out/baked.png" > /dev/null

# The weight-space baselines, and the evaluation of all three against the reference.
for method in average ties; do
  dmm -q baseline-merge --method "$method" --recipe recipes/toy_styles.yaml -o "$out/$method" --overwrite
done
dmm eval "$run" "$out/ties" "$out/average" --recipe recipes/toy_styles.yaml -k 100 "${sample[@]}" \
  --batch-size 100 -o "$out/eval"
