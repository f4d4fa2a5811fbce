"""Benchmark of the fused ANIL meta-loss (meta.anil_loss) against what users run today:
the per-task autograd loop with create_graph=True (learn2learn / higher style, our
"torch" backend), torch.func vmap(grad) over tasks, and higher's innerloop_ctx where
that package is installed; and against those under torch.compile (inductor, dynamic=False,
graph breaks allowed: "compile" is the vmap baseline's, in every case; "compile-loop" and
"compile-higher" in the main case), compiled from scratch for each case on an empty
inductor cache, their compile time apart and out of the medians.  Where compile cannot run
a baseline (higher's second-order step needs a double backward through compiled graphs,
which AOTAutograd refuses) its row holds the error.  Second order, float32,
forward+backward.

All configurations run in one worker process; peak memory of a call is its peak RSS
(VmHWM reset through /proc/self/clear_refs) over the RSS before it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from metassl_fast import meta

from . import _common as c

MAIN = dict(T=32, S=25, Q=75, D=640, C=5, K=5)
SWEEP_K = (1, 5, 10, 20)
SWEEP_T = (1, 8, 32, 128)
LR = 0.5


def _inputs(T, S, Q, D, C, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, S, D, generator=g, dtype=dtype).requires_grad_()
    y = torch.randint(0, C, (T, S), generator=g)
    xq = torch.randn(T, Q, D, generator=g, dtype=dtype).requires_grad_()
    yq = torch.randint(0, C, (T, Q), generator=g)
    W = (0.01 * torch.randn(C, D, generator=g, dtype=dtype)).requires_grad_()
    b = torch.zeros(C, dtype=dtype, requires_grad=True)
    return x, y, xq, yq, W, b


def _ours(K):
    return lambda x, y, xq, yq, W, b: meta.anil_loss(x, y, xq, yq, W, b, lr=LR, steps=K, backend="cpu")


def _loop(K):
    return lambda x, y, xq, yq, W, b: meta.anil_loss(x, y, xq, yq, W, b, lr=LR, steps=K, backend="torch")


def _vmap(K):
    def task_loss(W, b, x, y, xq, yq):
        def inner(W, b):
            return F.cross_entropy(x @ W.T + b, y)

        for _ in range(K):
            gW, gb = grad(inner, argnums=(0, 1))(W, b)
            W, b = W - LR * gW, b - LR * gb
        return F.cross_entropy(xq @ W.T + b, yq)

    batched = vmap(task_loss, in_dims=(None, None, 0, 0, 0, 0))
    return lambda x, y, xq, yq, W, b: batched(W, b, x, y, xq, yq).mean()


def _higher(K):
    import higher  # noqa: F401  (only where installed)

    def run(x, y, xq, yq, W, b):
        head = torch.nn.Linear(W.shape[1], W.shape[0])
        losses = []
        for t in range(x.shape[0]):
            with torch.no_grad():
                head.weight.copy_(W)
                head.bias.copy_(b)
            opt = torch.optim.SGD(head.parameters(), lr=LR)
            with higher.innerloop_ctx(head, opt, copy_initial_weights=False) as (fhead, diffopt):
                for _ in range(K):
                    diffopt.step(F.cross_entropy(fhead(x[t]), y[t]))
                losses.append(F.cross_entropy(fhead(xq[t]), yq[t]))
        return torch.stack(losses).mean()

    return run


IMPLS = {"ours": _ours, "vmap": _vmap, "loop": _loop, "higher": _higher}
COMPILED = {"compile": "vmap", "compile-loop": "loop", "compile-higher": "higher"}  # impl -> the baseline it compiles


def _step(fn, args):
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            a.grad = None
    fn(*args).backward()


def _measure(impls, cfg, repeats, mode, check=False):
    """impls: names in IMPLS or COMPILED.  mode "time": median (20/80 quantiles) of repeats
    after a warm-up (for a compiled baseline its first call, the compile, timed apart), the
    implementations interleaved repeat by repeat so that a slow spell of this shared machine
    hits all of them alike; mode "memory": peak RSS of one call over the RSS before it (in a
    worker whose mmap threshold is pinned, so freed buffers leave the RSS).  check: a compiled
    baseline's max_rel_err against the float64 loop too (its compiled graphs reused: no recompile)."""
    out, runs = {}, {}
    fresh = True  # one torch._dynamo.reset() per case, before its first compiled baseline
    for impl in impls:
        args = _inputs(cfg["T"], cfg["S"], cfg["Q"], cfg["D"], cfg["C"])
        try:
            fn = IMPLS[COMPILED.get(impl, impl)](cfg["K"])
        except ImportError as exc:
            out[impl] = {"note": f"{exc.name} not installed"}
            continue
        if impl in COMPILED:
            fn, fresh = c.compiled(fn, fresh), False
            step = c.CompiledStep(lambda fn=fn, args=args: _step(fn, args))
            if not step.first():  # its warm-up: the compile, timed apart
                out[impl] = {"note": step.failure}
                continue
        else:
            step = lambda fn=fn, args=args: _step(fn, args)  # noqa: E731
            step()  # warm-up
        if mode == "memory":  # the gradients it makes count: drop the warm-up's first
            for a in args:
                if isinstance(a, torch.Tensor):
                    a.grad = None
            out[impl] = {"peak_mb": c.peak_extra_mb(step)}
            del args, fn, step
        else:
            runs[impl] = (step, [], fn)
    for _ in range(repeats if mode == "time" else 0):
        for step, times, _ in runs.values():
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    for impl, (step, times, fn) in runs.items():
        out[impl] = c.quantiles(times)
        if impl in COMPILED:
            out[impl].update(step.fields(out[impl]["median_ms"]))
            if check:  # the compiled baseline computes the same meta-gradient
                out[impl]["max_rel_err"] = _max_rel_err(cfg, fn)
    return {impl: out[impl] for impl in impls}


def _max_rel_err(cfg, fn=None):
    """fn (default: ours; float32) against the per-task autograd loop in float64, loss and every
    gradient."""
    args32 = _inputs(cfg["T"], cfg["S"], cfg["Q"], cfg["D"], cfg["C"])
    args64 = [a.detach().double().requires_grad_() if a.is_floating_point() else a for a in args32]
    leaves = lambda a: [a[0], a[2], a[4], a[5]]  # noqa: E731
    l32 = (fn or _ours(cfg["K"]))(*args32)
    g32 = torch.autograd.grad(l32, leaves(args32))
    l64 = _loop(cfg["K"])(*args64)
    g64 = torch.autograd.grad(l64, leaves(args64))
    return c.max_rel_err([l32, *g32], [l64, *g64])


MAIN_IMPLS = ("ours", "vmap", "loop", "higher", "compile", "compile-loop", "compile-higher")
SWEEP_IMPLS = ("ours", "vmap", "compile")


def _configs(main=MAIN, sweep_k=SWEEP_K, sweep_t=SWEEP_T):
    """(label, cfg, impls, repeats): the main case with every baseline, then the sweeps."""
    out = [("main", dict(main), MAIN_IMPLS, 11)]
    for K in sweep_k:
        out.append(("sweep K", {**main, "K": K}, SWEEP_IMPLS, 7))
    for T in sweep_t:
        if T != main["T"]:
            out.append(("sweep T", {**main, "T": T}, SWEEP_IMPLS, 7))
    return out


def _worker(mode, configs, compile=True):
    startup = c.compile_startup_s() if compile else None
    for label, cfg, impls, repeats in configs:
        res = _measure([i for i in impls if compile or i not in COMPILED], cfg, repeats, mode,
                       check=label == "main" and mode == "time")
        res.update({i: {"note": c.COMPILE_SKIPPED} for i in impls if i not in res})
        err = _max_rel_err(cfg) if label == "main" and mode == "time" else None
        print("ROW " + json.dumps({"label": label, **cfg, "results": res, "max_rel_err": err,
                                   "compile_startup_s": startup}), flush=True)


def _run_worker(mode, configs, compile, cache, total, done):
    env = {**(c.pinned_malloc_env() if mode == "memory" else os.environ), **cache}
    # the timing worker keeps glibc's default allocator: pinned, every output is a fresh
    # mmap whose page faults cost more than the kernel itself
    cmd = [sys.executable, "-m", "metassl_fast.benchmarks.inner_loop", "--worker", mode,
           "--configs", json.dumps(configs)] + ([] if compile else ["--no-compile"])
    return c.worker_rows(cmd, env, len(configs), total, done, lambda row: f"inner loop {mode} {row['label']}",
                         f"inner-loop benchmark ({mode})")


def run(out_dir="bench/out", stream=sys.stdout, compile=True, configs=None):
    """Run the inner-loop benchmark (a timing worker, then a memory worker) of configs (default
    _configs(): the main case and the sweeps), compile: with the torch.compile rows; returns the rows."""
    configs = _configs() if configs is None else configs
    n = len(configs)
    c.progress(0, 2 * n, "inner loop")
    with c.cold_compile_cache() as cache:  # the memory worker's compiles (not timed) find the timing one's
        rows = _run_worker("time", configs, compile, cache, 2 * n, 0)
        for row, mem in zip(rows, _run_worker("memory", configs, compile, cache, 2 * n, n)):
            for impl, m in mem["results"].items():
                row["results"][impl]["peak_mb"] = m.get("peak_mb")
    record = c.run_meta(c.cpu_name(), torch.get_num_threads())
    table = format_table(rows, record)
    print(table, file=stream)
    flat = []
    for r in rows:
        base = r["results"].get("vmap", {}).get("median_ms")
        comp = r["results"].get("compile", {}).get("median_ms")
        for impl, m in r["results"].items():
            ms = m.get("median_ms")
            flat.append({"op": "anil_loss", "impl": impl, "dtype": "float32", "N": r["T"], "D": r["D"],
                         "median_ms": ms, "p20_ms": m.get("p20_ms"), "p80_ms": m.get("p80_ms"),
                         "speedup": base / ms if base and ms else None,
                         "speedup_vs_compile": comp / ms if comp and ms else None,
                         "peak_mb": m.get("peak_mb"), "mem_ratio": None,
                         "max_rel_err": r["max_rel_err"] if impl == "ours" else m.get("max_rel_err"),
                         "repeats": None,
                         "S": r["S"], "Q": r["Q"], "C": r["C"], "K": r["K"],
                         **{k: m.get(k) for k in ("compile_s", "graph_breaks", "note")}})
    c.write_outputs(out_dir, table, "latest_inner_loop.md", "results_inner_loop.csv", flat, record,
                    c.CSV_FIELDS + ["speedup_vs_compile", "S", "Q", "C", "K", "compile_s", "graph_breaks", "note"])
    return rows


def format_table(rows, meta):
    lines = [f"ANIL meta-loss, second order, float32, forward+backward, {meta['device']}, "
             f"{meta['threads']} threads, torch {meta['torch']}, metassl_fast {meta['version']}, {meta['date']}\n",
             "| case | T | S | Q | D | C | K | impl | median ms (p20-p80) | ours faster by | peak MiB | compile s |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        ours = r["results"]["ours"].get("median_ms")
        for impl, m in r["results"].items():
            ms = m.get("median_ms")
            timing = f"{ms:.1f} ({m['p20_ms']:.1f}-{m['p80_ms']:.1f})" if ms else m.get("note", "-")
            ratio = f"{ms / ours:.1f}x" if ms and impl != "ours" else "-"
            compile_s = "; ".join(([f"{m['compile_s']:.1f}"] if m.get("compile_s") is not None else [])
                                  + ([m["note"]] if ms and m.get("note") else [])) or "-"
            lines.append(f"| {r['label']} | {r['T']} | {r['S']} | {r['Q']} | {r['D']} | {r['C']} | {r['K']} | "
                         f"{impl} | {timing} | {ratio} | {c.fmt(m.get('peak_mb'), '.1f')} | {compile_s} |")
    main = rows[0]
    lines.append(f"\nmax relative error of ours (float32) against the float64 autograd loop, main case: "
                 f"{c.fmt(main['max_rel_err'], '.1e')}" + "".join(
                     f"; {impl}: {c.fmt(m['max_rel_err'], '.1e')}" for impl, m in main["results"].items()
                     if m.get("max_rel_err") is not None))
    if any(i in COMPILED for r in rows for i in r["results"]):
        lines.append("\n" + c.compile_legend([r["compile_startup_s"] for r in rows]) + "  compile is the vmap "
                     "baseline's, compile-loop and compile-higher the loop's and higher's.")
    return "\n".join(lines)


def run_gpu(out_dir="bench/out", stream=sys.stdout, Ts=(32, 128)):
    """On a CUDA device: the Triton and CUDA C++ kernels of anil_loss against torch.func vmap(grad) and the
    per-task autograd loop, forward+backward, float32, the main shape at each T; median
    of triton.testing.do_bench, peak memory from torch.cuda.max_memory_allocated."""
    import metassl_fast
    from triton.testing import do_bench

    if not torch.cuda.is_available():
        raise RuntimeError("run_gpu needs a CUDA device")

    def ours(backend):
        return lambda K: (lambda x, y, xq, yq, W, b: meta.anil_loss(x, y, xq, yq, W, b, lr=LR, steps=K,
                                                                  backend=backend))

    impls = {"ours-triton": ours("triton")}
    if c.cuda_built():
        impls["ours-cuda"] = ours("cuda")
    impls.update(vmap=_vmap, loop=_loop)
    rows = []
    for T in Ts:
        cfg = {**MAIN, "T": T}
        args = [a.cuda().detach().requires_grad_(a.requires_grad) for a in
                _inputs(T, cfg["S"], cfg["Q"], cfg["D"], cfg["C"])]
        for name, make in impls.items():
            fn = make(cfg["K"])
            try:
                _step(fn, args)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                _step(fn, args)
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                ms = do_bench(lambda: _step(fn, args), quantiles=[0.5, 0.2, 0.8])
                rows.append({"T": T, "impl": name, "median_ms": ms[0], "p20_ms": ms[1], "p80_ms": ms[2],
                             "peak_mb": peak})
            except Exception as exc:  # a baseline that fails is reported, not hidden
                rows.append({"T": T, "impl": name, "note": f"{type(exc).__name__}: {exc}"[:80]})
    lines = [f"ANIL meta-loss on {torch.cuda.get_device_name()}, S={MAIN['S']} Q={MAIN['Q']} D={MAIN['D']} "
             f"C={MAIN['C']} K={MAIN['K']}, second order, float32, forward+backward, torch {torch.__version__}, "
             f"metassl_fast {metassl_fast.__version__}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n",
             "| T | impl | median ms (p20-p80) | vmap / this | peak MiB |", "|---:|---|---:|---:|---:|"]
    for r in rows:
        vm = next((x.get("median_ms") for x in rows if x["T"] == r["T"] and x["impl"] == "vmap"), None)
        if "median_ms" not in r:
            lines.append(f"| {r['T']} | {r['impl']} | {r['note']} | - | - |")
            continue
        ratio = f"{vm / r['median_ms']:.1f}x" if vm else "-"
        lines.append(f"| {r['T']} | {r['impl']} | {r['median_ms']:.2f} ({r['p20_ms']:.2f}-{r['p80_ms']:.2f}) | "
                     f"{ratio} | {r['peak_mb']:.1f} |")
    table = "\n".join(lines)
    print(table, file=stream)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "latest_inner_loop_gpu.md"), "w") as f:
        f.write(table + "\n")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--configs", help=argparse.SUPPRESS)  # the worker's cases, as JSON
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="without the torch.compile rows (the compiles take minutes)")
    p.add_argument("--out", default="bench/out")
    p.add_argument("--gpu", action="store_true", help="the GPU benchmark of the Triton kernel (needs CUDA)")
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args.worker, json.loads(args.configs), args.compile)
    if args.gpu:
        return run_gpu(args.out)
    run(args.out, compile=args.compile)


if __name__ == "__main__":
    main()
