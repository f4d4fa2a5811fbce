# Issue 14 probe, run as-is for bench/RESULTS.md (2026-12-02): first call of supcon_loss, nt_xent, siglip_loss in a fresh process.
# PYTHONPATH=python .venv/bin/python bench/probes/first_call_family.py
import time, sys, torch, metassl_fast as msf
a = torch.randn(64, 32, requires_grad=True); b = torch.randn(64, 32); y = torch.randint(0, 4, (64,))
for name, f in [("supcon", lambda: msf.supcon_loss(a, y).backward()), ("nt_xent", lambda: msf.nt_xent(a, b).backward()),
                ("siglip", lambda: msf.siglip_loss(a, b, 10.0, -10.0).backward())]:
    t = time.perf_counter(); f(); print(name, f"first {1e3*(time.perf_counter()-t):.1f} ms")
print("dynamo imported:", "torch._dynamo" in sys.modules)
