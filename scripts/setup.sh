#!/usr/bin/env bash
# Make ./.venv with torch and metassl_fast (built from this checkout) installed.
# Sourced by scripts/test.sh and scripts/bench.sh; safe to run again (rebuilds only
# what changed, through the CMake tree kept in build/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
# torch goes in first and on its own: a bare `torch` requirement can pull a
# multi-GB CUDA build. Override for another machine, e.g.
#   METASSL_TORCH="torch --index-url https://download.pytorch.org/whl/cpu" bash scripts/test.sh
METASSL_TORCH=${METASSL_TORCH:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "setup: installing $METASSL_TORCH into .venv" >&2
  # shellcheck disable=SC2086  # METASSL_TORCH may carry pip options
  "$VPY" -m pip install -q $METASSL_TORCH
fi
echo "setup: building and installing metassl_fast into .venv" >&2
# The CPU module's instruction-set builds (CMakeLists.txt): the three a plain `pip install .`
# makes, and avx2_w64, a test build (AVX2 instructions with the avx512 build's 64-byte
# vectors) that tests/test_isa.py runs where the CPU has no AVX-512.
"$VPY" -m pip install -q ".[test,bench]" --config-settings=cmake.define.METASSL_FAST_ISAS="base;avx2;avx512;avx2_w64"
# The original losses the compat drop-ins are tested against (tests/originals.py),
# higher (a meta-learning baseline of the inner-loop benchmark and tests) and qpth (MetaOptNet's
# SVM solver, the baseline of the heads benchmark; it imports cvxpy, which benchmarks/heads.py stubs).
# --no-deps: each of them would otherwise pull a torch (and torchvision) of its own.
echo "setup: installing the original packages for the parity tests" >&2
"$VPY" -m pip install -q --no-deps pytorch-metric-learning==2.9.0 info-nce-pytorch==0.1.4 \
  lightly==1.6.0 open_clip_torch==3.3.0 higher==0.2.1 tqdm qpth==0.0.18
