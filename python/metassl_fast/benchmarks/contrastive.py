"""Benchmark of info_nce and clip_loss against the eager code their users run today, and
against that code under torch.compile (inductor, dynamic=False; compiled from scratch for
each N on an empty inductor cache, its compile time reported apart and kept out of the
medians; a compile that fails is reported with its error).

Each N runs in fresh worker processes, so peak memory on the CPU counts all of torch's
allocations: peak RSS (VmHWM, reset through /proc/self/clear_refs) over the RSS before the
measured call, in a worker whose glibc mmap threshold is pinned so that a freed buffer goes
back to the OS at once instead of hiding in the heap.  Times come from a second worker with
glibc's default allocator (under the pinned threshold every buffer past 128 KiB is fresh
pages on every call: info_nce at N=1024 took 12.2 ms there against 6.4 with the default).
Times are forward+backward, median (and 20/80 quantiles) of interleaved repeats after a
warm-up; the large sizes (ours alone, one call) are timed in the memory worker.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import metassl_fast as msf
from metassl_fast.reference import contrastive_loss

from . import _common as c
from . import fma_peak
from ._common import TEMPERATURE

OPS = ("info_nce", "clip_loss")


# ----------------------------------------------------------------------------- the contenders

def _ours(op):
    if op == "info_nce":
        return lambda q, k, s: msf.info_nce(q, k, temperature=TEMPERATURE)
    return lambda q, k, s: msf.clip_loss(q, k, s)


def _reference_loss(op):
    if op == "info_nce":
        return lambda q, k, s: contrastive_loss(q, k, None, torch.tensor(1 / TEMPERATURE, dtype=q.dtype),
                                                False, True, "mean")
    return lambda q, k, s: contrastive_loss(q, k, None, s, True, False, "mean")


def _inputs(op, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g)
    k = torch.randn(n, d, generator=g)
    if op == "clip_loss":  # open_clip normalises in the encoders, before the loss
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    q = q.to(dtype).requires_grad_()
    k = k.to(dtype).requires_grad_()
    s = torch.tensor(math.log(1 / TEMPERATURE)).exp().to(dtype).detach().requires_grad_()
    return q, k, s


def _step(fn, q, k, s):
    q.grad = k.grad = s.grad = None
    loss = fn(q, k, s)
    loss.backward()
    return loss


# ----------------------------------------------------------------------------- worker side

def _max_rel_err(fn, op, q, k, s):
    """max over (loss, dq, dk[, ds]) of max|ours - ref| / max|ref|, ref in float64."""
    loss = _step(fn, q, k, s)
    got = [loss.detach(), q.grad, k.grad] + ([s.grad] if op == "clip_loss" else [])
    q64, k64, s64 = (x.detach().double().requires_grad_() for x in (q, k, s))
    ref_loss = _step(_reference_loss(op), q64, k64, s64)
    want = [ref_loss.detach(), q64.grad, k64.grad] + ([s64.grad] if op == "clip_loss" else [])
    return c.max_rel_err(got, want)


def _worker(args):
    impls = args.impls.split(",")
    out = {"compile_startup_s": c.compile_startup_s() if "compile" in impls and args.mode != "memory" else None,
           "ops": {}}
    for op in args.ops.split(","):
        out["ops"][op] = _measure(op, impls, args)
    print("RESULT " + json.dumps(out))


def _measure(op, impls, args):
    """args.mode "time": the interleaved medians (and the error check), no peak memory;
    "memory": each contender's peak memory only (in a worker whose mmap threshold is pinned,
    which would make fresh pages of every buffer in a timed call); "both": one call, timed
    and measured (the large sizes, ours alone)."""
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    q, k, s = _inputs(op, args.n, args.d, dtype)
    eager = c.eager_info_nce if op == "info_nce" else c.eager_clip_loss
    makers = {"ours": lambda: _ours(op), "eager": lambda: eager, "compile": lambda: c.compiled(eager)}
    fns = {impl: makers[impl]() for impl in impls}
    steps = {impl: (lambda fn: lambda: _step(fn, q, k, s))(fn) for impl, fn in fns.items()}
    out = {}
    if "compile" in steps:
        steps["compile"] = c.CompiledStep(steps["compile"])
    times = {impl: [] for impl in steps}
    peaks = {}
    for impl, step in list(steps.items()):
        if impl == "compile":
            if not step.first():  # its warm-up: the compile, timed apart
                out[impl] = {"note": step.failure}
                del steps[impl]
                continue
        elif args.mode != "both":
            step()  # warm-up: lazy initialisation, thread pools, BLAS buffers
        if args.mode == "time":
            continue
        t0 = time.perf_counter()
        peaks[impl] = c.peak_extra_mb(step)
        if args.mode == "both":  # one run (the large sizes): it is also the timed one
            times[impl].append((time.perf_counter() - t0) * 1e3)
    if args.mode == "memory":
        for impl in steps:
            out[impl] = {"peak_mb": peaks[impl]}
        return {impl: out[impl] for impl in impls}
    for _ in range(args.repeats if args.mode == "time" else 0):
        for impl, step in steps.items():  # interleaved, so machine noise hits all alike
            t0 = time.perf_counter()
            step()
            times[impl].append((time.perf_counter() - t0) * 1e3)
    for impl, step in steps.items():
        out[impl] = {**c.quantiles(times[impl]), "peak_mb": peaks.get(impl),
                     "max_rel_err": _max_rel_err(fns[impl], op, q, k, s) if args.check_error else None}
        if impl == "compile":
            out[impl].update(step.fields(out[impl]["median_ms"]))
    return {impl: out[impl] for impl in impls}


# ----------------------------------------------------------------------------- driver side

def _configs(sizes, large, repeats, check_max, compile=True):
    """One worker process per N (both ops in it: a process start costs ~5 s here)."""
    cfgs = []
    for n in sizes:
        # fewer repeats where one eager call takes seconds: the default run stays < 3 min
        reps = repeats if n < 8192 else max(3, repeats // 2)
        cfgs.append(dict(ops=",".join(OPS), n=n, impls="ours,eager,compile" if compile else "ours,eager",
                         repeats=reps, check_error=n <= check_max, modes=("time", "memory")))
    for n in large:  # eager would need n^2 * 4 bytes several times over: ours only, one timed run
        cfgs.append(dict(ops="info_nce", n=n, impls="ours", repeats=1, check_error=False, modes=("both",)))
    return cfgs


def _run_worker(cfg, d, dtype, threads):
    """The config's workers: timing with glibc's default allocator, peak memory with its mmap
    threshold pinned (c.pinned_malloc_env: every freed buffer leaves the RSS, so the peak is
    what a call allocates, but every buffer past 128 KiB is fresh pages, which would tax the
    contender that allocates more buffers per call); their results merged."""
    merged = None
    for mode in cfg["modes"]:
        args = ["--ops", cfg["ops"], "--n", str(cfg["n"]), "--d", str(d), "--dtype", dtype,
                "--impls", cfg["impls"], "--repeats", str(cfg["repeats"]), "--threads", str(threads),
                "--mode", mode]
        if cfg["check_error"] and mode != "memory":
            args.append("--check-error")
        env = c.pinned_malloc_env() if mode != "time" else dict(os.environ)
        with c.cold_compile_cache() as cache:
            res = c.worker_result("metassl_fast.benchmarks.contrastive", args, {**env, **cache})
        if merged is None:
            merged = res
            continue
        for op, by_impl in res["ops"].items():
            for impl, fields in by_impl.items():
                if "peak_mb" in fields:
                    merged["ops"][op].setdefault(impl, {})["peak_mb"] = fields["peak_mb"]
    return merged


CSV_FIELDS = c.CSV_FIELDS + ["speedup_vs_compile", "fma_share", "compile_s", "graph_breaks", "note"]

# Floating-point work counted for a kernel's share of the FMA peak: forward+backward of a loss
# over an N x N similarity needs at least 3 N x N x D products (S = Q K^T, dQ = G K, dK = G^T Q),
# 2 flops a multiply-add; the softmax's exps and the recomputation of S are not counted, so the
# share is of the work that cannot be avoided.
GEMMS = 3


def useful_flops(n, d):
    return GEMMS * 2.0 * n * n * d


def run(sizes=(1024, 2048, 4096, 8192), large=(65536,), d=128, dtype="float32", repeats=5,
        out_dir="bench/out", threads=None, plot=True, check_max=2048, stream=sys.stdout, compile=True):
    """Run the CPU benchmark (compile: with the torch.compile column); returns the result rows
    (also appended to out_dir/results.csv)."""
    threads = threads or torch.get_num_threads()
    peak = fma_peak.measure(dtype if dtype in fma_peak.DTYPES else "float32", threads)  # before the workers
    cfgs = _configs(sizes, large, repeats, check_max, compile)
    rows, startups = [], []
    for i, cfg in enumerate(cfgs):
        c.progress(i, len(cfgs), f"{cfg['ops']} N={cfg['n']}")
        res = _run_worker(cfg, d, dtype, threads)
        startups.append(res["compile_startup_s"])
        for op, by_impl in res["ops"].items():
            eager, comp = by_impl.get("eager"), by_impl.get("compile", {}).get("median_ms")
            for impl, r in by_impl.items():
                ms = r.get("median_ms")
                rows.append({
                    "op": op, "impl": impl, "N": cfg["n"], "D": d, "dtype": dtype,
                    "median_ms": ms, "p20_ms": r.get("p20_ms"), "p80_ms": r.get("p80_ms"),
                    "speedup": (eager["median_ms"] / ms) if eager and ms else None,
                    "speedup_vs_compile": comp / ms if comp and ms else None,
                    "peak_mb": r.get("peak_mb"),
                    "mem_ratio": (r["peak_mb"] / eager["peak_mb"])
                    if eager and r.get("peak_mb") and eager["peak_mb"] else None,
                    "max_rel_err": r.get("max_rel_err"), "repeats": cfg["repeats"],
                    "fma_share": fma_peak.share(useful_flops(cfg["n"], d), ms, peak["gflops"]) if ms else None,
                    **{k: r.get(k) for k in ("compile_s", "graph_breaks", "note")},
                })
    rows.sort(key=lambda r: (OPS.index(r["op"]), r["N"], r["impl"] != "ours"))
    c.progress(len(cfgs), len(cfgs), "done")
    meta = c.run_meta(c.cpu_name(), threads)
    table = format_table(rows, meta, startups, peak)
    print(table, file=stream)
    c.write_outputs(out_dir, table, "latest.md", "results.csv", rows, meta, CSV_FIELDS)
    if plot:
        _plot(os.path.join(out_dir, "contrastive_cpu.png"), rows, meta, stream)
    return rows


def _speedup(x):
    return f"{c.fmt(x, '.2f')}{'x' if x else ''}"


def _compile_cell(r):
    """compile s of a compile row, and its graph-break / recompile note."""
    parts = [f"{r['compile_s']:.1f}"] if r.get("compile_s") is not None else []
    if r.get("note") and r["median_ms"]:
        parts.append(r["note"])
    return "; ".join(parts) or "-"


def format_table(rows, meta, startups=(), peak=None):
    head = (f"contrastive losses, forward+backward, {meta['device']}, {meta['threads']} threads, "
            f"torch {meta['torch']}, metassl_fast {meta['version']}, {meta['date']}\n\n"
            "| op | impl | N | D | dtype | median ms (p20-p80) | speed-up vs eager | vs compile | peak MiB | "
            "mem ratio | max rel err | of FMA peak | compile s |\n"
            "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in rows:
        ms = r["median_ms"]
        timing = f"{ms:.1f} ({r['p20_ms']:.1f}-{r['p80_ms']:.1f})" if ms else (r.get("note") or "-")
        lines.append(
            f"| {r['op']} | {r['impl']} | {r['N']} | {r['D']} | {r['dtype']} | {timing} | "
            f"{_speedup(r['speedup'])} | {_speedup(r.get('speedup_vs_compile'))} | {c.fmt(r['peak_mb'], '.1f')} | "
            f"{c.fmt(r['mem_ratio'], '.4f')} | {c.fmt(r['max_rel_err'], '.1e')} | {_percent(r.get('fma_share'))} | "
            f"{_compile_cell(r)} |")
    if any(r["impl"] == "compile" for r in rows):
        lines.append("\n" + c.compile_legend(startups))
    if peak is not None:
        lines.append(f"\nof FMA peak: {GEMMS} N x N x D multiply-adds (S, dQ, dK; 2 flops each) over the median, as a "
                     "share of the FMA peak measured in this run: " + fma_peak.describe(peak))
    return "\n".join(lines)


def _percent(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def _plot(path, rows, meta, stream):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install 'metassl-fast[bench]')", file=stream)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for op in OPS:
        for impl, style in (("ours", "-o"), ("eager", "--s"), ("compile", ":^")):
            pts = sorted((r["N"], r["median_ms"], r["peak_mb"]) for r in rows
                         if r["op"] == op and r["impl"] == impl and r["median_ms"])
            if not pts:
                continue
            n, t, m = zip(*pts)
            axes[0].plot(n, t, style, label=f"{op} {impl}")
            axes[1].plot(n, [x if x is not None else float("nan") for x in m], style, label=f"{op} {impl}")
    for ax, ylabel in zip(axes, ("forward+backward median (ms)", "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (batch)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"metassl_fast {meta['version']} vs eager and torch.compile, {meta['device']}, "
                 f"D={rows[0]['D']}, {rows[0]['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}", file=stream)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ops", default=",".join(OPS), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int)
    p.add_argument("--impls", default="ours,eager,compile")
    p.add_argument("--mode", default="both", choices=["time", "memory", "both"], help=argparse.SUPPRESS)
    p.add_argument("--check-error", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--check-max", type=int, default=2048,
                   help="largest N whose error against the float64 reference is measured")
    p.add_argument("--sizes", default="1024,2048,4096,8192", help="N for ours vs eager (comma list)")
    p.add_argument("--large", default="65536", help="N for ours alone (comma list, '' for none)")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--out", default="bench/out", help="folder for results.csv, latest.md and the plot")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="without the torch.compile column (its compiles "
                   "take seconds per N)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return _worker(args)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    large = [int(x) for x in args.large.split(",") if x]
    run(sizes, large, args.d, args.dtype, args.repeats, args.out, args.threads or None, not args.no_plot,
        args.check_max, compile=not args.no_compile)


if __name__ == "__main__":
    main()
