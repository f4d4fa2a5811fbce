# Issue 14 probe, run for bench/RESULTS.md (2026-12-08): a trivial autograd.Function with anil_loss's four gradient
# inputs (T=1, S=25, Q=75, D=640, C=5), forward+backward: torch's own per-call floor.
#   PYTHONPATH=python .venv/bin/python bench/probes/autograd_floor.py
import timeit, torch
from metassl_fast.benchmarks import inner_loop as il
x,y,xq,yq,W,b = il._inputs(1, 25, 75, 640, 5)
def t(name, f, n=5000):
    f()
    r=min(timeit.repeat(f, number=n, repeat=5))/n*1e6
    print(f"{name:40s} {r:7.2f} us")
class F(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xq, W, b):
        return x.new_zeros(())
    @staticmethod
    def backward(ctx, g):
        return torch.empty_like(x), torch.empty_like(xq), torch.empty_like(W), torch.empty_like(b)
def step():
    x.grad=xq.grad=W.grad=b.grad=None
    F.apply(x,xq,W,b).backward()
t("trivial fwd+bwd, 4 grads", step)
def step2():
    x.grad=xq.grad=W.grad=b.grad=None
    l=F.apply(x,xq,W,b)
t("trivial fwd", step2)
l=None
def step3():
    x.grad=xq.grad=W.grad=b.grad=None
    l=F.apply(x,xq,W,b); torch.autograd.backward([l],[torch.ones(())])
t("trivial fwd+autograd.backward w/ grad", step3)
def step4():
    x.grad=xq.grad=W.grad=b.grad=None
    l=F.apply(x,xq,W,b); torch._C._autograd_init if False else None
    torch.autograd.grad([l],[x,xq,W,b])
t("trivial fwd+autograd.grad", step4)
t("4 empty_like", lambda: (torch.empty_like(x), torch.empty_like(xq), torch.empty_like(W), torch.empty_like(b)))
