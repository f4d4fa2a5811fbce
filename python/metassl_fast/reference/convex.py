"""Reference convex few-shot heads (R2-D2 ridge, MetaOptNet's Crammer-Singer SVM, L2
multinomial logistic regression): each task's head is the solution of a small convex
problem on its support set, differentiated with autograd through an exact solve.

Per task: support X (S, D), labels y (S) in [0, C), Y = onehot(y) (S, C), K = X X^T.
    ridge   W = X^T A,  A = (K + lam I)^-1 Y                       (closed form, in support space)
    svm     W = X^T A,  A = argmin 1/2 sum_c A_c^T K A_c + r/2 |A|^2 - <A, Y>
                        s.t. A_ic <= C_box Y_ic, sum_c A_ic = 0      (the Crammer-Singer dual;
                        MetaOptNet adds r = 1 to its quadratic term)
    logreg  (W, b) = argmin 1/S sum_i CE(W x_i + b, y_i) + lam/2 |W|^2   (bias not penalised);
            at the optimum W = X^T A with A = (Y - P) / (lam S), P = softmax(K A + b)
    query logits = scale (Xq W + b) (b = 0 for ridge and svm); the loss is the mean
    cross-entropy over each task's queries (with label smoothing).

Gradients: ridge by autograd through torch.linalg.solve.  svm and logreg are solved
to convergence under no_grad (float64), then one differentiable exact step from the
solution: for svm the linear KKT system on the active set (bounds that hold with
equality stay fixed), for logreg one Newton step on the optimality conditions.  At the
optimum either step returns the solution itself and its first derivative is the
implicit-function-theorem gradient, exact whatever the solver's path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _eye(n: int, like: Tensor) -> Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def ridge_dual(X: Tensor, Y: Tensor, lam: Tensor) -> Tensor:
    """A (T, S, C) = (X X^T + lam I)^-1 Y for X (T, S, D), Y (T, S, C)."""
    K = X @ X.transpose(1, 2)
    return torch.linalg.solve(K + lam * _eye(X.shape[1], X), Y)


# ---------------------------------------------------------------------------
# SVM (Crammer-Singer dual)
# ---------------------------------------------------------------------------

def project_rows(v: Tensor, u: Tensor) -> Tensor:
    """Per row of v (..., C): argmin |a - v| s.t. sum(a) = 0, a <= u, i.e. a = min(u, v - phi)
    with sum_c min(u_c, v_c - phi) = 0 (sum(u) >= 0 makes the set non-empty).  With the
    breakpoints t = v - u sorted ascending, component j is unclamped (v_j - phi < u_j) when
    t_j < phi: with the first k unclamped, phi_k = (sum of their v + sum of the other u) / k,
    and the root is the phi_k inside its interval [t_(k), t_(k+1)]."""
    t, order = (v - u).sort(-1)
    vs, us = v.gather(-1, order), u.gather(-1, order)
    k = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype, device=v.device)
    phi = (vs.cumsum(-1) + us.sum(-1, keepdim=True) - us.cumsum(-1)) / k
    above = torch.cat([t[..., 1:], torch.full_like(t[..., :1], float("inf"))], -1)
    ok = (phi >= t) & (phi <= above)
    first = ok.to(torch.int8).argmax(-1, keepdim=True)
    return torch.minimum(u, v - phi.gather(-1, first))


def svm_kkt_residual(K: Tensor, A: Tensor, Y: Tensor, C_box: float, r: float) -> Tensor:
    """max over examples of max_c g_ic - min_{c: A_ic < u_ic} g_ic, g = K A + r A - Y, and of
    any excess over a bound (T,): 0 exactly at the optimum of the dual (every free
    coordinate of an example shares the largest gradient).  Equality sum_c A_ic = 0 is
    assumed (every iterate of the solvers keeps it)."""
    g = K @ A + r * A - Y
    u = C_box * Y
    free = A < u - 1e-12 * (1 + u.abs())  # a bound met up to rounding counts as met
    low = torch.where(free, g, torch.full_like(g, float("inf"))).amin(-1)
    infeasible = (A - u).clamp_min(0).amax(-1)
    return torch.maximum((g.amax(-1) - low).clamp_min(0), infeasible).amax(-1)


def svm_dual_solve(K: Tensor, Y: Tensor, C_box: float, r: float, iters: int = 20000,
                   tol: float = 1e-12) -> Tensor:
    """The dual's solution A (T, S, C) by accelerated projected gradient (FISTA with
    restarts), float64, no autograd; then polished by the exact active-set solve."""
    with torch.no_grad():
        u = C_box * Y
        L = torch.linalg.eigvalsh(K)[..., -1:].unsqueeze(-1) + r  # (T, 1, 1)
        A = torch.zeros_like(Y)
        Z, t = A.clone(), 1.0
        for it in range(iters):
            g = K @ Z + r * Z - Y
            A_new = project_rows(Z - g / L, u)
            t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
            Z = A_new + ((t - 1) / t_new) * (A_new - A)
            if ((A_new - A) * (Z - A_new)).sum() > 0:  # restart when momentum points uphill
                Z, t_new = A_new.clone(), 1.0
            A, t = A_new, t_new
            if it % 50 == 49 and float(svm_kkt_residual(K, A, Y, C_box, r).max()) < tol:
                break
        return A


def svm_active_solve(K: Tensor, Y: Tensor, C_box: Tensor, r: float, A0: Tensor) -> Tensor:
    """The exact solution on A0's active set (coordinates at their bound stay there), by one
    dense linear solve of the KKT system per task; differentiable in K and C_box.

        free (i, c):  (K A)_ic + r A_ic - Y_ic + nu_i = 0;  bound: A_ic = C_box Y_ic;
        every i:      sum_c A_ic = 0
    """
    T, S, C = Y.shape
    n = S * C
    u0 = C_box.detach() * Y
    bound = (A0 >= u0 - 1e-9 * (1 + u0.abs())).reshape(T, n)
    eyeC = _eye(C, K)
    H = (K.unsqueeze(-1).unsqueeze(2) * eyeC.view(1, 1, C, 1, C)).reshape(T, n, n) + r * _eye(n, K)
    rows = torch.where(bound.unsqueeze(-1), _eye(n, K).expand(T, n, n), H)
    E = torch.repeat_interleave(_eye(S, K), C, dim=1)  # (S, n): sum over each example's classes
    top = torch.cat([rows, torch.where(bound.unsqueeze(-1), 0.0, E.t().expand(T, n, S))], 2)
    bottom = torch.cat([E.expand(T, S, n), K.new_zeros(T, S, S)], 2)
    rhs_top = torch.where(bound, (C_box * Y).reshape(T, n), Y.reshape(T, n))
    rhs = torch.cat([rhs_top, K.new_zeros(T, S)], 1)
    sol = torch.linalg.solve(torch.cat([top, bottom], 1), rhs)
    return sol[:, :n].reshape(T, S, C)


def svm_dual(X: Tensor, Y: Tensor, C_box: Tensor, r: float) -> Tensor:
    """A (T, S, C) of the Crammer-Singer dual, differentiable in X and C_box."""
    K = X @ X.transpose(1, 2)
    A0 = svm_dual_solve(K.detach().double(), Y.double(), float(C_box.detach()), r).to(X.dtype)
    return svm_active_solve(K, Y, C_box, r, A0)


# ---------------------------------------------------------------------------
# logistic regression
# ---------------------------------------------------------------------------

def _logreg_residual(K: Tensor, Y: Tensor, A: Tensor, b: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """The optimality conditions as a root: F_A = A - (Y - P) / (lam S) (T, S, C) and
    F_b = colsum(P - Y) / S + mean(b) (T, C) (the mean pins the shift that softmax ignores)."""
    S = Y.shape[1]
    P = torch.softmax(K @ A + b.unsqueeze(1), -1)
    return A - (Y - P) / (lam * S), (P - Y).sum(1) / S + b.mean(-1, keepdim=True)


def _logreg_jacobian(K: Tensor, P: Tensor, lam: Tensor) -> Tensor:
    """d(F_A, F_b) / d(A, b), dense (T, S C + C, S C + C)."""
    T, S, C = P.shape
    Jp = torch.diag_embed(P) - P.unsqueeze(-1) * P.unsqueeze(-2)  # (T, S, C, C)
    JAA = torch.einsum("tice,tij->ticje", Jp, K) / (lam * S)
    JAA = JAA.reshape(T, S * C, S * C) + _eye(S * C, K)
    JAb = Jp.reshape(T, S * C, C) / (lam * S)
    JbA = torch.einsum("tice,tij->tcje", Jp, K).reshape(T, C, S * C) / S
    Jbb = Jp.sum(1) / S + 1.0 / C
    return torch.cat([torch.cat([JAA, JAb], 2), torch.cat([JbA, Jbb], 2)], 1)


def _newton_step(K, Y, A, b, lam):
    T, S, C = Y.shape
    FA, Fb = _logreg_residual(K, Y, A, b, lam)
    P = torch.softmax(K @ A + b.unsqueeze(1), -1)
    J = _logreg_jacobian(K.detach(), P.detach(), lam.detach())
    step = torch.linalg.solve(J, torch.cat([FA.reshape(T, S * C), Fb], 1))
    return A - step[:, :S * C].reshape(T, S, C), b - step[:, S * C:]


def logreg_dual(X: Tensor, Y: Tensor, lam: Tensor, iters: int = 100, tol: float = 1e-13
                ) -> tuple[Tensor, Tensor]:
    """(A (T, S, C), b (T, C)) of L2 multinomial logistic regression (W = X^T A), by damped
    Newton on the optimality conditions in float64 without autograd, then one Newton step
    with autograd from the solution (differentiable in X and lam)."""
    K = X @ X.transpose(1, 2)
    with torch.no_grad():
        Kd, Yd, ld = K.double(), Y.double(), lam.detach().double()
        A = torch.zeros_like(Yd)
        b = Yd.new_zeros(Yd.shape[0], Yd.shape[2])

        def norm(A, b):
            FA, Fb = _logreg_residual(Kd, Yd, A, b, ld)
            return FA.flatten(1).norm(dim=1) + Fb.norm(dim=1)

        for _ in range(iters):
            cur = norm(A, b)
            if float(cur.max()) < tol:
                break
            A1, b1 = _newton_step(Kd, Yd, A, b, ld)
            step = 1.0
            for _ in range(30):  # backtracking on the residual's norm, per task
                A2, b2 = A + step * (A1 - A), b + step * (b1 - b)
                if bool((norm(A2, b2) <= (1 - 1e-4 * step) * cur + 1e-300).all()):
                    break
                step /= 2
            A, b = A2, b2
    return _newton_step(K, Y, A.to(X.dtype), b.to(X.dtype), lam)


# ---------------------------------------------------------------------------
# the heads' query loss
# ---------------------------------------------------------------------------

def head_weights(kind: str, X: Tensor, y: Tensor, n_way: int, lam: Tensor | None = None,
                 C_box: Tensor | None = None, dual_reg: float = 1.0) -> tuple[Tensor, Tensor]:
    """The fitted heads W (T, C, D) and b (T, C) of `kind` ("ridge", "svm", "logreg") on the
    support X (T, S, D) with labels y (T, S)."""
    Y = F.one_hot(y, n_way).to(X.dtype)
    b = X.new_zeros(X.shape[0], n_way)
    if kind == "ridge":
        A = ridge_dual(X, Y, lam)
    elif kind == "svm":
        A = svm_dual(X, Y, C_box, dual_reg)
    elif kind == "logreg":
        A, b = logreg_dual(X, Y, lam)
    else:
        raise ValueError(f"kind must be 'ridge', 'svm' or 'logreg', got {kind!r}")
    return A.transpose(1, 2) @ X, b


def head_loss(kind: str, X: Tensor, y: Tensor, Xq: Tensor, yq: Tensor, n_way: int, scale: Tensor,
              label_smoothing: float, lam: Tensor | None = None, C_box: Tensor | None = None,
              dual_reg: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per task (T,): the mean cross-entropy of scale (Xq W^T + b) on the queries, and the
    number of queries whose largest logit is their label."""
    W, b = head_weights(kind, X, y, n_way, lam, C_box, dual_reg)
    logits = scale * (Xq @ W.transpose(1, 2) + b.unsqueeze(1))
    ce = F.cross_entropy(logits.reshape(-1, n_way), yq.reshape(-1), reduction="none",
                         label_smoothing=label_smoothing)
    correct = (logits.detach().argmax(-1) == yq).sum(1).to(X.dtype)
    return ce.view(X.shape[0], -1).mean(1), correct
