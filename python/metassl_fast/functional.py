"""Public functional API."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _validate
from . import distributed as _dist
from .ops import family as _family_ops
from .ops.contrastive import contrastive
from .reference import family as _reference_family
from .reference.contrastive import contrastive_loss as _reference


def _autocast_common(*xs):
    """Under torch.autocast, features from layers of different precision (a bf16 linear
    and an fp32 queue, say) meet here: compute in float32, as autocast does for losses.
    Outside autocast mixed dtypes stay an error (same_dtype_device)."""
    ts = [x for x in xs if isinstance(x, Tensor)]
    if len(ts) < 2 or len({t.dtype for t in ts}) == 1:
        return xs
    dev = ts[0].device.type
    if not (torch.is_autocast_enabled(dev) if dev in ("cpu", "cuda") else False):
        return xs
    if any(t.dtype not in _validate.FLOAT_DTYPES for t in ts):
        return xs
    return tuple(x.float() if isinstance(x, Tensor) else x for x in xs)


def _pair(name_a, a, name_b, b, what):
    """Two (N, D) feature tensors of one dtype, device and shape (`what` says why)."""
    _validate.features(name_a, a)
    _validate.features(name_b, b)
    a, b = _autocast_common(a, b)
    _validate.same_dtype_device(name_a, a, name_b, b)
    if b.shape != a.shape:
        raise ValueError(f"{name_b} must have the shape of {name_a} {tuple(a.shape)} ({what}), got {tuple(b.shape)}")
    return a, b


def _world(gather_distributed, process_group) -> tuple[int, int]:
    """(rank, world size) when the op gathers across ranks, else (0, 1)."""
    _validate.flag("gather_distributed", gather_distributed)
    if not gather_distributed:
        if process_group is not None:
            raise ValueError("process_group was given but gather_distributed=False")
        return 0, 1
    return _dist.world(process_group)


def _labeled_any(which, query, key, y, yk, scale, normalize, reduction, pairwise, self_offset=-1):
    if which == "torch":
        return _reference_family.labeled_contrastive_loss(query, key, y, yk, scale, normalize, reduction, pairwise,
                                                          self_offset)
    return _family_ops.labeled(query, key, y, yk, scale, normalize, reduction, pairwise, which,
                               self_offset=self_offset)


def _paired_lse(query, negatives, scale, normalize):
    """LSE_m s q_i . negatives[i, m] per row, differentiable: the (N, M) logits are
    smaller than the (N, M, D) negatives themselves."""
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    with torch.autocast(query.device.type, enabled=False):  # accumulate in acc, as the fused row does
        q, n = query.to(acc), negatives.to(acc)
        if normalize:
            q, n = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(n, dim=-1)
        return torch.logsumexp(scale.to(acc) * torch.bmm(n, q.unsqueeze(2)).squeeze(2), 1)


def _rows_against(which, query, key, keys, queries, ids, all_ids, negatives, scale, symmetric, normalize,
                  reduction):
    """InfoNCE of these rows (labels ids) against `keys` (labels all_ids: every rank's keys,
    or just `key`), plus the negatives: an (M, D) queue as more key rows that are no row's
    positive, or (N, M, D) paired negatives as one extra logit per row, the LSE of its
    paired logits, which is exact: LSE(S_i, P_i) = LSE(S_i, LSE(P_i)).  Symmetric: also
    `key`'s rows against `queries`, and the mean of the two."""
    y_keys, ext = all_ids, None
    if negatives is not None and negatives.dim() == 3:
        ext = _paired_lse(query, negatives, scale, normalize)
    elif negatives is not None:
        keys = torch.cat([keys, negatives])
        y_keys = torch.cat([all_ids, torch.full((negatives.shape[0],), -1, dtype=torch.long, device=ids.device)])
    if ext is None:
        row = _labeled_any(which, query, keys, ids, y_keys, scale, normalize, reduction, False)
    elif which == "torch":
        raise ValueError("gather_distributed with paired negatives runs on the cpu or triton backend")
    else:
        row = _family_ops.labeled(query, keys, ids, y_keys, scale, normalize, reduction, False, which,
                                  pos_logit=ext, ext_positive=False)
    if not symmetric:
        return row
    col = _labeled_any(which, key, queries, ids, all_ids, scale, normalize, reduction, False)
    return 0.5 * (row + col)


def _contrastive_gathered(name_q, query, name_k, key, negatives, scale, symmetric, normalize, reduction, backend,
                          rank, ws, group):
    """Local rows against the columns of every rank (see metassl_fast.distributed)."""
    which = _family_backend(backend, query.device, "gather_distributed", query.dtype)
    n, dev = query.shape[0], query.device
    ids = rank * n + torch.arange(n, device=dev)
    keys = _dist.gather(key, name_k, group)
    queries = _dist.gather(query, name_q, group) if symmetric else None
    return _rows_against(which, query, key, keys, queries, ids, torch.arange(ws * n, device=dev), negatives, scale,
                         symmetric, normalize, reduction)


def _contrastive(name_q, query, name_k, key, negatives, scale_name, scale_value, *, scale_is_temperature,
                 symmetric, normalize, reduction, backend, gather_distributed=False, process_group=None):
    query, key = _pair(name_q, query, name_k, key, f"row i of {name_k} is the positive of row i of {name_q}")
    query, key, negatives = _autocast_common(query, key, negatives)
    paired = isinstance(negatives, Tensor) and negatives.dim() == 3
    if paired:
        _validate.features("negatives", negatives, rank=3)
        _validate.same_dtype_device(name_q, query, "negatives", negatives)
        if negatives.shape[0] != query.shape[0] or negatives.shape[2] != query.shape[1] or negatives.shape[1] == 0:
            raise ValueError(f"paired negatives must have shape (N, M, D) = ({query.shape[0]}, M >= 1, "
                             f"{query.shape[1]}), got {tuple(negatives.shape)}")
    elif negatives is not None:
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
    rank, ws = _world(gather_distributed, process_group)
    if ws > 1:
        return _contrastive_gathered(name_q, query, name_k, key, negatives, scale, symmetric, normalize, reduction,
                                     backend, rank, ws, process_group)
    if paired:
        which = _family_backend(backend, query.device, "info_nce with paired negatives", query.dtype)
        if which == "torch":
            return _reference(query, key, negatives, scale, symmetric, normalize, reduction)
        ids = torch.arange(query.shape[0], device=query.device)
        return _rows_against(which, query, key, key, query, ids, ids, negatives, scale, symmetric, normalize,
                             reduction)
    which = _backend.resolve(backend, query.device)
    if which in ("triton", "cuda") and query.dtype == torch.float64:
        raise TypeError(f"{name_q}: backend={which!r} takes float32, float16 or bfloat16, got float64")
    if which == "torch":
        return _reference(query, key, negatives, scale, symmetric, normalize, reduction)
    return contrastive(query, key, negatives, scale, symmetric, normalize, reduction, which)


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
    return _contrastive("query", query, "key", key, negatives, "temperature", temperature,
                        scale_is_temperature=True, symmetric=symmetric, normalize=normalize,
                        reduction=reduction, backend=backend, gather_distributed=gather_distributed,
                        process_group=process_group)


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
    return _contrastive("image_features", image_features, "text_features", text_features, None,
                        "logit_scale", logit_scale, scale_is_temperature=False, symmetric=True,
                        normalize=False, reduction="mean", backend=backend,
                        gather_distributed=gather_distributed, process_group=process_group)


# ---------------------------------------------------------------------------
# the rest of the family: NT-Xent, SupCon, SigLIP
# ---------------------------------------------------------------------------

def _family_backend(backend, device, op: str, dtype=None) -> str:
    which = _backend.resolve(backend, device)
    if which in ("triton", "cuda") and dtype == torch.float64:
        raise TypeError(f"{op}: backend={which!r} takes float32, float16 or bfloat16, got float64")
    return which


def labeled_contrastive(query: Tensor, labels: Tensor, key: Tensor | None = None,
                        key_labels: Tensor | None = None, *, temperature: float | Tensor = 0.1,
                        normalize: bool = True, reduction: str = "mean", pairwise: bool = False,
                        backend: str | None = None, gather_distributed: bool = False, process_group=None,
                        self_offset: int = -1, names=("query", "labels", "key", "key_labels")) -> Tensor:
    """The labelled-row loss behind nt_xent and supcon_loss (math: reference/family.py).

    query (N, D) with labels (N,); key (M, D) with key_labels (M,), or None: the keys
    are the queries and each anchor's own column is left out.  pairwise=True is
    pytorch-metric-learning's NT-Xent (one softplus term per positive pair, whose
    denominator is that positive plus the anchor's negatives); False the SupCon form
    (the mean over positives against all other columns).  Anchors without positives
    add 0 and are left out of the mean.  gather_distributed (key=None only): the anchors
    of every rank are the columns; each rank's loss covers its own anchors.  self_offset
    >= 0 (with a key): anchor i is key row self_offset + i and is left out of every set
    (pytorch-metric-learning's rule when ref_labels is labels)."""
    nq, nl, nk, nkl = names
    _validate.features(nq, query)
    y = _validate.labels(nl, labels, query.shape[0], query.device, f"row of {nq}")
    yk = None
    if key is not None:
        _validate.features(nk, key)
        query, key = _autocast_common(query, key)
        _validate.same_dtype_device(nq, query, nk, key)
        if key.shape[1] != query.shape[1]:
            raise ValueError(f"{nk} must have D = {query.shape[1]} columns like {nq}, got shape {tuple(key.shape)}")
        if key_labels is None:
            raise ValueError(f"{nkl} is required with {nk}")
        yk = _validate.labels(nkl, key_labels, key.shape[0], key.device, f"row of {nk}")
    elif key_labels is not None:
        raise ValueError(f"{nkl} was given without {nk}")
    _validate.flag("normalize", normalize)
    _validate.flag("pairwise", pairwise)
    _validate.reduction(reduction)
    scale = 1.0 / _validate.positive_scalar("temperature", temperature, query.device)
    which = _family_backend(backend, query.device, "this loss", query.dtype)
    rank, ws = _world(gather_distributed, process_group)
    if ws > 1:
        if key is not None:
            raise ValueError("gather_distributed gathers the anchors themselves: pass key=None")
        n = query.shape[0]
        z_all = _dist.gather(query, nq, process_group)
        y_all = _dist.gather(y, nl, process_group, with_grad=False)
        return _labeled_any(which, query, z_all, y, y_all, scale, normalize, reduction, pairwise,
                            self_offset=rank * n)
    if not isinstance(self_offset, int) or isinstance(self_offset, bool):
        raise TypeError(f"self_offset must be an int, got {type(self_offset).__name__}")
    if key is not None and self_offset >= 0 and self_offset + query.shape[0] > key.shape[0]:
        raise ValueError(f"self_offset={self_offset}: {nk} has {key.shape[0]} rows, fewer than the anchors' own "
                         f"columns [{self_offset}, {self_offset + query.shape[0]}) need")
    return _labeled_any(which, query, key, y, yk, scale, normalize, reduction, pairwise,
                        self_offset=self_offset if key is not None else -1)


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
        backend: as in info_nce; "cpu" or "torch" for this op.
        gather_distributed: all-gather both views of every rank (with gradient); this
            rank's 2N rows are scored against all 2 W N views (lightly's
            gather_distributed).  process_group: the group (default: the world).

    Returns:
        A scalar, or (2N,), in the input dtype.
    """
    z1, z2 = _pair("z1", z1, "z2", z2, "row i of each is a view of sample i")
    n = z1.shape[0]
    rank, _ = _world(gather_distributed, process_group)
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
        backend: as in info_nce; "cpu" or "torch" for this op.
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
        backend: as in info_nce; "cpu" or "torch" for this op.
        gather_distributed: all-gather the text features (with gradient); this rank's N
            images are scored against all W N texts and the sum is divided by the local N
            (open_clip's SigLipLoss with world_size > 1, any dist_impl).
            process_group: the group (default: the world).

    Returns:
        A scalar in the input dtype.  The N x N logits are never in memory.
    """
    image_features, text_features = _pair("image_features", image_features, "text_features", text_features,
                                          "text j is the caption of image j")
    scale = _validate.positive_scalar("logit_scale", logit_scale, image_features.device)
    bias = _validate.scalar("logit_bias", logit_bias, image_features.device)
    which = _family_backend(backend, image_features.device, "siglip_loss", image_features.dtype)
    rank, ws = _world(gather_distributed, process_group)
    offset = 0
    if ws > 1:
        text_features = _dist.gather(text_features, "text_features", process_group)
        offset = rank * image_features.shape[0]
    if which == "torch":
        return _reference_family.siglip_loss(image_features, text_features, scale, bias, offset)
    return _family_ops.siglip(image_features, text_features, scale, bias, which, diag_offset=offset)


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
    query, positive_key, negatives = _autocast_common(query, positive_key, negatives)
    _validate.same_dtype_device("query", query, "positive_key", positive_key)
    _validate.same_dtype_device("query", query, "negatives", negatives)
    if positive_key.shape != query.shape:
        raise ValueError(f"positive_key must have the shape of query {tuple(query.shape)}, "
                         f"got {tuple(positive_key.shape)}")
    if negatives.shape[1] != query.shape[1]:
        raise ValueError(f"negatives must have D = {query.shape[1]} columns like query, "
                         f"got shape {tuple(negatives.shape)}")
    _validate.flag("normalize", normalize)
    _validate.reduction(reduction)
    scale = 1.0 / _validate.positive_scalar("temperature", temperature, query.device)
    which = _family_backend(backend, query.device, "info_nce_explicit", query.dtype)
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, p = query.to(acc), positive_key.to(acc)
    if normalize:
        q, p = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(p, dim=-1)
    pos = scale.to(acc) * (q * p).sum(1)
    if which == "torch":
        n = negatives.to(acc)
        if normalize:
            n = torch.nn.functional.normalize(n, dim=-1)
        logits = torch.cat([pos[:, None], scale.to(acc) * (q @ n.T)], 1)
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return torch.nn.functional.cross_entropy(logits, target, reduction=reduction).to(query.dtype)
    # no column of the negatives is a positive: labels that never match
    y = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    yk = torch.ones(negatives.shape[0], dtype=torch.long, device=query.device)
    return _family_ops.labeled(query, negatives, y, yk, scale, normalize, reduction, False, which, pos_logit=pos)
