#!/usr/bin/env bash
# The one prepared script for a lent GPU host (no network; torch, triton, nvcc,
# pybind11 and scikit-build-core are installed there): build, GPU tests, GPU benchmark.
# Everything it prints also lands under $OUT (7 files: the device tool brings back 8).
# Budget: under 8 minutes.  Run from the repository root:  bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
echo "== build"
if ! (time pip install --no-build-isolation -e .) > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  exit 1
fi
tail -3 "$OUT/build.log"
metassl-fast info 2>&1 | tee "$OUT/info.txt"

echo "== GPU tests"
timeout 270 python -m pytest tests/test_contrastive_gpu.py tests/test_contrastive_triton.py tests/test_family_triton.py \
  -q --maxfail=20 -rs 2>&1 | tee "$OUT/gpu_tests.log" | tail -25

echo "== GPU benchmark"
timeout 200 metassl-fast bench --section contrastive --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -45
