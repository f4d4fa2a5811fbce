# Issue 14 probe, run as-is for bench/RESULTS.md (2026-12-02): first call of anil_loss in a fresh process (import times, RSS, whether torch._dynamo got imported).
# PYTHONPATH=python .venv/bin/python bench/probes/first_call_anil.py
import time, resource, sys
t0 = time.perf_counter()
import torch
t1 = time.perf_counter(); r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import metassl_fast as msf
from metassl_fast import meta
t2 = time.perf_counter(); r2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
x = torch.randn(1, 25, 640, requires_grad=True); y = torch.randint(0, 5, (1, 25)); xq = torch.randn(1, 75, 640); yq = torch.randint(0, 5, (1, 75))
W = torch.zeros(5, 640, requires_grad=True); b = torch.zeros(5, requires_grad=True)
t3 = time.perf_counter()
meta.anil_loss(x, y, xq, yq, W, b).backward()
t4 = time.perf_counter(); r4 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
meta.anil_loss(x, y, xq, yq, W, b).backward()
t5 = time.perf_counter()
print(f"import torch {t1-t0:.2f}s {r1/1024:.0f} MiB; import metassl_fast {t2-t1:.2f}s +{(r2-r1)/1024:.0f} MiB; first anil_loss fwd+bwd {t4-t3:.2f}s +{(r4-r2)/1024:.0f} MiB; second {1e3*(t5-t4):.2f} ms")
print("dynamo imported:", "torch._dynamo" in sys.modules, "inductor:", "torch._inductor" in sys.modules)
