#!/usr/bin/env bash
# The one prepared script for a lent GPU host (no network; torch, triton, nvcc,
# pybind11 and scikit-build-core are installed there): build (the CUDA C++ module
# included), GPU tests of the Triton and CUDA C++ backends, GPU benchmarks of both (with Inf-CL
# as a baseline where its wheel came along: run bash bench/fetch_gpu_wheels.sh here first).
# Everything it prints also lands under $OUT (8 files: the device tool brings back 8).
# Budget: each step has its own timeout (210 s tests, 150 s + 75 s + 60 s benchmarks) and the build is
# for this GPU's architecture only: about 9 minutes at most with the build.  Run from the repository root:  bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
# baselines that the GPU host lacks (no network there): wheels that bench/fetch_gpu_wheels.sh
# put in .whl/ here, carried with the working tree (the device tool's carry: [".whl"])
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# build the CUDA module for this device only, on every core: the build is the one step without a timeout
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
[ -n "$cap" ] && export METASSL_FAST_CUDA_ARCHS="$cap"
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
echo "== build"
if ! (time pip install --no-build-isolation -e .) > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  exit 1
fi
tail -3 "$OUT/build.log"
metassl-fast info 2>&1 | tee "$OUT/info.txt"

echo "== GPU tests"
# one test file per op, every backend a parameter: the Triton and CUDA cases, and the GPU-only tests
timeout 210 python -m pytest tests/test_contrastive.py tests/test_labeled.py tests/test_siglip.py tests/test_inner_loop.py \
  -k "triton or cuda or gpu" -q --maxfail=20 -rs 2>&1 | tee "$OUT/gpu_tests.log" | tail -25

echo "== GPU benchmark"
timeout 150 metassl-fast bench --section contrastive --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -45

echo "== GPU benchmark: ANIL meta-loss (Triton and CUDA C++ kernels vs vmap and the autograd loop)"
# its table file goes to /tmp: $OUT may hold 8 files and the log has the table
timeout 75 python -m metassl_fast.benchmarks.inner_loop --gpu --out /tmp/msf_inner 2>&1 | tee "$OUT/bench_inner_loop.log" | tail -12

# appended to bench.log: a ninth file would not come back
echo "== CUDA C++ backward: accumulators for all of D in shared memory vs one chunk per block"
timeout 60 python bench/probes/cuda_grad_span.py 2>&1 | tee -a "$OUT/bench.log" | tail -6
