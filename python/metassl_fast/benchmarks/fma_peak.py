"""The machine's attainable FMA rate (GFLOP/s, one FMA = 2 flops), measured, so that a benchmark
table can give each kernel's share of it (share()).

How it is measured: a small C loop is compiled at run time with the system C compiler ($CC, else
cc, else gcc) into a shared library and called through ctypes.  The loop keeps ACCUMULATORS
independent vectors in registers and updates each as a = a * x + y once per iteration (GCC vector
extensions, -ffp-contract=fast, so each update is one vfmadd).  The accumulators are independent,
so the loop is bound by FMA throughput, not latency: 12 accumulators of 256 bits (AVX2+FMA, 16
ymm registers) or 24 of 512 bits (AVX-512F, 32 zmm registers) cover an FMA latency of 4-5 cycles
times 2 FMA units.  The instruction set is the widest one /proc/cpuinfo lists (avx512f, else
avx2 and fma); a CPU with neither gets no number.  x and y are run-time arguments and the loop
returns the sum of its accumulators, so the compiler can neither drop nor shorten it; every
timed call's sum is checked against closed_form() (x = -1, y = 2: the values alternate between
a0 and 2 - a0, exact, never denormal), so a loop that did not run raises.  One loop runs per
thread (Python threads: ctypes releases the GIL), started together at a barrier; the total is
all threads' flops over the wall time from the first start to the last end.  The call count is
calibrated so that each repeat runs about `seconds`; the peak is the best of `repeats` repeats.

Caveats:
- Frequency: the rate is at the clock the cores hold under an all-core FMA load (turbo, thermal
  and power limits, AVX-512 frequency licences), which is what a busy kernel sees too; one
  thread alone may run faster per core than the same thread among all threads.
- SMT: two threads on one core's siblings share its FMA units, so threads beyond the physical
  cores add nothing to the total and halve the per-thread rate.  Threads are not pinned.
- A shared machine (or a VM's steal time): other load takes cycles from the loop.  The best of
  the repeats escapes a brief interruption but not sustained contention, under which the peak
  reads low and a kernel's share reads high.
- It is the peak of FMAs alone: a kernel that must also load, exponentiate or reduce cannot
  reach it, and its share says how far off it is, not why.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import math
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time

import torch

from ._common import cpu_name

DTYPES = {"float32": (ctypes.c_float, 4), "float64": (ctypes.c_double, 8)}

# isa: (compiler flags, vector bytes, accumulators)
ISAS = {"avx512f": (["-mavx512f", "-mfma"], 64, 24),
        "avx2+fma": (["-mavx2", "-mfma"], 32, 12)}

# The timed calls' x and y: exact for any iteration count (see closed_form).
TIMED_X, TIMED_Y = -1.0, 2.0

CALIBRATION_ITERATIONS = 1 << 16
CALIBRATION_SECONDS = 0.03

SOURCE = r"""
/* acc[i] = acc[i] * x + y, NACC independent accumulator vectors of VEC_BYTES bytes, n times;
   acc[i] starts at i + 1 in every lane.  Returns the sum of every lane of every accumulator. */
#define DEFINE_LOOP(NAME, T)                                                             \
typedef T NAME##_vec __attribute__((vector_size(VEC_BYTES)));                            \
double NAME(long long n, T x, T y) {                                                     \
    NAME##_vec acc[NACC];                                                                \
    _Pragma("GCC unroll 64") for (int i = 0; i < NACC; i++) acc[i] = (NAME##_vec){} + (T)(i + 1); \
    NAME##_vec vx = (NAME##_vec){} + x, vy = (NAME##_vec){} + y;                         \
    for (long long k = 0; k < n; k++) {                                                  \
        _Pragma("GCC unroll 64") for (int i = 0; i < NACC; i++) acc[i] = acc[i] * vx + vy; \
    }                                                                                    \
    double s = 0;                                                                        \
    for (int i = 0; i < NACC; i++)                                                       \
        for (int j = 0; j < (int)(VEC_BYTES / sizeof(T)); j++) s += acc[i][j];           \
    return s;                                                                            \
}
DEFINE_LOOP(fma_float32, float)
DEFINE_LOOP(fma_float64, double)
"""


# ----------------------------------------------------------------------------- the loop

def cpu_isa():
    """(isa, None) for the widest loop this CPU runs ("avx512f" or "avx2+fma"), else (None, reason).
    Linux's /proc/cpuinfo flags already leave out what the OS does not enable."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), None)
    except OSError as e:
        return None, f"cannot read the CPU flags from /proc/cpuinfo ({e})"
    if flags is None:
        return None, "/proc/cpuinfo lists no x86 flags (not an x86 CPU?): no AVX2/AVX-512 FMA loop to run"
    if "avx512f" in flags:
        return "avx512f", None
    if {"avx2", "fma"} <= flags:
        return "avx2+fma", None
    return None, "the CPU has neither AVX-512F nor AVX2+FMA"


def compiler():
    """The C compiler's argv ($CC, else cc, else gcc), or None."""
    if os.environ.get("CC"):
        argv = shlex.split(os.environ["CC"])
        return argv if shutil.which(argv[0]) else None
    path = shutil.which("cc") or shutil.which("gcc")
    return [path] if path else None


@functools.lru_cache(maxsize=None)
def _library(isa, cc):
    """(ctypes library, compile command) for isa built by cc (a tuple), or (None, reason);
    cached per process and compiler."""
    flags, vec_bytes, accumulators = ISAS[isa]
    with tempfile.TemporaryDirectory(prefix="fma_peak_") as tmp:
        src, lib = os.path.join(tmp, "fma_peak.c"), os.path.join(tmp, "fma_peak.so")
        with open(src, "w") as f:
            f.write(SOURCE)
        cmd = [*cc, "-O2", "-shared", "-fPIC", "-ffp-contract=fast", *flags,
               f"-DVEC_BYTES={vec_bytes}", f"-DNACC={accumulators}", src, "-o", lib]
        shown = " ".join(cmd).replace(tmp + os.sep, "")
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"`{shown}` failed: {e}"
        if r.returncode:
            err = (r.stderr.strip().splitlines() or [""])[0]
            return None, f"`{shown}` failed (exit {r.returncode}): {err}"
        dll = ctypes.CDLL(lib)  # mapped now: Linux keeps it when the directory goes
    for dtype, (ctype, _) in DTYPES.items():
        fn = getattr(dll, f"fma_{dtype}")
        fn.argtypes, fn.restype = [ctypes.c_longlong, ctype, ctype], ctypes.c_double
    return dll, shown


def kernel():
    """(library, info) or (None, info): info holds isa, vector_bytes, accumulators and compiler,
    and "note" (why there is no library) when there is none."""
    isa, why = cpu_isa()
    if isa is None:
        return None, {"isa": None, "note": why}
    _, vec_bytes, accumulators = ISAS[isa]
    info = {"isa": isa, "vector_bytes": vec_bytes, "accumulators": accumulators}
    cc = compiler()
    if cc is None:
        cc_env = os.environ.get("CC")
        return None, {**info, "compiler": None,
                      "note": f"CC={cc_env!r} is not an executable" if cc_env else "no C compiler (cc or gcc) on PATH"}
    lib, shown = _library(isa, tuple(cc))
    if lib is None:
        return None, {**info, "compiler": None, "note": shown}
    return lib, {**info, "compiler": shown, "note": None}


def _check_dtype(dtype):
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def loop(dtype, iterations, x, y):
    """The loop's result: the sum over every accumulator and lane after `iterations` updates
    a = a * x + y (x and y rounded to dtype).  Raises RuntimeError when the loop cannot be built."""
    _check_dtype(dtype)
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    lib, info = kernel()
    if lib is None:
        raise RuntimeError(f"no FMA loop: {info['note']}")
    return getattr(lib, f"fma_{dtype}")(iterations, x, y)


def closed_form(dtype, iterations, x, y):
    """What loop() must return: each accumulator a0 = i + 1 (i < accumulators) in each lane ends at
    x^n a0 + y (1 + x + ... + x^(n-1)).  Exact wherever every intermediate value is (x = 1 with
    integers below 2^24 in float32, or x = -1 for any n)."""
    _check_dtype(dtype)
    _, info = kernel()
    if info["isa"] is None:
        raise RuntimeError(f"no FMA loop: {info['note']}")
    lanes = info["vector_bytes"] // DTYPES[dtype][1]
    xn = x ** iterations
    geometric = iterations if x == 1 else (xn - 1) / (x - 1)
    return lanes * sum(xn * (i + 1) + y * geometric for i in range(info["accumulators"]))


# ----------------------------------------------------------------------------- the measurement

def _run_threads(fn, threads, iterations, expected):
    """One call of fn(iterations, TIMED_X, TIMED_Y) per thread, started at a barrier: (wall
    seconds from the first start to the last end, each thread's seconds)."""
    barrier = threading.Barrier(threads)
    spans, errors = [None] * threads, []

    def work(t):
        barrier.wait()
        t0 = time.perf_counter()
        got = fn(iterations, TIMED_X, TIMED_Y)
        spans[t] = (t0, time.perf_counter())
        if got != expected:
            errors.append(f"thread {t}: the loop returned {got!r}, its closed form is {expected!r}")

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise RuntimeError("the FMA loop computed a wrong sum (miscompiled or not run): " + "; ".join(errors))
    return max(e for _, e in spans) - min(s for s, _ in spans), [e - s for s, e in spans]


def measure(dtype="float32", threads=None, seconds=0.3, repeats=3):
    """The attainable FMA rate of `threads` threads (default torch.get_num_threads()).

    Returns a dict: gflops (all threads together, best of `repeats`; None when it cannot be
    measured, with the reason in note), per_thread_gflops (each thread's in that repeat),
    gflops_per_thread (gflops / threads), repeats_gflops (every repeat's total), dtype, threads,
    isa, vector_bytes, lanes, accumulators, iterations (per thread and repeat), seconds (the
    best repeat's wall time), compiler (the compile command), cpu and note."""
    _check_dtype(dtype)
    threads = torch.get_num_threads() if threads is None else threads
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"seconds must be a finite number > 0, got {seconds!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    lib, info = kernel()
    result = {"dtype": dtype, "threads": threads, "cpu": cpu_name(), "gflops": None, **info}
    if lib is None:
        return result
    fn = getattr(lib, f"fma_{dtype}")
    lanes = info["vector_bytes"] // DTYPES[dtype][1]
    flops_per_iteration = 2 * lanes * info["accumulators"]

    def timed(iterations):
        return _run_threads(fn, threads, iterations, closed_form(dtype, iterations, TIMED_X, TIMED_Y))

    # Calibrate with every thread running, at the rate the repeats will see, on a run long
    # enough (CALIBRATION_SECONDS) that starting the threads does not count.
    iterations = CALIBRATION_ITERATIONS
    while (wall := timed(iterations)[0]) < min(CALIBRATION_SECONDS, seconds):
        iterations *= 2
    iterations = max(1, round(iterations * seconds / wall))
    best, totals = None, []
    for _ in range(repeats):
        wall, each = timed(iterations)
        totals.append(threads * iterations * flops_per_iteration / wall / 1e9)
        if best is None or totals[-1] > best[0]:
            best = (totals[-1], wall, [iterations * flops_per_iteration / s / 1e9 for s in each])
    return {**result, "gflops": best[0], "per_thread_gflops": best[2], "gflops_per_thread": best[0] / threads,
            "repeats_gflops": totals, "lanes": lanes, "iterations": iterations, "seconds": best[1]}


def share(flops, ms, peak_gflops):
    """The fraction of the FMA peak a kernel reached: flops / (ms / 1e3) / (peak_gflops * 1e9).
    None when peak_gflops is None (no peak measured)."""
    if peak_gflops is None:
        return None
    if not peak_gflops > 0:
        raise ValueError(f"peak_gflops must be > 0, got {peak_gflops!r}")
    if not ms > 0:
        raise ValueError(f"ms must be > 0, got {ms!r}")
    return flops / (ms / 1e3) / (peak_gflops * 1e9)


def describe(r):
    """One paragraph: the result and how it was measured."""
    if r["gflops"] is None:
        return f"FMA peak ({r['dtype']}, {r['cpu']}): not measured: {r['note']}."
    per = ", ".join(f"{g:.1f}" for g in r["per_thread_gflops"])
    return (f"FMA peak ({r['dtype']}, {r['cpu']}): {r['gflops']:.1f} GFLOP/s with {r['threads']} thread(s), "
            f"{r['gflops_per_thread']:.1f} per thread (each: {per}); best of {len(r['repeats_gflops'])} repeats "
            f"({', '.join(f'{g:.1f}' for g in r['repeats_gflops'])}).  Measured with a register-blocked loop of "
            f"{r['accumulators']} independent {r['isa']} accumulators ({r['vector_bytes'] * 8}-bit, {r['lanes']} "
            f"lanes), a = a * x + y, {r['iterations']} iterations per thread in {r['seconds']:.3f} s, one loop per "
            f"thread started together, an FMA counted as 2 flops, the result checked against its closed form; "
            f"compiled with `{r['compiler']}`.  It is the rate at the clock the cores hold under this load, "
            f"on a machine others may be using.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=None, help="threads (default: torch.get_num_threads())")
    p.add_argument("--seconds", type=float, default=0.3, help="seconds of each repeat")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print(describe(measure(args.dtype, threads=args.threads, seconds=args.seconds, repeats=args.repeats)))


if __name__ == "__main__":
    main()
