#!/usr/bin/env bash
# Download, on a machine with network, the wheels of the GPU benchmark's baselines that the
# GPU host lacks (it has no network) into .whl/ (git-ignored); the device tool carries
# .whl to the host and bench/gpu_check.sh installs them there.  Inf-CL (PyPI inf-cl) is
# pure Python over triton, which the host has.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m pip download -q --no-deps -d .whl inf-cl==1.2.1
ls -l .whl
