"""Differentiable convex few-shot heads, batched over tasks: ridge regression (R2-D2),
the Crammer-Singer SVM (MetaOptNet) and L2 multinomial logistic regression.  Each task's
head is the exact solution of a small convex problem on its support set, solved in
support (Gram) space; the meta-gradient is exact at the solution (closed form for
ridge, implicit differentiation of the optimality conditions for svm and logreg),
whatever the number of solver iterations.  The op: ops/convex; the math:
reference/convex.py and csrc/cpu/convex.h.

Shapes (as anil_loss): T tasks, S support and Q query examples per task, D features,
C = n_way classes.
    support (T, S, D), support_labels (T, S) integers in [0, C)
    query (T, Q, D), query_labels (T, Q) in [0, C)
    lam, C, scale: floats or 0-dim tensors; a tensor may require grad (learned).
The query loss is the cross-entropy of scale * (query @ W_t^T + b_t), with
label_smoothing as in F.cross_entropy, averaged over each task's queries, then over
tasks ("mean", a scalar) or per task ("none", (T,)).
backend: None (the C++ kernel for CPU tensors, else the torch reference), "cpu" or
"torch" (reference/convex.py: autograd through an exact solve); also
METASSL_FAST_BACKEND.  There is no GPU kernel of these heads.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _validate
from ..ops import convex as _op

KINDS = ("ridge", "svm", "logreg")


def _labels_and_n_way(n_way, support_labels, shape: tuple, device) -> tuple[Tensor, int]:
    """The support labels (int64) and the number of classes: n_way, or the largest label + 1."""
    if n_way is None:  # the labels first: a negative label is their error, not n_way's
        labels = _validate.int_labels("support_labels", support_labels, shape, None, device)
        return labels, int(labels.max()) + 1
    if isinstance(n_way, bool) or not isinstance(n_way, int) or n_way < 1:
        raise ValueError(f"n_way must be a positive int, got {n_way!r}")
    return _validate.int_labels("support_labels", support_labels, shape, n_way, device), n_way


def _solver_options(tol, max_iter, kind: str) -> tuple[float, int]:
    d_tol, d_iter = _op.DEFAULTS[kind]
    tol = d_tol if tol is None else tol
    max_iter = d_iter if max_iter is None else max_iter
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 < float(tol) < 1):
        raise ValueError(f"tol must be a float in (0, 1), got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or not 1 <= max_iter <= _validate.MAX_STEPS:
        raise ValueError(f"max_iter must be an int in [1, {_validate.MAX_STEPS}], got {max_iter!r}")
    return float(tol), max_iter


def _smoothing(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {value!r}")
    return float(value)


def _prepare(kind, support, support_labels, query, query_labels, reg_name, reg, scale, n_way, need_all_classes):
    """Validated inputs: (X, y, Xq, yq in the accumulation dtype / int64, contiguous;
    reg, scale as 0-dim tensors; C)."""
    _validate.tasks("support", support)
    T, S, _ = support.shape
    y, C = _labels_and_n_way(n_way, support_labels, (T, S), support.device)
    acc = torch.float64 if support.dtype == torch.float64 else torch.float32
    if query is not None:
        yq = _validate.query_set(support, query, query_labels, C).contiguous()
        Xq = query.to(acc).contiguous()
    else:
        Xq = yq = None
    if need_all_classes and not torch.compiler.is_compiling():
        counts = torch.zeros(T, C, dtype=torch.int64, device=y.device).scatter_add_(1, y, torch.ones_like(y))
        if bool((counts == 0).any()):
            t, c = (counts == 0).nonzero()[0].tolist()
            raise ValueError(f"support_labels: class {c} has no support example in task {t} (logistic regression "
                             "with an unpenalised bias has no minimum then: pass n_way = the classes present)")
    reg_t = _validate.positive_scalar(reg_name, reg, support.device)
    scale_t = _validate.positive_scalar("scale", scale, support.device)
    return support.to(acc).contiguous(), y.contiguous(), Xq, yq, reg_t, scale_t, C


def _backend(backend, device) -> str:
    which = _validate.backend(backend, device)
    if which in ("triton", "cuda"):
        raise ValueError(f"backend={which!r}: the convex heads have no GPU kernel; use backend='torch' (torch's "
                         "batched solvers) for CUDA tensors")
    return which


def _head_loss(kind, support, support_labels, query, query_labels, reg_name, reg, scale, label_smoothing,
               n_way, reduction, backend, dual_reg=1.0, tol=None, max_iter=None):
    """(the loss, correct queries per task (T,)) of a convex head."""
    _validate.task_reduction(reduction)
    ls = _smoothing(label_smoothing)
    tol, max_iter = _solver_options(tol, max_iter, kind)
    X, y, Xq, yq, reg_t, scale_t, C = _prepare(kind, support, support_labels, query, query_labels, reg_name, reg,
                                               scale, n_way, kind == "logreg")
    which = _backend(backend, support.device)
    loss, correct = _op.head_loss(kind, X, y, Xq, yq, reg_t, scale_t, C, ls, float(dual_reg), tol, max_iter, which,
                                  reduction)
    return loss.to(query.dtype), correct


def _dual_reg(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"dual_reg must be a float, got {type(value).__name__}")
    if not (0 < float(value) < float("inf")):
        raise ValueError(f"dual_reg must be finite and > 0, got {value!r}")
    return float(value)


def ridge_loss(support: Tensor, support_labels: Tensor, query: Tensor, query_labels: Tensor, *,
               lam: float | Tensor = 50.0, scale: float | Tensor = 1.0, label_smoothing: float = 0.0,
               n_way: int | None = None, reduction: str = "mean", backend: str | None = None) -> Tensor:
    """R2-D2's ridge-regression head: per task W_t = X^T (X X^T + lam I)^-1 Y (X the
    support (S, D), Y its one-hot labels (S, C)), solved in support space (one S x S
    Cholesky per task), then the query loss (module docstring).  Exact gradients in
    closed form into support, query, lam and scale.  n_way defaults to the largest
    support label + 1 (a class with no support example gets a zero column)."""
    return _head_loss("ridge", support, support_labels, query, query_labels, "lam", lam, scale, label_smoothing,
                      n_way, reduction, backend)[0]


def svm_loss(support: Tensor, support_labels: Tensor, query: Tensor, query_labels: Tensor, *,
             C: float | Tensor = 0.1, scale: float | Tensor = 1.0, label_smoothing: float = 0.0,
             dual_reg: float = 1.0, tol: float | None = None, max_iter: int | None = None,
             n_way: int | None = None, reduction: str = "mean", backend: str | None = None) -> Tensor:
    """MetaOptNet's multi-class (Crammer-Singer) SVM head.  Per task the dual in S C
    variables A: min 1/2 sum_c A_c^T K A_c + dual_reg/2 |A|^2 - <A, Y> subject to
    A_ic <= C Y_ic and sum_c A_ic = 0 (K = X X^T; dual_reg = 1 is the identity MetaOptNet
    adds to the quadratic term, which makes the solution unique), solved by exact block
    coordinate descent until its KKT residual (max_i [max_c g_ic - min over free c of
    g_ic], g = K A + dual_reg A - Y the dual gradient, whose label term is of size 1) is at
    most tol or max_iter sweeps have run (defaults: tol 1e-6, 1000 sweeps); W_t = X^T A.  The gradient into support, query,
    C and scale is the implicit one: a linear solve of the KKT system on the active set
    at the solution found.  With S > D and dual_reg -> 0 (K + dual_reg I ill-conditioned) that
    solve loses digits: 1e-8 relative at dual_reg = 1e-6."""
    return _head_loss("svm", support, support_labels, query, query_labels, "C", C, scale, label_smoothing, n_way,
                      reduction, backend, _dual_reg(dual_reg), tol, max_iter)[0]


def logreg_loss(support: Tensor, support_labels: Tensor, query: Tensor, query_labels: Tensor, *,
                lam: float | Tensor = 1.0, scale: float | Tensor = 1.0, label_smoothing: float = 0.0,
                tol: float | None = None, max_iter: int | None = None, n_way: int | None = None,
                reduction: str = "mean", backend: str | None = None) -> Tensor:
    """L2-regularised multinomial logistic-regression head: per task (W_t, b_t) =
    argmin mean_i CE(W x_i + b, y_i) + lam/2 |W|^2 (the bias not penalised), by Newton's
    method with conjugate-gradient steps in support space until the gradient's norm is
    at most tol times its first value (defaults: 1e-7, 50 Newton steps).  The gradient
    into support, query, lam and scale is the implicit one (one Hessian solve).  Every
    class must have a support example in every task."""
    return _head_loss("logreg", support, support_labels, query, query_labels, "lam", lam, scale, label_smoothing,
                      n_way, reduction, backend, 1.0, tol, max_iter)[0]


def _fit(kind, support, support_labels, reg_name, reg, n_way, backend, dual_reg=1.0, tol=None, max_iter=None):
    tol, max_iter = _solver_options(tol, max_iter, kind)
    X, y, _, _, reg_t, _, C = _prepare(kind, support, support_labels, None, None, reg_name, reg, 1.0, n_way,
                                       kind == "logreg")
    which = _backend(backend, support.device)
    with torch.no_grad():
        W, b = _op.fit(kind, X, y, reg_t, C, dual_reg, tol, max_iter, which)
    return W.to(support.dtype), b.to(support.dtype)


def fit_ridge(support: Tensor, support_labels: Tensor, *, lam: float | Tensor = 50.0, n_way: int | None = None,
              backend: str | None = None) -> tuple[Tensor, Tensor]:
    """The ridge heads of ridge_loss, without gradient: (W (T, C, D), b (T, C), all zero);
    query logits = query @ W.transpose(1, 2) + b[:, None]."""
    return _fit("ridge", support, support_labels, "lam", lam, n_way, backend)


def fit_svm(support: Tensor, support_labels: Tensor, *, C: float | Tensor = 0.1, dual_reg: float = 1.0,
            tol: float | None = None, max_iter: int | None = None, n_way: int | None = None,
            backend: str | None = None) -> tuple[Tensor, Tensor]:
    """The SVM heads of svm_loss, without gradient: (W (T, C, D), b (T, C), all zero)."""
    return _fit("svm", support, support_labels, "C", C, n_way, backend, _dual_reg(dual_reg), tol, max_iter)


def fit_logreg(support: Tensor, support_labels: Tensor, *, lam: float | Tensor = 1.0, tol: float | None = None,
               max_iter: int | None = None, n_way: int | None = None, backend: str | None = None
               ) -> tuple[Tensor, Tensor]:
    """L2 multinomial logistic regression fitted to every task's support set in one call
    (batched episode evaluation), without gradient: (W (T, C, D), b (T, C)) minimising
    mean_i CE(W x_i + b, y_i) + lam/2 |W|^2.  scikit-learn's LogisticRegression(C=c)
    minimises c sum_i CE + 1/2 |W|^2: the same problem for lam = 1 / (c S).  The bias is
    defined up to a constant shared by the classes; it is returned with mean 0."""
    return _fit("logreg", support, support_labels, "lam", lam, n_way, backend, 1.0, tol, max_iter)


class ConvexHead(nn.Module):
    """A convex few-shot head ("ridge", "svm" or "logreg") with a learnable logit scale
    (MetaOptNet trains one; scale_param: an existing nn.Parameter to use instead, e.g. a
    trainer's own) and, for ridge and logreg, optionally a learnable lam.
    forward(support (T, S, D), support_labels (T, S), query (T, Q, D), query_labels (T, Q))
    -> (the mean query loss, the accuracy on the queries)."""

    def __init__(self, kind: str, n_way: int, *, lam: float | None = None, C: float | None = None,
                 scale: float = 1.0, learn_scale: bool = True, learn_lam: bool = False,
                 label_smoothing: float = 0.0, scale_param: nn.Parameter | None = None, dual_reg: float = 1.0,
                 tol: float | None = None, max_iter: int | None = None, backend: str | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if isinstance(n_way, bool) or not isinstance(n_way, int) or n_way < 1:
            raise ValueError(f"n_way must be a positive int, got {n_way!r}")
        _validate.flag("learn_scale", learn_scale)
        _validate.flag("learn_lam", learn_lam)
        if kind == "svm":
            if lam is not None or learn_lam:
                raise ValueError("kind='svm' takes C, not lam (nor learn_lam)")
            reg, self.reg_name = (0.1 if C is None else C), "C"
        else:
            if C is not None:
                raise ValueError(f"kind={kind!r} takes lam, not C")
            reg, self.reg_name = ((50.0 if kind == "ridge" else 1.0) if lam is None else lam), "lam"
        if isinstance(reg, Tensor):  # a tensor would be copied into the head's own parameter, detached
            raise TypeError(f"{self.reg_name} must be a float (learn_lam=True makes the head's own parameter "
                            f"learnable), got a tensor")
        _validate.positive_scalar(self.reg_name, reg, torch.device("cpu"))
        if kind != "svm" and dual_reg != 1.0:
            raise ValueError(f"dual_reg is the SVM dual's; kind={kind!r} takes none")
        if kind == "ridge" and (tol is not None or max_iter is not None):
            raise ValueError("kind='ridge' is solved in closed form: it takes no tol or max_iter")
        self.kind, self.n_way = kind, n_way
        self.label_smoothing = _smoothing(label_smoothing)
        self.dual_reg = _dual_reg(dual_reg)
        self.tol, self.max_iter = _solver_options(tol, max_iter, kind)
        self.backend = backend
        if scale_param is not None:
            if not isinstance(scale_param, nn.Parameter):
                raise TypeError(f"scale_param must be an nn.Parameter (registered with the head, so that "
                                f"parameters() and .to() see it), got {type(scale_param).__name__}")
            if scale != 1.0 or learn_scale is not True:
                raise ValueError("scale_param replaces scale and learn_scale: pass one or the other")
            _validate.positive_scalar("scale_param", scale_param, scale_param.device)
            self.scale = scale_param
        else:
            _validate.positive_scalar("scale", scale, torch.device("cpu"))
            self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=learn_scale)
        self.reg = nn.Parameter(torch.tensor(float(reg)), requires_grad=learn_lam)

    def forward(self, support: Tensor, support_labels: Tensor, query: Tensor, query_labels: Tensor):
        loss, correct = _head_loss(self.kind, support, support_labels, query, query_labels, self.reg_name, self.reg,
                                   self.scale, self.label_smoothing, self.n_way, "mean", self.backend,
                                   self.dual_reg, self.tol, self.max_iter)
        return loss, (correct.sum() / query_labels.numel()).float()

    def extra_repr(self) -> str:
        return f"{self.kind!r}, n_way={self.n_way}, {self.reg_name}={float(self.reg):g}"
