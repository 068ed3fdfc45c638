#!/usr/bin/env bash
# The checks that need a GPU, in one go (under 10 minutes on an H100): the CUDA cells of the tests (kernels,
# memory), then each suite's benchmark on CUDA: generation (cache speed-up), memory (chunked against
# sequential update, training step), understanding (prefill / decode latency, streaming) and the kernels'
# quick sweep (an earlier H200 check's full sweep is in benchmarks/results-gpu/).
# Runs from source on a bare machine whose python3 has torch, lightning, transformers and timm. The core's
# other imports travel as wheels in .whl/ when the machine has no registry, fetched here once with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d .whl jsonargparse omegaconf av docstring-parser typeshed-client
# Every step has its own time limit and log; a failed step is reported and the next one runs.
#   [STEPS="tests understanding"] scripts/gpu_check.sh [OUT_DIR] [PACK.tgz]
# STEPS picks steps (default: all); PACK: the logs and results packed after each step.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-${OUT:-benchmarks/results-gpu}}
PACK=${2:-}
mkdir -p "$OUT"
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check-site .whl/*.whl
  export PYTHONPATH=/tmp/gpu-check-site
fi
for src in src kernels/src packages/*/src; do PYTHONPATH="$PWD/$src${PYTHONPATH:+:$PYTHONPATH}"; done
export PYTHONPATH PYTHONUNBUFFERED=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

failed=0
STEPS=${STEPS:-tests generation memory understanding kernels}
step() {  # step NAME SECONDS CMD...: run CMD under a time limit, log to OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local status=$?
  echo "$name: exit $status in $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
  tail -n 4 "$OUT/$name.log"
  [ "$status" -eq 0 ] || failed=$((failed + 1))
  if [ -n "$PACK" ]; then tar czf "$PACK" -C "$OUT" .; fi
}
# the CUDA cells compile flex attention per shape (CPU-bound): spread them over processes; a bare machine
# compiles every shape cold (the first H100 call ran past 150 s)
workers=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
step tests 240 $PY -m pytest -q -p no:cacheprovider $workers --durations=15 tests/kernels tests/memory/test_memory_cuda.py
step generation 90 $PY -m timeloom_generation.bench --device cuda --out "$OUT/generation"
step memory 120 $PY -m timeloom_memory.bench --device cuda --out "$OUT/memory"
step understanding 90 $PY -m timeloom_understanding.bench --device cuda --out "$OUT/understanding"
step kernels 120 $PY -m timeloom_kernels.bench --quick --device cuda --out "$OUT/kernels"
echo "$failed step(s) failed; results in $OUT"
[ "$failed" -eq 0 ]
