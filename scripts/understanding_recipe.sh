#!/usr/bin/env bash
# The tiny full video-LLM of issue #6 (CCAM + TC-LLaVA, a frozen digit ViT on its own CCAM beside it), every
# stage from nothing, then scored on the held-out built-in temporal QA at 8 and 32 frames:
#   text (6 CPU-min) → align (8) → instruct (15) → instruct again (15, a warm restart: stop 12's 4,000 steps)
#   → digit ViT stage 0 (10) → side-align (4) → side-instruct (15)      at most 73 CPU-minutes in all
# Each stage is `timeloom fit` on its shipped config (configs/understanding/, headers say what each measured),
# capped by CPU time, and skipped when its checkpoint exists, so an interrupted recipe resumes where it stopped.
# Results: benchmarks/understanding-quality.md (stop 15, run W: direction 100, order 98.9, reversed 99.1 %).
#   scripts/understanding_recipe.sh [ROOT]        (ROOT: runs/understanding-recipe)
#   PREFIX="env CPULANE=A /tmp/cpuslot" scripts/understanding_recipe.sh   # each stage behind a launcher
#   DRY=1 scripts/understanding_recipe.sh         # print the commands only
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/understanding-recipe}
PY=${PYTHON:-.venv/bin/python}
C=configs/understanding
last() { echo "$ROOT/$1/checkpoints/last.ckpt"; }

stage() {  # stage NAME CONFIG ARGS...: fit CONFIG into ROOT/NAME unless its checkpoint exists
  local name=$1 config=$2
  shift 2
  local command=(${PREFIX:-} "$PY" -m timeloom.cli fit -c "$config" -c configs/logger/csv.yaml
    --trainer.default_root_dir "$ROOT/$name" --checkpoint.dirpath "$ROOT/$name/checkpoints" "$@")
  if [ -n "${DRY:-}" ]; then echo "${command[*]}"; return; fi
  if [ -e "$(last "$name")" ]; then echo "[recipe] $name: $(last "$name") exists, skipped"; return; fi
  echo "[recipe] $name: ${command[*]}"
  "${command[@]}"
}

stage text "$C/videollm-tiny-ccam-tcllava-text.yaml"
stage align "$C/videollm-tiny-ccam-tcllava-align.yaml" --model.init_args.llm_init "$(last text)"
stage instruct "$C/videollm-tiny-ccam-tcllava-instruct.yaml" --model.init_args.init_from "$(last align)"
stage instruct2 "$C/videollm-tiny-ccam-tcllava-instruct.yaml" --model.init_args.init_from "$(last instruct)"
stage digits "$C/vit-digits-tiny.yaml"
stage side-align "$C/videollm-tiny-ccam-tcllava-side-align.yaml" --model.init_args.init_from "$(last instruct2)" \
  --model.init_args.side_encoder_init "$(last digits)"
stage side-instruct "$C/videollm-tiny-ccam-tcllava-side-instruct.yaml" \
  --model.init_args.init_from "$(last side-align)"

score=(${PREFIX:-} "$PY" scripts/understanding_study.py score "full=$(last side-instruct)"
  "full@32frames=$(last side-instruct)@frames=32@time_steps=8" --out "$ROOT/results.json")
if [ -n "${DRY:-}" ]; then echo "${score[*]}"; else "${score[@]}"; fi
