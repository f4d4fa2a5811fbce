# Issue 14 probe, run as-is for bench/RESULTS.md (2026-12-02): first and second call of info_nce, clip_loss, svm_loss in one fresh process, RSS growth.
# PYTHONPATH=python .venv/bin/python bench/probes/first_call_contrastive.py
import time, resource, sys, torch
import metassl_fast as msf
from metassl_fast import meta
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name, f in [("info_nce", lambda: msf.info_nce(torch.randn(64, 32, requires_grad=True), torch.randn(64, 32)).backward()),
                ("clip_loss", lambda: msf.clip_loss(torch.randn(64, 32, requires_grad=True), torch.randn(64, 32), 10.0).backward()),
                ("svm_loss", lambda: meta.svm_loss(torch.randn(2, 10, 16, requires_grad=True), torch.randint(0, 5, (2, 10)), torch.randn(2, 5, 16), torch.randint(0, 5, (2, 5)), n_way=5).backward())]:
    t = time.perf_counter(); f(); t1 = time.perf_counter(); f(); t2 = time.perf_counter()
    print(f"{name}: first {1e3*(t1-t):.1f} ms, second {1e3*(t2-t1):.2f} ms, maxrss +{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0)/1024:.0f} MiB so far")
print("dynamo imported:", "torch._dynamo" in sys.modules)
