"""Public functional API of the contrastive losses.  Each function: signature, docstring,
argument checks (_validate.py), the backend resolved once, one call of its op's entry
(ops/<op>/__init__.py), which routes the call (paired negatives, keys gathered across
ranks, backend="torch") and runs the kernel."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _validate
from .ops import contrastive as _contrastive
from .ops import labeled as _labeled
from .ops import siglip as _siglip


def info_nce(query: Tensor, key: Tensor, *, temperature: float | Tensor = 0.07,
             negatives: Tensor | None = None, symmetric: bool = False, normalize: bool = True,
             reduction: str = "mean", backend: str | None = None, gather_distributed: bool = False,
             process_group=None) -> Tensor:
    """InfoNCE loss, fused: the N x (N + M) similarity matrix is never in memory.

    Args:
        query: (N, D) float16, bfloat16, float32 or float64.
        key: (N, D), same dtype and device; key[i] is the positive of query[i] and the
            other keys are its in-batch negatives.
        temperature: float or 0-dim tensor > 0; logits are query . key / temperature.
            Its gradient is computed when it requires grad.
        negatives: optional (M, D) extra negatives for every query (e.g. a MoCo queue),
            or (N, M, D) paired negatives (query i's own M negatives, e.g. hard
            negatives).  They get a gradient only if they require grad.
        symmetric: also add the column-wise loss (key j against all queries) and
            average the two, as CLIP does.  Negatives take part only in the row loss.
        normalize: L2-normalise query, key and negatives inside the op (exact gradient).
        reduction: "mean", "sum" or "none" (per row, shape (N,); symmetric: per pair,
            the mean of row i's and column i's loss).
        backend: None (best available for the device), "cpu", "cuda", "triton" or
            "torch" (the reference); also settable with METASSL_FAST_BACKEND.
        gather_distributed: with torch.distributed initialised, all-gather the keys (and
            for symmetric, the queries) with gradient and compute this rank's rows against
            every rank's columns; the negatives stay local.  See metassl_fast.distributed
            for the gradient scaling.  process_group: the group to gather over (default:
            the world).

    Returns:
        A scalar, or (N,) for reduction="none", in the input dtype.  Accumulation
        is in float32 (float64 for float64 inputs); gradients come back in each
        input's dtype.
    """
    query, key, negatives = _validate.pair("query", query, "key", key,
                                           "row i of key is the positive of row i of query", negatives)
    if negatives is not None:
        _validate.negatives(negatives, "query", query)
    _validate.flag("symmetric", symmetric)
    _validate.flag("normalize", normalize)
    _validate.reduction(reduction)
    scale = _validate.inverse_temperature("temperature", temperature, query.device)
    world = _validate.world(gather_distributed, process_group)
    what = ("gather_distributed" if world[1] > 1 else
            "info_nce with paired negatives" if negatives is not None and negatives.dim() == 3 else "query")
    which = _validate.backend(backend, query.device, query.dtype, what)
    return _contrastive.loss(query, key, negatives, scale, symmetric=symmetric, normalize=normalize,
                             reduction=reduction, backend=which, world=world)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: float | Tensor, *,
              backend: str | None = None, gather_distributed: bool = False, process_group=None) -> Tensor:
    """CLIP's symmetric contrastive loss with open_clip's semantics, fused.

    loss = (CE(s I T^T, arange(N)) + CE(s T I^T, arange(N))) / 2

    Args:
        image_features: (N, D), used as given (open_clip normalises before the loss).
        text_features: (N, D), same dtype and device.
        logit_scale: s, already exponentiated (open_clip passes logit_scale.exp()):
            a float or a 0-dim tensor > 0, which may require grad.
        backend: as in info_nce.
        gather_distributed, process_group: as in info_nce (open_clip's local_loss=True,
            gather_with_grad=True).

    Returns:
        A scalar in the input dtype.
    """
    img, txt = _validate.pair("image_features", image_features, "text_features", text_features,
                              "row i of text_features is the positive of row i of image_features")
    scale = _validate.positive_scalar("logit_scale", logit_scale, img.device)
    world = _validate.world(gather_distributed, process_group)
    which = _validate.backend(backend, img.device, img.dtype, "image_features")
    return _contrastive.loss(img, txt, None, scale, symmetric=True, normalize=False, reduction="mean",
                             backend=which, world=world, key_name="text_features", query_name="image_features")


def labeled_contrastive(query: Tensor, labels: Tensor, key: Tensor | None = None,
                        key_labels: Tensor | None = None, *, temperature: float | Tensor = 0.1,
                        normalize: bool = True, reduction: str = "mean", pairwise: bool = False,
                        backend: str | None = None, gather_distributed: bool = False, process_group=None,
                        self_offset: int = -1, names=("query", "labels", "key", "key_labels")) -> Tensor:
    """The labelled-row loss behind nt_xent and supcon_loss (math: reference/labeled.py).

    query (N, D) with labels (N,); key (M, D) with key_labels (M,), or None: the keys
    are the queries and each anchor's own column is left out.  pairwise=True is
    pytorch-metric-learning's NT-Xent (one softplus term per positive pair, whose
    denominator is that positive plus the anchor's negatives); False the SupCon form
    (the mean over positives against all other columns).  Anchors without positives
    add 0 and are left out of the mean.  gather_distributed (key=None only): the anchors
    of every rank are the columns; each rank's loss covers its own anchors.  self_offset
    >= 0 (with a key): anchor i is key row self_offset + i and is left out of every set
    (pytorch-metric-learning's rule when ref_labels is labels).  names: the argument
    names the errors use (the callers' own)."""
    nq, nl, nk, nkl = names
    _validate.features(nq, query)
    y = _validate.labels(nl, labels, query.shape[0], query.device, f"row of {nq}")
    yk = None
    if key is not None:
        _validate.features(nk, key)
        query, key = _validate.autocast_common(query, key)
        _validate.key_like(nk, key, nq, query)
        if key_labels is None:
            raise ValueError(f"{nkl} is required with {nk}")
        yk = _validate.labels(nkl, key_labels, key.shape[0], key.device, f"row of {nk}")
    elif key_labels is not None:
        raise ValueError(f"{nkl} was given without {nk}")
    _validate.flag("normalize", normalize)
    _validate.flag("pairwise", pairwise)
    _validate.reduction(reduction)
    scale = _validate.inverse_temperature("temperature", temperature, query.device)
    which = _validate.backend(backend, query.device, query.dtype, "this loss")
    rank, ws, group = _validate.world(gather_distributed, process_group)
    if ws > 1:
        if key is not None:
            raise ValueError("gather_distributed gathers the anchors themselves: pass key=None")
        return _labeled.gathered(query, y, scale, normalize, reduction, pairwise, which, (rank, ws, group), nq, nl)
    offset = _validate.self_offset(self_offset, query.shape[0], nk, key)
    return _labeled.loss(query, key, y, yk, scale, normalize, reduction, pairwise, which,
                         self_offset=offset if key is not None else -1)


def nt_xent(z1: Tensor, z2: Tensor, *, temperature: float | Tensor = 0.5, normalize: bool = True,
            reduction: str = "mean", backend: str | None = None, gather_distributed: bool = False,
            process_group=None) -> Tensor:
    """SimCLR's NT-Xent loss (lightly's NTXentLoss semantics), fused.

    Z = [z1; z2] (2N, D), S = Z Z^T / temperature; row i's positive is its other view
    (i + N or i - N) and its own column is left out of the softmax:
        loss_i = LSE_{j != i} S_ij - S_{i, i +- N},   mean over the 2N rows.

    Args:
        z1, z2: (N, D) the two views' embeddings, same dtype and device (float16,
            bfloat16, float32 or float64).
        temperature: float or 0-dim tensor > 0 (may require grad).
        normalize: L2-normalise the embeddings inside the op (SimCLR and lightly do).
        reduction: "mean", "sum" or "none" ((2N,), the z1 rows then the z2 rows).
        backend: as in info_nce.
        gather_distributed: all-gather both views of every rank (with gradient); this
            rank's 2N rows are scored against all 2 W N views (lightly's
            gather_distributed).  process_group: the group (default: the world).

    Returns:
        A scalar, or (2N,), in the input dtype.
    """
    z1, z2 = _validate.pair("z1", z1, "z2", z2, "row i of each is a view of sample i")
    n = z1.shape[0]
    rank, _, _ = _validate.world(gather_distributed, process_group)
    labels = (rank * n + torch.arange(n, device=z1.device)).repeat(2)  # sample ids, unique across ranks
    return labeled_contrastive(torch.cat([z1, z2]), labels, temperature=temperature, normalize=normalize,
                               reduction=reduction, backend=backend, gather_distributed=gather_distributed,
                               process_group=process_group, names=("z1/z2", "labels", "key", "key_labels"))


def supcon_loss(features: Tensor, labels: Tensor, *, temperature: float | Tensor = 0.1,
                normalize: bool = True, reduction: str = "mean", backend: str | None = None,
                gather_distributed: bool = False, process_group=None) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, "L_out"), fused.

    Every view of every sample is an anchor; its positives are the other views with
    its label, and its softmax runs over every other view:
        loss_i = LSE_{j != i} S_ij - mean_{p in P(i)} S_ip,   S = Z Z^T / temperature.
    Anchors without positives add 0 and are left out of the mean (as in
    pytorch-metric-learning's SupConLoss; no base_temperature factor).

    Args:
        features: (N, D), or (N, V, D) with V views per sample.
        labels: (N,) integer class labels (any integer dtype).
        temperature: float or 0-dim tensor > 0.
        normalize: L2-normalise the features inside the op.
        reduction: "mean", "sum" or "none" ((N,) or (N, V); 0 for anchors without
            positives).
        backend: as in info_nce.
        gather_distributed: all-gather features and labels of every rank; this rank's
            anchors are scored against all of them (the mean is over this rank's anchors
            with positives).  process_group: the group (default: the world).
    """
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() not in (2, 3):
        raise ValueError(f"features must have shape (N, D) or (N, V, D), got {tuple(features.shape)}")
    if 0 in features.shape:
        raise ValueError(f"features has an empty dimension: shape {tuple(features.shape)}")
    shape = features.shape[:-1]
    flat = features.reshape(-1, features.shape[-1])
    _validate.features("features", flat)
    y = _validate.labels("labels", labels, features.shape[0], features.device, "sample of features")
    if features.dim() == 3:
        y = y.repeat_interleave(features.shape[1])
    loss = labeled_contrastive(flat, y, temperature=temperature, normalize=normalize, reduction=reduction,
                               backend=backend, gather_distributed=gather_distributed, process_group=process_group,
                               names=("features", "labels", "key", "key_labels"))
    return loss.reshape(shape) if reduction == "none" else loss


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale: float | Tensor,
                logit_bias: float | Tensor, *, backend: str | None = None, gather_distributed: bool = False,
                process_group=None) -> Tensor:
    """SigLIP's pairwise sigmoid loss with open_clip's SigLipLoss semantics, fused:

        loss = -(1/N) sum_ij log sigmoid(z_ij (logit_scale I_i . T_j + logit_bias)),
        z_ij = 1 if i == j else -1.

    Args:
        image_features, text_features: (N, D), used as given (open_clip normalises).
        logit_scale: already exponentiated, a float or 0-dim tensor > 0.
        logit_bias: a float or 0-dim tensor.  Both may require grad.
        backend: as in info_nce.
        gather_distributed: all-gather the text features (with gradient); this rank's N
            images are scored against all W N texts and the sum is divided by the local N
            (open_clip's SigLipLoss with world_size > 1, any dist_impl).
            process_group: the group (default: the world).

    Returns:
        A scalar in the input dtype.  The N x N logits are never in memory.
    """
    img, txt = _validate.pair("image_features", image_features, "text_features", text_features,
                              "text j is the caption of image j")
    scale = _validate.positive_scalar("logit_scale", logit_scale, img.device)
    bias = _validate.scalar("logit_bias", logit_bias, img.device)
    which = _validate.backend(backend, img.device, img.dtype, "siglip_loss")
    world = _validate.world(gather_distributed, process_group)
    return _siglip.loss(img, txt, scale, bias, backend=which, world=world)


def info_nce_explicit(query: Tensor, positive_key: Tensor, negatives: Tensor, *,
                      temperature: float | Tensor = 0.1, normalize: bool = True, reduction: str = "mean",
                      backend: str | None = None) -> Tensor:
    """InfoNCE against explicit negatives only (info-nce-pytorch's unpaired form, lightly's
    memory-bank form), fused: row i's logits are [q_i . p_i, q_i . negatives^T] / temperature
    with the positive first; the other rows' keys are NOT negatives.

    Args:
        query: (N, D).  positive_key: (N, D).  negatives: (M, D), shared by every query;
            same dtype and device.  Each gets a gradient if it requires grad.
        temperature: float or 0-dim tensor > 0.
        normalize: L2-normalise all three inside the op.
        reduction: "mean", "sum" or "none" ((N,)).

    The (N, M) logits are streamed in row blocks like info_nce's; the positive logit is
    an O(N D) row-wise dot product.
    """
    _validate.features("query", query)
    _validate.features("positive_key", positive_key)
    _validate.features("negatives", negatives)
    query, positive_key, negatives = _validate.autocast_common(query, positive_key, negatives)
    _validate.same_dtype_device("query", query, "positive_key", positive_key)
    _validate.same_dtype_device("query", query, "negatives", negatives)
    if positive_key.shape != query.shape:
        raise ValueError(f"positive_key must have the shape of query {tuple(query.shape)}, "
                         f"got {tuple(positive_key.shape)}")
    _validate.key_like("negatives", negatives, "query", query)
    _validate.flag("normalize", normalize)
    _validate.reduction(reduction)
    scale = _validate.inverse_temperature("temperature", temperature, query.device)
    which = _validate.backend(backend, query.device, query.dtype, "info_nce_explicit")
    return _labeled.explicit(query, positive_key, negatives, scale, normalize, reduction, which)
