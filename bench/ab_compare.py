"""Interleaved A/B timing of metassl_fast's public ops between two package trees.

    python bench/ab_compare.py --a /work/ab/base --b /work/main/python --rounds 15 --out bench/out/ab.md
    python bench/ab_compare.py --a SITE --b SITE --env-a METASSL_FAST_ISA=avx2 --env-b METASSL_FAST_ISA=avx512

Each tree runs in its own long-lived worker process (the tree first on its PYTHONPATH,
torch.set_num_threads fixed), which builds every case's inputs once, warms the case up,
then answers "time case X for r repeats" over stdin/stdout JSON lines.  The parent asks
A and B in ABBA order (alternating BAAB the next round) for every case in every round,
so that a slow spell of the machine hits both trees alike.  Reported per case: the
median of A and of B over all their repeats, B/A (the median over rounds of the per-round
ratio: each round is one paired ABBA sample), its 95% bootstrap interval over rounds, and a verdict: "same" when the interval lies within +-5% (--tolerance) of 1,
"slower"/"faster" when it lies wholly outside, else "unclear" (more rounds needed).
Only the public API is used, so the same case runs on both trees; a case that fails in
one tree is an error row, not a crash.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

# ----------------------------------------------------------------------------- the cases (worker side)
# name -> make(torch, msf) -> a zero-argument callable that runs one timed repeat.
# Inputs are built once; forward+backward, float32, CPU unless the name says otherwise.


def _contrastive_cases():
    def leaves(torch, *shapes, seed=0):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(*s, generator=g).requires_grad_() for s in shapes]

    def fwd_bwd(loss_of, xs):
        def call():
            for x in xs:
                x.grad = None
            loss_of().backward()
        return call

    def info_nce(n, d, symmetric=False, queue=0, paired=0):
        def make(torch, msf):
            q, k = leaves(torch, (n, d), (n, d))
            xs = [q, k]
            neg = None
            if queue:
                neg = leaves(torch, (queue, d), seed=1)[0].detach()  # a MoCo queue: no gradient
            if paired:
                neg = leaves(torch, (n, paired, d), seed=1)[0]
                xs.append(neg)
            return fwd_bwd(lambda: msf.info_nce(q, k, temperature=0.07, negatives=neg, symmetric=symmetric), xs)
        return make

    def info_nce_no_grad(n, d):
        def make(torch, msf):
            q, k = (x.detach() for x in leaves(torch, (n, d), (n, d)))

            def call():
                with torch.no_grad():
                    msf.info_nce(q, k, temperature=0.07)
            return call
        return make

    def clip(n, d):
        def make(torch, msf):
            a, b = leaves(torch, (n, d), (n, d))
            a = torch.nn.functional.normalize(a.detach(), dim=1).requires_grad_()
            b = torch.nn.functional.normalize(b.detach(), dim=1).requires_grad_()
            s = torch.tensor(14.0, requires_grad=True)
            return fwd_bwd(lambda: msf.clip_loss(a, b, s), [a, b, s])
        return make

    def nt_xent(n, d):
        def make(torch, msf):
            a, b = leaves(torch, (n // 2, d), (n // 2, d))
            return fwd_bwd(lambda: msf.nt_xent(a, b, temperature=0.5), [a, b])
        return make

    def supcon(n, d, classes):
        def make(torch, msf):
            (x,) = leaves(torch, (n, d))
            y = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(1))
            return fwd_bwd(lambda: msf.supcon_loss(x, y, temperature=0.1), [x])
        return make

    def siglip(n, d):
        def make(torch, msf):
            a, b = leaves(torch, (n, d), (n, d))
            s = torch.tensor(10.0, requires_grad=True)
            bias = torch.tensor(-10.0, requires_grad=True)
            return fwd_bwd(lambda: msf.siglip_loss(a, b, s, bias), [a, b, s, bias])
        return make

    return {
        "info_nce N=256 D=128": info_nce(256, 128),
        "info_nce N=4096 D=128": info_nce(4096, 128),
        "info_nce symmetric N=4096 D=128": info_nce(4096, 128, symmetric=True),
        "info_nce queue N=1024 M=4096 D=128": info_nce(1024, 128, queue=4096),
        "info_nce paired N=512 M=16 D=128": info_nce(512, 128, paired=16),
        "info_nce no-grad forward N=256 D=128": info_nce_no_grad(256, 128),
        "clip_loss N=4096 D=128": clip(4096, 128),
        "nt_xent N=2048 D=128": nt_xent(2048, 128),
        "supcon_loss N=2048 D=128 C=10": supcon(2048, 128, 10),
        "siglip_loss N=2048 D=128": siglip(2048, 128),
    }


def _meta_cases():
    S, Q, D, C, K = 25, 75, 640, 5, 5

    def episode(torch, T):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(T, S, D, generator=g).requires_grad_()
        y = torch.randint(0, C, (T, S), generator=g)
        xq = torch.randn(T, Q, D, generator=g).requires_grad_()
        yq = torch.randint(0, C, (T, Q), generator=g)
        W = (0.01 * torch.randn(C, D, generator=g)).requires_grad_()
        b = torch.zeros(C, requires_grad=True)
        return x, y, xq, yq, W, b

    def anil(T):
        def make(torch, msf):
            from metassl_fast import meta

            x, y, xq, yq, W, b = episode(torch, T)

            def call():
                for t in (x, xq, W, b):
                    t.grad = None
                meta.anil_loss(x, y, xq, yq, W, b, lr=0.5, steps=K).backward()
            return call
        return make

    def adapt(T):
        def make(torch, msf):
            from metassl_fast import meta

            x, y, _, _, W, b = episode(torch, T)
            g = torch.Generator().manual_seed(2)
            dW, db = torch.randn(T, C, D, generator=g), torch.randn(T, C, generator=g)

            def call():
                for t in (x, W, b):
                    t.grad = None
                W_t, b_t = meta.adapt_linear_head(x, y, W, b, lr=0.5, steps=K)
                torch.autograd.backward((W_t, b_t), (dW, db))
            return call
        return make

    def head(T):
        def make(torch, msf):
            from metassl_fast import meta

            torch.manual_seed(0)
            module = meta.ANILHead(D, C, lr=0.5, steps=K)
            x, y, xq, yq, _, _ = episode(torch, T)

            def call():
                module.zero_grad(set_to_none=True)
                x.grad = xq.grad = None
                loss, _acc = module(x, y, xq, yq)
                loss.backward()
            return call
        return make

    def convex(kind, T, dim):
        # the heads benchmark's episodes: 5-shot, 15 queries per class, labels in order
        def make(torch, msf):
            from metassl_fast import meta

            g = torch.Generator().manual_seed(0)
            x = torch.randn(T, S, dim, generator=g).requires_grad_()
            xq = torch.randn(T, Q, dim, generator=g).requires_grad_()
            y = torch.arange(S).remainder(C).repeat(T, 1)
            yq = torch.arange(Q).remainder(C).repeat(T, 1)
            loss_of = {"svm": lambda: meta.svm_loss(x, y, xq, yq, C=0.1, n_way=C),
                       "ridge": lambda: meta.ridge_loss(x, y, xq, yq, lam=50.0, n_way=C)}[kind]

            def call():
                x.grad = xq.grad = None
                loss_of().backward()
            return call
        return make

    return {
        f"meta.anil_loss T=32 S={S} Q={Q} D={D} C={C} steps={K}": anil(32),
        f"meta.anil_loss T=1 S={S} Q={Q} D={D} C={C} steps={K}": anil(1),
        f"meta.adapt_linear_head T=32 S={S} D={D} C={C} steps={K}": adapt(32),
        f"meta.ANILHead T=32 S={S} Q={Q} D={D} C={C} steps={K}": head(32),
        f"meta.svm_loss T=8 S={S} Q={Q} D={D} C={C}": convex("svm", 8, D),
        f"meta.ridge_loss T=8 S={S} Q={Q} D={D} C={C}": convex("ridge", 8, D),
        f"meta.svm_loss T=8 S={S} Q={Q} D=16000 C={C}": convex("svm", 8, 16000),
    }


def _compat_cases():
    n, d = 2048, 128

    def make_case(build):
        def make(torch, msf):
            g = torch.Generator().manual_seed(0)
            loss_of, xs = build(torch, g)

            def call():
                for x in xs:
                    x.grad = None
                loss_of().backward()
            return call
        return make

    def lightly(torch, g):
        from metassl_fast.compat.lightly import NTXentLoss

        a = torch.randn(n // 2, d, generator=g).requires_grad_()
        b = torch.randn(n // 2, d, generator=g).requires_grad_()
        loss = NTXentLoss(0.5)
        return (lambda: loss(a, b)), [a, b]

    def pml(torch, g):
        from metassl_fast.compat.pytorch_metric_learning import SupConLoss

        x = torch.randn(n, d, generator=g).requires_grad_()
        y = torch.randint(0, 100, (n,), generator=g)
        loss = SupConLoss(0.1)
        return (lambda: loss(x, y)), [x]

    def info_nce(torch, g):
        from metassl_fast.compat.info_nce import InfoNCE

        q = torch.randn(n, d, generator=g).requires_grad_()
        p = torch.randn(n, d, generator=g).requires_grad_()
        loss = InfoNCE(0.1)
        return (lambda: loss(q, p)), [q, p]

    def open_clip(torch, g):
        from metassl_fast.compat.open_clip import ClipLoss

        a = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
        b = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
        s = torch.tensor(14.0, requires_grad=True)
        loss = ClipLoss()
        return (lambda: loss(a, b, s)), [a, b, s]

    return {
        f"compat lightly.NTXentLoss N={n} D={d}": make_case(lightly),
        f"compat pml.SupConLoss N={n} D={d}": make_case(pml),
        f"compat info_nce.InfoNCE N={n} D={d}": make_case(info_nce),
        f"compat open_clip.ClipLoss N={n} D={d}": make_case(open_clip),
    }


def cases():
    return {**_contrastive_cases(), **_meta_cases(), **_compat_cases()}


def _worker(threads):
    """Answer JSON requests on stdin: {"cmd": "time", "case", "repeats"} -> {"times_ms"} or {"error"}."""
    import torch

    torch.set_num_threads(threads)
    import metassl_fast as msf

    out = sys.stdout
    sys.stdout = sys.stderr  # a stray print in the package must not corrupt the protocol
    table, built = cases(), {}
    from metassl_fast import _ext

    cpu = _ext.require("_C").__name__.rsplit(".", 1)[-1] if _ext.available("_C") else "none"
    hello = {"file": msf.__file__, "version": getattr(msf, "__version__", "?"), "torch": torch.__version__,
             "threads": torch.get_num_threads(), "cpu_module": cpu}
    out.write(json.dumps(hello) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            name = req["case"]
            if name not in built:
                call = table[name](torch, msf)
                for _ in range(req.get("warmup", 3)):  # lazy init, thread pools, allocator
                    call()
                built[name] = call
            call = built[name]
            times = []
            for _ in range(req["repeats"]):
                t0 = time.perf_counter()
                call()
                times.append((time.perf_counter() - t0) * 1e3)
            reply = {"times_ms": times}
        except Exception as exc:  # reported as an error row by the parent
            reply = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


# ----------------------------------------------------------------------------- the parent

class WorkerDied(RuntimeError):
    """The worker process exited (a crash inside a case): that case is an error row."""


class Worker:
    def __init__(self, tree, threads, wait_policy, extra_env=None):
        env = dict(os.environ, **(extra_env or {}))
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(tree)] + [p for p in [env.get("PYTHONPATH")] if p])
        env["OMP_NUM_THREADS"] = str(threads)
        if wait_policy:
            env["OMP_WAIT_POLICY"] = wait_policy
        self.tree = tree
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.hello = self._read()
        where = os.path.realpath(os.path.dirname(os.path.dirname(self.hello["file"])))
        if where != os.path.realpath(tree):
            self.close()
            raise RuntimeError(f"the worker for {tree} imported metassl_fast from {where}")

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerDied(f"worker for {self.tree} exited (code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def ask(self, **req):
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # _read reports the exit
        return self._read()

    def close(self):
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=30)


def _median(xs):
    return statistics.median(xs)


def bootstrap_ratio(round_ratios, n=2000, seed=0):
    """95% interval of the median per-round B/A ratio, resampling rounds: repeats within a
    visit share the machine's state of the moment, rounds are the independent samples."""
    rng = random.Random(seed)
    k = len(round_ratios)
    meds = sorted(_median(rng.choices(round_ratios, k=k)) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def verdict(lo, hi, tol):
    if 1 - tol <= lo and hi <= 1 + tol:
        return "same"
    if lo > 1 + tol:
        return "slower"
    if hi < 1 - tol:
        return "faster"
    return "unclear"


def _repeats_for(worker, case, target_ms):
    """Repeats per visit so that one visit takes about target_ms (at least 1)."""
    reply = worker.ask(cmd="time", case=case, repeats=1)
    if "error" in reply:
        return None, reply["error"]
    return max(1, min(50, int(target_ms / max(reply["times_ms"][0], 1e-3)))), None


def compare(a_tree, b_tree, rounds, threads, selected, target_ms, tol, wait_policy, log=sys.stderr, envs=None):
    envs = envs or {}
    workers = {side: Worker(tree, threads, wait_policy, envs.get(side))
               for side, tree in (("A", a_tree), ("B", b_tree))}
    trees = {"A": a_tree, "B": b_tree}
    hello = (workers["A"].hello, workers["B"].hello)
    rows = []
    try:
        for name in selected:
            try:
                rows.append(_compare_case(workers["A"], workers["B"], name, rounds, target_ms, tol))
            except WorkerDied as exc:  # restart the dead side(s) for the next case
                rows.append({"case": name, "error": str(exc)})
                for label, w in workers.items():
                    if w.proc.poll() is not None:
                        workers[label] = Worker(trees[label], threads, wait_policy)
            if "error" in rows[-1]:
                log.write(f"{name}: error {rows[-1]['error']}\n")
            else:
                r = rows[-1]
                log.write(f"{name}: A {r['a_ms']:.3f} ms  B {r['b_ms']:.3f} ms  B/A {r['ratio']:.3f} "
                          f"[{r['lo']:.3f}, {r['hi']:.3f}]\n")
            log.flush()
    finally:
        for w in workers.values():
            w.close()
    return rows, hello


def _compare_case(wa, wb, name, rounds, target_ms, tol):
    """One case: calibrate the repeats per visit (the worker's first call also warms the
    case up), then rounds of ABBA / BAAB visits; a result row or an error row."""
    reps, errs = 0, {}
    for label, w in (("A", wa), ("B", wb)):
        r, err = _repeats_for(w, name, target_ms)
        if err:
            errs[label] = err
        else:
            reps = max(reps, r)
    if errs:
        return {"case": name, "error": "; ".join(f"{k}: {v}" for k, v in errs.items())}
    times, round_ratios = {"A": [], "B": []}, []
    for rnd in range(rounds):
        visits = {"A": [], "B": []}  # each visit's median, this round
        for label in ("A", "B", "B", "A") if rnd % 2 == 0 else ("B", "A", "A", "B"):
            reply = (wa if label == "A" else wb).ask(cmd="time", case=name, repeats=reps)
            if "error" in reply:
                return {"case": name, "error": f"{label}: {reply['error']}"}
            times[label] += reply["times_ms"]
            visits[label].append(_median(reply["times_ms"]))
        round_ratios.append(sum(visits["B"]) / sum(visits["A"]))
    ma, mb = _median(times["A"]), _median(times["B"])
    lo, hi = bootstrap_ratio(round_ratios)
    return {"case": name, "a_ms": ma, "b_ms": mb, "ratio": _median(round_ratios), "lo": lo, "hi": hi,
            "n": len(times["A"]),
            "verdict": verdict(lo, hi, tol)}


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def format_report(rows, hello, args):
    ha, hb = hello
    load = ", ".join(f"{x:.2f}" for x in args.load_before)
    lines = [f"# A/B timing: B = {args.b} against A = {args.a}", "",
             f"CPU: {cpu_model()} ({os.cpu_count()} cores), torch {ha['torch']}, {ha['threads']} threads per worker; "
             f"OMP_WAIT_POLICY={args.omp_wait_policy or os.environ.get('OMP_WAIT_POLICY', '(unset)')}; "
             f"{args.rounds} rounds, ABBA/BAAB interleaved, {time.strftime('%Y-%m-%d %H:%M:%S')}; "
             f"load average before the run {load} (a loaded machine inflates multi-threaded times)", "",
             f"A: {ha['file']} (metassl_fast {ha['version']}, CPU module {ha.get('cpu_module')}"
             f"{', ' + ' '.join(args.env_a) if args.env_a else ''})  ",
             f"B: {hb['file']} (metassl_fast {hb['version']}, CPU module {hb.get('cpu_module')}"
             f"{', ' + ' '.join(args.env_b) if args.env_b else ''})", "",
             f"Times: forward+backward (unless the case says forward), float32, CPU, medians over all repeats; "
             f"B/A: median over rounds of the per-round ratio (B's two visit medians over A's two, ABBA), "
             f"95% interval: its bootstrap over rounds; verdict 'same' when the interval lies "
             f"within +-{args.tolerance:.0%} of 1.", "",
             "| case | A median ms | B median ms | B/A | 95% interval | repeats per side | verdict |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | - | - | - | - | - | error: {r['error'].replace('|', '/')} |")
        else:
            lines.append(f"| {r['case']} | {r['a_ms']:.3f} | {r['b_ms']:.3f} | {r['ratio']:.3f} | "
                         f"{r['lo']:.3f}-{r['hi']:.3f} | {r['n']} | {r['verdict']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--a", help="package tree A (a directory holding metassl_fast/), the baseline")
    p.add_argument("--b", help="package tree B, compared against A")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2, help="torch threads in each worker")
    p.add_argument("--cases", default="", help="only the cases whose name contains one of these (comma list)")
    p.add_argument("--visit-ms", type=float, default=150.0, help="about how long one A or B visit times a case")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--omp-wait-policy", default="passive",
                   help="OMP_WAIT_POLICY of both workers ('' keeps the environment's): passive, so that "
                        "an OpenMP thread that lost its core to another process sleeps instead of spinning "
                        "(on a loaded 2-core machine, active waiting made identical trees differ 5x)")
    p.add_argument("--env-a", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable of worker A only (repeatable), e.g. METASSL_FAST_ISA=avx2 "
                        "to compare two CPU builds of one tree")
    p.add_argument("--env-b", action="append", default=[], metavar="KEY=VALUE", help="the same for worker B")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    p.add_argument("--out", default="bench/out/ab.md")
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args.threads)
    names = list(cases())
    if args.list:
        print("\n".join(names))
        return None
    if not (args.a and args.b):
        p.error("--a and --b are required")
    for tree in (args.a, args.b):
        if not os.path.isdir(os.path.join(tree, "metassl_fast")):
            p.error(f"{tree} holds no metassl_fast/ package")
    wanted = [w.strip() for w in args.cases.split(",") if w.strip()]
    selected = [n for n in names if not wanted or any(w in n for w in wanted)]
    if not selected:
        p.error(f"--cases {args.cases!r} matches none of: {', '.join(names)}")
    args.load_before = os.getloadavg()
    envs = {}
    for side, pairs in (("A", args.env_a), ("B", args.env_b)):
        bad = [kv for kv in pairs if "=" not in kv]
        if bad:
            p.error(f"--env-{side.lower()} takes KEY=VALUE, got {bad}")
        envs[side] = dict(kv.split("=", 1) for kv in pairs)
    rows, hello = compare(args.a, args.b, args.rounds, args.threads, selected, args.visit_ms, args.tolerance,
                          args.omp_wait_policy, envs=envs)
    report = format_report(rows, hello, args)
    print(report)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(report + "\n")
    return rows


if __name__ == "__main__":
    main()
