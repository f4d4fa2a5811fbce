"""Argument checks at the Python boundary: every failure names the argument,
what was expected and what came (STYLE.md, convention 2)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _backend, distributed

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def dense(name: str, x: Tensor) -> Tensor:
    """A strided (dense) tensor: sparse, mkldnn and other layouts are refused here, by name,
    instead of failing inside torch."""
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}: convert it with "
                        f".to_dense()")
    return x


def _float(name: str, value, why: str) -> float:
    """float(value) of a Python number, an int too large for a float refused by name."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be {why}, got an int too large for a float ({str(value)[:20]}...)") from None


def features(name: str, x: object, rank: int = 2) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    dense(name, x)
    if x.dim() != rank:
        want = "(N, D)" if rank == 2 else "(N, M, D)"
        raise ValueError(f"{name} must have rank {rank} (shape {want}), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}): need at least one row")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has feature dimension 0 (shape {tuple(x.shape)})")
    return x


def same_dtype_device(ref_name: str, ref: Tensor, name: str, x: Tensor) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}: cast them to one dtype")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def _scalar_tensor(name: str, value: object, device: torch.device) -> Tensor | None:
    """What positive_scalar and scalar check of the value's type: a Python number (-> None,
    the caller checks its value) or a dense one-element floating tensor, returned 0-dim on
    `device`, float16 / bfloat16 in float32 (the ops form 1 / value or value * S from it,
    which overflow in 16 bits: a float16 temperature of 1e-5 gave NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    if not isinstance(value, Tensor):
        return None
    dense(name, value)
    if value.dim() > 1 or value.numel() != 1:
        raise ValueError(f"{name} must be a scalar (0-dim tensor), got shape {tuple(value.shape)}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    t = value.reshape(())
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.to(device) if t.device != device else t


def positive_scalar(name: str, value: object, device: torch.device) -> Tensor:
    """A float or a 0-dim (or one-element) floating tensor that is finite and > 0,
    returned as a 0-dim tensor on `device` (kept in the autograd graph; float16 / bfloat16
    in float32, see _scalar_tensor)."""
    t = _scalar_tensor(name, value, device)
    if t is not None:
        if not _compiling():  # a value check is data-dependent: skipped inside torch.compile
            v = float(t.detach())
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and > 0, got {v}")
        return t
    v = _float(name, value, "finite and > 0")
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return torch.tensor(v, dtype=torch.float64, device=device)


def inverse_temperature(name: str, value: object, device: torch.device) -> Tensor:
    """1 / temperature as a 0-dim float64 tensor (differentiable), the temperature validated as
    in positive_scalar and its reciprocal finite too (a float64 temperature of 1e-310 is > 0,
    but 1 / it is inf)."""
    t = positive_scalar(name, value, device)
    scale = 1.0 / (t if t.dtype == torch.float64 else t.double())  # in float64: a float32 1 / t loses digits
    if not _compiling() and not math.isfinite(float(scale.detach())):
        raise ValueError(f"{name} is too small: 1 / {name} overflows {scale.dtype}")
    return scale


def takes_temperature(value: object) -> bool:
    """Whether the fused ops take this temperature (inverse_temperature accepts it): the
    drop-ins hand any other value their original accepts to the original class."""
    try:
        inverse_temperature("temperature", value, torch.device("cpu"))
        return True
    except ValueError:
        return False


def reduction(value: object) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value  # type: ignore[return-value]


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32,
              torch.uint64)


def labels(name: str, y: object, n: int, device: torch.device, n_name: str = "rows") -> Tensor:
    """Integer class labels, one per row: returned as a contiguous int64 tensor."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer class labels, got {type(y).__name__}")
    dense(name, y)
    if y.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must hold integer class labels (int64 or another integer dtype), got {y.dtype}")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), one label per {n_name}, got {tuple(y.shape)}")
    if y.device != device:
        raise ValueError(f"{name} is on {y.device} but the features are on {device}")
    return y.to(torch.int64).contiguous()


def scalar(name: str, value: object, device: torch.device) -> Tensor:
    """A finite float or 0-dim floating tensor of any sign, as a 0-dim tensor on `device`
    (float16 / bfloat16 in float32, as positive_scalar)."""
    t = _scalar_tensor(name, value, device)
    if t is not None:
        if not _compiling() and not math.isfinite(float(t.detach())):
            raise ValueError(f"{name} must be finite, got {float(t.detach())}")
        return t
    v = _float(name, value, "finite")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value}")
    return torch.tensor(v, dtype=torch.float64, device=device)


def autocast_common(*xs):
    """Under torch.autocast, features from layers of different precision (a bf16 linear
    and an fp32 queue, say) meet here: compute in float32, as autocast does for losses.
    Outside autocast mixed dtypes stay an error (same_dtype_device)."""
    dtype, mixed = None, False
    for x in xs:
        if isinstance(x, Tensor):
            mixed = mixed or (dtype is not None and x.dtype != dtype)
            dtype = x.dtype
    if not mixed:
        return xs
    ts = [x for x in xs if isinstance(x, Tensor)]
    dev = ts[0].device.type
    if not (torch.is_autocast_enabled(dev) if dev in ("cpu", "cuda") else False):
        return xs
    if any(t.dtype not in FLOAT_DTYPES for t in ts):
        return xs
    return tuple(x.float() if isinstance(x, Tensor) else x for x in xs)


def pair(name_a: str, a: object, name_b: str, b: object, what: str, *more):
    """Two (N, D) feature tensors of one dtype, device and shape (`what` says why), cast
    together with `more` (e.g. the negatives) under autocast: -> (a, b, *more)."""
    features(name_a, a)
    features(name_b, b)
    a, b, *more = autocast_common(a, b, *more)
    same_dtype_device(name_a, a, name_b, b)
    if b.shape != a.shape:
        raise ValueError(f"{name_b} must have the shape of {name_a} {tuple(a.shape)} ({what}), got {tuple(b.shape)}")
    return (a, b, *more)


def key_like(name: str, x: object, query_name: str, query: Tensor) -> Tensor:
    """(M, D) keys with the query's dtype, device and D."""
    features(name, x)
    same_dtype_device(query_name, query, name, x)
    if x.shape[1] != query.shape[1]:
        raise ValueError(f"{name} must have D = {query.shape[1]} columns like {query_name}, got shape {tuple(x.shape)}")
    return x


def negatives(x: object, query_name: str, query: Tensor) -> Tensor | None:
    """None, (M, D) extra negatives shared by every query, or (N, M, D) paired ones."""
    if x is None:
        return None
    if isinstance(x, Tensor) and x.dim() == 3:
        features("negatives", x, rank=3)
        same_dtype_device(query_name, query, "negatives", x)
        if x.shape[0] != query.shape[0] or x.shape[2] != query.shape[1] or x.shape[1] == 0:
            raise ValueError(f"paired negatives must have shape (N, M, D) = ({query.shape[0]}, M >= 1, "
                             f"{query.shape[1]}), got {tuple(x.shape)}")
        return x
    return key_like("negatives", x, query_name, query)


def world(gather_distributed: object, process_group) -> tuple[int, int, object]:
    """(rank, world size, group) when the op gathers across ranks, else (0, 1, None)."""
    flag("gather_distributed", gather_distributed)
    if not gather_distributed:
        if process_group is not None:
            raise ValueError("process_group was given but gather_distributed=False")
        return 0, 1, None
    return (*distributed.world(process_group), process_group)


def backend(value: object, device: torch.device, dtype: torch.dtype | None = None, what: str = "") -> str:
    """The backend that runs this call, resolved once (backend=, METASSL_FAST_BACKEND, the
    device; see _backend.resolve).  With a dtype: the GPU contrastive kernels take no
    float64 (the inner-loop ones round it, so meta passes none)."""
    which = _backend.resolve(value, device)
    if which in ("triton", "cuda") and dtype == torch.float64:
        raise TypeError(f"{what}: backend={which!r} takes float32, float16 or bfloat16, got float64")
    return which


def self_offset(value: object, n: int, key_name: str, key: Tensor | None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"self_offset must be an int, got {type(value).__name__}")
    if value < -1:
        raise ValueError(f"self_offset must be -1 (the anchors are not among the keys) or >= 0, got {value}")
    if key is not None and value >= 0 and value + n > key.shape[0]:
        raise ValueError(f"self_offset={value}: {key_name} has {key.shape[0]} rows, fewer than the anchors' own "
                         f"columns [{value}, {value + n}) need")
    return value


# ---------------------------------------------------------------------------
# meta-learning (metassl_fast.meta)
# ---------------------------------------------------------------------------

def int_labels(name: str, labels: object, shape: tuple, n_classes: int | None,
               device: torch.device | None = None) -> Tensor:
    """Integer labels of the given shape, in [0, n_classes) when that is given, as int64."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if device is not None and labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the features are on {device}")
    dense(name, labels)
    if labels.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must hold integers (int64), got {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(labels.shape)}")
    if labels.dtype == torch.uint64 and labels.numel() and not _compiling():
        # torch has no min/max for uint64: values past int64's range are out of any [0, C)
        if bool((labels.view(torch.int64) < 0).any()):
            raise ValueError(f"{name} holds values >= 2**63: class labels must lie in [0, n_classes)")
    labels = labels.long()
    if labels.numel() and not _compiling():
        lo, hi = (int(v) for v in torch.aminmax(labels))  # one reduction: this runs on every call
        if lo < 0 or (n_classes is not None and hi >= n_classes):
            where = f"[0, {n_classes})" if n_classes is not None else "[0, n_classes): no negative class"
            raise ValueError(f"{name} must lie in {where}, got values in [{lo}, {hi}]")
    return labels


def tasks(name: str, x: object) -> Tensor:
    """(T, n, D) per-task features."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    dense(name, x)
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (T, n, D), got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    return x


def head(support: Tensor, weight: object, bias: object) -> tuple[int, int]:
    """A linear head (C, D) and (C,) for D-dimensional support features: -> (C, D)."""
    if not isinstance(weight, Tensor) or not isinstance(bias, Tensor):
        raise TypeError("weight and bias must be torch.Tensors")
    D = support.shape[2]
    if weight.dim() != 2 or weight.shape[1] != D or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (C, D={D}), got {tuple(weight.shape)}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape (C={weight.shape[0]},), got {tuple(bias.shape)}")
    for name, x in (("weight", weight), ("bias", bias)):
        dense(name, x)
        same_dtype_device("support", support, name, x)
    return weight.shape[0], D


def step_sizes(lr: object, C: int, D: int, like: Tensor) -> tuple[Tensor, Tensor, bool]:
    """lr as per-parameter step sizes (C, D) and (C,), differentiable where lr is, and
    whether it is one number that needs no gradient."""
    if isinstance(lr, (tuple, list)):
        if len(lr) != 2 or not all(isinstance(x, Tensor) for x in lr):
            raise TypeError("lr as a pair must be (lr_weight (C, D) tensor, lr_bias (C,) tensor)")
        lr_w, lr_b = lr
        if lr_w.shape != (C, D):
            raise ValueError(f"lr_weight must have shape (C, D) = ({C}, {D}), got {tuple(lr_w.shape)}")
        if lr_b.shape != (C,):
            raise ValueError(f"lr_bias must have shape (C,) = ({C},), got {tuple(lr_b.shape)}")
        for name, x in (("lr_weight", lr_w), ("lr_bias", lr_b)):
            if not x.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
            if x.device != like.device:
                raise ValueError(f"{name} is on {x.device} but the features are on {like.device}")
            if not _compiling() and not bool(torch.isfinite(x.detach()).all()):
                raise ValueError(f"{name} must be finite")
        return lr_w.to(like), lr_b.to(like), False
    if isinstance(lr, Tensor):
        if lr.dim() != 0:
            raise ValueError(f"lr must be a float, a 0-dim tensor or a (lr_weight, lr_bias) pair; "
                             f"got a tensor of shape {tuple(lr.shape)}")
        if not lr.dtype.is_floating_point:
            raise TypeError(f"lr must be a floating tensor, got {lr.dtype}")
        if not _compiling() and not math.isfinite(float(lr.detach())):
            raise ValueError(f"lr must be finite, got {float(lr.detach())}")
        constant = not lr.requires_grad
        lr = lr.to(like)
        return lr.expand(C, D), lr.expand(C), constant
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"lr must be a float, a 0-dim tensor or a pair of tensors, got {type(lr).__name__}")
    if not math.isfinite(_float("lr", lr, "finite")):
        raise ValueError(f"lr must be finite, got {lr}")
    return like.new_full((C, D), float(lr)), like.new_full((C,), float(lr)), True


def steps(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"steps must be an int, got {type(value).__name__}")
    if value < 0 or value > MAX_STEPS:
        raise ValueError(f"steps must be in [0, {MAX_STEPS}], got {value}")
    return value


MAX_STEPS = 2**31 - 1  # the kernels' scratch is (steps + 1) C D per task: past this, sizes overflow


def task_reduction(value: object) -> str:
    if value not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {value!r}")
    return value  # type: ignore[return-value]


def query_set(support: Tensor, query: object, query_labels: object, C: int | None) -> Tensor:
    """Query features (T, Q, D) like the support's; returns their int64 labels (T, Q)."""
    tasks("query", query)
    if query.shape[0] != support.shape[0] or query.shape[2] != support.shape[2]:
        raise ValueError(f"query must have shape (T={support.shape[0]}, Q, D={support.shape[2]}), "
                         f"got {tuple(query.shape)}")
    same_dtype_device("support", support, "query", query)
    return int_labels("query_labels", query_labels, query.shape[:2], C, support.device)
