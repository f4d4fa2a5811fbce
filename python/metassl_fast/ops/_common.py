"""What every op shares: the CPU row-block sweep, normalisation and its gradient, the
GPU operand scaling and launch helpers, the backend table lookup and the autograd
helpers (precomputed gradients, refused double backward).

The CPU sweep: S = rows keys^T is formed in row blocks of at most TARGET_BLOCK_BYTES; a
C++ kernel (csrc/cpu/<op>.cpp) does the loss and overwrites the block with G in cache;
G is multiplied back into the gradients.  The three products run in csrc/cpu/gemm.cpp or
torch's BLAS (sweep_gemm).  Extra memory is O(N D + block), never O(N M).
"""
from __future__ import annotations

import functools
import importlib
import math
import os
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from .. import _ext

# One S block: 8 MiB fits the L3 of small CPUs and the GEMMs are no faster above it;
# at least 128 rows, since thinner blocks make the GEMMs slow (N = 65536 on 2 cores:
# 32 rows 75 s of GEMM, 128 rows 45 s) and 128 x 65536 floats is still only 32 MiB.
TARGET_BLOCK_BYTES = 8 << 20
MIN_BLOCK_ROWS = 128
NORM_EPS = 1e-12  # F.normalize's eps: |x| is clamped to it

KERNEL_BACKENDS = ("cpu", "triton", "cuda")

GEMM_ENV = "METASSL_FAST_GEMM"
GEMM_CHOICES = ("auto", "own", "blas")
# Sweeps below this many multiply-adds per product keep torch's BLAS whatever sweep_gemm
# says: there the own path's fixed costs (packing the keys, two parallel regions per
# product) outweigh its speed (measured on a Zen 4: info_nce N=256 D=128 5-8% slower with
# it, N=2048 the same, N=4096 10-14% faster; bench/RESULTS.md).
OWN_GEMM_MIN_MACS = 1 << 28


@functools.lru_cache(maxsize=None)
def backend_module(package: str, op: str, backend: str) -> ModuleType:
    """ops/<op>/<backend>.py, the one implementation of the op's contract for `backend`
    (imported on first use: the GPU modules import triton lazily)."""
    if backend not in KERNEL_BACKENDS:  # _backend.resolve stops the others before they get here
        raise RuntimeError(f"metassl_fast::{op} has no {backend!r} kernel (kernels: {KERNEL_BACKENDS}; "
                           "backend='torch' is the reference, outside the custom ops)")
    return importlib.import_module(f"{package}.{backend}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def nthreads() -> int:
    return max(1, torch.get_num_threads())


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def block_rows(n_rows: int, n_cols: int, itemsize: int) -> int:
    rows = max(MIN_BLOCK_ROWS, TARGET_BLOCK_BYTES // (n_cols * itemsize))
    return max(1, min(n_rows, rows))


def normalized(x: Tensor) -> tuple[Tensor, Tensor]:
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(NORM_EPS)
    return x / norm, norm


def normalize_backward(dxn: Tensor, xn: Tensor, norm: Tensor | None) -> Tensor:
    """dL/dx of xn = x / |x| from dL/dxn; dxn itself when there was no normalisation
    (norm None).  Where |x| was clamped to eps the map is x / eps: its gradient is dxn / eps."""
    if norm is None:
        return dxn
    radial = (xn * dxn).sum(dim=1, keepdim=True)
    clamped = norm <= NORM_EPS
    return torch.where(clamped, dxn, dxn - xn * radial) / norm


def operands(x: Tensor, normalize: bool) -> tuple[Tensor, Tensor | None]:
    """x in the accumulation dtype, L2-normalised if asked, and its norms (or None)."""
    xa = x.to(acc_dtype(x.dtype))
    return normalized(xa) if normalize else (xa, None)


@functools.lru_cache(maxsize=None)
def _cpu_vendor() -> str:
    """cpuid's vendor string as Linux reports it ('' where /proc/cpuinfo says none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def sweep_gemm() -> str:
    """Which products the CPU row sweep runs: "own" (csrc/cpu/gemm.cpp, register-blocked
    AVX2 / AVX-512 micro-kernels) or "blas" (torch.mm, MKL in torch's x86 wheels).

    METASSL_FAST_GEMM=own|blas forces one (read on every call); "auto" (the default) picks
    "own" on x86 CPUs not made by Intel whose loaded _C has AVX2 or AVX-512 (on a Zen 4 MKL
    ran the sweep's block shapes at 34-67% of the FMA peak, ours at 71-85% in a C++ harness;
    whole losses 10-14% faster at N=4096: bench/RESULTS.md) and "blas" elsewhere (Intel,
    where MKL is the vendor's own kernel and ours is unmeasured; the SSE base build; other
    architectures)."""
    choice = os.environ.get(GEMM_ENV, "auto").strip() or "auto"
    if choice not in GEMM_CHOICES:
        raise ValueError(f"{GEMM_ENV}={choice!r}: expected one of {GEMM_CHOICES}")
    if choice != "auto":
        return choice
    vendor = _cpu_vendor()
    simd = getattr(_ext.require("_C"), "simd", "baseline")
    return "own" if vendor and vendor != "GenuineIntel" and simd in ("avx2", "avx512") else "blas"


class _OwnProducts:
    """The row sweep's three products in csrc/cpu/gemm.cpp: keys packed once per sweep."""

    def __init__(self, rows: Tensor, keys: Tensor, block: int):
        self.C = _ext.require("_C")
        self.code = _ext.DTYPE_CODE[rows.dtype]
        self.nt = nthreads()
        self.rows, self.keys = rows, keys
        n, d = keys.shape
        self.work = torch.empty(self.C.gemm_nt_work_numel(self.code, block, d), dtype=keys.dtype)
        self.packed = torch.empty(self.C.gemm_packed_numel(self.code, n, d), dtype=keys.dtype)
        self.C.gemm_pack(self.code, keys.data_ptr(), _extent(keys), n, d, keys.stride(0), self.packed.data_ptr(),
                         self.packed.numel(), self.nt)

    def scores(self, r0: int, r1: int, S: Tensor) -> None:
        """S = rows[r0:r1] keys^T."""
        a = self.rows[r0:r1]
        n, d = self.keys.shape
        self.C.gemm_nt(self.code, a.data_ptr(), _extent(a), a.stride(0), self.packed.data_ptr(), self.packed.numel(),
                       S.data_ptr(), S.numel(), S.stride(0), r1 - r0, n, d, 1.0, self.work.data_ptr(),
                       self.work.numel(), self.nt)

    def rows_grad(self, S: Tensor, out: Tensor, alpha: float, accumulate: bool) -> None:
        """out (+)= alpha S keys."""
        n, d = self.keys.shape
        self.C.gemm_nn_tn(self.code, False, S.data_ptr(), _extent(S), S.stride(0), self.keys.data_ptr(),
                          _extent(self.keys), self.keys.stride(0), out.data_ptr(), _extent(out), out.stride(0),
                          S.shape[0], d, n, alpha, accumulate, self.nt)

    def keys_grad(self, S: Tensor, r0: int, r1: int, c0: int, c1: int, d_keys: Tensor, alpha: float) -> None:
        """d_keys += alpha S[:, c0:c1]^T rows[r0:r1]."""
        a = S[:, c0:c1]
        b = self.rows[r0:r1]
        self.C.gemm_nn_tn(self.code, True, a.data_ptr(), _extent(a), S.stride(0), b.data_ptr(), _extent(b),
                          b.stride(0), d_keys.data_ptr(), _extent(d_keys), d_keys.stride(0), c1 - c0, b.shape[1],
                          r1 - r0, alpha, True, self.nt)


def _row_major(t: Tensor) -> bool:
    return t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= t.shape[1]


def _extent(t: Tensor) -> int:
    """Elements a row-major 2-D view spans from its first: (rows - 1) * stride + cols (a
    strided view's numel is less: the C++ side checks the span)."""
    return (t.shape[0] - 1) * t.stride(0) + t.shape[1] if t.shape[0] else 0


def row_sweep(rows: Tensor, keys: Tensor, kernel, *, d_rows: Tensor | None = None, d_keys: Tensor | None = None,
              key_cols: tuple[int, int] | None = None, row_alpha: float = 1.0, key_alpha: float = 1.0) -> None:
    """S = rows keys^T in row blocks; kernel(S, r0, r1) does the op's work on the block in
    place (with a gradient it leaves G in S).  Then d_rows[r0:r1] = row_alpha G keys and
    d_keys += key_alpha G[:, c0:c1]^T rows[r0:r1] for key_cols = (c0, c1) (all columns by
    default).  When d_keys is d_rows (rows and keys are the same samples) both add into it,
    so it must start at zero; otherwise d_rows may start uninitialised."""
    n_rows, n_cols = rows.shape[0], keys.shape[0]
    B = block_rows(n_rows, n_cols, rows.element_size())
    buf = torch.empty(B, n_cols, dtype=rows.dtype)
    keys_t = keys.t()
    c0, c1 = key_cols if key_cols is not None else (0, n_cols)
    rows_beta = 1.0 if d_rows is not None and d_rows is d_keys else 0.0
    if not 0 <= c0 <= c1 <= n_cols:
        raise ValueError(f"key_cols must satisfy 0 <= c0 <= c1 <= {n_cols}, got {key_cols}")
    own = None
    gemm = sweep_gemm()  # a bad METASSL_FAST_GEMM is refused at every size
    if (gemm == "own" and n_rows * n_cols * rows.shape[1] >= max(1, OWN_GEMM_MIN_MACS)
            and rows.dtype in (torch.float32, torch.float64) and keys.dtype == rows.dtype
            and _row_major(rows) and _row_major(keys)
            and all(t is None or (t.is_contiguous() and t.dtype == rows.dtype) for t in (d_rows, d_keys))):
        own = _OwnProducts(rows, keys, B)
    for r0 in range(0, n_rows, B):
        r1 = min(n_rows, r0 + B)
        S = buf[: r1 - r0]
        if own is not None:
            own.scores(r0, r1, S)
        else:
            torch.mm(rows[r0:r1], keys_t, out=S)
        kernel(S, r0, r1)
        if d_rows is not None:
            out = d_rows[r0:r1]
            if own is not None:
                own.rows_grad(S, out, row_alpha, rows_beta == 1.0)
            elif rows_beta == 0.0 and row_alpha == 1.0:
                torch.mm(S, keys, out=out)
            else:
                out.addmm_(S, keys, beta=rows_beta, alpha=row_alpha)
        if d_keys is not None and c1 > c0:
            if own is not None:
                own.keys_grad(S, r0, r1, c0, c1, d_keys, key_alpha)
            else:
                d_keys.addmm_(S[:, c0:c1].t(), rows[r0:r1], alpha=key_alpha)


def one_device(op: str, *tensors: Tensor | None) -> None:
    """Every tensor of a raw op call on one device (0-dim CPU tensors may join any, as in
    torch), checked in the op and in its fake: a tensor on the meta device among CPU ones
    sends the call to the fake, which would return uninitialised CPU memory."""
    device = None
    for t in tensors:
        if t is None or (t.dim() == 0 and t.device.type == "cpu"):
            continue
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"metassl_fast::{op}: every tensor must be on one device, got {device} and {t.device}")


def check_op(query: Tensor, key: Tensor | None, scale: Tensor, reduction: str | None = None,
             **others: Tensor | None) -> None:
    """What the row-sweep kernels assume of a direct torch.ops call (the public functions
    ensure it): (N, D) features with N, D >= 1, keys with the same D and device, a 0-dim
    scale > 0, a known reduction, and every other tensor on the features' device."""
    if query.dim() != 2 or query.shape[0] == 0 or query.shape[1] == 0:
        raise ValueError(f"query must be (N, D) with N, D >= 1, got {tuple(query.shape)}")
    if key is not None and (key.dim() != 2 or key.shape[0] == 0 or key.shape[1] != query.shape[1]):
        raise ValueError(f"key must be (M, D={query.shape[1]}) with M >= 1, got {tuple(key.shape)}")
    if key is not None and key.device != query.device:
        raise ValueError(f"key is on {key.device} but query is on {query.device}")
    if scale.dim() != 0:
        raise ValueError(f"scale must be a 0-dim tensor, got shape {tuple(scale.shape)}")
    if reduction is not None and reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    for name, t in others.items():
        if t is not None and t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
    if not torch.compiler.is_compiling() and not float(scale) > 0:
        raise ValueError(f"scale must be > 0, got {float(scale)}")


def grad_or_empty(g: Tensor | None, like: Tensor, needed: bool) -> Tensor:
    """g in like's dtype, or a fresh empty tensor where no gradient is needed (outputs of
    a custom op may not alias each other)."""
    return g.to(like.dtype) if needed else like.new_empty(0)


def tensor_or_empty(value: float, like: Tensor, needed: bool) -> Tensor:
    """A host-side float sum as a 0-dim tensor of like's dtype, or an empty tensor."""
    return torch.tensor(value, dtype=torch.float64).to(like.dtype) if needed else like.new_empty(0)


# ---------------------------------------------------------------------------
# GPU backends (Triton and CUDA C++)
# ---------------------------------------------------------------------------

def gpu_operand(x: Tensor, normalize: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """(x in float32, normalised if asked; its norms or None; the kernel operand: the same
    values in the input dtype (float64 inputs are rounded to float32), contiguous rows)."""
    xa, norm = operands(x, normalize)
    op_dtype = x.dtype if x.dtype != torch.float64 else torch.float32
    return xa, norm, xa.to(op_dtype).contiguous()


def operand_scale(dtype, weights) -> float:
    """fp16 / bf16 operands: the power of two that brings max|weights| into [1, 2).  The
    backward kernels round G (proportional to these weights) to the operand dtype before
    G K; with weights ~ 1/N, G underflows fp16 at large N, and a large loss scale would
    overflow it.  Scaling the weights by a power of two and the results back is exact.
    1.0 for fp32 operands (and for weights all zero or not finite)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return 1.0
    m = float(weights.abs().max()) if isinstance(weights, Tensor) else abs(float(weights))
    if not (0.0 < m < math.inf):
        return 1.0
    return math.ldexp(1.0, 1 - math.frexp(m)[1])


TRITON_MAX_D = 16384  # D is streamed in chunks, so any D fits; beyond this the table is not swept


class TritonTiles(NamedTuple):
    """Tile sizes and launch options of the contrastive-family Triton kernels (kernels/_tiles.py):
    BLOCK_M query rows and BLOCK_N key rows per S tile (both >= 64 on a GPU: each is the
    MMA's M in one of the backward passes, and wgmma's M is 64), D streamed in BLOCK_K
    chunks over num_stages buffers, BLOCK_DO columns of D per backward program."""
    block_m: int
    block_n: int
    block_k: int
    block_do: int
    num_warps: int
    num_stages: int

    def meta(self, backward: bool) -> dict:
        out = dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, num_warps=self.num_warps,
                   num_stages=self.num_stages)
        if backward:
            out["BLOCK_DO"] = self.block_do
        return out


def triton_config(d: int, dtype: torch.dtype = torch.bfloat16, *, rows: int) -> TritonTiles:
    """The tiles for feature dimension d and operand dtype (rows: the most rows of any
    (rows, d) operand or output).  Under the interpreter small ones, so that the tests
    cross every chunk edge; on a GPU the choice that bench/aot/ shows fits sm_80 and sm_90
    without spills (tests/test_aot.py keeps it so)."""
    from .. import _backend

    if not 1 <= d <= TRITON_MAX_D:
        raise ValueError(f"backend='triton' supports feature dimension 1 <= D <= {TRITON_MAX_D}, got D = {d}")
    check_int32_offsets("backend='triton'", ("rows x D", rows * d))
    if _backend.interpreting():
        return TritonTiles(16, 16, 32, 64, 1, 1)
    pow2 = max(16, 1 << (d - 1).bit_length())
    if dtype == torch.float32 and precision(dtype) == "ieee":
        # tl.dot on CUDA cores: every operand element passes through registers
        return TritonTiles(32, 32, 16, min(64, pow2), 4, 2)
    half = dtype != torch.float32  # 16-bit operands: half the shared memory and registers per element
    # BLOCK_DO: the backward recomputes S once per chunk of the output's D, so as wide as
    # the registers allow without spills (fp32 tf32 spills at 256 on sm_80)
    return TritonTiles(64, 64, min(64 if half else 32, pow2), min(256 if half else 128, pow2), 8, 3)


def check_int32_offsets(who: str, *sizes) -> None:
    """The Triton kernels form element offsets in 32-bit integers: each (name, count) must
    stay below 2^31, or the addresses would wrap (out-of-bounds reads and writes)."""
    for name, count in sizes:
        if count >= 2**31:
            raise ValueError(f"{who} addresses a tensor with 32-bit element offsets: {name} must be < 2^31, "
                             f"got {count}; use backend='cuda', 'cpu' or 'torch', or split the batch")


def precision(dtype) -> str:
    """fp32 operands use tf32 exactly when torch would (torch.backends.cuda.matmul.allow_tf32,
    off by default); the setting means nothing for fp16/bf16 operands."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def ptr_args(**tensors) -> dict:
    """name=pointer and name_numel=element count of each tensor, as the compiled modules'
    functions take them (they check every count against the sizes they are given)."""
    out = {}
    for name, t in tensors.items():
        out[name] = t.data_ptr()
        out[name + "_numel"] = t.numel()
    return out


HUGE_PAGE_MIN_BYTES = 4 << 20


def fresh_like(t: Tensor) -> Tensor:
    """torch.empty_like(t) for a gradient a CPU kernel is about to write: past 4 MiB with
    transparent huge pages asked for (_C.advise_huge_pages), since a large fresh buffer is a
    new mapping that otherwise faults once per 4 KiB page on its first write (a 38 MB
    d query at D = 16000: 11 ms of faults against 0.9 ms of writing; bench/RESULTS.md)."""
    out = torch.empty_like(t)
    nbytes = out.numel() * out.element_size()
    if nbytes >= HUGE_PAGE_MIN_BYTES and out.device.type == "cpu":
        _ext.require("_C").advise_huge_pages(out.data_ptr(), nbytes)
    return out


def check_saved(dtype: torch.dtype, *tensors: Tensor) -> None:
    """What an unchecked backward reads raw, as its forward saved it: contiguous CPU tensors
    of dtype (a saved_tensors_hooks unpack may hand back another dtype or layout; the C++
    side checks only element counts)."""
    for t in tensors:
        if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
            raise RuntimeError(f"metassl_fast: a tensor saved for the backward came back as {t.dtype} on {t.device}"
                               f"{'' if t.is_contiguous() else ', not contiguous'}; the kernel needs it as saved "
                               f"({dtype}, contiguous, CPU): check the saved_tensors_hooks in use")


def ptr_pairs(*tensors) -> list:
    """pointer, element count, pointer, ... of the tensors, for a positional call of a
    compiled function whose arguments are in that order (the hot entries: keyword parsing
    of some fifty arguments and ptr_args's dict cost about 6 us a call)."""
    out = []
    for t in tensors:
        out += (t.data_ptr(), t.numel())
    return out


def cuda_call(name: str, device: torch.device, **kwargs) -> None:
    """_C_cuda.<name>(**kwargs) with `device` current and torch's current stream on it."""
    mod = _ext.require("_C_cuda")
    with torch.cuda.device(device):
        getattr(mod, name)(stream=torch.cuda.current_stream().cuda_stream, **kwargs)


def cuda_tile() -> int:
    """The CUDA kernels' fixed square tile (rows per block, columns per tile)."""
    return _ext.require("_C_cuda").TILE


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------

def double_backward_error(what: str) -> RuntimeError:
    return RuntimeError(f"metassl_fast: double backward (a gradient of the gradient) of {what} is not "
                        "supported; use backend='torch' for higher-order derivatives")


def refuse_double_backward(what: str):
    """An autograd formula for a backward op: differentiating it raises a clear error."""
    def backward(ctx, *grads):
        raise double_backward_error(what)
    return backward


def register_backward_op(name: str, what: str) -> None:
    """A backward op's own autograd formula: refuse (double backward is not supported)."""
    torch.library.register_autograd(name, refuse_double_backward(what),
                                    setup_context=lambda ctx, inputs, output: None)


class _RefuseBackward(torch.autograd.Function):
    """Identity (a view of x) whose backward raises: the result of a backward computed in
    closed form, handed out under create_graph=True, so that the first-order gradient
    is usable and only differentiating it again is refused.  `anchor` (an input of the
    op that requires grad) ties the result into the graph."""

    generate_vmap_rule = True  # the forward is a view: torch.func vmaps it itself

    @staticmethod
    def forward(what, x, anchor):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.what = inputs[0]

    @staticmethod
    def backward(ctx, grad):
        raise double_backward_error(ctx.what)


def loop_vmap(op):
    """A vmap rule for `op`: one call per element of the batch, the outputs stacked along
    dim 0.  Exact, not fast (the ops batch already: stack the batch into their leading
    dimension, tasks or rows, and call once); jacrev and vmap-over-grad need it."""

    def vmap(info, in_dims, *args):
        if info.batch_size == 0:
            raise ValueError("metassl_fast: vmap over a batch of size 0 (the ops take no empty batch)")
        outs = []
        for i in range(info.batch_size):
            outs.append(op(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims))))
        if isinstance(outs[0], (tuple, list)):
            stacked = tuple(torch.stack(list(parts)) for parts in zip(*outs))
            return stacked, (0,) * len(stacked)
        return torch.stack(outs), 0

    return vmap


def transformable(op, setup_context, backward, name: str) -> type:
    """An autograd.Function running `op` (a custom op, or an implementation function) with
    the autograd formula registered for it (the same setup_context and backward).
    torch.library's own autograd wrapper has no setup_context, so torch.func.grad / vjp /
    jacrev refuse a custom op; under those transforms the entries call this instead
    (call_op).  vmap: loop_vmap; forward mode: a clear error."""

    def forward(*args):
        return op(*args)

    return type(f"{name}_transformable", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
                 "backward": staticmethod(backward), "vmap": staticmethod(loop_vmap(op)),
                 "jvp": staticmethod(_no_forward_ad(name))})


def _no_forward_ad(name: str):
    """A Function's jvp that refuses forward-mode AD with the library's own message."""

    def jvp(ctx, *tangents):
        raise RuntimeError(f"metassl_fast: forward-mode AD (torch.func.jvp, jacfwd, hessian) of {name} is not "
                           "supported; use backend='torch' for it")

    return jvp


def func_transforms() -> bool:
    """A torch.func transform (grad, vjp, jacrev, vmap) is active, in eager mode.  The entries
    then call the ops through transformable() and never precompute a gradient in the
    forward: torch.func runs every backward with create_graph=True, which a gradient formed
    in the forward (a constant to autograd) must refuse; the recomputing backward gives the
    first-order gradient and refuses only a second derivative."""
    return torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling()


_BACKWARD_FNS: dict = {}


def backward_op(op, what: str, *args, ctx=None):
    """op(*args) for a backward op, called inside an autograd formula.  Under a torch.func
    transform (func_transforms) the call goes through an autograd.Function of the form
    torch.func accepts, whose own backward refuses (double backward is not supported):
    torch.library's wrapper of the op would be refused by the transform itself.  Where the
    forward ran through eager_transformable (ctx.eager; op then is the CustomOpDef), the
    op's own Python function runs instead, as the dispatcher would run it (below autograd),
    its outputs refusing a second derivative as the op's registered formula does
    (register_backward_op, refuse_later)."""
    if not func_transforms():
        if ctx is not None and getattr(ctx, "eager", False):
            with torch.no_grad():
                out = op._init_fn(*args)
            return refuse_later(what, [a for a in args if isinstance(a, torch.Tensor)], *out)
        return op(*args)
    fn = _BACKWARD_FNS.get(op)
    if fn is None:
        fn = _BACKWARD_FNS[op] = transformable(op, lambda ctx, inputs, output: None, refuse_double_backward(what),
                                               "backward_op")
    return fn.apply(*args)


def call_op(op, fn: type, *args, eager: type | None = None):
    """op(*args), or through the torch.func-compatible Function fn when a torch.func transform
    is active (func_transforms), or through eager (eager_transformable) in plain eager mode
    where one is given: no dispatcher, so the first call does not import torch._dynamo."""
    if func_transforms():
        return fn.apply(*args)
    if eager is not None and _plain_eager(args):
        return eager.apply(*args)
    return op(*args)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(args) -> bool:
    """No compile, no dispatch mode (FakeTensorMode, FlopCounterMode, a recorder) and no tensor
    subclass among args: the implementation may run without the dispatcher, which those
    need to see the op."""
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor)))


def eager_transformable(op_def, setup_context, backward, name: str) -> type:
    """transformable() of a custom op's own Python function (op_def: the CustomOpDef), for
    plain eager mode (call_op's eager).  torch.library runs a custom op's implementation
    inside a torch._dynamo-disabled wrapper, which imports torch._dynamo (about 3 s and
    150 MiB here) on the first call, and adds dispatch cost on every call; this Function
    runs the same implementation and autograd formula without it.  Its ctx.eager is True,
    so that the backward calls its backward op's function the same way (backward_op's
    ctx).  torch.compile still traces the op (call_op checks)."""

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.eager = True

    return eager_function(op_def._init_fn, setup, backward, name)


def eager_function(run, setup_context, backward, name: str) -> type:
    """An autograd.Function of the classic form, forward(ctx, *args) = run(*args) followed by
    setup_context(ctx, args, output), with the op's backward: for plain eager mode only
    (never under torch.func, which needs transformable()'s form).  torch binds the arguments
    of a Function that defines setup_context with inspect.signature on every call, about
    20 us here, a tenth of a small call (bench/RESULTS.md, fixed per-call cost)."""

    def forward(ctx, *args):
        output = run(*args)
        setup_context(ctx, args, output)
        return output

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward),
                                                   "jvp": staticmethod(_no_forward_ad(name))})


def refuse_later(what: str, anchors, *grads):
    """The gradients as they are, or (under create_graph=True) wrapped so that their own
    backward raises the double-backward error; anchors: the op's saved inputs."""
    anchor = next((a for a in anchors if isinstance(a, torch.Tensor) and a.requires_grad), None)
    if not torch.is_grad_enabled() or anchor is None:
        return grads
    return tuple(None if g is None else _RefuseBackward.apply(what, g, anchor) for g in grads)


def refuse_create_graph(what: str) -> None:
    """A gradient precomputed in the forward is a constant to autograd: differentiating it
    again (create_graph=True) would silently drop terms, so refuse instead."""
    if torch.is_grad_enabled():
        raise double_backward_error(what)


def scale_precomputed(grads, grad_output, needed):
    """Gradients formed in the forward for grad_output = 1, scaled by the real one; None
    where an input needs no gradient.  Always a new tensor, never the saved one: a
    saved tensor handed out as .grad would be changed in place by the optimiser or
    clip_grad_norm_ and break a retained graph."""
    return tuple(g * grad_output.to(g.dtype) if need else None for g, need in zip(grads, needed))


def needs(a: Tensor, b: Tensor | None, c: Tensor | None, d: Tensor | None) -> tuple[bool, bool, bool, bool]:
    """Which of an op's four differentiable inputs (None where absent) need a gradient in
    this call (written out: this runs on every call)."""
    if not torch.is_grad_enabled():
        return False, False, False, False
    return (a.requires_grad, b is not None and b.requires_grad, c is not None and c.requires_grad,
            d is not None and d.requires_grad)
