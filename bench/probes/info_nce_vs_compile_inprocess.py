# Issue 14 probe, run as-is for bench/RESULTS.md (2026-12-02): info_nce N=8192 D=128 ours vs torch.compile of the eager code, in one process, interleaved (run with an argument).
# PYTHONPATH=python .venv/bin/python bench/probes/info_nce_vs_compile_inprocess.py
import time, torch, metassl_fast as msf, sys
from metassl_fast.benchmarks import _common as c
torch.manual_seed(0)
N, D = 8192, 128
q = torch.nn.functional.normalize(torch.randn(N, D), dim=1).requires_grad_()
k = torch.nn.functional.normalize(torch.randn(N, D), dim=1).requires_grad_()
def mk(fn):
    def step():
        q.grad = k.grad = None
        fn(q, k).backward()
    return step
ours = mk(lambda a, b: msf.info_nce(a, b))
comp = mk(c.compiled(lambda a, b: c.eager_info_nce(a, b, None)) if len(sys.argv) > 1 else None)
def t(step, n=4):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
    return sorted(ts)[n // 2] * 1e3
ours()
print("ours before compile", t(ours))
if len(sys.argv) > 1:
    comp()
    print("compile", t(comp))
    print("ours after compile", t(ours))
    print("ours interleaved", [ (t(ours,1), t(comp,1)) for _ in range(3)])
