"""Multi-process (torch.distributed) support of the contrastive losses.

The scheme of every op with gather_distributed=True: the keys (and, for symmetric
losses, the queries) of all ranks are all-gathered with gradient; each rank computes
the loss of its LOCAL rows against ALL columns and returns its local mean.  So:

- the mean of the per-rank losses is the single-process loss on the concatenated batch
  (exactly, when every rank has the same batch size and, for SupCon, the same number
  of anchors with positives);
- the gradient that reaches rank r's features is W times the single-process gradient
  (each rank's loss is a mean over its own rows, and the gather's backward sums the
  key gradients of all ranks), so DistributedDataParallel, which averages parameter
  gradients over the W ranks, gives the parameters exactly the gradient of the
  single-process loss.  This is how lightly and open_clip scale it too.

Memory per rank is O(W N D) for the gathered features, never O(N x W N).
On GPUs use the NCCL backend (torch.distributed.init_process_group("nccl")); the CPU
tests use gloo.  Every rank must pass the same batch size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world(process_group=None) -> tuple[int, int]:
    """(rank, world size) in process_group, or (0, 1) when torch.distributed is not
    initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gradient of every rank's copy and
    hands each rank the rows it contributed."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ws = dist.get_world_size(group)
        ctx.rank, ctx.n = dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ws)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def _check_same_rows(x: Tensor, name: str, group) -> None:
    ws = dist.get_world_size(group)
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.empty_like(n) for _ in range(ws)]
    dist.all_gather(sizes, n, group=group)
    got = [int(s) for s in sizes]
    if len(set(got)) != 1:
        raise ValueError(f"{name}: every rank must pass the same batch size for gather_distributed, "
                         f"got {got} rows across ranks")


def gather(x: Tensor, name: str, group=None, with_grad: bool = True) -> Tensor:
    """Rows of every rank concatenated in rank order: (W N, ...).  with_grad: the
    gradient of every rank's copy flows back to its owner (summed)."""
    _check_same_rows(x, name, group)
    if with_grad and torch.is_grad_enabled() and x.requires_grad:
        return _GatherWithGrad.apply(x, group)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    return torch.cat(parts)
