# Issue 11 probe for a lent GPU (bench/gpu_check.sh runs it): the CUDA C++ backward with its
# accumulators for all of D in shared memory (S computed once per 64 outer rows; narrower spans,
# more pieces, where the grid has fewer row blocks than SMs) against one
# output chunk per block in registers (METASSL_FAST_CUDA_GRAD_SPAN = the chunk: S computed
# ceil(D / chunk) times, the layout before 2026-12-08), clip_loss forward+backward, interleaved
# rounds, median ms.  Unrun: no GPU had been lent when it was written.
#   python bench/probes/cuda_grad_span.py
import os
import statistics
import sys

import torch
import torch.nn.functional as F

import metassl_fast as msf

if not torch.cuda.is_available():
    sys.exit("cuda_grad_span.py needs a GPU")
CHUNK = {torch.bfloat16: "128", torch.float32: "64"}  # csrc/cuda/_tiles.cuh Traits<T>::kOutChunk
# N = 4096: 64 row blocks, fewer than an H100's 132 SMs, so grad_span narrows the span (min pieces)
CASES = [(16384, 256, torch.bfloat16), (16384, 512, torch.bfloat16), (16384, 1024, torch.bfloat16),
         (4096, 512, torch.bfloat16), (8192, 512, torch.float32)]


def step(q, k, s):
    q.grad = k.grad = s.grad = None
    msf.clip_loss(q, k, s, backend="cuda").backward()


def timed(q, k, s, span, reps=5):
    if span is None:
        os.environ.pop("METASSL_FAST_CUDA_GRAD_SPAN", None)
    else:
        os.environ["METASSL_FAST_CUDA_GRAD_SPAN"] = span
    step(q, k, s)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        step(q, k, s)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


print(f"{torch.cuda.get_device_name()}; clip_loss fwd+bwd, backend cuda, ms (median of 7 interleaved rounds)")
for n, d, dt in CASES:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = F.normalize(torch.randn(n, d, device="cuda", generator=g), dim=1).to(dt).requires_grad_()
    k = F.normalize(torch.randn(n, d, device="cuda", generator=g), dim=1).to(dt).requires_grad_()
    s = torch.tensor(14.3, device="cuda").requires_grad_()
    try:
        # the two layouts agree (same products, summed in another order)
        step(q, k, s)
        whole = q.grad.float().clone()
        os.environ["METASSL_FAST_CUDA_GRAD_SPAN"] = CHUNK[dt]
        step(q, k, s)
        diff = (q.grad.float() - whole).abs().max().item()
        runs = {"whole D": [], "one chunk": []}
        for _ in range(7):
            runs["whole D"].append(timed(q, k, s, None))
            runs["one chunk"].append(timed(q, k, s, CHUNK[dt]))
        med = {name: statistics.median(v) for name, v in runs.items()}
        print(f"N={n} D={d} {str(dt)[6:]}: whole D {med['whole D']:.2f} ms, one chunk {med['one chunk']:.2f} ms "
              f"(ratio {med['whole D'] / med['one chunk']:.3f}); max |dq difference| {diff:.2e}", flush=True)
    except Exception as exc:  # a failing layout is the finding; go on with the next case
        print(f"N={n} D={d} {str(dt)[6:]}: {type(exc).__name__}: {exc}", flush=True)
    finally:
        os.environ.pop("METASSL_FAST_CUDA_GRAD_SPAN", None)
    del q, k, s
    torch.cuda.empty_cache()
