# Issue 14 probe (2026-12-08): the contrastive sweep's three products at its block shape
# (256 rows x N=8192 keys x D=128, fp32, torch's threads), csrc/cpu/gemm.cpp ("own") against
# torch.mm (MKL), interleaved call by call so that both see the same machine phase.
#   .venv/bin/python bench/probes/sweep_products.py [rounds]
import statistics
import sys
import time

import torch

from metassl_fast.ops import _common as cm

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
N, D, B = 8192, 128, 256
g = torch.Generator().manual_seed(0)
rows, keys = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
own = cm._OwnProducts(rows, keys, B)
S, out, dk = torch.randn(B, N, generator=g), torch.empty(B, D), torch.zeros(N, D)
cases = {
    "S = Q K^T": (lambda: own.scores(0, B, S), lambda: torch.mm(rows[:B], keys.t(), out=S)),
    "dQ = G K": (lambda: own.rows_grad(S, out, 1.0, False), lambda: torch.mm(S, keys, out=out)),
    "dK += G^T Q": (lambda: own.keys_grad(S, 0, B, 0, N, dk, 1.0), lambda: dk.addmm_(S.t(), rows[:B])),
}
flop = 2 * B * N * D
print(f"threads {torch.get_num_threads()}, {rounds} interleaved rounds, GFLOP/s median (p20-p80)")
for name, fns in cases.items():
    t = {0: [], 1: []}
    for f in fns:
        f()
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            fns[i]()
            t[i].append(flop / (time.perf_counter() - t0) / 1e9)
    def fmt(v):
        q = statistics.quantiles(v, n=5)
        return f"{statistics.median(v):6.1f} ({q[0]:.0f}-{q[3]:.0f})"
    print(f"{name:12s} own {fmt(t[0])}   MKL {fmt(t[1])}   own/MKL time {statistics.median(t[1]) / statistics.median(t[0]):.3f}")
