#!/usr/bin/env bash
# Regenerate the ahead-of-time compile tables in bench/aot/ (tests/test_aot.py fails when
# the kernel or launcher code no longer matches them): every Triton binary the launchers
# can choose, for sm_90 and sm_80, with the pinned triton of ./.venv and with triton 3.6
# (the GPU machine's, in ./.venv-triton36, which only needs triton), and _C_cuda through
# nvcc -Xptxas -v.  Binaries whose spec and kernel source are unchanged are taken from
# the committed table, so a launcher-only change recompiles only what it changed; a full
# sweep is about 800 binaries per triton version, 20-40 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
if [ ! -x .venv-triton36/bin/python ]; then
  python3 -m venv .venv-triton36
  .venv-triton36/bin/python -m pip install -q triton==3.6.0
fi
JOBS=${JOBS:-$(nproc)}
.venv/bin/python -m metassl_fast.benchmarks.aot --write --jobs "$JOBS"
.venv/bin/python -m metassl_fast.benchmarks.aot --write --jobs "$JOBS" --python .venv-triton36/bin/python
.venv/bin/python -m metassl_fast.benchmarks.aot --write --cuda
.venv/bin/python -m metassl_fast.benchmarks.aot --check
