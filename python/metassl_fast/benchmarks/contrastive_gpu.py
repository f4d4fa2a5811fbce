"""GPU benchmark of clip_loss and info_nce (and siglip_loss and nt_xent at N=16384,
D=512): eager torch, torch.compile of the same eager code, ours (Triton, and the
CUDA C++ kernels where _C_cuda is built) and, for clip_loss, Inf-CL (PyPI inf-cl,
where it is importable: the GPU host has no network, so bench/gpu_check.sh installs
its wheel from .whl/, which bench/fetch_gpu_wheels.sh downloads before the run).

Forward+backward, bf16, median of triton.testing.do_bench (CUDA events), peak memory
from torch.cuda.max_memory_allocated over the allocation before the call, achieved
TFLOP/s counting the matrix products the algorithm needs (4 N x N x D for the
symmetric loss, 3 for the one-sided), and the max relative error against the float64
reference on a small shape.  Also the machine's own bf16 matmul rate, measured here.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import metassl_fast as msf
from metassl_fast.reference import contrastive_loss, labeled_contrastive_loss, siglip_loss

from . import _common as c
from ._common import TEMPERATURE

OPS = ("clip_loss", "info_nce")
# the rest of the family, at the issue's target shape only (each op's N is its rows)
FAMILY_OPS = ("siglip", "nt_xent")
FAMILY_SHAPES = ((16384, 512),)


def _products(op: str) -> int:
    return 4 if op == "clip_loss" else 3


def matmul_tflops(n: int = 8192, dtype=torch.bfloat16) -> float:
    """The device's measured bf16 GEMM rate (torch.mm, n^3), in TFLOP/s."""
    import triton.testing

    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median")
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _contenders(op: str):
    eager = {"clip_loss": c.eager_clip_loss, "info_nce": c.eager_info_nce, "siglip": c.eager_siglip,
             "nt_xent": c.eager_nt_xent}[op]
    out = {"eager": eager, "compiled": torch.compile(eager, dynamic=True)}
    ours = ("triton", "cuda") if c.cuda_built() else ("triton",)
    if op == "clip_loss":
        for b in ours:
            out[b] = lambda q, k, s, b=b: msf.clip_loss(q, k, s, backend=b)
        inf_cl = inf_cl_clip_loss()
        if inf_cl is not None:
            out["inf-cl"] = inf_cl
    elif op == "info_nce":
        for b in ours:
            out[b] = lambda q, k, s, b=b: msf.info_nce(q, k, temperature=TEMPERATURE, backend=b)
    elif op == "siglip":
        for b in ours:
            out[b] = lambda q, k, s, b=b: msf.siglip_loss(q, k, s, -10.0, backend=b)
    else:  # nt_xent: 2 x N/2 views, so that N counts the rows as for the others
        for b in ours:
            out[b] = lambda q, k, s, b=b: msf.nt_xent(q, k, temperature=0.5, backend=b)
    return out


def inf_cl_clip_loss():
    """Inf-CL's symmetric CLIP loss as its README writes it, (inf(img, txt) + inf(txt,
    img)) / 2 with the logit scale multiplying the first argument, or None where inf_cl
    is not importable.  Its default head_dim of 256 tiles D (D must be a multiple)."""
    try:
        from inf_cl import cal_inf_loss
    except ImportError:
        return None

    def loss(q, k, s):
        return 0.5 * (cal_inf_loss(q, k, scale=s) + cal_inf_loss(k, q, scale=s))
    return loss


def _inputs(n, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = F.normalize(torch.randn(n, d, device="cuda", generator=g), dim=1).to(dtype).requires_grad_()
    k = F.normalize(torch.randn(n, d, device="cuda", generator=g), dim=1).to(dtype).requires_grad_()
    s = torch.tensor(1 / TEMPERATURE, device="cuda").requires_grad_()
    return q, k, s


def _step(fn, q, k, s):
    q.grad = k.grad = s.grad = None
    fn(q, k, s).backward()


def _measure(fn, q, k, s):
    import triton.testing

    try:
        _step(fn, q, k, s)  # warm-up and compile
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(fn, q, k, s)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = triton.testing.do_bench(lambda: _step(fn, q, k, s), warmup=10, rep=50, return_mode="median")
        return ms, peak, None
    except torch.OutOfMemoryError:
        return None, None, "OOM"
    except Exception as exc:  # a kernel that fails (ours or a baseline's) is reported in the table, not hidden
        return None, None, f"{type(exc).__name__}: {exc}"[:60]
    finally:
        q.grad = k.grad = s.grad = None
        torch.cuda.empty_cache()


def _rel_err(fn, op, n=1000, d=256, dtype=torch.bfloat16):
    q, k, s = _inputs(n, d, dtype, seed=1)
    loss = fn(q, k, s)
    got = [loss] + list(torch.autograd.grad(loss, (q, k, s), allow_unused=True))
    q64, k64, s64 = (x.detach().double().requires_grad_() for x in (q, k, s))
    if op == "siglip":
        ref = siglip_loss(q64, k64, s64, torch.tensor(-10.0, dtype=torch.float64, device="cuda"))
    elif op == "nt_xent":
        y = torch.arange(n, device="cuda").repeat(2)
        ref = labeled_contrastive_loss(torch.cat([q64, k64]), None, y, None,
                                       torch.tensor(2.0, dtype=torch.float64, device="cuda"), True, "mean", False)
    elif op == "clip_loss":
        ref = contrastive_loss(q64, k64, None, s64, True, False, "mean")
    else:
        ref = contrastive_loss(q64, k64, None, torch.tensor(1 / TEMPERATURE, dtype=torch.float64,
                                                            device="cuda"), False, True, "mean")
    want = [ref] + list(torch.autograd.grad(ref, (q64, k64, s64), allow_unused=True))
    return c.max_rel_err(got, want)


def run(sizes=(4096, 16384, 65536), dims=(256, 512), huge=(262144,), dtype="bfloat16",
        out_dir="bench/out", stream=sys.stdout, ops=OPS + FAMILY_OPS):
    """Run the GPU benchmark of `ops` (clip_loss also at the `huge` N); returns the rows."""
    dt = getattr(torch, dtype)
    peak_rate = matmul_tflops()
    device = f"cuda: {torch.cuda.get_device_name()}"
    print(f"{device}: measured bf16 matmul rate {peak_rate:.0f} TFLOP/s (torch.mm 8192^3)", file=stream)
    rows = []
    for op in (op for op in OPS if op in ops):
        contenders = _contenders(op)
        errs = {}
        for name, fn in contenders.items():
            try:
                errs[name] = _rel_err(fn, op)
            except Exception as exc:  # reported, and the timings still run
                print(f"{op} {name}: error check failed: {type(exc).__name__}: {exc}", file=stream)
                errs[name] = None
        for d in dims:
            for n in sizes:
                q, k, s = _inputs(n, d, dt)
                res = {name: _measure(fn, q, k, s) for name, fn in contenders.items()}
                for name, r in res.items():
                    rows.append(_row(op, name, n, d, dtype, r, res["eager"], errs[name], _products(op), peak_rate))
                    print(_line(rows[-1]), file=stream, flush=True)
                del q, k, s
    for op in (op for op in FAMILY_OPS if op in ops):
        contenders = _contenders(op)
        try:
            errs = {name: _rel_err(fn, op) for name, fn in contenders.items()}
        except Exception as exc:  # reported, and the timings still run
            print(f"{op}: error check failed: {type(exc).__name__}: {exc}", file=stream)
            errs = {name: None for name in contenders}
        for n, d in FAMILY_SHAPES:
            # nt_xent takes two (N/2, D) views
            q, k, s = _inputs(n // 2 if op == "nt_xent" else n, d, dt)
            res = {name: _measure(fn, q, k, s) for name, fn in contenders.items()}
            for name, r in res.items():
                # the products the fused algorithm needs: S, dQ, dK (N x N x D each)
                rows.append(_row(op, name, n, d, dtype, r, res["eager"], errs[name], 3, peak_rate))
                print(_line(rows[-1]), file=stream, flush=True)
            del q, k, s
    for n in huge if "clip_loss" in ops else ():  # ours alone: eager needs n^2 x 2 B for the logits alone
        d = max(dims)
        q, k, s = _inputs(n, d, dt)
        for name, fn in _contenders("clip_loss").items():
            if name in ("eager", "compiled"):
                continue
            measured = _measure(fn, q, k, s)
            rows.append(_row("clip_loss", name, n, d, dtype, measured, (None, None), None, 4, peak_rate))
            print(_line(rows[-1]), file=stream, flush=True)
        del q, k, s
    meta = c.run_meta(device, torch.get_num_threads())
    table = format_table(rows, meta, peak_rate)
    c.write_outputs(out_dir, table, "latest_gpu.md", "results_gpu.csv", rows, meta,
                    c.CSV_FIELDS + ["tflops", "of_peak", "note"])
    print(table, file=stream)
    return rows


def _row(op, impl, n, d, dtype, measured, eager, err, products, peak_rate):
    """One table row from (ms, peak MiB, note) of this contender and of eager."""
    ms, peak, note = measured
    tflops = products * 2 * n * n * d / (ms * 1e-3) / 1e12 if ms else None
    return {"op": op, "impl": impl, "N": n, "D": d, "dtype": dtype, "median_ms": ms, "p20_ms": None,
            "p80_ms": None, "speedup": eager[0] / ms if ms and eager[0] else None, "peak_mb": peak,
            "mem_ratio": peak / eager[1] if peak and eager[1] else None, "max_rel_err": err, "repeats": None,
            "note": note, "tflops": tflops, "of_peak": tflops / peak_rate if tflops else None}


def _line(r):
    return (f"{r['op']:9s} {r['impl']:8s} N={r['N']:<7d} D={r['D']:<4d} "
            f"{c.fmt(r['median_ms'], '9.3f')} ms  peak {c.fmt(r['peak_mb'], '9.1f')} MiB  "
            f"{c.fmt(r['tflops'], '6.1f')} TFLOP/s  {r['note'] or ''}")


def format_table(rows, meta, peak_rate):
    lines = [f"contrastive losses, forward+backward, {meta['device']}, torch {meta['torch']}, "
             f"metassl_fast {meta['version']}, {meta['date']}; measured bf16 matmul {peak_rate:.0f} TFLOP/s\n",
             "| op | impl | N | D | dtype | median ms | speed-up vs eager | peak MiB | mem ratio | TFLOP/s "
             "| of matmul rate | max rel err |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['impl']} | {r['N']} | {r['D']} | {r['dtype']} | "
                     f"{c.fmt(r['median_ms'], '.3f') if r['median_ms'] else r['note']} | "
                     f"{c.fmt(r['speedup'], '.2f')} | {c.fmt(r['peak_mb'], '.1f')} | {c.fmt(r['mem_ratio'], '.4f')} | "
                     f"{c.fmt(r['tflops'], '.1f')} | {c.fmt(r['of_peak'], '.0%')} | {c.fmt(r['max_rel_err'], '.1e')} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(OPS + FAMILY_OPS), help="comma list of " + ",".join(OPS + FAMILY_OPS))
    p.add_argument("--out", default="bench/out", help="folder for results_gpu.csv and latest_gpu.md")
    args = p.parse_args(argv)
    ops = tuple(args.ops.split(","))
    unknown = set(ops) - set(OPS + FAMILY_OPS)
    if unknown:
        p.error(f"--ops: unknown {sorted(unknown)}, expected some of {OPS + FAMILY_OPS}")
    return run(out_dir=args.out, ops=ops)


if __name__ == "__main__":
    main()
