#!/usr/bin/env bash
# The checks that need a GPU, in one go (about 5 minutes on an H200): the kernels' tests, whose CUDA cells
# skip on a CPU machine, and the kernels benchmark on CUDA. Works on a bare machine whose python3 has torch:
# the kernels package needs nothing else, so it runs from source without installing.
#   scripts/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-${OUT:-benchmarks/results-gpu}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/kernels/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tee "$OUT/gpu_tests.log"
tests=${PIPESTATUS[0]}
timeout 300 $PY -m timeloom_kernels.bench --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, benchmark exit $bench; results in $OUT"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
