# Issue 14 probe, run for bench/RESULTS.md (2026-12-08): anil_loss T=1 per-call pieces timed apart (validation, the
# Function, the kernels alone with preallocated buffers, apply, scaling), min of 5 timeit repeats.
#   PYTHONPATH=python .venv/bin/python bench/probes/anil_t1_parts.py
import timeit, torch
from metassl_fast.benchmarks import inner_loop as il
from metassl_fast.meta import anil as A
from metassl_fast import _validate
from metassl_fast.ops import inner_loop as op
x,y,xq,yq,W,b = il._inputs(1, 25, 75, 640, 5)
lr=il.LR
def t(name, f, n=5000):
    f()
    r=min(timeit.repeat(f, number=n, repeat=5))/n*1e6
    print(f"{name:40s} {r:7.2f} us")
t("task_reduction", lambda: _validate.task_reduction("mean"))
t("prepared", lambda: A.prepared(x,y,W,b,lr,5,False))
X, labels, W_, b_, lr_w, lr_b, steps, constant = A.prepared(x,y,W,b,lr,5,False)
t("query_set", lambda: _validate.query_set(x, xq, yq, 5))
t("backend", lambda: _validate.backend(None, x.device))
t("query.to.contiguous", lambda: xq.to(X.dtype).contiguous())
t("one_pass", lambda: op.one_pass("cpu", "mean", True, (X, xq, W_, b_)))
t("is_compiling", lambda: torch.compiler.is_compiling())
t("tasks", lambda: _validate.tasks("support", x))
t("head", lambda: _validate.head(x, W, b))
t("int_labels", lambda: _validate.int_labels("support_labels", y, (1,25), 5, x.device))
t("step_sizes", lambda: _validate.step_sizes(lr, 5, 640, X))
t("steps", lambda: _validate.steps(5))
t("3x to.contiguous", lambda: [z.to(torch.float32).contiguous() for z in (x,W,b)])
inputs = (X, labels, xq, yq, W_, b_, lr_w, lr_b, steps, False)
t("_train_run (kernel+allocs)", lambda: op._train_run(*inputs, op._impl("cpu").anil_unchecked), 2000)
with torch.no_grad():
    t("Function.apply no grad", lambda: op._AnilTrainEager.apply(*inputs), 2000)
t("Function.apply", lambda: op._AnilTrainEager.apply(*inputs), 2000)
t("anil_loss fwd only", lambda: il._ours(5)(x,y,xq,yq,W,b), 2000)
t("full step", lambda: il._step(il._ours(5), (x,y,xq,yq,W,b)), 2000)
out = op._train_run(*inputs, op._impl("cpu").anil_unchecked)
loss, dW, db, coef, lamK, dzqT, WK, correct = out
g = torch.ones(())
cpu = op._impl("cpu")
t("apply_unchecked", lambda: cpu.apply_unchecked(g, X, xq, W_, coef, lamK, dzqT, WK), 2000)
from metassl_fast.ops._common import scale_precomputed, refuse_later, check_saved
t("scale_precomputed", lambda: scale_precomputed((dW, db), g, (True, True)))
t("check_saved", lambda: check_saved(X.dtype, X, xq, W_, coef, lamK, dzqT, WK))
t("_apply_run", lambda: cpu._apply_run(g, X, xq, W_, coef, lamK, dzqT, WK), 2000)
class Ctx: pass
def fwd_then_bwd():
    l = il._ours(5)(x,y,xq,yq,W,b)
    x.grad=xq.grad=W.grad=b.grad=None
    l.backward()
t("fwd+bwd", fwd_then_bwd, 2000)
def fwd_only_keep():
    l = il._ours(5)(x,y,xq,yq,W,b)
    return l
t("fwd (keep)", fwd_only_keep, 2000)
from metassl_fast import _ext
from metassl_fast.ops._common import ptr_pairs, nthreads
C_ext=_ext.require("_C")
T,S,D=X.shape; Q=xq.shape[1]; C=5
none = X.new_empty(0)
weights=X.new_full((T,),1.0/T); lossb=X.new_empty(T); dW0=X.new_empty(T,C,D); db0=X.new_empty(T,C)
defer=(X.new_empty(T,S+2*C,S), X.new_empty(T,C,D), X.new_empty(T,C,Q), X.new_empty(T,C,D)); corr=X.new_empty(T)
args=[_ext.DTYPE_CODE[X.dtype], *ptr_pairs(X, labels, xq, yq, W_, b_, lr_w, lr_b, weights, lossb, none, none, dW0, db0, none, none), T,S,Q,D,C,5,False,True,False,True,*ptr_pairs(*defer), nthreads(), *ptr_pairs(corr)]
t("C anil_loss only", lambda: C_ext.anil_loss(*args), 2000)
dX, dXq = torch.empty_like(X), torch.empty_like(xq)
args2=[_ext.DTYPE_CODE[X.dtype], *ptr_pairs(X, W_, *defer), 1.0, *ptr_pairs(dX, dXq), T, S, Q, D, C, nthreads()]
t("C anil_apply only", lambda: C_ext.anil_apply(*args2), 2000)
t("ptr_pairs 20", lambda: ptr_pairs(X, labels, xq, yq, W_, b_, lr_w, lr_b, weights, lossb, none, none, dW0, db0, none, none,*defer))
t("10 new_empty", lambda: [X.new_empty(T,C,D) for _ in range(10)])
