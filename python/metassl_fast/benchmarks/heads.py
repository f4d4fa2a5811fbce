"""Benchmark of the convex few-shot heads (meta.svm_loss, meta.ridge_loss, meta.fit_logreg)
against what users run today, on the same episodes in the same run:

- svm_loss (C = 0.1) against MetaOptNet's Crammer-Singer SVM head through qpth at 3
  interior-point iterations (as MetaOptNet evaluates; 15 is its default), forward+backward;
  with the KKT residual our solver reached and each one's error in d loss / d support
  against the converged float64 solution's (svm_loss with backend="torch" in float64);
- ridge_loss (lam = 50) against R2-D2's batched torch solve with autograd, eager and under
  torch.compile (compile time reported apart), forward+backward;
- fit_logreg against an RFS-style scikit-learn LogisticRegression loop over the episodes
  (L2-normalised features, C = 1, lbfgs, max_iter 1000; lam = 1 / (C S) is the same
  problem), episodes per second and query accuracy of both.

float32.  Episodes: T tasks of n_way classes, class means N(0, D^-1/2 I) plus unit noise
(the D^-1/4 separation keeps few-shot accuracy about level across D, like real features:
separable-ish, not trivially).  Timing runs in one worker process, the providers
interleaved repeat by repeat after a warm-up (median, 20/80 quantiles); peak memory in a
second worker with glibc's mmap threshold pinned: peak RSS of one call over the RSS before
it (_common.peak_extra_mb: VmHWM reset through /proc/self/clear_refs), so that torch's,
qpth's and numpy's allocations all count.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys
import time
import types

import torch
import torch.nn.functional as F

from metassl_fast import meta

from . import _common as c

N_WAY = 5
Q_PER_CLASS = 15
SVM_C = 0.1
RIDGE_LAM = 50.0
SKLEARN_C = 1.0
EVAL_CHUNK = 16  # episodes per fit_logreg call: 25 was as fast at 15-shot and 4% faster at 5-shot, but its
# peak RSS (0.8-1.0 MiB with a view of a whole chunk's W kept) exceeded scikit-learn's 0.55-1.0; 16: 0.45

FULL = dict(T=8, Ds=(640, 16000), shots=(5, 15), q=Q_PER_CLASS, episodes=2000, logreg_D=640,
            repeats={"svm": 7, "ridge": 21, "logreg": 7}, qpth_iters=(3, 15), compile=True)
QUICK = dict(T=2, Ds=(24,), shots=(2,), q=3, episodes=12, logreg_D=24,
             repeats={"svm": 2, "ridge": 2, "logreg": 2}, qpth_iters=(3,), compile=False)

CSV_FIELDS = c.CSV_FIELDS + ["backend", "shot", "S", "Q", "C", "episodes", "episodes_per_s", "accuracy",
                             "kkt_residual", "kkt_solver", "compile_s", "note"]


# ----------------------------------------------------------------------------- episodes

def episodes(T, shot, D, q=Q_PER_CLASS, n_way=N_WAY, seed=0, normalize=False):
    """(support (T, S, D), support_labels (T, S), query (T, Q, D), query_labels (T, Q)), float32,
    S = n_way shot, Q = n_way q; rows L2-normalised if normalize."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(T, n_way, D, generator=g) * D ** -0.25
    ys = torch.arange(n_way).repeat(shot).expand(T, -1).contiguous()
    yq = torch.arange(n_way).repeat(q).expand(T, -1).contiguous()
    rows = torch.arange(T)[:, None]
    xs = means[rows, ys] + torch.randn(T, n_way * shot, D, generator=g)
    xq = means[rows, yq] + torch.randn(T, n_way * q, D, generator=g)
    if normalize:
        xs, xq = F.normalize(xs, dim=-1), F.normalize(xq, dim=-1)
    return xs, ys, xq, yq


# ----------------------------------------------------------------------------- baselines

def qp_function():
    """qpth's QPFunction.  qpth 0.0.18's package __init__ imports qpth.solvers.cvxpy, whose first
    line is `import cvxpy as cp`; that module uses `cp` only inside forward_single_np, the
    QPSolvers.CVXPY path, never in the batched PDIPM solver MetaOptNet calls.  So where cvxpy
    is not installed an empty module under its name lets qpth import (a real cvxpy wins)."""
    if "cvxpy" not in sys.modules and importlib.util.find_spec("cvxpy") is None:
        sys.modules["cvxpy"] = types.ModuleType("cvxpy")
    from qpth.qp import QPFunction

    return QPFunction


def metaoptnet_svm_dual(support, support_labels, n_way, C_reg=SVM_C, max_iter=3):
    """The dual A (T, S, n_way) of MetaOptNet's head MetaOptNetHead_SVM_CS (kjunelee/MetaOptNet,
    models/classification_heads.py at commit 19601591da8090734e2e69113c9510831da5528a),
    written here for CPU tensors: the QP over z = A flattened example-major,
        min 1/2 z^T (K kron I_C + 1.0 I) z - Y^T z   s.t.  z <= C_reg Y,  (I_S kron 1_C^T) z = 0,
    K = X X^T, solved by qpth's QPFunction(verbose=False, maxIter=max_iter) with the
    constraint tensors detached as there (the gradient flows through K only)."""
    T, S, _ = support.shape
    n = S * n_way
    K = support @ support.transpose(1, 2)
    eye_c = torch.eye(n_way, dtype=support.dtype)
    G = (K[:, :, None, :, None] * eye_c[:, None, :]).reshape(T, n, n)  # [i c, j c'] = K_ij [c = c']
    G = G + torch.eye(n, dtype=support.dtype)  # MetaOptNet's "help avoid PSD error" term
    Y = F.one_hot(support_labels, n_way).to(support.dtype).reshape(T, n)
    ineq = torch.eye(n, dtype=support.dtype).expand(T, n, n).contiguous()
    eq = torch.kron(torch.eye(S, dtype=support.dtype), torch.ones(1, n_way, dtype=support.dtype))
    eq = eq.expand(T, S, n).contiguous()
    zero = support.new_zeros(T, S)
    z = qp_function()(verbose=False, maxIter=max_iter)(G, -Y.detach(), ineq, C_reg * Y.detach(), eq, zero)
    return z.reshape(T, S, n_way)


def metaoptnet_svm_loss(support, support_labels, query, query_labels, max_iter=3):
    """Mean query cross-entropy of MetaOptNet's SVM head (logits sum_i A_ic <x_i, q>, scale 1)."""
    A = metaoptnet_svm_dual(support, support_labels, N_WAY, max_iter=max_iter)
    logits = (query @ support.transpose(1, 2)) @ A
    return F.cross_entropy(logits.reshape(-1, N_WAY), query_labels.reshape(-1))


def r2d2_loss(support, support_labels, query, query_labels, lam=RIDGE_LAM):
    """R2-D2's head as a user writes it in torch: W = X^T (X X^T + lam I)^-1 Y by a batched
    solve, autograd through it, the query cross-entropy of query @ W."""
    S = support.shape[1]
    Y = F.one_hot(support_labels, N_WAY).to(support.dtype)
    K = support @ support.transpose(1, 2) + lam * torch.eye(S, dtype=support.dtype)
    W = support.transpose(1, 2) @ torch.linalg.solve(K, Y)
    logits = query @ W
    return F.cross_entropy(logits.reshape(-1, N_WAY), query_labels.reshape(-1))


def sklearn_eval(xs, ys, xq, yq):
    """RFS's evaluation loop: one scikit-learn LogisticRegression per episode; returns
    (correct queries, [coef_ (C, D) of the first episodes])."""
    from sklearn.linear_model import LogisticRegression

    correct, coefs = 0, []
    for e in range(xs.shape[0]):
        clf = LogisticRegression(C=SKLEARN_C, max_iter=1000, random_state=0).fit(xs[e], ys[e])
        correct += int((clf.predict(xq[e]) == yq[e]).sum())
        if e < 8:
            coefs.append(clf.coef_)
    return correct, coefs


def ours_eval(xs, ys, xq, yq, backend):
    """fit_logreg over the episodes, EVAL_CHUNK at a time; (correct queries, W of the first 8)."""
    S = xs.shape[1]
    correct, first = 0, None
    for i in range(0, xs.shape[0], EVAL_CHUNK):
        sl = slice(i, i + EVAL_CHUNK)
        W, b = meta.fit_logreg(xs[sl], ys[sl], lam=1.0 / (SKLEARN_C * S), n_way=N_WAY, backend=backend)
        pred = (xq[sl] @ W.transpose(1, 2) + b[:, None]).argmax(-1)
        correct += int((pred == yq[sl]).sum())
        first = W[:8].clone() if first is None else first  # not a view: it would keep the whole chunk's W
    return correct, first


# ----------------------------------------------------------------------------- measurement

def _loss_step(loss_fn, xs, ys, xq, yq):
    """A forward+backward of loss_fn into fresh leaf copies of support and query."""
    x, q = xs.detach().clone().requires_grad_(), xq.detach().clone().requires_grad_()

    def step():
        x.grad = q.grad = None
        loss_fn(x, ys, q, yq).backward()
    return step


def _interleaved(steps, repeats):
    """{name: quantiles} of warmed-up steps, run in turn repeat by repeat (a step whose repeat
    count is smaller drops out early) so that a slow spell of this shared machine hits all
    alike."""
    times = {k: [] for k in steps}
    for r in range(max(repeats.values())):
        for k, fn in steps.items():
            if r < repeats[k]:
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: c.quantiles(v) for k, v in times.items()}


def _qpth_note():
    try:
        qp_function()
        return None
    except ImportError as exc:
        return f"{exc.name} not installed (pip install --no-deps qpth==0.0.18)"


def _grad_support(loss_fn, xs, ys, xq, yq):
    x = xs.detach().clone().requires_grad_()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # qpth prints its inaccurate-solution warning
        g, = torch.autograd.grad(loss_fn(x, ys, xq, yq), [x])
    return g, "qpth warned: inaccurate solution" if "inaccurate" in out.getvalue() else None


def _svm_kkt(xs, ys, backend):
    """(max over tasks of the KKT residual of the dual our solver returns, recomputed in float64
    from its A; the residual the solver itself reports, which it drives below its absolute tol)."""
    if backend != "cpu":
        return None, None
    from metassl_fast.ops import convex as op
    from metassl_fast.reference.convex import svm_kkt_residual

    tol, max_iter = op.DEFAULTS["svm"]
    xq = xs[:, :1].contiguous()
    out = torch.ops.metassl_fast.convex_fwd(xs, ys, xq, ys[:, :1].contiguous(), torch.tensor(SVM_C),
                                            torch.tensor(1.0), "svm", N_WAY, 0.0, 1.0, tol, max_iter, "cpu")
    A = out[2]
    X = xs.double()
    K = X @ X.transpose(1, 2)
    r = svm_kkt_residual(K, A, F.one_hot(ys, N_WAY).double(), SVM_C, 1.0)
    return float(r.max()), float(out[7].max())


def _svm_case(cfg, D, shot, mode, backend):
    data = episodes(cfg["T"], shot, D, cfg["q"])
    ours = lambda *a: meta.svm_loss(*a, C=SVM_C, n_way=N_WAY, backend=backend)  # noqa: E731
    impls = {"ours": ours}
    note = _qpth_note()
    for it in cfg["qpth_iters"]:
        impls[f"qpth-{it}"] = (lambda it: lambda *a: metaoptnet_svm_loss(*a, max_iter=it))(it)
    # qpth-3 under torch.compile, timed in the first (D, shot) only: its compile takes ~1 min here
    first_case = (D, shot) == (cfg["Ds"][0], cfg["shots"][0])
    if cfg["compile"] and mode == "time" and first_case:
        impls["compile"] = _compiled(impls["qpth-3"])
    res = {k: {} for k in impls}
    if not cfg["compile"] and first_case:
        res["compile"] = {"note": "skipped in --quick"}
    if note:
        for k in impls:
            if k != "ours":
                res[k] = {"note": note}
    run = {k: f for k, f in impls.items() if "note" not in res[k]}
    if mode == "time":
        steps = {}
        for k, f in list(run.items()):
            steps[k] = _loss_step(f, *data)
            with contextlib.redirect_stdout(io.StringIO()):
                if k != "compile":
                    steps[k]()  # warm-up
                    continue
                steps[k] = c.CompiledStep(steps[k])
                if not steps[k].first():  # its warm-up: the compile, timed apart
                    res[k]["note"] = steps[k].failure
                    del steps[k], run[k]
        with contextlib.redirect_stdout(io.StringIO()):
            t = _interleaved(steps, {k: cfg["repeats"]["svm"] for k in steps})
        xs64, ys, xq64, yq = [a.double() if a.is_floating_point() else a for a in data]
        g_ref, _ = _grad_support(lambda *a: meta.svm_loss(*a, C=SVM_C, n_way=N_WAY, backend="torch"),
                                 xs64, ys, xq64, yq)
        for k, f in run.items():
            g, warn = _grad_support(f, *data)
            res[k].update(t[k], max_rel_err=c.max_rel_err([g], [g_ref]), note=warn)
            if k == "compile":
                fields = steps[k].fields(t[k]["median_ms"])
                res[k].update(compile_s=fields["compile_s"],
                              note="; ".join(x for x in ("qpth-3 under torch.compile", warn, fields["note"]) if x))
        res["ours"]["kkt_residual"], res["ours"]["kkt_solver"] = _svm_kkt(data[0], data[1], backend)
    else:
        for k, f in run.items():
            step = _loss_step(f, *data)
            with contextlib.redirect_stdout(io.StringIO()):
                step()
                res[k]["peak_mb"] = c.peak_extra_mb(step)
    return res


def _compiled(fn):
    torch._dynamo.reset()  # compile each shape from scratch: its compile time is its own
    return torch.compile(fn, dynamic=False)


def _ridge_case(cfg, D, shot, mode, backend):
    data = episodes(cfg["T"], shot, D, cfg["q"])
    impls = {"ours": lambda *a: meta.ridge_loss(*a, lam=RIDGE_LAM, n_way=N_WAY, backend=backend),
             "torch": r2d2_loss}
    res = {"ours": {}, "torch": {}, "compile": {}}
    if cfg["compile"]:
        impls["compile"] = None
    else:
        res["compile"] = {"note": "skipped in --quick"}
    steps = {}
    for k, f in impls.items():
        if k == "compile":
            try:
                step = _loss_step(_compiled(r2d2_loss), *data)
                t0 = time.perf_counter()
                step()
                first = time.perf_counter() - t0
            except Exception as exc:  # a baseline that fails is reported, not hidden
                res[k]["note"] = f"compile failed: {type(exc).__name__}: {exc}"[:120]
                continue
            step()
        else:
            step = _loss_step(f, *data)
            step()
        steps[k] = step
    if mode == "time":
        t = _interleaved(steps, {k: cfg["repeats"]["ridge"] for k in steps})
        for k in steps:
            res[k].update(t[k])
        if "compile" in steps:
            res["compile"]["compile_s"] = max(first - t["compile"]["median_ms"] / 1e3, 0.0)
        xs64, ys, xq64, yq = [a.double() if a.is_floating_point() else a for a in data]
        g_ref, _ = _grad_support(r2d2_loss, xs64, ys, xq64, yq)
        g, _ = _grad_support(impls["ours"], *data)
        res["ours"]["max_rel_err"] = c.max_rel_err([g], [g_ref])
    else:
        for k, step in steps.items():
            res[k]["peak_mb"] = c.peak_extra_mb(step)
    return res


def _logreg_case(cfg, shot, mode, backend):
    xs, ys, xq, yq = episodes(cfg["episodes"], shot, cfg["logreg_D"], cfg["q"], seed=1, normalize=True)
    np_args = [a.numpy() for a in (xs, ys, xq, yq)]
    n_query = yq.numel()
    runs = {"ours": lambda: ours_eval(xs, ys, xq, yq, backend), "sklearn": lambda: sklearn_eval(*np_args)}
    warm = {"ours": lambda: ours_eval(xs[:2], ys[:2], xq[:2], yq[:2], backend),
            "sklearn": lambda: sklearn_eval(*[a[:2] for a in np_args])}
    for w in warm.values():
        w()
    res = {"ours": {}, "sklearn": {},
           "compile": {"note": "not applicable: the baseline is a scikit-learn (numpy) loop, no torch code for "
                               "torch.compile to trace"}}
    if mode == "time":
        out = {}

        def timed(k):
            def step():
                out[k] = runs[k]()
            return step

        reps = cfg["repeats"]["logreg"]
        t = _interleaved({k: timed(k) for k in runs}, {"ours": reps, "sklearn": 1})
        for k in runs:
            res[k].update(t[k], accuracy=100.0 * out[k][0] / n_query,
                          episodes_per_s=cfg["episodes"] / (t[k]["median_ms"] / 1e3))
        W_sk = torch.stack([torch.as_tensor(w) for w in out["sklearn"][1]])
        res["ours"]["max_rel_err"] = c.max_rel_err([out["ours"][1][:len(W_sk)]], [W_sk])
    else:
        for k, fn in runs.items():
            res[k]["peak_mb"] = c.peak_extra_mb(fn)
    return res


def _cases(cfg):
    out = []
    for D in cfg["Ds"]:
        for shot in cfg["shots"]:
            out.append(("svm", D, shot))
            out.append(("ridge", D, shot))
    for shot in cfg["shots"]:
        out.append(("logreg", cfg["logreg_D"], shot))
    return out


def _merge(into, results):
    """Add one mode's {impl: measurements} to another's (their keys differ but for notes)."""
    for impl, m in results.items():
        into.setdefault(impl, {}).update(m)
    return into


def _worker(modes, quick, backend):
    cfg = QUICK if quick else FULL
    case = {"svm": _svm_case, "ridge": _ridge_case}
    for head, D, shot in _cases(cfg):
        res = {}
        for mode in modes:
            _merge(res, _logreg_case(cfg, shot, mode, backend) if head == "logreg"
                   else case[head](cfg, D, shot, mode, backend))
        print("ROW " + json.dumps({"head": head, "D": D, "shot": shot, "threads": torch.get_num_threads(),
                                   "results": res}), flush=True)


def _run_worker(modes, quick, backend, threads, total, done):
    env = c.pinned_malloc_env() if "memory" in modes else dict(os.environ)
    # a timing worker keeps glibc's default allocator (pinned, every output is a fresh mmap whose
    # page faults cost more than a small kernel); every provider gets the same thread count:
    # torch's intra-op pool and our kernel's OpenMP, and the BLAS under numpy / scikit-learn
    env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    cmd = [sys.executable, "-m", "metassl_fast.benchmarks.heads", "--worker", ",".join(modes), "--backend", backend]
    return c.worker_rows(cmd + (["--quick"] if quick else []), env, len(_cases(QUICK if quick else FULL)), total,
                         done, lambda row: f"heads {'+'.join(modes)} {row['head']} D={row['D']}",
                         f"heads benchmark ({modes})")


BASELINE = {"svm": "qpth-3", "ridge": "torch", "logreg": "sklearn"}
OP = {"svm": "svm_loss", "ridge": "ridge_loss", "logreg": "fit_logreg"}


def run(out_dir="bench/out", quick=False, backend="cpu", threads=None, stream=sys.stdout):
    """Run the heads benchmark (a timing worker, then a memory worker; --quick: one worker that
    does both), each with `threads` threads (default every core); print the table, append the
    rows to out_dir/results_heads.csv, write out_dir/latest_heads.md; returns the flat rows."""
    cfg = QUICK if quick else FULL
    threads = threads or os.cpu_count()  # what torch would take; the workers report what they ran with
    n = len(_cases(cfg))
    workers = [("time", "memory")] if quick else [("time",), ("memory",)]
    c.progress(0, len(workers) * n, "heads")
    rows = _run_worker(workers[0], quick, backend, threads, len(workers) * n, 0)
    for w in workers[1:]:
        for row, other in zip(rows, _run_worker(w, quick, backend, threads, len(workers) * n, n)):
            _merge(row["results"], other["results"])
    record = c.run_meta(c.cpu_name(), rows[0]["threads"])
    flat = []
    for r in rows:
        T = cfg["episodes"] if r["head"] == "logreg" else cfg["T"]
        base = r["results"][BASELINE[r["head"]]]
        for impl, m in r["results"].items():
            ms, pk = m.get("median_ms"), m.get("peak_mb")
            flat.append({"op": OP[r["head"]], "impl": impl, "dtype": "float32", "N": T, "D": r["D"],
                         "median_ms": ms, "p20_ms": m.get("p20_ms"), "p80_ms": m.get("p80_ms"),
                         "speedup": base["median_ms"] / ms if ms and base.get("median_ms") else None,
                         "peak_mb": pk,
                         "mem_ratio": pk / base["peak_mb"] if pk is not None and base.get("peak_mb") else None,
                         "max_rel_err": m.get("max_rel_err"), "repeats": None,
                         "backend": backend if impl == "ours" else None, "shot": r["shot"],
                         "S": N_WAY * r["shot"], "Q": N_WAY * cfg["q"], "C": N_WAY,
                         "episodes": T if r["head"] == "logreg" else None,
                         **{k: m.get(k) for k in ("episodes_per_s", "accuracy", "kkt_residual", "kkt_solver",
                                                  "compile_s", "note")}})
    table = format_table(flat, record, backend, cfg["q"])
    print(table, file=stream)
    c.write_outputs(out_dir, table, "latest_heads.md", "results_heads.csv", flat, record, CSV_FIELDS)
    return flat


TARGETS = {"svm_loss": 20.0, "ridge_loss": 2.0, "fit_logreg": 20.0}


def format_table(flat, meta_, backend, q):
    lines = [f"convex few-shot heads, float32, forward+backward, {N_WAY}-way, {q} queries per class, ours on "
             f"backend={backend!r}, {meta_['device']}, {meta_['threads']} threads, torch {meta_['torch']}, "
             f"metassl_fast {meta_['version']}, {meta_['date']}\n",
             "| op | T | D | shot | impl | median ms (p20-p80) | ours faster by | peak MiB | "
             "d support rel. err | other |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in flat:
        ours = next(x for x in flat if x["op"] == r["op"] and x["D"] == r["D"] and x["shot"] == r["shot"]
                    and x["impl"] == "ours")
        ms = r["median_ms"]
        timing = f"{ms:.2f} ({r['p20_ms']:.2f}-{r['p80_ms']:.2f})" if ms else (r["note"] or "-")
        ratio = f"{ms / ours['median_ms']:.1f}x" if ms and ours["median_ms"] and r["impl"] != "ours" else "-"
        other = []
        if r["kkt_residual"] is not None:
            other.append(f"KKT residual {r['kkt_residual']:.1e} (solver: {r['kkt_solver']:.1e}, tol 1e-6)")
        if r["accuracy"] is not None:
            other.append(f"{r['episodes_per_s']:.0f} episodes/s, accuracy {r['accuracy']:.2f}%")
        if r["compile_s"] is not None:
            other.append(f"compile {r['compile_s']:.1f} s apart")
        if r["note"] and ms:
            other.append(r["note"])
        err = "-" if r["max_rel_err"] is None or r["op"] == "fit_logreg" else f"{r['max_rel_err']:.1e}"
        if r["op"] == "fit_logreg" and r["max_rel_err"] is not None:
            other.append(f"W vs sklearn coef_ rel. diff {r['max_rel_err']:.1e}")
        lines.append(f"| {r['op']} | {r['N']} | {r['D']} | {r['shot']} | {r['impl']} | {timing} | {ratio} | "
                     f"{c.fmt(r['peak_mb'], '.1f')} | {err} | {'; '.join(other)} |")
    lines.append("\nd support rel. err: max|g - g*| / max|g*| against the gradient of the converged float64 "
                 "solution (svm_loss / R2-D2 solve in float64).  peak MiB: peak RSS of one call (for fit_logreg "
                 "the whole evaluation) over the RSS before it.\n\ntargets:")
    lines.extend(check_targets(flat))
    return "\n".join(lines)


def check_targets(flat):
    """One line per (op, D, shot): speed over the baseline against its target, memory, and the
    svm gradient / logreg accuracy conditions."""
    out = []
    for r in flat:
        if r["impl"] != "ours":
            continue
        op, base_impl = r["op"], BASELINE[{v: k for k, v in OP.items()}[r["op"]]]
        base = next(x for x in flat if x["op"] == op and x["D"] == r["D"] and x["shot"] == r["shot"]
                    and x["impl"] == base_impl)
        parts = []
        if r["speedup"] is not None:
            parts.append(f"{r['speedup']:.2f}x vs {base_impl} (target {TARGETS[op]:g}x: "
                         f"{'holds' if r['speedup'] >= TARGETS[op] else 'FAILS'})")
        else:
            parts.append(f"{base_impl}: {base['note']}")
        if r["mem_ratio"] is not None:
            parts.append(f"peak memory {r['mem_ratio']:.2f} of {base_impl}'s "
                         f"({'holds' if r['mem_ratio'] <= 1.0 else 'FAILS'})")
        if op == "svm_loss" and base.get("max_rel_err") is not None and r["max_rel_err"] is not None:
            parts.append(f"gradient error {r['max_rel_err']:.1e} vs qpth-3's {base['max_rel_err']:.1e} "
                         f"({'holds' if r['max_rel_err'] < base['max_rel_err'] else 'FAILS'})")
        if op == "fit_logreg":
            d = abs(r["accuracy"] - base["accuracy"])
            parts.append(f"accuracy {r['accuracy']:.2f} vs {base['accuracy']:.2f} "
                         f"({'holds' if d <= 0.5 else 'FAILS'}: within 0.5 points)")
        out.append(f"- {op} D={r['D']} shot={r['shot']}: " + "; ".join(parts))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)  # its modes: time, memory or time,memory
    p.add_argument("--out", default="bench/out")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats, no torch.compile: a smoke test")
    p.add_argument("--backend", choices=["cpu", "torch"], default="cpu",
                   help="ours: the C++ kernel (default) or the torch reference")
    p.add_argument("--threads", type=int, default=None, help="threads of every provider (default: every core)")
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args.worker.split(","), args.quick, args.backend)
    run(args.out, quick=args.quick, backend=args.backend, threads=args.threads)


if __name__ == "__main__":
    main()
