"""Benchmark of the drop-ins (metassl_fast.compat) against the original packages' own
losses on the same inputs, in the same worker process, CPU; and against the original's loss
under torch.compile (inductor, dynamic=False, graph breaks allowed: what a user tries first;
a separate instance of it, so that a memory bank's state is not shared), compiled on an
empty inductor cache, its compile time apart and out of the medians, or the error where it
fails.

Each case runs in a fresh worker (peak memory = peak RSS over the RSS before the call,
as in benchmarks/contrastive.py).  Times are forward+backward medians of interleaved
repeats after a warm-up; "max rel diff" is max over the loss and every input gradient
of max|ours - original| / max|original| on the measured inputs (float32).
Originals that are not installed are reported as missing (scripts/setup.sh installs
them); pytorch-metric-learning's NTXentLoss allocates (positive pairs x negative pairs)
and is measured at a size it survives.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from metassl_fast.compat import info_nce as c_info_nce
from metassl_fast.compat import lightly as c_lightly
from metassl_fast.compat import open_clip as c_open_clip
from metassl_fast.compat import pytorch_metric_learning as c_pml

from . import _common as c
from . import originals

D = 128

# the op (bench/bench_<op>.py, ops/<op>) each drop-in case measures
CASES_OF_OP = {
    "contrastive": ("info_nce.InfoNCE", "info_nce.InfoNCE+negatives", "open_clip.ClipLoss"),
    "labeled": ("lightly.NTXentLoss", "lightly.NTXentLoss+bank", "pml.SupConLoss", "pml.NTXentLoss"),
    "siglip": ("open_clip.SigLipLoss",),
}


def _case_table():
    """name -> (description, rows N, make(N) -> (ours_fn, orig_fn, inputs))."""

    def leaves(*shapes, seed=0):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(*s, generator=g).requires_grad_() for s in shapes]

    def lightly_ntxent(n):
        NT = originals.lightly_ntxent()
        a, b = leaves((n // 2, D), (n // 2, D))
        return c_lightly.NTXentLoss(0.5), NT(0.5), [a, b]

    def lightly_bank(n):
        NT = originals.lightly_ntxent()
        torch.manual_seed(0)
        orig = NT(0.2, memory_bank_size=(65536, D))
        torch.manual_seed(0)
        ours = c_lightly.NTXentLoss(0.2, memory_bank_size=(65536, D))
        a, b = leaves((n, D), (n, D))
        # both banks start equal and get the same batches in the same order: they stay equal
        return ours, orig, [a, b]

    def pml_supcon(n):
        L = originals.pml()
        (x,) = leaves((n, D))
        y = torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(1))
        # built once, as a trainer does (and torch.compile cannot trace pml's module constructor)
        ours, orig = c_pml.SupConLoss(0.1), L.SupConLoss(0.1)
        return (lambda e: ours(e, y)), (lambda e: orig(e, y)), [x]

    def pml_ntxent(n):
        L = originals.pml()
        a, b = leaves((n // 2, D), (n // 2, D))
        return (c_pml.SelfSupervisedLoss(c_pml.NTXentLoss(0.07)), L.SelfSupervisedLoss(L.NTXentLoss(0.07)), [a, b])

    def info_nce_in_batch(n):
        m = originals.info_nce_pkg()
        q, p = leaves((n, D), (n, D))
        return c_info_nce.InfoNCE(0.1), m.InfoNCE(0.1), [q, p]

    def info_nce_negatives(n):
        m = originals.info_nce_pkg()
        q, p, neg = leaves((n, D), (n, D), (n, D))
        return c_info_nce.InfoNCE(0.1), m.InfoNCE(0.1), [q, p, neg]

    def clip(n):
        ClipLoss, _ = originals.open_clip_losses()
        a, b = leaves((n, D), (n, D))
        s = torch.tensor(14.0, requires_grad=True)
        unit = [F.normalize(a.detach(), dim=1).requires_grad_(), F.normalize(b.detach(), dim=1).requires_grad_()]
        return c_open_clip.ClipLoss(), ClipLoss(), unit + [s]

    def siglip(n):
        _, SigLipLoss = originals.open_clip_losses()
        a, b = leaves((n, D), (n, D))
        unit = [F.normalize(a.detach(), dim=1).requires_grad_(), F.normalize(b.detach(), dim=1).requires_grad_()]
        s = torch.tensor(10.0, requires_grad=True)
        bias = torch.tensor(-10.0, requires_grad=True)
        return c_open_clip.SigLipLoss(), SigLipLoss(), unit + [s, bias]

    return {
        "lightly.NTXentLoss": ("2 x N/2 views, in-batch negatives", lightly_ntxent),
        "lightly.NTXentLoss+bank": ("N queries, memory bank of 65536", lightly_bank),
        "pml.SupConLoss": ("N embeddings, 100 classes", pml_supcon),
        "pml.NTXentLoss": ("SelfSupervisedLoss, 2 x N/2 views", pml_ntxent),
        "info_nce.InfoNCE": ("N pairs, in-batch negatives", info_nce_in_batch),
        "info_nce.InfoNCE+negatives": ("N pairs, N unpaired negatives", info_nce_negatives),
        "open_clip.ClipLoss": ("N pairs", clip),
        "open_clip.SigLipLoss": ("N pairs", siglip),
    }


def _step(fn, inputs):
    for x in inputs:
        x.grad = None
    loss = fn(*inputs)
    loss.backward()
    return [loss.detach()] + [x.grad for x in inputs]


def _worker(args):
    make = _case_table()[args.case][1]
    try:
        ours, orig, inputs = make(args.n)
    except originals.OriginalMissing as exc:
        print("RESULT " + json.dumps({"missing": str(exc)}))
        return
    with_compile = args.compile and not args.ours_only
    startup = c.compile_startup_s() if with_compile else None
    steps = {"ours": lambda: _step(ours, inputs)}
    if not args.ours_only:
        steps["original"] = lambda: _step(orig, inputs)
    if with_compile:  # a second instance of the original (same seeds: same state), compiled
        compiled = c.compiled(make(args.n)[1])
        steps["compile"] = c.CompiledStep(lambda: _step(compiled, inputs))
    times = {k: [] for k in steps}
    peaks, outs, res = {}, {}, {}
    for impl, step in list(steps.items()):
        if impl == "compile":
            if not step.first():  # its warm-up: the compile, timed apart
                res[impl] = {"note": step.failure}
                del steps[impl]
                continue
        else:
            step()  # warm-up
        peaks[impl] = c.peak_extra_mb(lambda: outs.__setitem__(impl, step()))
        outs[impl] = [None if t is None else t.clone() for t in outs[impl]]
    for _ in range(args.repeats):
        for impl, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[impl].append((time.perf_counter() - t0) * 1e3)
    for impl, step in steps.items():
        res[impl] = {**c.quantiles(times[impl]), "peak_mb": peaks[impl]}
        if impl == "compile":
            res[impl].update(step.fields(res[impl]["median_ms"]))
        if impl != "original" and "original" in outs:  # ours, and compile: the same loss as the original's?
            res[impl]["max_rel_diff"] = c.max_rel_err(outs[impl], outs["original"])
    order = [k for k in ("ours", "original", "compile") if k in res]
    print("RESULT " + json.dumps({"compile_startup_s": startup, "impls": {k: res[k] for k in order}}))


def _run_worker(case, n, repeats, ours_only, threads, compile=True):
    args = ["--case", case, "--n", str(n), "--repeats", str(repeats), "--threads", str(threads)]
    args += (["--ours-only"] if ours_only else []) + ([] if compile else ["--no-compile"])
    with c.cold_compile_cache() as cache:
        return c.worker_result("metassl_fast.benchmarks.family", args, {**c.pinned_malloc_env(), **cache})


# (case, N, ours only): N = rows fed to the loss (both views together for NT-Xent);
# pml's NTXentLoss at 512 rows already allocates ~0.5 GiB of pair masks (cubic in N).
PLAN = [("lightly.NTXentLoss", 8192, False), ("lightly.NTXentLoss+bank", 1024, False),
        ("pml.SupConLoss", 8192, False), ("pml.NTXentLoss", 512, False), ("pml.NTXentLoss", 8192, True),
        ("info_nce.InfoNCE", 8192, False), ("info_nce.InfoNCE+negatives", 8192, False),
        ("open_clip.ClipLoss", 8192, False), ("open_clip.SigLipLoss", 8192, False)]


def run(out_dir="bench/out", repeats=3, threads=None, stream=sys.stdout, plan=PLAN, compile=True):
    """Run the drop-in benchmark of each (case, N, ours only) in plan (compile: with the
    torch.compile column of the original); returns the rows (also appended to out_dir/family.csv)."""
    threads = threads or torch.get_num_threads()
    descr = {k: v[0] for k, v in _case_table().items()}
    rows, startups = [], []
    for i, (case, n, ours_only) in enumerate(plan):
        sys.stderr.write(f"\r[family {i + 1}/{len(plan)}] {case} N={n}          ")
        sys.stderr.flush()
        res = _run_worker(case, n, repeats, ours_only, threads, compile)
        if "missing" in res:
            for impl in ("original", "compile") if compile else ("original",):
                rows.append({"op": case, "impl": impl, "N": n, "note": res["missing"]})
            continue
        startups.append(res["compile_startup_s"])
        orig, comp = res["impls"].get("original"), res["impls"].get("compile", {}).get("median_ms")
        for impl, r in res["impls"].items():
            ms = r.get("median_ms")
            rows.append({"op": case, "impl": impl, "N": n, "D": D, "dtype": "float32", **r,
                         "speedup": orig["median_ms"] / ms if orig and ms else None,
                         "speedup_vs_compile": comp / ms if comp and ms else None,
                         "mem_ratio": (r["peak_mb"] / orig["peak_mb"]) if orig and orig["peak_mb"] and ms else None,
                         "inputs": descr[case]})
    sys.stderr.write("\n")
    meta = c.run_meta(c.cpu_name(), threads)
    table = format_table(rows, meta, startups)
    print(table, file=stream)
    fields = ["date", "version", "torch", "device", "threads", "op", "impl", "N", "D", "dtype", "median_ms",
              "p20_ms", "p80_ms", "speedup", "speedup_vs_compile", "peak_mb", "mem_ratio", "max_rel_diff",
              "compile_s", "graph_breaks", "note", "inputs"]
    c.write_outputs(out_dir, table, "family.md", "family.csv", rows, meta, fields)
    return rows


def _ratio(x):
    return f"{c.fmt(x, '.2f')}{'x' if x else ''}"


def format_table(rows, meta, startups=()):
    lines = [f"drop-ins vs the original packages, forward+backward, {meta['device']}, {meta['threads']} threads, "
             f"torch {meta['torch']}, metassl_fast {meta['version']}, {meta['date']}, D={D}, float32\n",
             "| loss | impl | N | median ms (p20-p80) | speed-up vs original | vs compile | peak MiB | mem ratio | "
             "max rel diff | compile s | inputs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if not r.get("median_ms"):  # a missing original, or a compile that failed: the reason
            lines.append(f"| {r['op']} | {r['impl']} | {r['N']} | {r['note']} | - | - | - | - | - | - | "
                         f"{r.get('inputs', '-')} |")
            continue
        compile_s = "; ".join(([f"{r['compile_s']:.1f}"] if r.get("compile_s") is not None else [])
                              + ([r["note"]] if r.get("note") else [])) or "-"
        lines.append(f"| {r['op']} | {r['impl']} | {r['N']} | {r['median_ms']:.1f} ({r['p20_ms']:.1f}-"
                     f"{r['p80_ms']:.1f}) | {_ratio(r['speedup'])} | {_ratio(r['speedup_vs_compile'])} | "
                     f"{c.fmt(r['peak_mb'], '.1f')} | {c.fmt(r['mem_ratio'], '.4f')} | "
                     f"{c.fmt(r.get('max_rel_diff'), '.1e')} | {compile_s} | {r['inputs']} |")
    if any(r["impl"] == "compile" for r in rows):
        lines.append("\n" + c.compile_legend(startups) + "  max rel diff of compile: against the original.")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case")
    p.add_argument("--n", type=int)
    p.add_argument("--ours-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="bench/out")
    p.add_argument("--op", choices=sorted(CASES_OF_OP), help="only the cases of this op (default: all)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="without the torch.compile column (its compiles take seconds per case)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        _worker(args)
    else:
        plan = [row for row in PLAN if args.op is None or row[0] in CASES_OF_OP[args.op]]
        run(args.out, args.repeats, args.threads or None, plan=plan, compile=args.compile)


if __name__ == "__main__":
    main()
