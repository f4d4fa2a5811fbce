"""Public functional API."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _validate
from .ops.contrastive import contrastive
from .reference.contrastive import contrastive_loss as _reference


def _contrastive(name_q, query, name_k, key, negatives, scale_name, scale_value, *, scale_is_temperature,
                 symmetric, normalize, reduction, backend):
    _validate.features(name_q, query)
    _validate.features(name_k, key)
    _validate.same_dtype_device(name_q, query, name_k, key)
    if key.shape != query.shape:
        raise ValueError(f"{name_k} must have the shape of {name_q} {tuple(query.shape)} "
                         f"(row i of {name_k} is the positive of row i of {name_q}), got {tuple(key.shape)}")
    if negatives is not None:
        _validate.features("negatives", negatives)
        _validate.same_dtype_device(name_q, query, "negatives", negatives)
        if negatives.shape[1] != query.shape[1]:
            raise ValueError(f"negatives must have D = {query.shape[1]} columns like {name_q}, "
                             f"got shape {tuple(negatives.shape)}")
    _validate.flag("symmetric", symmetric)
    _validate.flag("normalize", normalize)
    _validate.reduction(reduction)
    value = _validate.positive_scalar(scale_name, scale_value, query.device)
    scale = 1.0 / value if scale_is_temperature else value
    which = _backend.resolve(backend, query.device)
    if which == "triton" and query.dtype == torch.float64:
        raise TypeError(f"{name_q}: backend='triton' takes float32, float16 or bfloat16, got float64")
    if which == "torch":
        return _reference(query, key, negatives, scale, symmetric, normalize, reduction)
    return contrastive(query, key, negatives, scale, symmetric, normalize, reduction, which)


def info_nce(query: Tensor, key: Tensor, *, temperature: float | Tensor = 0.07,
             negatives: Tensor | None = None, symmetric: bool = False, normalize: bool = True,
             reduction: str = "mean", backend: str | None = None) -> Tensor:
    """InfoNCE loss, fused: the N x (N + M) similarity matrix is never in memory.

    Args:
        query: (N, D) float16, bfloat16, float32 or float64.
        key: (N, D), same dtype and device; key[i] is the positive of query[i] and the
            other keys are its in-batch negatives.
        temperature: float or 0-dim tensor > 0; logits are query . key / temperature.
            Its gradient is computed when it requires grad.
        negatives: optional (M, D) extra negatives for every query (e.g. a MoCo queue).
            They get a gradient only if they require grad.
        symmetric: also add the column-wise loss (key j against all queries) and
            average the two, as CLIP does.  Negatives take part only in the row loss.
        normalize: L2-normalise query, key and negatives inside the op (exact gradient).
        reduction: "mean", "sum" or "none" (per row, shape (N,); symmetric: per pair,
            the mean of row i's and column i's loss).
        backend: None (best available for the device), "cpu", "cuda", "triton" or
            "torch" (the reference); also settable with METASSL_FAST_BACKEND.

    Returns:
        A scalar, or (N,) for reduction="none", in the input dtype.  Accumulation
        is in float32 (float64 for float64 inputs); gradients come back in each
        input's dtype.
    """
    return _contrastive("query", query, "key", key, negatives, "temperature", temperature,
                        scale_is_temperature=True, symmetric=symmetric, normalize=normalize,
                        reduction=reduction, backend=backend)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: float | Tensor, *,
              backend: str | None = None) -> Tensor:
    """CLIP's symmetric contrastive loss with open_clip's semantics, fused.

    loss = (CE(s I T^T, arange(N)) + CE(s T I^T, arange(N))) / 2

    Args:
        image_features: (N, D), used as given (open_clip normalises before the loss).
        text_features: (N, D), same dtype and device.
        logit_scale: s, already exponentiated (open_clip passes logit_scale.exp()):
            a float or a 0-dim tensor > 0, which may require grad.
        backend: as in info_nce.

    Returns:
        A scalar in the input dtype.
    """
    return _contrastive("image_features", image_features, "text_features", text_features, None,
                        "logit_scale", logit_scale, scale_is_temperature=False, symmetric=True,
                        normalize=False, reduction="mean", backend=backend)
