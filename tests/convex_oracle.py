"""Independent float64 ground truth for the convex few-shot heads (tests/test_convex.py).

Written from the problems' definitions in numpy / scipy, sharing nothing with
metassl_fast (neither reference/convex.py nor the kernels), and solved in other spaces
where that is possible:

    ridge   the primal closed form W = (X^T X + lam I)^-1 X^T Y (a D x D solve; the
            library works in the S x S Gram space).
    svm     the Crammer-Singer dual min 1/2 sum_c A_c^T K A_c + r/2 |A|^2 - <A, Y>,
            A_ic <= C Y_ic, sum_c A_ic = 0, by a long accelerated projected-gradient run
            (numpy), then a primal-dual active-set iteration to the exact solution of the
            KKT system, which is *certified*: `svm_certificate` checks feasibility,
            stationarity on the free set and the sign of every bound's multiplier, so a
            wrong active set cannot pass.  The dual's quadratic is >= r I (r > 0), hence
            the solution is unique and ||A - A*|| <= residual / r.  `svm_primal_slsqp`
            solves the *primal* QP (features augmented by sqrt(r) e_i, the primal
            problem whose dual has K + r I) with scipy SLSQP on tiny shapes: the test of
            this oracle itself.
    logreg  the primal min mean_i CE(W x_i + b, y_i) + lam/2 |W|^2 (b not penalised) over
            (W, b), W in an orthonormal basis of the support's row space (exact: see
            logreg), by scipy's trust-exact with the dense Hessian, then Newton, to a
            gradient norm <= 1e-10 (asserted; ~1e-15 reached); the library works in the
            dual variables A (S, C).  b is returned with mean 0 (its shift is free).

Everything takes and returns numpy float64 arrays, one task (X (S, D), y (S,)) or a batch
(T leading) where the name says so.
"""
from __future__ import annotations

import numpy as np
import scipy.optimize

# ---------------------------------------------------------------------------- common


def onehot(y: np.ndarray, C: int) -> np.ndarray:
    return np.eye(C)[np.asarray(y)]


def query_loss(W, b, Xq, yq, scale, label_smoothing=0.0):
    """Mean over the queries of the label-smoothed cross-entropy of scale (Xq W^T + b):
    (1 - ls) CE(yq) + ls mean_c CE(c), as F.cross_entropy defines it."""
    C = W.shape[0]
    z = scale * (Xq @ W.T + b)
    m = z.max(1, keepdims=True)
    logp = z - m - np.log(np.exp(z - m).sum(1, keepdims=True))
    target = (1 - label_smoothing) * onehot(yq, C) + label_smoothing / C
    return float(-(target * logp).sum(1).mean())


# ---------------------------------------------------------------------------- ridge


def ridge(X, y, C, lam):
    """W (C, D) = ((X^T X + lam I)^-1 X^T Y)^T, the primal closed form."""
    D = X.shape[1]
    return np.linalg.solve(X.T @ X + lam * np.eye(D), X.T @ onehot(y, C)).T


# ---------------------------------------------------------------------------- svm


def _project(v, u):
    """Per row (last axis): argmin |a - v| s.t. a <= u, sum a = 0, i.e. a = min(u, v - phi)
    with phi the root of the decreasing piecewise-linear g(phi) = sum_c min(u_c, v_c - phi).
    g's kinks are at t_c = v_c - u_c; between the k-th and (k+1)-th smallest kink the k
    coordinates with the smallest t are unclamped and g is linear: phi_k = (their v +
    the others' u) / k.  The root is the largest phi_k whose piece starts at or before it
    (g is decreasing and g(t_(1)) = sum u >= 0), checked below by g(phi) = 0."""
    order = np.argsort(v - u, -1)
    vs, us = np.take_along_axis(v, order, -1), np.take_along_axis(u, order, -1)
    k = np.arange(1, v.shape[-1] + 1)
    phi = (np.cumsum(vs, -1) + us.sum(-1, keepdims=True) - np.cumsum(us, -1)) / k
    ok = phi >= np.take_along_axis(v - u, order, -1) - 1e-15 * (1 + np.abs(phi))
    last = v.shape[-1] - 1 - np.argmax(ok[..., ::-1], -1)
    a = np.minimum(u, v - np.take_along_axis(phi, last[..., None], -1))
    return a


def svm_certificate(K, A, Y, Cbox, r):
    """Max violation of the KKT conditions of the dual at A (one task), with the bound
    multipliers recovered: g = K A + r A - Y; per row nu_i = -mean of g over free coords;
    violations: a bound exceeded, a row sum != 0, a free coord's g + nu != 0, a bound
    coord's multiplier mu = -(g + nu) < 0.  Zero (to rounding) iff A is the optimum."""
    u = Cbox * Y
    g = K @ A + r * A - Y
    bound = A >= u - 1e-13 * (1 + abs(Cbox))
    # sum_c u_ic = Cbox > 0 and sum_c A_ic = 0: every row keeps a free coordinate
    nu = -np.where(bound, 0, g).sum(1) / np.maximum((~bound).sum(1), 1)
    stat = np.where(bound, 0, np.abs(g + nu[:, None])).max()
    mu_neg = np.where(bound, np.maximum(g + nu[:, None], 0), 0).max()
    return max(float(np.maximum(A - u, 0).max()), float(np.abs(A.sum(1)).max()), float(stat), float(mu_neg))


def _svm_kkt_solve(K, Y, Cbox, r, bound):
    """(A, nu): the solution of the KKT equations with the coordinates in `bound` at their
    bound, reduced to the free coordinates F: H_FF A_F + E_F^T nu = Y_F - H_FB u_B and
    E A = 0, with H = K (x) I_C + r I and E the row sums."""
    S, C = Y.shape
    u = Cbox * Y
    fi, fc = np.nonzero(~bound)
    A = np.where(bound, u, 0.0)
    nF = fi.size
    HFF = K[np.ix_(fi, fi)] * (fc[:, None] == fc[None, :]) + r * np.eye(nF)
    EF = np.zeros((S, nF))
    EF[fi, np.arange(nF)] = 1.0
    KA_B = K @ A  # the bound coordinates' part of (K A)_F; r u_B does not reach F
    M = np.block([[HFF, EF.T], [EF, np.zeros((S, S))]])
    rhs = np.concatenate([Y[fi, fc] - KA_B[fi, fc], -A.sum(1)])
    sol = np.linalg.solve(M, rhs)
    A[fi, fc] = sol[:nF]
    return A, sol[nF:]


def svm_dual(X, y, C, Cbox, r=1.0, warm_bound=None, fixed_bound=None, iters=20000):
    """(A (S, C), bound mask (S, C)): the exact dual solution of one task.  warm_bound: an
    active set to start the active-set iteration from (a nearby problem's), skipping the
    projected-gradient run.  fixed_bound: the solution of the KKT equations on that active
    set, not certified (smooth in X and Cbox: what the implicit gradient differentiates)."""
    K = X @ X.T
    Y = onehot(y, C)
    u = Cbox * Y
    if fixed_bound is not None:
        return _svm_kkt_solve(K, Y, Cbox, r, fixed_bound)[0], fixed_bound
    if warm_bound is None:
        L = np.linalg.eigvalsh(K)[-1] + r
        A = np.zeros_like(Y)
        Z, t = A.copy(), 1.0
        for it in range(iters):  # to a loose tolerance: the active-set iteration finishes exactly
            A_new = _project(Z - (K @ Z + r * Z - Y) / L, u)
            t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
            Z = A_new + (t - 1) / t_new * (A_new - A)
            if ((A_new - A) * (Z - A_new)).sum() > 0:
                Z, t_new = A_new.copy(), 1.0
            if it % 25 == 24 and np.abs(A_new - A).max() < 1e-6 * (1 + np.abs(A).max()):
                A = A_new
                break
            A, t = A_new, t_new
        bound = A >= u - 1e-9 * (1 + Cbox)
    else:
        bound = warm_bound.copy()
    for _ in range(50):  # primal-dual active set: free the bounds with a negative multiplier,
        A, nu = _svm_kkt_solve(K, Y, Cbox, r, bound)  # bind the coordinates past their bound
        g = K @ A + r * A - Y + nu[:, None]
        over = (~bound) & (A > u + 1e-13 * (1 + Cbox))
        neg = bound & (g > 1e-13 * (1 + np.abs(g).max()))
        if not over.any() and not neg.any():
            break
        bound = (bound & ~neg) | over
    else:
        raise RuntimeError("svm oracle: the active-set iteration did not settle")
    res = svm_certificate(K, A, Y, Cbox, r)
    assert res < 1e-11 * (1 + np.abs(K).max() * Cbox), f"svm oracle not certified: KKT residual {res}"
    return A, bound


def svm_primal_slsqp(X, y, C, Cbox, r=1.0):
    """W (C, D) from the primal QP min 1/2 |W_aug|^2 + Cbox sum_i xi_i s.t.
    (w_c - w_{y_i}) . x~_i + [c != y_i] <= xi_i for all c (xi_i >= 0 is c = y_i), on the
    augmented features x~_i = (x_i, sqrt(r) e_i) (the kernel K + r I), by scipy SLSQP.
    Tiny shapes only (C (D + S) + S variables)."""
    S, D = X.shape
    Xa = np.hstack([X, np.sqrt(r) * np.eye(S)])
    Da = D + S
    nW = C * Da

    def f(z):
        return 0.5 * z[:nW] @ z[:nW] + Cbox * z[nW:].sum()

    def jac(z):
        return np.concatenate([z[:nW], np.full(S, Cbox)])

    rows = []
    for i in range(S):
        for c in range(C):
            a = np.zeros(nW + S)
            if c != y[i]:
                a[c * Da:(c + 1) * Da] -= Xa[i]
                a[y[i] * Da:(y[i] + 1) * Da] += Xa[i]
            a[nW + i] = 1.0
            rows.append((a, 0.0 if c == y[i] else -1.0))
    G = np.array([a for a, _ in rows])
    h = np.array([c for _, c in rows])  # G z + h >= 0
    cons = {"type": "ineq", "fun": lambda z: G @ z + h, "jac": lambda z: G}
    out = scipy.optimize.minimize(f, np.zeros(nW + S), jac=jac, constraints=[cons], method="SLSQP",
                                  options={"ftol": 1e-12, "maxiter": 2000})
    assert out.success, out.message
    return out.x[:nW].reshape(C, Da)[:, :D]


# ---------------------------------------------------------------------------- logreg


def logreg(X, y, C, lam, warm=None):
    """(W (C, D), b (C,) with mean 0, gradient norm reached) of the primal problem.

    W is optimised in an orthonormal basis Q (D, r) of the support's row space, W = V Q^T:
    the data term sees W only through X W^T = (X Q) V^T, and |W| = |V|, so the component
    of W outside the row space is 0 at the optimum and the reduced primal (C (r + 1)
    variables, r <= min(S, D)) has the same minimiser; + 1/2 (sum_c b_c)^2 pins the
    shift of b that the softmax ignores (0 at the mean-0 optimum).  Solved by scipy's
    trust-region method with the exact dense Hessian, then polished by Newton steps."""
    S, D = X.shape
    Y = onehot(y, C)
    _, sv, Vt = np.linalg.svd(X, full_matrices=False)
    Q = Vt[sv > 1e-12 * sv.max()].T if sv.max() > 0 else np.zeros((D, 0))
    r = Q.shape[1]
    Zb = np.hstack([X @ Q, np.ones((S, 1))])  # the bias as a last, unpenalised column
    pen = np.ones(r + 1)
    pen[-1] = 0.0

    def probs(z):
        V = z.reshape(C, r + 1)
        logits = Zb @ V.T
        logits = logits - logits.max(1, keepdims=True)
        return V, logits, np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    def fun(z):
        V, logits, _ = probs(z)
        ce = -(Y * (logits - np.log(np.exp(logits).sum(1, keepdims=True)))).sum() / S
        return ce + lam / 2 * ((V * pen) ** 2).sum() + 0.5 * V[:, -1].sum() ** 2

    def grad(z):
        V, _, P = probs(z)
        G = (P - Y).T @ Zb / S + lam * V * pen
        G[:, -1] += V[:, -1].sum()
        return G.ravel()

    def hess(z):
        _, _, P = probs(z)
        J = P[:, :, None] * np.eye(C) - P[:, :, None] * P[:, None, :]  # (S, C, C)
        H = np.einsum("ice,ik,il->ckel", J, Zb, Zb, optimize=True) / S
        H += lam * np.einsum("ce,kl->ckel", np.eye(C), np.diag(pen))
        H[:, -1, :, -1] += 1.0
        return H.reshape(C * (r + 1), C * (r + 1))

    z0 = np.zeros(C * (r + 1)) if warm is None else np.hstack([warm[0] @ Q, warm[1][:, None]]).ravel()
    z = z0
    if warm is None:  # a warm start (a nearby problem's solution) goes to Newton directly
        z = scipy.optimize.minimize(fun, z0, jac=grad, hess=hess, method="trust-exact",
                                    options={"gtol": 1e-12, "maxiter": 500}).x
    best = np.linalg.norm(grad(z))
    for _ in range(4):  # Newton polish: the trust region stops once its model's decrease is rounding
        new_z = z - np.linalg.solve(hess(z), grad(z))
        new = np.linalg.norm(grad(new_z))
        if new >= best:
            break
        z, best = new_z, new
    assert best <= 1e-10, f"logreg oracle: gradient norm {best}"
    V = z.reshape(C, r + 1)
    return V[:, :r] @ Q.T, V[:, r] - V[:, r].mean(), float(best)


# ---------------------------------------------------------------------------- batched


def fit(kind, X, y, C, reg, r=1.0, warm=None):
    """Per task t of X (T, S, D): (W (T, C, D), b (T, C), state for a warm start).  For
    svm a warm state fixes the active set (see svm_dual's fixed_bound)."""
    Ws, bs, states = [], [], []
    for t in range(X.shape[0]):
        w = None if warm is None else warm[t]
        if kind == "ridge":
            W, b, st = ridge(X[t], y[t], C, reg), np.zeros(C), None
        elif kind == "svm":
            A, st = svm_dual(X[t], y[t], C, reg, r, fixed_bound=w)
            W, b = A.T @ X[t], np.zeros(C)
        else:
            W, b, _ = logreg(X[t], y[t], C, reg, warm=w)
            st = (W, b)
        Ws.append(W)
        bs.append(b)
        states.append(st)
    return np.stack(Ws), np.stack(bs), states


def limit_threads():
    """One BLAS thread for the oracle's dense solves (on a busy 2-core machine the default
    pool is 5-10x slower at D = 640)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def losses(kind, X, y, Xq, yq, C, reg, scale, label_smoothing=0.0, r=1.0, warm=None):
    """(per-task query losses (T,), W, b, state) of the batch."""
    W, b, st = fit(kind, X, y, C, reg, r, warm)
    per = np.array([query_loss(W[t], b[t], Xq[t], yq[t], scale, label_smoothing) for t in range(X.shape[0])])
    return per, W, b, st
