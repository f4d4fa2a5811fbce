#!/usr/bin/env bash
# The sanitizer job (part of .ci/run): _C built with AddressSanitizer + UndefinedBehaviorSanitizer
# (CMake option METASSL_FAST_SANITIZE), and the tests that reach _C run against that build.
# Any ASan report aborts the process and any UB report is fatal (-fno-sanitize-recover), so
# pytest fails on either.  Needs ./.venv (scripts/setup.sh).  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VPY=$PWD/.venv/bin/python
# CMake needs pybind11's config in the venv (pip's isolated build env had its own)
"$VPY" -c "import pybind11" 2>/dev/null || "$VPY" -m pip install -q "pybind11>=2.12"
BUILD=build/sanitize
STAGE=$BUILD/pkg
# The instruction-set build this CPU runs (CMakeLists.txt, METASSL_FAST_ISAS) is the one
# sanitized; _C_base, which the loader asks for the CPU's levels, is copied as installed
# unless it is that build.
ISA=$("$VPY" -c "from metassl_fast import _ext; print(_ext.require('_C').isa)")
cmake -S . -B "$BUILD" -DPython_EXECUTABLE="$VPY" -Dpybind11_DIR="$("$VPY" -m pybind11 --cmakedir)" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMETASSL_FAST_SANITIZE=ON -DMETASSL_FAST_ISAS="$ISA" >"$BUILD.configure.log" 2>&1 ||
  { cat "$BUILD.configure.log"; exit 1; }
cmake --build "$BUILD" --target "_C_$ISA" -j2 >"$BUILD.build.log" 2>&1 || { tail -50 "$BUILD.build.log"; exit 1; }

# A copy of the package whose _C is the sanitized one (imported first through PYTHONPATH).
rm -rf "$STAGE"
mkdir -p "$STAGE"
cp -r python/metassl_fast "$STAGE/metassl_fast"
rm -rf "$STAGE/metassl_fast/kernels" "$STAGE"/metassl_fast/*.so
cp -r kernels "$STAGE/metassl_fast/kernels"
cp "$BUILD"/_C_"$ISA".*.so "$STAGE/metassl_fast/"
[ "$ISA" = base ] || cp "$("$VPY" -c "import metassl_fast, pathlib; print(pathlib.Path(metassl_fast.__file__).parent)")"/_C_base.*.so \
  "$STAGE/metassl_fast/"

# The interpreter is not instrumented: the runtimes are preloaded.  detect_leaks=0: CPython
# and torch keep allocations for the process's life; allocator_may_return_null=1: the
# tests ask for impossible allocations on purpose (steps=10**12), which must raise
# MemoryError rather than be an ASan report.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:detect_odr_violation=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$PWD/$STAGE" METASSL_SANITIZE=1
# the fuzzer's examples under the sanitizers (instrumented kernels run ~2-3x slower): its
# default 200 run in the plain suite already
export METASSL_FUZZ_EXAMPLES=${METASSL_FUZZ_EXAMPLES:-60}
# The tests that reach _C: the CPU backend's parametrisations of the per-op suites, the
# drop-ins, the hardening regressions and the fuzzer.  (Triton and CUDA cases, which do
# not call _C, are deselected: under the interpreter they would only cost time here.)
"$VPY" - <<'EOF'
import metassl_fast, pathlib
from metassl_fast import _ext
c = _ext.require("_C")
assert pathlib.Path(c.__file__).parent == pathlib.Path(metassl_fast.__file__).parent, c.__file__
assert "sanitize" in c.__file__, f"not the sanitized build: {c.__file__}"
print("sanitize: using", c.__file__)
EOF
# the convex heads' tests apart: their backend="torch" cases (the reference, no _C) are deselected
"$VPY" -m pytest -q -p no:cacheprovider tests/test_convex.py -k "not torch and not compile" "$@"
exec "$VPY" -m pytest -q -p no:cacheprovider tests/test_hardening.py tests/test_fuzz.py tests/test_compat.py tests/test_gemm.py \
  tests/test_contrastive.py tests/test_labeled.py tests/test_siglip.py tests/test_inner_loop.py \
  -k "not triton and not cuda and not gpu and not compile" "$@"
