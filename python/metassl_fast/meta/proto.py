"""Prototypical networks: the same head as ANIL with W = the class means of each task's
support set, computed as torch ops (the work is O(T (S + Q) C D), far below the
contrastive losses' N^2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _validate
from ..ops.inner_loop import reduce_tasks


def proto_loss(support: Tensor, support_labels: Tensor, query: Tensor, query_labels: Tensor, *,
               n_way: int | None = None, scale: float | Tensor = 1.0, normalize_by_dim: bool = False,
               reduction: str = "mean") -> Tensor:
    """Prototypical-network loss with squared Euclidean distance: prototypes are the
    class means of each task's support set (T, S, D), logits_qc = -scale |x_q - c_c|^2
    (/ D with normalize_by_dim) for the queries (T, Q, D) (computed as
    2 x.c - |c|^2 - |x|^2, no (Q, C, D) tensor).  n_way defaults to max label + 1.
    Every class must have a support example in every task.

    scale: a float or a 0-dim (or one-element) tensor, finite and > 0, that may require
    grad: MetaOptNet's learnable logit scale (its ``nn.Parameter(torch.FloatTensor([1.0]))``
    goes in as it is).  normalize_by_dim=True divides the squared distances by D, as
    MetaOptNet's ProtoNet head does (its ``normalize=True``); the defaults (1.0, False)
    give the plain Snell et al. loss.
    Returns a scalar ("mean") or (T,) ("none")."""
    _validate.task_reduction(reduction)
    _validate.tasks("support", support)
    _validate.flag("normalize_by_dim", normalize_by_dim)
    scale = _validate.positive_scalar("scale", scale, support.device)
    T, S, D = support.shape
    if n_way is None:  # the labels first: a negative label is their error, not n_way's
        n_way = int(_validate.int_labels("support_labels", support_labels, (T, S), None, support.device).max()) + 1
    if isinstance(n_way, bool) or not isinstance(n_way, int) or n_way < 1:
        raise ValueError(f"n_way must be a positive int, got {n_way!r}")
    labels = _validate.int_labels("support_labels", support_labels, (T, S), n_way, support.device)
    q_labels = _validate.query_set(support, query, query_labels, n_way)
    acc = torch.float64 if support.dtype == torch.float64 else torch.float32
    onehot = F.one_hot(labels, n_way).to(acc)  # (T, S, C)
    counts = onehot.sum(1)  # (T, C)
    if not torch.compiler.is_compiling() and bool((counts == 0).any()):
        t, c = (counts == 0).nonzero()[0].tolist()
        raise ValueError(f"support_labels: class {c} has no support example in task {t}")
    protos = onehot.transpose(1, 2) @ support.to(acc) / counts.unsqueeze(-1)  # (T, C, D)
    q = query.to(acc)
    logits = 2 * q @ protos.transpose(1, 2) - (protos * protos).sum(-1).unsqueeze(1) \
        - (q * q).sum(-1, keepdim=True)
    # scale (float64 for a Python float) is 0-dim: it does not promote the float32 logits
    logits = logits * (scale / D if normalize_by_dim else scale)
    ce = F.cross_entropy(logits.reshape(-1, n_way), q_labels.reshape(-1), reduction="none")
    return reduce_tasks(ce, T, reduction).to(query.dtype)
