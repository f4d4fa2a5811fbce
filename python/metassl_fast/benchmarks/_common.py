"""What every benchmark shares: the eager baselines of the CPU and GPU tables, their
torch.compile'd versions, peak-memory measurement, worker processes, quantiles, the CSV
record and the table formatting.

Imports torch and the standard library only, so that each benchmark module imports this
one and the public metassl_fast API, and no benchmark imports another.
"""
from __future__ import annotations

import contextlib
import csv
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

TEMPERATURE = 0.07

CSV_FIELDS = ["date", "version", "torch", "device", "threads", "op", "impl", "dtype", "N", "D",
              "median_ms", "p20_ms", "p80_ms", "speedup", "peak_mb", "mem_ratio", "max_rel_err", "repeats"]


# ----------------------------------------------------------------------------- eager baselines

def eager_info_nce(q, k, logit_scale):
    """lightly / info-nce-pytorch style: normalise, materialise the logits, cross-entropy."""
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = qn @ kn.T / TEMPERATURE
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def eager_clip_loss(image, text, logit_scale):
    """open_clip ClipLoss.forward for one process, as written there."""
    logits_per_image = logit_scale * image @ text.T
    logits_per_text = logit_scale * text @ image.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def eager_siglip(image, text, logit_scale):
    """open_clip SigLipLoss.forward for one process (bias -10)."""
    logits = logit_scale * image @ text.T - 10.0
    labels = 2 * torch.eye(image.shape[0], device=image.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


def eager_nt_xent(z1, z2, logit_scale):
    """lightly NTXentLoss without a memory bank (SimCLR), as its single-process code does."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T) * (1 / 0.5)
    logits = logits.masked_fill(torch.eye(z.shape[0], dtype=torch.bool, device=z.device), float("-inf"))
    n = z1.shape[0]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, target)


# ----------------------------------------------------------------------------- torch.compile baselines
# A CPU table's "compile" column is its eager baseline under torch.compile (inductor,
# dynamic=False, graph breaks allowed): what a user tries before a fused kernel.  Its compile
# time is reported apart and kept out of the medians; where compile cannot run the baseline
# the row holds the error instead of a time.

COMPILE_SKIPPED = "not run (--no-compile)"


def compiled(fn, fresh=True):
    """fn under torch.compile(dynamic=False).  fresh: torch._dynamo.reset() first, so that this
    shape's first call compiles from scratch (pass fresh=False for the second and later compiled
    baselines of one shape: a reset would throw away the graphs of the first)."""
    if fresh:
        torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def compile_startup_s():
    """Seconds of torch.compile's one-time start-up in this process (imports, the C++ toolchain
    probe, the first kernel build): a trivial function compiled forward and backward, run once
    in a worker before its measured compiles so that none of them carries it."""
    x = torch.ones(3, requires_grad=True)
    t0 = time.perf_counter()
    compiled(lambda x: (x * 2).sum())(x).backward()
    torch._dynamo.reset()
    return time.perf_counter() - t0


def _dynamo_counts():
    """(graphs dynamo has compiled, graph breaks it has met) in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def compile_failure(exc, limit=160):
    """'compile failed: <type>: <first line of the message>', at most limit characters, fit for
    a markdown cell."""
    lines = str(exc).strip().splitlines()
    text = f"compile failed: {type(exc).__name__}: {lines[0] if lines else ''}".replace("|", "/")
    return text if len(text) <= limit else text[:limit - 3] + "..."


class CompiledStep:
    """A forward+backward step (no arguments) through a compiled baseline, for the interleaved
    timing loops.  first() makes the first call, which compiles (the backward graph at the first
    backward), timed apart; a later call counts the graphs dynamo compiles during it, so that a
    baseline that recompiles while timed (its median then holds compile work) says so."""

    def __init__(self, step):
        self.step = step
        self.first_s = None
        self.failure = None
        self.graph_breaks = 0
        self.recompiles = 0

    def first(self):
        """Make the first call; False (and failure says why) where it raised."""
        breaks = _dynamo_counts()[1]
        t0 = time.perf_counter()
        try:
            self.step()
        except Exception as exc:  # a baseline that fails is reported, not hidden
            self.failure = compile_failure(exc)
            return False
        self.first_s = time.perf_counter() - t0
        self.graph_breaks = _dynamo_counts()[1] - breaks
        return True

    def __call__(self):
        graphs = _dynamo_counts()[0]
        out = self.step()
        self.recompiles += _dynamo_counts()[0] - graphs
        return out

    def fields(self, median_ms):
        """The row's compile_s (first call minus median_ms, None where compile failed),
        graph_breaks and note (the failure, or the graph breaks and recompiles)."""
        if self.first_s is None:
            return {"compile_s": None, "graph_breaks": None, "note": self.failure}
        notes = [f"{self.graph_breaks} graph breaks"] if self.graph_breaks else []
        if self.recompiles:
            notes.append(f"recompiled {self.recompiles}x while timed")
        return {"compile_s": max(self.first_s - median_ms / 1e3, 0.0), "graph_breaks": self.graph_breaks,
                "note": "; ".join(notes) or None}


@contextlib.contextmanager
def cold_compile_cache():
    """The environment a worker adds to put torch.compile's on-disk caches (inductor's FX-graph,
    AOTAutograd and kernel caches) in a fresh temporary folder, removed afterwards: a compile time
    measured under it is a cold cache's, what a first run pays, and the same on every run (on a
    warm cache a rerun's compile is mostly cache hits).  {} where TORCHINDUCTOR_CACHE_DIR is set
    already: the caller chose that cache (the tests share one, to pay the cold compiles once)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        yield {}
        return
    with tempfile.TemporaryDirectory(prefix="metassl_fast_inductor_") as d:
        yield {"TORCHINDUCTOR_CACHE_DIR": d}


def compile_legend(startups):
    """The table's footnote on the compile column, with the start-up seconds the workers measured."""
    startups = sorted(s for s in startups if s is not None)
    span = "-" if not startups else f"{startups[0]:.1f}"
    if len(startups) > 1 and f"{startups[-1]:.1f}" != span:
        span += f"-{startups[-1]:.1f}"
    cache = (f"on the inductor cache in TORCHINDUCTOR_CACHE_DIR={os.environ['TORCHINDUCTOR_CACHE_DIR']} (warm "
             "on a rerun)" if os.environ.get("TORCHINDUCTOR_CACHE_DIR") else "on an empty inductor cache")
    return ("compile: the baseline under torch.compile (inductor, dynamic=False, graph breaks allowed), "
            f"compiled from scratch for each shape {cache}; compile s = its first call minus its median, "
            "kept out of the medians; torch.compile's one-time start-up in a worker "
            f"({span} s) is measured apart, before, and in no row.")


# ----------------------------------------------------------------------------- measurement

def cuda_built() -> bool:
    """The CUDA C++ backend is built (it runs only where a CUDA device is present)."""
    import metassl_fast

    return metassl_fast.available_backends()["cuda"].startswith("built")


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mb(call):
    """Peak RSS of call() over the RSS before it, in MiB (None where the kernel does
    not let us reset the peak)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    before = _status_kb("VmRSS")
    call()
    return (_status_kb("VmHWM") - before) / 1024.0


def quantiles(times):
    """{median_ms, p20_ms, p80_ms} of a list of times in ms."""
    ts = sorted(times)
    return {"median_ms": ts[len(ts) // 2], "p20_ms": ts[int(0.2 * (len(ts) - 1))],
            "p80_ms": ts[int(math.ceil(0.8 * (len(ts) - 1)))]}


def max_rel_err(got, want):
    """max over pairs of max|a - b| / max|b| (pairs with a None skipped), in float64."""
    err = 0.0
    for a, b in zip(got, want):
        if a is None or b is None:
            continue
        err = max(err, ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item())
    return err


# ----------------------------------------------------------------------------- worker processes

def pinned_malloc_env():
    """os.environ with glibc's mmap threshold fixed: freed big buffers leave the RSS at once
    instead of hiding in the heap, so that peak RSS measures what a call allocates."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def worker_result(module, args, env):
    """Run `python -m module --worker args` and return the JSON of its RESULT line."""
    cmd = [sys.executable, "-m", module, "--worker", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark worker failed ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}")


def progress(i, total, label):
    width = 30
    done = int(width * i / total)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{total} {label:<40}")
    sys.stderr.flush()
    if i == total:
        sys.stderr.write("\n")


def worker_rows(cmd, env, expected: int, total: int, done: int, label, what: str) -> list[dict]:
    """Run a benchmark worker (a subprocess that prints one `ROW <json>` line per case) and
    collect its rows, with progress(done + rows, total, label(row)) after each; RuntimeError
    with the worker's stderr if it fails or returns other than `expected` rows."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    rows = []
    for line in proc.stdout:
        if line.startswith("ROW "):
            rows.append(json.loads(line[4:]))
            progress(done + len(rows), total, label(rows[-1]))
    err = proc.stderr.read()
    if proc.wait() != 0 or len(rows) != expected:
        raise RuntimeError(f"{what} worker failed:\n{err}")
    return rows


# ----------------------------------------------------------------------------- the record

def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"cpu: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def run_meta(device, threads):
    """The header of a table and the constant columns of its CSV rows."""
    import metassl_fast

    return {"version": metassl_fast.__version__, "torch": torch.__version__, "device": device,
            "threads": threads, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def append_csv(path, rows, meta, fields=CSV_FIELDS):
    """Append rows to the CSV at path.  A file that lacks some of fields (written before they were
    added) is first rewritten under the union of both headers, its rows blank in the new columns,
    so that no value lands under another column's name."""
    header = list(fields)
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old = reader.fieldnames or []
            old_rows = list(reader) if not set(fields) <= set(old) else None
        header = old if old_rows is None else header + [k for k in old if k not in fields]
        if old_rows is not None:
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=header)
                w.writeheader()
                w.writerows(old_rows)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**{k: meta[k] for k in ("date", "version", "torch", "device", "threads")},
                        **{k: r[k] for k in fields if k in r}})


def write_outputs(out_dir, table, md_name, csv_name, rows, meta, fields=CSV_FIELDS):
    """Append rows to out_dir/csv_name and write the table to out_dir/md_name."""
    os.makedirs(out_dir, exist_ok=True)
    append_csv(os.path.join(out_dir, csv_name), rows, meta, fields)
    with open(os.path.join(out_dir, md_name), "w") as f:
        f.write(table + "\n")
