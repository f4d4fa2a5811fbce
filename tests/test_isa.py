"""The CPU module's instruction-set builds (CMakeLists.txt, METASSL_FAST_ISAS; _ext._load_cpu).

The rest of the suite runs the build this CPU picks.  Here: the pick is the widest level the
CPU reports, METASSL_FAST_ISA forces a build or fails loudly, and every other installed build
this CPU can run passes a representative slice of the kernel tests (float64 grids against the
references, float32 against torch, the tiny-loss precision test, gradcheck) in a subprocess.
avx2_w64 (AVX2 instructions, the avx512 build's 64-byte vectors) is how a CPU without
AVX-512 runs the avx512 build's code paths: vector width 16 floats / 8 doubles.
"""
import os
import pathlib
import subprocess
import sys

import pytest

import metassl_fast
from metassl_fast import _ext

needs_c = pytest.mark.skipif(not _ext.available("_C"), reason="_C not built")
ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = pathlib.Path(metassl_fast.__file__).parent


def _installed():
    return sorted(p.name.split(".")[0][len("_C_"):] for p in PKG.glob("_C_*.so") if not p.name.startswith("_C_cuda"))


def _cpuinfo_flags():
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


@needs_c
def test_pick_is_the_widest_level_the_cpu_reports():
    mod = _ext.require("_C")
    levels = mod.cpu_levels()
    flags = _cpuinfo_flags()
    if flags is not None:  # cpuid through libgcc agrees with the kernel's view of the CPU
        assert levels["x86-64-v3"] == ({"avx2", "fma", "bmi2", "f16c", "movbe"} <= flags)
        assert levels["x86-64-v4"] == ({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags)
    installed = _installed()
    if "METASSL_FAST_ISA" in os.environ or "native" in installed:
        pytest.skip("a forced or native build is in use: the automatic pick is not what runs")
    want = "avx512" if levels["x86-64-v4"] and "avx512" in installed else \
        "avx2" if levels["x86-64-v3"] and "avx2" in installed else "base"
    assert mod.isa == want, (mod.isa, levels, installed)
    assert mod.vec_bytes == (64 if want == "avx512" else 32)
    assert mod.simd == {"avx512": "avx512", "avx2": "avx2", "base": "baseline"}[want]


@needs_c
def test_forced_build_fails_loudly():
    bad = _run("import metassl_fast", METASSL_FAST_ISA="avx9000")
    assert bad.returncode != 0 and "METASSL_FAST_ISA='avx9000'" in bad.stderr
    ok = _run("from metassl_fast import _ext; print(_ext.require('_C').isa)", METASSL_FAST_ISA="base")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "base"
    if not _ext.require("_C").cpu_levels()["x86-64-v4"]:
        no = _run("import metassl_fast", METASSL_FAST_ISA="avx512")
        assert no.returncode != 0 and "needs a x86-64-v4 CPU" in no.stderr


# One slice of each kernel's tests: float64 against the references on tile edges, float32
# against torch, precision and NaN behaviour, gradcheck.
SLICE = ["tests/test_contrastive.py", "tests/test_labeled.py", "tests/test_siglip.py", "tests/test_inner_loop.py",
         "tests/test_convex.py", "-k",
         "cpu and (test_float64_grid and not inner_loop or tiny_loss or nan_input or gradcheck "
         "or low_precision_against_float64 or test_float32 or large_logits or ridge_equals or duplicated) "
         "and not triton and not compile and not torch"]


def _other_builds():
    mod = _ext.require("_C") if _ext.available("_C") else None
    levels = mod.cpu_levels() if mod else {}
    need = {"avx512": "x86-64-v4", "avx2": "x86-64-v3", "avx2_w64": "x86-64-v3"}
    out = []
    for isa in ("base", "avx2", "avx512", "avx2_w64"):
        if mod is not None and isa == mod.isa:
            continue  # the rest of the suite runs it
        reason = None
        if isa not in _installed():
            reason = f"_C_{isa} is not installed (scripts/setup.sh builds base;avx2;avx512;avx2_w64)"
        elif isa in need and not levels.get(need[isa], False):
            reason = f"this CPU lacks {need[isa]} (avx2_w64 runs the avx512 build's vector width instead)"
        out.append(pytest.param(isa, marks=pytest.mark.skip(reason=reason)) if reason else isa)
    return out


@needs_c
@pytest.mark.parametrize("isa", _other_builds())
def test_other_builds_pass_the_kernel_slice(isa):
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SLICE],
                       cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "METASSL_FAST_ISA": isa})
    tail = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and " failed" not in r.stdout, tail
