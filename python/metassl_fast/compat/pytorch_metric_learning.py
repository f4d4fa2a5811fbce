"""Drop-ins for pytorch-metric-learning's NTXentLoss, SupConLoss and SelfSupervisedLoss
(``from pytorch_metric_learning.losses import ...``).

Semantics of pytorch-metric-learning 2.9.0 with its defaults (CosineSimilarity, i.e.
L2-normalised dot products; the default reducer; no miner):
- forward(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None);
  without ref_emb the candidates are the embeddings themselves and each anchor's own
  column is left out (also when ref_labels is labels or None, as there).
- NTXentLoss: one term per positive pair, softplus(LSE over the anchor's negatives -
  S_ap) (its denominator is that positive plus the negatives only), mean over all
  positive pairs.  SupConLoss: per anchor, the mean log-probability of its positives
  against all its positives and negatives; mean over the anchors whose loss is not 0
  (AvgNonZeroReducer).  Either returns 0 (with a gradient of 0) when the batch has no
  positive pair or no negative pair.
- Fused: neither builds the pair masks (positives x negatives) that make the originals
  quadratic or worse in memory.

Arguments with no fused path (a distance, reducer, miner, regularizer or other keyword
of the original constructor, a temperature that is not a finite value > 0, or an
indices_tuple in forward) are run by the original pytorch-metric-learning class with the
same arguments, so the number is the original's; a warning says so once per class.  The
original is taken from its defining module (pytorch_metric_learning.losses.ntxent_loss,
...), so a drop-in assigned over ``pytorch_metric_learning.losses.NTXentLoss`` still
finds it.  Without pytorch-metric-learning installed such
arguments raise a TypeError rather than give a different number.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .. import _validate
from .. import functional as _f
from ..ops.labeled import positives_per_row

__all__ = ["NTXentLoss", "SupConLoss", "SelfSupervisedLoss"]

_warned: set[str] = set()


def _original_class(name: str) -> type:
    """The original pytorch-metric-learning class, from the module that defines it: never
    through ``pytorch_metric_learning.losses``, where a user may have put this module's
    class in its place (swapping a drop-in into a trainer they do not own); looking it up
    there made the fallback call itself (RecursionError)."""
    import importlib

    module = {"NTXentLoss": "ntxent_loss", "SupConLoss": "supcon_loss",
              "SelfSupervisedLoss": "self_supervised_loss"}[name]
    cls = getattr(importlib.import_module(f"pytorch_metric_learning.losses.{module}"), name)
    if cls.__module__.startswith(__name__.rsplit(".", 1)[0]):
        raise TypeError(f"pytorch_metric_learning.losses.{module}.{name} is metassl_fast's drop-in itself: "
                        "the original class is needed for arguments without a fused path")
    return cls


class _PMLLoss(nn.Module):
    _pairwise: bool
    _name: str

    def __init__(self, temperature: float, backend: str | None = None, **kwargs):
        super().__init__()
        self.temperature = temperature
        self.backend = backend
        self.kwargs = kwargs
        self._original = None
        if kwargs:
            self._original = self._original_loss(f"constructor arguments {sorted(kwargs)}")
        elif not _validate.takes_temperature(temperature):
            self._original = self._original_loss(f"temperature={temperature!r} (not a finite value > 0)")

    def _original_loss(self, why: str) -> nn.Module:
        try:
            cls = _original_class(self._name)
        except ImportError as exc:
            raise TypeError(f"metassl_fast.compat.pytorch_metric_learning.{self._name}: {why} have no fused path, "
                            "and pytorch-metric-learning (which would compute them exactly) is not installed") from exc
        if self._name not in _warned:
            _warned.add(self._name)
            warnings.warn(f"metassl_fast.compat.pytorch_metric_learning.{self._name}: {why} have no fused path; "
                          "running pytorch-metric-learning's own implementation for them (same numbers, "
                          "its memory and speed)", stacklevel=3)
        return cls(temperature=self.temperature, **self.kwargs)

    def forward(self, embeddings: Tensor, labels: Tensor | None = None, indices_tuple=None,
                ref_emb: Tensor | None = None, ref_labels: Tensor | None = None) -> Tensor:
        if self._original is None and indices_tuple is not None:
            self._original = self._original_loss("indices_tuple (a miner's output)")
        if self._original is not None:
            return self._original(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        _validate.features("embeddings", embeddings)
        if labels is None:
            raise ValueError(f"{self._name}: labels is required (or an indices_tuple)")
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor of integer class labels, got {type(labels).__name__}")
        labels = labels.to(embeddings.device)
        # as in pytorch-metric-learning: the anchor's own column is excluded exactly when
        # the reference labels are the labels object itself (or absent)
        same_set = ref_emb is None
        exclude_self = ref_emb is None or ref_labels is None or ref_labels is labels
        if ref_emb is None:
            key, key_labels = None, None
        else:
            key = ref_emb
            key_labels = labels if ref_labels is None else ref_labels.to(embeddings.device)
        y = _validate.labels("labels", labels, embeddings.shape[0], embeddings.device, "row of embeddings")
        yk = y if key is None else _validate.labels("ref_labels", key_labels, key.shape[0], key.device,
                                                          "row of ref_emb")
        if _no_pairs(y, yk, exclude_self):
            return (embeddings * 0).sum()
        if same_set or not exclude_self:
            loss = self._fused(embeddings, y, key, yk, self_offset=-1)
        else:  # a separate ref_emb whose row i is anchor i itself (pytorch-metric-learning's rule)
            if key.shape[0] < embeddings.shape[0]:
                raise ValueError(f"ref_emb has {key.shape[0]} rows but embeddings has {embeddings.shape[0]}: "
                                 "without ref_labels (or with ref_labels=labels) pytorch-metric-learning treats "
                                 "row i of ref_emb as anchor i itself; pass ref_labels for a separate set")
            loss = self._fused(embeddings, y, key, yk, self_offset=0)
        return loss

    def _fused(self, q, y, key, yk, self_offset):
        raise NotImplementedError


def _no_pairs(y: Tensor, yk: Tensor, exclude_self: bool) -> bool:
    """No positive pair or no negative pair anywhere (pytorch-metric-learning returns 0)."""
    has_neg = bool((yk.min() != y.max()) | (yk.max() != y.min())) if y.numel() and yk.numel() else False
    if not has_neg:  # every label equal to every other
        return True
    npos = positives_per_row(y, yk, 0 if exclude_self else None)
    return int(npos.sum()) == 0


class NTXentLoss(_PMLLoss):
    """pytorch_metric_learning.losses.NTXentLoss(temperature=0.07, **kwargs).

    One difference, at extremes only: pml computes each pair's loss as
    -log(num / den + finfo.tiny), which caps it at about 87.3 in float32 (9.7 in float16,
    where pml computes in half precision) and gives such pairs almost no gradient; this
    op computes the exact value, in float32 for half-precision inputs.  In float32 the
    two agree unless a pair's loss exceeds ~87 (temperatures far below 0.07 with hard
    pairs); half-precision inputs warn once, since pml's own numbers differ there."""
    _name = "NTXentLoss"

    def __init__(self, temperature: float = 0.07, **kwargs):
        super().__init__(temperature, **kwargs)

    def _fused(self, q, y, key, yk, self_offset):
        if q.dtype in (torch.float16, torch.bfloat16) and "NTXentLoss-half" not in _warned:
            _warned.add("NTXentLoss-half")
            warnings.warn("metassl_fast.compat.pytorch_metric_learning.NTXentLoss: half-precision inputs are "
                          "computed in float32 here; pytorch-metric-learning computes them in half precision "
                          "and caps each pair's loss at -log(finfo.tiny) (9.7 in float16), so the numbers "
                          "differ", stacklevel=4)
        if key is None:
            return _f.labeled_contrastive(q, y, temperature=self.temperature, pairwise=True, backend=self.backend)
        return _pairwise_with_key(q, y, key, yk, self.temperature, self_offset, self.backend)


class SupConLoss(_PMLLoss):
    """pytorch_metric_learning.losses.SupConLoss(temperature=0.1, **kwargs).

    pml averages over the anchors whose loss is > 0 as computed.  An anchor whose true
    loss is within a float32 rounding of 0 (~1e-7: one tight positive, negatives far
    away, low temperature) can come out as exactly 0 in one implementation and 1.2e-7
    in the other, and then the two average over different anchors; elsewhere they
    agree to float32 precision."""
    _name = "SupConLoss"

    def __init__(self, temperature: float = 0.1, **kwargs):
        super().__init__(temperature, **kwargs)

    def _fused(self, q, y, key, yk, self_offset):
        # AvgNonZeroReducer: the mean over the anchors whose loss is > 0 as computed, so an
        # anchor whose loss rounds to 0 (a well separated class) leaves the mean, as in pml.
        # Per-anchor losses cost a recomputing backward; still far below pml's pair masks.
        losses = _labeled(q, y, key, yk, self.temperature, self_offset, "none", False, self.backend)
        keep = losses > 0
        if not bool(keep.any()):
            return (q * 0).sum()
        return losses[keep].mean()


def _pairwise_with_key(q, y, key, yk, temperature, self_offset, backend):
    return _labeled(q, y, key, yk, temperature, self_offset, "mean", True, backend)


def _labeled(q, y, key, yk, temperature, self_offset, reduction, pairwise, backend):
    return _f.labeled_contrastive(q, y, key, None if key is None else yk, temperature=temperature,
                                  reduction=reduction, pairwise=pairwise, backend=backend, self_offset=self_offset,
                                  names=("embeddings", "labels", "ref_emb", "ref_labels"))


class SelfSupervisedLoss(nn.Module):
    """pytorch_metric_learning.losses.SelfSupervisedLoss(loss, symmetric=True);
    forward(embeddings, ref_emb).  Fused for this module's NTXentLoss and SupConLoss; any
    other loss (one of pytorch-metric-learning's own) or extra keyword goes to the
    original class, which computes it as it would."""

    def __init__(self, loss: nn.Module, symmetric: bool = True, **kwargs):
        super().__init__()
        self.loss = loss
        self.symmetric = symmetric
        self._original = None
        if not isinstance(loss, _PMLLoss) or kwargs:
            try:
                cls = _original_class("SelfSupervisedLoss")
            except ImportError as exc:
                raise TypeError("SelfSupervisedLoss here wraps metassl_fast.compat.pytorch_metric_learning's "
                                f"NTXentLoss or SupConLoss without extra arguments, got {type(loss).__name__} "
                                f"and {sorted(kwargs)}; pytorch-metric-learning (which would run the others) is not "
                                "installed") from exc
            self._original = cls(loss, symmetric=symmetric, **kwargs)

    @staticmethod
    def supported_losses() -> list[str]:
        """The original's list (its own API, which code written for it calls)."""
        try:
            return _original_class("SelfSupervisedLoss").supported_losses()
        except ImportError:
            return ["NTXentLoss", "SupConLoss"]

    @classmethod
    def check_loss_support(cls, loss_name: str) -> None:
        if loss_name not in cls.supported_losses():
            raise Exception(f"SelfSupervisedLoss not supported for {loss_name}")  # the original's type and text

    def forward(self, embeddings: Tensor, ref_emb: Tensor) -> Tensor:
        if self._original is not None:
            return self._original(embeddings, ref_emb)
        labels = torch.arange(embeddings.shape[0], device=embeddings.device)
        if self.symmetric:
            return self.loss(torch.cat([embeddings, ref_emb], dim=0), torch.cat([labels, labels], dim=0))
        return self.loss(embeddings, labels, ref_emb=ref_emb, ref_labels=labels.clone())
