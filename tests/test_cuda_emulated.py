"""The CUDA C++ kernels (csrc/cuda/{contrastive,labeled,siglip,inner_loop}.cu) run on the CPU.

No GPU here: tests/cuda_emu/emu.h emulates the CUDA features the kernels use (one
host thread per CUDA thread, barriers, shuffles, atomics, WMMA by its documented
load / mma / store semantics, fp16 / bf16 rounding), and run_kernels.cpp drives
the real kernel code: forward, then dQ and dK, for InfoNCE / CLIP, SigLIP and the
labelled rows (SupCon / NT-Xent, pairwise, extra logit).  Every output is compared with the
float64 formulas written out here, on shapes that cut tiles (64), feature chunks (32 fp16 / bf16, 16 fp32)
and output chunks (64 fp32 / 128 fp16, bf16).  What it cannot check: the hardware's
fragment layout, the memory model under concurrency (cp.async copies land at once here, so a
missing wait or barrier goes unseen), speed (tests/test_contrastive.py (gpu-marked) runs the
kernels on a GPU).
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CODES = {torch.float32: 0, torch.float16: 2, torch.bfloat16: 3}
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1e-2, 4e-2)}


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not on PATH")
    exe = str(tmp_path_factory.mktemp("cuda_emu") / "run_kernels")
    subprocess.run([gxx, "-std=c++20", "-O2", "-pthread", "-I", os.path.join(HERE, "..", "csrc"), "-o", exe,
                    os.path.join(HERE, "cuda_emu", "run_kernels.cpp")],
                   check=True, capture_output=True, text=True)
    return exe


def _call(exe, tmp_path, mode, dtype, n, c, d, params, inputs, names, sizes):
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    torch.cat([x.flatten().double() for x in inputs]).float().numpy().tofile(src)
    params = list(params) + [0.0] * (5 - len(params))
    subprocess.run([exe, mode, str(CODES[dtype]), str(n), str(c), str(d)] + [repr(float(p)) for p in params]
                   + [str(src), str(dst)], check=True, timeout=600)
    out = torch.from_numpy(__import__("numpy").fromfile(dst, dtype="float32")).double()
    assert sum(sizes) == out.numel()
    return dict(zip(names, torch.split(out, sizes)))


def _run(exe, tmp_path, dtype, q, k, g, scale, symmetric):
    n, d = q.shape
    c = k.shape[0]
    out = _call(exe, tmp_path, "contrastive", dtype, n, c, d, [int(symmetric), scale], [q, k, g],
                ["lse", "pos", "row_loss", "lse_col", "dq", "ds", "dk"], [n, n, n, n, n * d, 1, c * d])
    return _shaped(out, n, c, d)


def _shaped(out, n, c, d):
    out["dq"], out["dk"], out["ds"] = out["dq"].view(n, d), out["dk"].view(c, d), out["ds"][0]
    return out


def _reference(q, k, g, scale, symmetric):
    n, c = q.shape[0], k.shape[0]
    S = scale * q @ k.T
    lse = torch.logsumexp(S, 1)
    pos = S.diagonal()
    eye = torch.eye(n, c, dtype=S.dtype)
    G = g[:, None] * (torch.exp(S - lse[:, None]) - eye)
    lse_col = torch.zeros(n, dtype=S.dtype)
    if symmetric:
        lse_col = torch.logsumexp(S[:, :n], 0)
        G[:, :n] += g[None, :] * (torch.exp(S[:, :n] - lse_col[None, :]) - torch.eye(n, dtype=S.dtype))
    return dict(lse=lse, pos=pos, row_loss=lse - pos, lse_col=lse_col, dq=G @ k, ds=(G * S).sum(), dk=G.T @ q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,m,d", [(1, 0, 3), (3, 5, 40), (65, 0, 130), (64, 70, 16), (130, 7, 33)])
def test_cuda_kernels_against_float64(runner, tmp_path, dtype, n, m, d):
    g = torch.Generator().manual_seed(n * 1000 + m * 10 + d)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(torch.randn(n + m, d, generator=g, dtype=torch.float64), dim=1)
    q, k = q.to(dtype).double(), k.to(dtype).double()  # what the kernel reads
    w = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    scale = 7.5
    for symmetric in (False, True):
        got = _run(runner, tmp_path, dtype, q, k, w.float().double(), scale, symmetric)
        want = _reference(q, k, w.float().double(), scale, symmetric)
        if not symmetric:  # lse_col is the symmetric loss's only
            del want["lse_col"]
        _check(got, want, dtype, f"contrastive {dtype} n={n} m={m} d={d} sym={symmetric}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,c,d,ld", [(65, 70, 40, 48), (40, 64, 37, 40), (64, 65, 96, 104), (3, 5, 42, 43)])
def test_row_stride_longer_than_d(runner, tmp_path, monkeypatch, dtype, n, c, d, ld):
    """Inputs whose rows are ld > D apart, NaN past D (MSF_EMU_LD): the loader's 16-byte
    pieces (taken when the pointer, ld and D are whole pieces: D = 40, 96 here) must not
    read past D, nor the element-by-element path (D = 37, 42)."""
    monkeypatch.setenv("MSF_EMU_LD", str(ld))
    _both_directions(runner, tmp_path, dtype, n, c, d, seed=ld, what=f"ld={ld}")


def _both_directions(runner, tmp_path, dtype, n, c, d, seed, what):
    """The contrastive kernels one-sided and symmetric on seeded operands against float64."""
    q, k, g = _operands(n, c, d, dtype, seed=seed)
    w = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    for symmetric in (False, True):
        out = _call(runner, tmp_path, "contrastive", dtype, n, c, d, [int(symmetric), 7.5], [q, k, w.float().double()],
                    ["lse", "pos", "row_loss", "lse_col", "dq", "ds", "dk"], [n, n, n, n, n * d, 1, c * d])
        want = _reference(q, k, w.float().double(), 7.5, symmetric)
        if not symmetric:
            del want["lse_col"]
        _check(_shaped(out, n, c, d), want, dtype, f"{what} {dtype} n={n} c={c} d={d} sym={symmetric}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("env", [{"MSF_EMU_SMEM": "0"}, {"METASSL_FAST_CUDA_GRAD_SPAN": "256"},
                                 {"METASSL_FAST_CUDA_GRAD_SPAN": "128"}, {"MSF_EMU_SMS": "4"}, {}])
@pytest.mark.parametrize("d", [330, 392])
def test_backward_span(runner, tmp_path, monkeypatch, dtype, env, d):
    """The backward's output columns per block (grad_span): one output chunk in registers
    (no shared memory for them: S computed once per chunk), the fewest pieces of several
    chunks under a cap (accumulators in shared memory, a short last piece: D = 330 is 6
    fp32 / 3 bf16 chunks), at least a piece per SM for the 2 row blocks of 4 emulated SMs,
    all of D (the default: S computed once); D = 330 loads element by element, D = 392
    (a multiple of 8) in 16-byte copies."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _both_directions(runner, tmp_path, dtype, 66, 70, d, seed=330, what=f"span env={env}")


def _span(runner, dtype_code, d, budget, cap, min_pieces=1):
    out = subprocess.run([runner, "span", str(dtype_code), str(d), str(budget), str(cap), str(min_pieces)],
                         check=True, capture_output=True, text=True).stdout.split()
    return tuple(int(x) for x in out)


@pytest.mark.parametrize("dtype_code", [0, 3])
def test_grad_span_plan(runner, dtype_code):
    """grad_span: a whole number of output chunks; all of D where the accumulators fit the
    budget (the dynamic shared memory within it), else the fewest pieces that fit, of
    near-equal size; one chunk (no dynamic shared memory) where D is one chunk or not two
    chunks fit; a cap honoured; with min_pieces (few row blocks), spans of at most
    ceil(chunks / min_pieces) chunks."""
    sm90 = 232448 - 48 * 1024  # an opt-in per block minus static buffers of ~48 KB
    for d in (1, 64, 65, 128, 129, 300, 512, 640, 1000, 2048, 4096, 16384):
        for budget in (0, 40_000, 70_000, sm90, 163 * 1024 - 48 * 1024):
            for cap in (0, 64, 128, 256, 1000):
                span, chunk, smem = _span(runner, dtype_code, d, budget, cap)
                chunks = -(-d // chunk)
                what = (d, budget, cap, span, chunk, smem)
                assert span % chunk == 0 and span >= chunk, what
                if span == chunk:
                    assert smem == 0, what
                    fit = (budget // 256 - 4) // chunk
                    if cap:
                        fit = min(fit, cap // chunk)
                    assert chunks == 1 or fit < 2, what  # wider spans were possible otherwise
                    continue
                assert smem == 64 * (span + 4) * 4 <= budget, what
                assert cap == 0 or span <= cap, what
                pieces = -(-d // span)
                # the fewest pieces: one fewer would need a span over the budget or the cap
                wider = -(-chunks // (pieces - 1)) * chunk if pieces > 1 else None
                assert wider is None or 64 * (wider + 4) * 4 > budget or (cap and wider > cap), what
                assert span - chunk < -(-d // pieces), what  # near-equal: no piece a chunk too wide
    # sm_90 at D = 512 fp32 / bf16: the whole of D in one piece, S computed once
    assert _span(runner, dtype_code, 512, sm90, 0)[0] == 512
    # few row blocks (132 SMs, 64 row blocks: min_pieces 3): narrower spans, never wider than without
    for d in (512, 1000, 4096):
        span, chunk, _ = _span(runner, dtype_code, d, sm90, 0, 3)
        chunks = -(-d // chunk)
        assert span <= -(-chunks // min(3, chunks)) * chunk, (d, span)
        assert span <= _span(runner, dtype_code, d, sm90, 0, 1)[0], (d, span)
    assert _span(runner, dtype_code, 100, sm90, 0, 50)[0] == (64 if dtype_code == 0 else 128)


def _check(got, want, dtype, what):
    atol, rtol = TOL[dtype]
    for name, b in want.items():
        a = got[name].reshape(b.shape)
        assert torch.isfinite(a).all(), f"{name}: unwritten or non-finite elements ({what})"
        err, bound = (a - b).abs().max().item(), atol + rtol * b.abs().max().item()
        assert err <= bound, f"{name}: {err:.3e} > {bound:.3e} ({what})"


def _operands(n, c, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(torch.randn(c, d, generator=g, dtype=torch.float64), dim=1)
    return q.to(dtype).double(), k.to(dtype).double(), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,c,d,diag", [(1, 1, 3, 0), (65, 70, 40, 0), (40, 130, 33, 64)])
def test_siglip_kernels_against_float64(runner, tmp_path, dtype, n, c, d, diag):
    """loss_i = sum_j softplus(-z_ij x_ij), x = s q.k + b, z = +1 at column i + diag; the
    backward of w * sum_i loss_i against autograd."""
    q, k, _ = _operands(n, c, d, dtype, seed=n + c + d)
    ls, bias, w = 4.0, -2.0, 0.37
    got = _call(runner, tmp_path, "siglip", dtype, n, c, d, [ls, bias, diag, w], [q, k],
                ["loss", "dq", "ds", "db", "dk"], [n, n * d, 1, 1, c * d])
    qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    s_t, b_t = torch.tensor(ls, dtype=torch.float64, requires_grad=True), torch.tensor(bias, dtype=torch.float64,
                                                                                         requires_grad=True)
    x = s_t * qq @ kk.T + b_t
    z = -torch.ones(n, c, dtype=torch.float64)
    rows = torch.arange(n)
    ok = rows + diag < c
    z[rows[ok], rows[ok] + diag] = 1.0
    per_row = torch.nn.functional.softplus(-z * x).sum(1)
    dq, dk, ds, db = torch.autograd.grad(w * per_row.sum(), (qq, kk, s_t, b_t))
    _check(got, dict(loss=per_row.detach(), dq=dq / ls, dk=dk / ls, ds=ds.reshape(1), db=db.reshape(1)), dtype,
           f"siglip {dtype} n={n} c={c} d={d}")


def _labeled_reference(q, k, yq, yk, scale, self_col0, pairwise, ext, ext_pos, g):
    """Per anchor loss (SupCon / NT-Xent mean-positive, or pml's pairwise) with column
    self_col0 + i excluded for anchor i (self_col0 < 0: none), an optional extra logit
    per row; and the gradients of sum_i g_i l_i w.r.t. q, k (over s) and s (times s)."""
    qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    s_t = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    S = s_t * qq @ kk.T
    n, c = S.shape
    same = yq[:, None] == yk[None, :]
    excl = torch.zeros(n, c, dtype=torch.bool)
    if self_col0 >= 0:
        rows = torch.arange(n)
        excl[rows, rows + self_col0] = True
    pos = same & ~excl
    if ext is not None:  # one more column, outside S
        S = torch.cat([S, ext[:, None]], 1)
        pos = torch.cat([pos, torch.full((n, 1), ext_pos)], 1)
        same = torch.cat([same, torch.full((n, 1), ext_pos)], 1)
        excl = torch.cat([excl, torch.zeros(n, 1, dtype=torch.bool)], 1)
    npos = pos.sum(1)
    if pairwise:
        neg = ~same
        lse = torch.logsumexp(S.masked_fill(~neg, float("-inf")), 1, keepdim=True)
        per_row = torch.nn.functional.softplus(lse - S).masked_fill(~pos, 0.0).sum(1)
    else:
        lse = torch.logsumexp(S.masked_fill(excl, float("-inf")), 1)
        per_row = torch.where(npos > 0, lse - (S * pos).sum(1) / npos.clamp_min(1), torch.zeros_like(lse))
    dq, dk, ds = torch.autograd.grad((g * per_row).sum(), (qq, kk, s_t))
    return dict(loss=per_row.detach(), dq=dq / scale, dk=dk / scale, ds=(ds * scale).reshape(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pairwise", [False, True])
@pytest.mark.parametrize("n,c,d,self_col0,ext", [(1, 1, 3, 0, 0), (70, 70, 40, 0, 0), (65, 130, 17, 64, 0),
                                                 (33, 90, 20, -1, 0), (40, 40, 24, 0, 2), (40, 75, 24, -1, 1),
                                                 (50, 50, 8, 0, 0)])
def test_labeled_kernels_against_float64(runner, tmp_path, dtype, pairwise, n, c, d, self_col0, ext):
    if pairwise and ext:
        pytest.skip("the extra logit goes with the mean-positive loss only (info_nce's paired negatives)")
    q, k, gen = _operands(n, c, d, dtype, seed=n * 7 + c + d)
    n_labels = 40 if c == 50 else 4  # 40: anchors with one positive, or none
    yq = torch.randint(0, n_labels, (n,), generator=gen)
    yk = torch.randint(0, n_labels, (c,), generator=gen)
    if self_col0 >= 0:  # anchor i is key column self_col0 + i: same label
        yk[self_col0:self_col0 + n] = yq
    e = torch.randn(n, generator=gen, dtype=torch.float64) * 3
    w = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64)
    scale = 5.0
    got = _call(runner, tmp_path, "labeled", dtype, n, c, d, [scale, self_col0, int(pairwise), ext],
                [q, k, yq.double(), yk.double(), e, w],
                ["loss", "stat_a", "stat_b", "dq", "ds", "dk"], [n, n, n, n * d, 1, c * d])
    want = _labeled_reference(q, k, yq, yk, scale, self_col0, pairwise, e.float().double() if ext else None,
                              ext == 2, w.float().double())
    _check(got, want, dtype, f"labeled {dtype} pairwise={pairwise} n={n} c={c} d={d} self={self_col0} ext={ext}")


INNER_CONFIGS = [  # (T, S, Q, D, C, K)
    (1, 1, 1, 1, 2, 0), (2, 5, 7, 17, 5, 1), (3, 25, 7, 40, 5, 3), (2, 5, 3, 9, 20, 2), (1, 7, 4, 300, 3, 4)]


def _inner_inputs(T, S, Q, D, C, seed, meta_sgd):
    g = torch.Generator().manual_seed(seed)
    f = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).float().double()  # noqa: E731
    X, Xq = f(T, S, D), f(T, Q, D)
    y, yq = torch.randint(0, C, (T, S), generator=g), torch.randint(0, C, (T, Q), generator=g)
    W0, b0 = 0.3 * f(C, D), 0.1 * f(C)
    if meta_sgd:
        aW, ab = 0.2 + torch.rand(C, D, generator=g, dtype=torch.float64), 0.2 + torch.rand(C, generator=g,
                                                                                          dtype=torch.float64)
    else:
        aW, ab = torch.full((C, D), 0.6, dtype=torch.float64), torch.full((C,), 0.6, dtype=torch.float64)
    aW, ab = aW.float().double(), ab.float().double()
    tw = (0.5 + torch.rand(T, generator=g, dtype=torch.float64)).float().double()
    dWK, dbK = f(T, C, D), f(T, C)
    return X, y, Xq, yq, W0, b0, aW, ab, tw, dWK, dbK


def _inner_call(exe, tmp_path, cfg, inputs, mode, grad, first_order, need_dlr):
    T, S, Q, D, C, K = cfg
    flags = int(grad) + 2 * int(first_order) + 4 * int(need_dlr)
    sizes = [T, T * S * D, T * Q * D, T * C * D, T * C, T * C * D, T * C, T * (K + 1) * C * D, T * (K + 1) * C, T]
    names = ["loss", "dX", "dXq", "dW0", "db0", "daW", "dab", "W_traj", "b_traj", "correct"]
    return _call(exe, tmp_path, "inner", torch.float32, T, C, D, [S, Q, K, mode, flags], inputs, names, sizes)


@pytest.mark.parametrize("cfg", INNER_CONFIGS)
@pytest.mark.parametrize("meta_sgd", [False, True])
@pytest.mark.parametrize("first_order", [False, True])
def test_inner_loop_kernel_against_autograd(runner, tmp_path, cfg, meta_sgd, first_order):
    """csrc/cuda/inner_loop.cu in its three modes against the per-task autograd loop in
    float64 (adapt_reference): the trajectory's end, the ANIL loss with task weights and
    every gradient (step sizes included), and the reverse pass from a given dL/dW_K."""
    from metassl_fast.reference.inner_loop import adapt_reference

    T, S, Q, D, C, K = cfg
    inputs = _inner_inputs(T, S, Q, D, C, seed=sum(cfg) + 7 * meta_sgd, meta_sgd=meta_sgd)
    X, y, Xq, yq, W0, b0, aW, ab, tw, dWK, dbK = inputs
    flat = [X, y.double(), Xq, yq.double(), W0, b0, aW, ab, tw, dWK, dbK]
    leaves = [t.clone().requires_grad_() for t in (X, Xq, W0, b0, aW, ab)]
    Xl, Xql, Wl, bl, aWl, abl = leaves
    W_t, b_t = adapt_reference(Xl, y, Wl, bl, aWl, abl, K, first_order)
    logits = torch.baddbmm(b_t.unsqueeze(1), Xql, W_t.transpose(1, 2))
    per_task = torch.nn.functional.cross_entropy(logits.reshape(-1, C), yq.reshape(-1), reduction="none")
    per_task = per_task.view(T, Q).mean(1)
    what = f"cfg={cfg} meta_sgd={meta_sgd} first_order={first_order}"
    # mode 0: the ANIL loss and its gradient, and the correctly classified queries per task
    got = _inner_call(runner, tmp_path, cfg, flat, 0, True, first_order, True)
    want_correct = (logits.detach().argmax(-1) == yq).sum(1).double()
    assert torch.equal(got["correct"].double(), want_correct), (what, got["correct"], want_correct)
    grads = torch.autograd.grad((tw * per_task).sum(), leaves, allow_unused=True, retain_graph=True)
    grads = [torch.zeros_like(v) if g is None else g for g, v in zip(grads, leaves)]
    sums = {k: got[k].view(T, -1).sum(0) for k in ("dW0", "db0", "daW", "dab")}
    _check(dict(loss=got["loss"], dX=got["dX"], dXq=got["dXq"], **sums),
           dict(loss=per_task.detach(), dX=grads[0].flatten(), dXq=grads[1].flatten(), dW0=grads[2].flatten(),
                db0=grads[3].flatten(), daW=grads[4].flatten(), dab=grads[5].flatten()), torch.float32, "anil " + what)
    # without the step sizes' gradient: the same gradients, daW / dab untouched (NaN)
    got2 = _inner_call(runner, tmp_path, cfg, flat, 0, True, first_order, False)
    _check({k: got2[k] for k in ("loss", "dX", "dXq", "dW0", "db0")},
           {k: got[k] for k in ("loss", "dX", "dXq", "dW0", "db0")}, torch.float32, "no dlr " + what)
    assert torch.isnan(got2["daW"]).all()
    # mode 1: the trajectory; mode 2: the reverse pass from dW_K, db_K
    fwd = _inner_call(runner, tmp_path, cfg, flat, 1, False, first_order, False)
    _check(dict(WK=fwd["W_traj"].view(T, K + 1, C, D)[:, K], bK=fwd["b_traj"].view(T, K + 1, C)[:, K]),
           dict(WK=W_t.detach(), bK=b_t.detach()), torch.float32, "adapt forward " + what)
    back = _inner_call(runner, tmp_path, cfg, flat, 2, True, first_order, True)
    g2 = torch.autograd.grad((W_t * dWK).sum() + (b_t * dbK).sum(), [Xl, Wl, bl, aWl, abl], allow_unused=True)
    g2 = [torch.zeros_like(v) if g is None else g for g, v in zip(g2, [Xl, Wl, bl, aWl, abl])]
    _check(dict(dX=back["dX"], dW0=back["dW0"].view(T, -1).sum(0), db0=back["db0"].view(T, -1).sum(0),
                daW=back["daW"].view(T, -1).sum(0), dab=back["dab"].view(T, -1).sum(0)),
           dict(dX=g2[0].flatten(), dW0=g2[1].flatten(), db0=g2[2].flatten(), daW=g2[3].flatten(),
                dab=g2[4].flatten()), torch.float32, "adapt backward " + what)


# --------------------------------------------------------------------------- barriers: ThreadSanitizer

@pytest.fixture(scope="module")
def tsan_runner(tmp_path_factory):
    """run_kernels built with -fsanitize=thread: every emulated CUDA thread is a host thread
    and __shared__ memory is shared between them, so a read or write of shared memory that
    no barrier orders against another thread's write is a data race TSan reports (removing
    the 16-bit backward's barrier between its G pass and the inner loads is reported)."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not on PATH")
    exe = str(tmp_path_factory.mktemp("cuda_emu_tsan") / "run_kernels")
    build = subprocess.run([gxx, "-std=c++20", "-O1", "-g", "-pthread", "-fsanitize=thread", "-Wno-unknown-pragmas",
                            "-Wno-tsan", "-I", os.path.join(HERE, "..", "csrc"), "-o", exe,
                            os.path.join(HERE, "cuda_emu", "run_kernels.cpp")], capture_output=True, text=True)
    if build.returncode != 0 and "sanitize" in build.stderr:
        pytest.skip("this compiler cannot build with -fsanitize=thread: " + build.stderr[-200:])
    assert build.returncode == 0, build.stderr[-2000:]
    return exe


TSAN_CASES = [  # (mode, dtype, n, c, d, params, environment)
    ("contrastive", torch.bfloat16, 66, 70, 330, [1, 7.5], {}),  # all of D in shared accumulators
    ("contrastive", torch.float32, 66, 70, 330, [0, 7.5], {"METASSL_FAST_CUDA_GRAD_SPAN": "128"}),  # pieces
    ("contrastive", torch.float16, 40, 64, 40, [1, 7.5], {"MSF_EMU_SMEM": "0"}),  # register accumulators
    ("contrastive", torch.bfloat16, 40, 64, 37, [0, 7.5], {}),  # element-by-element loads
    ("labeled", torch.bfloat16, 65, 130, 17, [5.0, 64, 1, 0], {}),
    ("labeled", torch.float32, 65, 130, 40, [5.0, -1, 0, 0], {}),
    ("siglip", torch.bfloat16, 40, 130, 33, [10.0, -5.0, 64, 1.0], {}),
    ("siglip", torch.float32, 40, 130, 33, [10.0, -5.0, 64, 1.0], {}),
]


@pytest.mark.parametrize("case", TSAN_CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-d{c[4]}-{'+'.join(c[6]) or 'default'}")
def test_no_shared_memory_race(tsan_runner, tmp_path, monkeypatch, case):
    """The contrastive-family kernels (forward, dQ and dK, every accumulator layout) under
    ThreadSanitizer: a race is a non-zero exit (TSan's report on stderr)."""
    mode, dtype, n, c, d, params, env = case
    monkeypatch.setenv("TSAN_OPTIONS", "halt_on_error=1 exitcode=66")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    q, k, g = _operands(n, c, d, dtype, seed=n + c + d)
    if mode == "contrastive":
        inputs, names, sizes = [q, k, torch.ones(n, dtype=torch.float64)], None, [n, n, n, n, n * d, 1, c * d]
    elif mode == "labeled":
        y = torch.randint(0, 4, (n + c,), generator=g).double()
        inputs, sizes = [q, k, y[:n], y[n:], torch.zeros(n, dtype=torch.float64),
                         torch.ones(n, dtype=torch.float64)], [n, n, n, n * d, 1, c * d]
    else:
        inputs, sizes = [q, k], [n, n * d, 1, 1, c * d]
    names = [f"out{i}" for i in range(len(sizes))]
    out = _call(tsan_runner, tmp_path, mode, dtype, n, c, d, params, inputs, names, sizes)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_inner_loop_no_shared_memory_race(tsan_runner, tmp_path, monkeypatch):
    """The inner-loop kernel's three modes under ThreadSanitizer."""
    monkeypatch.setenv("TSAN_OPTIONS", "halt_on_error=1 exitcode=66")
    cfg = (2, 5, 7, 17, 5, 2)
    X, y, Xq, yq, W0, b0, aW, ab, tw, dWK, dbK = _inner_inputs(*cfg[:5], seed=3, meta_sgd=True)
    flat = [X, y.double(), Xq, yq.double(), W0, b0, aW, ab, tw, dWK, dbK]
    for mode in (0, 1, 2):
        out = _inner_call(tsan_runner, tmp_path, cfg, flat, mode, True, False, True)
        assert torch.isfinite(out["W_traj"]).all() or mode == 0
