// Batched linear-head inner loop and its closed-form reverse pass; math in inner_loop.h.
//
// A task's support block (S x D) and head (C x D) are small (25 x 640 and 5 x 640 in
// the few-shot benchmarks): every step is three thin matrix products with C tiny and
// D long, done with the classes' accumulators in registers; one thread keeps a task
// in L1/L2 and tasks run in parallel.
#include "cpu/inner_loop.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <vector>

#include "cpu/_products.h"
#include "cpu/simd.h"

namespace msf {
namespace {

using products::atx;
using products::aw_add;
using products::class_blocks;
using products::gram_matrix;
using products::xwt;

// In place: each row of Z (R, C) becomes softmax(row); returns nothing.
template <typename T>
void softmax_rows(T* Z, int64_t R, int64_t C) {
  for (int64_t r = 0; r < R; ++r) {
    T* z = Z + r * C;
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < C; ++c) m = z[c] > m ? z[c] : m;
    T sum = 0;
    for (int64_t c = 0; c < C; ++c) sum += (z[c] = std::exp(z[c] - m));
    for (int64_t c = 0; c < C; ++c) z[c] /= sum;
  }
}

// P = softmax(X W^T + b) row-wise, R = (P - onehot(y)) / S, G_W = R^T X, G_b = colsum(R).
template <typename T>
void probs_and_grad(const T* X, const int64_t* y, const T* W, const T* b, int64_t S, int64_t D,
                    int64_t C, T* P, T* R, T* GW, T* Gb, bool want_gw = true) {
  const T inv_s = T(1) / static_cast<T>(S);
  xwt(X, W, b, P, S, D, C);
  softmax_rows(P, S, C);
  for (int64_t c = 0; c < C; ++c) Gb[c] = 0;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t c = 0; c < C; ++c) {
      const T r = (P[s * C + c] - (y[s] == c ? T(1) : T(0))) * inv_s;
      R[s * C + c] = r;
      Gb[c] += r;
    }
  if (want_gw) atx(R, X, GW, S, D, C, T(1), false);
}

// Scratch of one task, reused across the tasks of a thread.
template <typename T>
struct TaskWork {
  std::vector<T> P, R, GW, Gb, V, v, M, MS, NR;
  TaskWork(int64_t S, int64_t D, int64_t C)
      : P(S * C), R(S * C), GW(C * D), Gb(C), V(C * D), v(C), M(S * C), MS(S * C), NR(S * C) {}
};

// W_traj (K+1, C, D), b_traj (K+1, C) of one task: W_0 = W0, then K SGD steps.
template <typename T>
void forward_task(const T* X, const int64_t* y, const T* W0, const T* b0, const T* aW, const T* ab,
                  T* Wt, T* bt, int64_t S, int64_t D, int64_t C, int64_t K, TaskWork<T>& w) {
  const int64_t CD = C * D;
  std::copy(W0, W0 + CD, Wt);
  std::copy(b0, b0 + C, bt);
  for (int64_t k = 0; k < K; ++k) {
    const T* W = Wt + k * CD;
    const T* b = bt + k * C;
    probs_and_grad(X, y, W, b, S, D, C, w.P.data(), w.R.data(), w.GW.data(), w.Gb.data());
    T* Wn = Wt + (k + 1) * CD;
    T* bn = bt + (k + 1) * C;
    for (int64_t i = 0; i < CD; ++i) Wn[i] = W[i] - aW[i] * w.GW[i];
    for (int64_t c = 0; c < C; ++c) bn[c] = b[c] - ab[c] * w.Gb[c];
  }
}

// The reverse pass of one task.  Lam (C, D) and lam (C) hold dL/dW_K, dL/db_K on entry
// and dL/dW_0, dL/db_0 on exit; dX (S, D), daW (C, D), dab (C) are overwritten.
template <typename T>
void reverse_task(const T* X, const int64_t* y, const T* aW, const T* ab, const T* Wt, const T* bt,
                  T* Lam, T* lam, T* dX, T* daW, T* dab, int64_t S, int64_t D, int64_t C, int64_t K,
                  bool first_order, bool need_dlr, TaskWork<T>& w) {
  const int64_t CD = C * D;
  const T inv_s = T(1) / static_cast<T>(S);
  std::fill(dX, dX + S * D, T(0));
  if (need_dlr) {
    std::fill(daW, daW + CD, T(0));
    std::fill(dab, dab + C, T(0));
  } else if (first_order) {
    return;  // Lambda passes through unchanged, nothing reaches X
  }
  for (int64_t k = K - 1; k >= 0; --k) {
    const T* W = Wt + k * CD;
    const T* b = bt + k * C;
    probs_and_grad(X, y, W, b, S, D, C, w.P.data(), w.R.data(), w.GW.data(), w.Gb.data(), need_dlr);
    if (need_dlr) {
      for (int64_t i = 0; i < CD; ++i) daW[i] -= Lam[i] * w.GW[i];
      for (int64_t c = 0; c < C; ++c) dab[c] -= lam[c] * w.Gb[c];
    }
    if (first_order) continue;
    for (int64_t i = 0; i < CD; ++i) w.V[i] = aW[i] * Lam[i];
    for (int64_t c = 0; c < C; ++c) w.v[c] = ab[c] * lam[c];
    xwt(X, w.V.data(), w.v.data(), w.M.data(), S, D, C);  // U = X V^T + v
    for (int64_t s = 0; s < S; ++s) {
      const T* p = w.P.data() + s * C;
      T* m = w.M.data() + s * C;
      T pu = 0;
      for (int64_t c = 0; c < C; ++c) pu += p[c] * m[c];
      for (int64_t c = 0; c < C; ++c) {
        m[c] = p[c] * (m[c] - pu);
        w.MS[s * C + c] = -m[c] * inv_s;  // the mixed term's coefficient of W_k
        w.NR[s * C + c] = -w.R[s * C + c];
      }
    }
    aw_add(w.MS.data(), W, w.NR.data(), w.V.data(), dX, S, D, C);  // dX -= M W_k / S + R V
    atx(w.M.data(), X, Lam, S, D, C, -inv_s, true);                 // Lambda -= M^T X / S
    for (int64_t s = 0; s < S; ++s)
      for (int64_t c = 0; c < C; ++c) lam[c] -= w.M[s * C + c] * inv_s;
  }
}

}  // namespace

template <typename T>
void inner_loop_forward(const T* X, const int64_t* y, const T* W0, const T* b0, const T* aW,
                        const T* ab, T* W_traj, T* b_traj, const InnerLoopArgs& a, int nthreads) {
  const int64_t S = a.S, D = a.D, C = a.C, K = a.K, CD = C * D;
  parallel_chunks(a.T, nthreads, [&](int64_t t0, int64_t t1, int) {
    TaskWork<T> w(S, D, C);
    for (int64_t t = t0; t < t1; ++t)
      forward_task(X + t * S * D, y + t * S, W0, b0, aW, ab, W_traj + t * (K + 1) * CD,
                   b_traj + t * (K + 1) * C, S, D, C, K, w);
  });
}

template <typename T>
void inner_loop_backward(const T* X, const int64_t* y, const T* aW, const T* ab, const T* W_traj,
                         const T* b_traj, const T* dW_K, const T* db_K, T* dX, T* dW0, T* db0,
                         T* daW, T* dab, const InnerLoopArgs& a, int nthreads) {
  const int64_t S = a.S, D = a.D, C = a.C, K = a.K, CD = C * D;
  parallel_chunks(a.T, nthreads, [&](int64_t t0, int64_t t1, int) {
    TaskWork<T> w(S, D, C);
    for (int64_t t = t0; t < t1; ++t) {
      std::copy(dW_K + t * CD, dW_K + (t + 1) * CD, dW0 + t * CD);
      std::copy(db_K + t * C, db_K + (t + 1) * C, db0 + t * C);
      reverse_task(X + t * S * D, y + t * S, aW, ab, W_traj + t * (K + 1) * CD,
                   b_traj + t * (K + 1) * C, dW0 + t * CD, db0 + t * C, dX + t * S * D,
                   daW + t * CD, dab + t * C, S, D, C, K, a.first_order, true, w);
    }
  });
}

namespace {

// The query half of one task: loss_t, and with grad the upstream of the inner loop:
// Z (Q, C) scratch becomes dL/dZ and ZT (C, Q) its transpose; Lam (C, D) = dZ^T Xq;
// lam = colsum dZ; dxq (Q, D) = dZ W_K unless dxq is null (deferred, anil_apply).
// correct (non-null): the number of queries whose first largest logit is their label.
template <typename T>
T query_loss(const T* Xq, const int64_t* yq, const T* WK, const T* bK, T* Z, T* ZT, int64_t Q,
             int64_t D, int64_t C, bool grad, T gq, T* dxq, T* Lam, T* lam, T* correct) {
  xwt(Xq, WK, bK, Z, Q, D, C);
  T total = 0;
  int64_t hits = 0;
  for (int64_t q = 0; q < Q; ++q) {
    T* z = Z + q * C;
    T m = -std::numeric_limits<T>::infinity();
    int64_t arg = 0;
    for (int64_t c = 0; c < C; ++c)
      if (z[c] > m) m = z[c], arg = c;
    hits += arg == yq[q];
    T sum = 0;
    for (int64_t c = 0; c < C; ++c) sum += std::exp(z[c] - m);
    const T lse = m + std::log(sum);
    total += lse - z[yq[q]];
    if (grad)
      for (int64_t c = 0; c < C; ++c)  // z becomes dL/dz
        z[c] = gq * (std::exp(z[c] - lse) - (c == yq[q] ? T(1) : T(0)));
  }
  if (grad) {
    for (int64_t q = 0; q < Q; ++q)
      for (int64_t c = 0; c < C; ++c) ZT[c * Q + q] = Z[q * C + c];
    if (dxq) atx<T, 6>(ZT, WK, dxq, C, D, Q, T(1), false);  // dXq = dZ W_K
    atx(Z, Xq, Lam, Q, D, C, T(1), false);   // Lambda = dZ^T Xq
    for (int64_t c = 0; c < C; ++c) lam[c] = 0;
    for (int64_t q = 0; q < Q; ++q)
      for (int64_t c = 0; c < C; ++c) lam[c] += Z[q * C + c];
  }
  if (correct) *correct = static_cast<T>(hits);
  return total / static_cast<T>(Q);
}

// True when each class's weight step size is one number (a scalar lr, or per-class
// rows): then the whole inner loop lives in the span of the support rows (below).
template <typename T>
bool rowwise_uniform(const T* aW, int64_t C, int64_t D) {
  for (int64_t c = 0; c < C; ++c)
    for (int64_t d = 1; d < D; ++d)
      if (aW[c * D + d] != aW[c * D]) return false;
  return true;
}

// Scratch of the support-space (Gram) path of one task.
template <typename T>
struct GramWork {
  std::vector<T> G, Z, Ps, A, Aa, dA, dZ, dG, dR, R, tmp, DZT, RT, BT, WW, WK, bK, col, Zq, ZqT;
  GramWork(int64_t S, int64_t Q, int64_t D, int64_t C, int64_t K)
      : G(S * S), Z(S * C), Ps(std::max<int64_t>(K, 1) * S * C), A(S * C), Aa(S * C), dA(S * C),
        dZ(S * C), dG(S * S), dR(S * C), R(S * C), tmp(C * S), DZT(std::max<int64_t>(K, 1) * C * S),
        RT(std::max<int64_t>(K, 1) * C * S), BT(2 * C * S), WW(2 * C * D), WK(C * D), bK(C), col(C),
        Zq(Q * C), ZqT(C * Q) {}
};

// R = (P - onehot(y)) / S
template <typename T>
void residual(const T* P, const int64_t* y, T* R, int64_t S, int64_t C) {
  const T inv_s = T(1) / static_cast<T>(S);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t c = 0; c < C; ++c) R[s * C + c] = (P[s * C + c] - (y[s] == c ? T(1) : T(0))) * inv_s;
}

template <typename T>
void colsum(const T* M, T* out, int64_t S, int64_t C) {
  for (int64_t c = 0; c < C; ++c) out[c] = 0;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t c = 0; c < C; ++c) out[c] += M[s * C + c];
}

// One task of the ANIL meta-loss when every class's weight step size a_c is constant
// along D (and the step sizes need no gradient).  Every update W_{k+1} - W_k = -diag(a)
// R_k^T X lies in the span of the support rows, so with the Gram matrix G = X X^T the
// support logits follow  Z_{k+1} = Z_k - G R_k diag(a) - 1 (ab * colsum R_k)^T  in
// S x C space (O(S^2 C) a step instead of O(S C D)), and W_K = W_0 - diag(a) A^T X with
// A = sum_k R_k.  The reverse pass is the same recursion's adjoint, also in S x C space:
//   dA = -X Lambda^T diag(a) - 1 (ab * lambda)^T           (from W_K, b_K)
//   for k = K-1 .. 0 (dZ = dL/dZ_{k+1}, 0 at k = K-1):
//     dR = dA - G dZ diag(a) - 1 (ab * colsum dZ)^T,   dG -= dZ diag(a) R_k^T
//     dZ += P_k * (dR / S - rowsum(P_k * dR / S))
//   dW_0 = Lambda + dZ_0^T X,  db_0 = lambda + colsum dZ_0
//   dX = (dG + dG^T) X - (A diag(a)) Lambda + dZ_0 W_0
// The products with D are then X W_0^T, X X^T, A^T X, X Lambda^T, dZ_0^T X and the dX
// sum: about half the work of the weight-space pass, whose gradient call also re-runs
// the inner loop.  The S x S x C products use G's rows as the long vectors (atx).
//
// grad: also the gradients (dX, dXq, dW0, db0 of task weight gq * Q); with a non-null
// defer.coef the two big products (dX and dXq) are left to anil_apply: the task's
// coefficients go to defer instead (AnilDeferred in inner_loop.h).
template <typename T>
T gram_task(const T* X, const int64_t* y, const T* Xq, const int64_t* yq, const T* W0, const T* b0,
            const T* aW, const T* ab, bool grad, T gq, T* dX, T* dXq, T* dW0, T* db0, T* correct,
            const AnilDeferred<T>& defer, int64_t S, int64_t Q, int64_t D, int64_t C, int64_t K,
            bool first_order, GramWork<T>& w) {
  const T inv_s = T(1) / static_cast<T>(S);
  T *Z = w.Z.data(), *A = w.A.data(), *G = w.G.data(), *R = w.R.data(), *tmp = w.tmp.data();
  T* col = w.col.data();
  xwt(X, W0, b0, Z, S, D, C);  // Z_0
  if (K > 0) gram_matrix(X, G, S, D);
  std::fill(A, A + S * C, T(0));
  for (int64_t k = 0; k < K; ++k) {
    T* P = w.Ps.data() + k * S * C;
    std::copy(Z, Z + S * C, P);
    softmax_rows(P, S, C);
    residual(P, y, R, S, C);
    for (int64_t i = 0; i < S * C; ++i) A[i] += R[i];
    if (k + 1 == K) break;
    colsum(R, col, S, C);
    atx(R, G, tmp, S, S, C, T(1), false);  // tmp (C, S) = R^T G = (G R)^T
    for (int64_t s = 0; s < S; ++s)
      for (int64_t c = 0; c < C; ++c) Z[s * C + c] -= aW[c * D] * tmp[c * S + s] + ab[c] * col[c];
  }
  // W_K = W_0 - diag(a) A^T X, b_K = b_0 - ab * colsum(A)
  T *WK = w.WK.data(), *bK = w.bK.data(), *Aa = w.Aa.data();
  for (int64_t s = 0; s < S; ++s)
    for (int64_t c = 0; c < C; ++c) Aa[s * C + c] = A[s * C + c] * aW[c * D];
  std::copy(W0, W0 + C * D, WK);
  if (K > 0) atx(Aa, X, WK, S, D, C, T(-1), true);
  colsum(A, col, S, C);
  for (int64_t c = 0; c < C; ++c) bK[c] = b0[c] - ab[c] * col[c];
  T* Lam = dW0;  // dL/dW_K, then dL/dW_0
  T* lam = db0;
  const bool deferred = defer.coef != nullptr;
  const T loss = query_loss(Xq, yq, WK, bK, w.Zq.data(), w.ZqT.data(), Q, D, C, grad, gq,
                            deferred ? nullptr : dXq, Lam, lam, correct);
  if (!grad) return loss;
  if (deferred) {
    std::copy(WK, WK + C * D, defer.WK);
    std::copy(w.ZqT.data(), w.ZqT.data() + C * Q, defer.dzqT);
    std::copy(Lam, Lam + C * D, defer.lamK);
  }
  if (first_order || K == 0) {  // the inner gradients are constants: nothing reaches X
    if (deferred)
      std::fill(defer.coef, defer.coef + (S + 2 * C) * S, T(0));
    else
      std::fill(dX, dX + S * D, T(0));
    return loss;
  }
  // dA = -X Lambda^T diag(a) - 1 (ab * lambda)^T
  T *dA = w.dA.data(), *dZ = w.dZ.data(), *dR = w.dR.data(), *dG = w.dG.data();
  xwt(X, Lam, static_cast<const T*>(nullptr), dA, S, D, C);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t c = 0; c < C; ++c) dA[s * C + c] = -aW[c * D] * dA[s * C + c] - ab[c] * lam[c];
  std::fill(dZ, dZ + S * C, T(0));
  for (int64_t k = K - 1; k >= 0; --k) {
    const T* P = w.Ps.data() + k * S * C;
    // dG -= dZ diag(a) R_k^T, kept as the K C rank-one terms (DZT, RT) and summed below
    T* dzt = w.DZT.data() + k * C * S;
    T* rt = w.RT.data() + k * C * S;
    residual(P, y, R, S, C);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t c = 0; c < C; ++c) {
        dzt[c * S + s] = dZ[s * C + c] * aW[c * D];
        rt[c * S + s] = R[s * C + c];
      }
    colsum(dZ, col, S, C);
    atx(dZ, G, tmp, S, S, C, T(1), false);  // tmp (C, S) = (G dZ)^T
    for (int64_t s = 0; s < S; ++s) {
      const T* p = P + s * C;
      T* dr = dR + s * C;
      T pd = 0;
      for (int64_t c = 0; c < C; ++c) {
        dr[c] = dA[s * C + c] - aW[c * D] * tmp[c * S + s] - ab[c] * col[c];
        pd += p[c] * dr[c];
      }
      for (int64_t c = 0; c < C; ++c) dZ[s * C + c] += p[c] * (dr[c] - pd) * inv_s;
    }
  }
  // dG = -sum_k dZ_{k+1} diag(a) R_k^T, then symmetrised: dX = (dG + dG^T) X + ...
  atx<T, 6>(w.DZT.data(), w.RT.data(), dG, K * C, S, S, T(-1), false);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t u = s; u < S; ++u) {
      const T v = dG[s * S + u] + dG[u * S + s];
      dG[s * S + u] = v;
      dG[u * S + s] = v;
    }
  // ... + [-(A diag a) | dZ_0] [Lambda; W_0]
  T* BT = deferred ? defer.coef + S * S : w.BT.data();
  for (int64_t s = 0; s < S; ++s)
    for (int64_t c = 0; c < C; ++c) {
      BT[c * S + s] = -Aa[s * C + c];
      BT[(C + c) * S + s] = dZ[s * C + c];
    }
  if (deferred) {
    std::copy(dG, dG + S * S, defer.coef);
  } else {
    atx<T, 6>(dG, X, dX, S, D, S, T(1), false);
    std::copy(Lam, Lam + C * D, w.WW.data());
    std::copy(W0, W0 + C * D, w.WW.data() + C * D);
    atx<T, 6>(BT, w.WW.data(), dX, 2 * C, D, S, T(1), true);
  }
  // dW_0 = Lambda + dZ_0^T X, db_0 = lambda + colsum dZ_0
  atx(dZ, X, Lam, S, D, C, T(1), true);
  colsum(dZ, col, S, C);
  for (int64_t c = 0; c < C; ++c) lam[c] += col[c];
  return loss;
}

}  // namespace

template <typename T>
void anil_loss(const T* X, const int64_t* y, const T* Xq, const int64_t* yq, const T* W0,
               const T* b0, const T* aW, const T* ab, const T* task_weight, T* loss, T* dX, T* dXq,
               T* dW0, T* db0, T* daW, T* dab, T* correct, const InnerLoopArgs& a, int64_t Q,
               bool compute_grad, bool need_dlr, const AnilDeferred<T>& defer, int nthreads) {
  const int64_t S = a.S, D = a.D, C = a.C, K = a.K, CD = C * D;
  const bool gram = !(compute_grad && need_dlr) && rowwise_uniform(aW, C, D);
  if (defer.coef && !(gram && compute_grad))
    throw std::invalid_argument(
        "deferred ANIL gradients need compute_grad, no step-size gradient and a step size constant along D");
  parallel_chunks(a.T, nthreads, [&](int64_t t0, int64_t t1, int) {
    if (gram) {
      GramWork<T> g(S, Q, D, C, K);
      std::vector<T> Lam(CD), lam(C);
      for (int64_t t = t0; t < t1; ++t) {
        const T gq = compute_grad ? task_weight[t] / static_cast<T>(Q) : T(0);
        AnilDeferred<T> d;
        if (defer.coef)
          d = {defer.coef + t * (S + 2 * C) * S, defer.lamK + t * CD, defer.dzqT + t * C * Q, defer.WK + t * CD};
        const bool dx_now = compute_grad && !defer.coef;
        loss[t] = gram_task(X + t * S * D, y + t * S, Xq + t * Q * D, yq + t * Q, W0, b0, aW, ab, compute_grad,
                            gq, dx_now ? dX + t * S * D : nullptr, dx_now ? dXq + t * Q * D : nullptr,
                            compute_grad ? dW0 + t * CD : Lam.data(), compute_grad ? db0 + t * C : lam.data(),
                            correct ? correct + t : nullptr, d, S, Q, D, C, K, a.first_order, g);
      }
      return;
    }
    TaskWork<T> w(S, D, C);
    std::vector<T> Wt((K + 1) * CD), bt((K + 1) * C), Z(Q * C), ZT(C * Q), Lam0(CD), lam0(C);
    for (int64_t t = t0; t < t1; ++t) {
      const T* Xt = X + t * S * D;
      const int64_t* yt = y + t * S;
      forward_task(Xt, yt, W0, b0, aW, ab, Wt.data(), bt.data(), S, D, C, K, w);
      T* Lam = compute_grad ? dW0 + t * CD : Lam0.data();
      T* lam = compute_grad ? db0 + t * C : lam0.data();
      const T gq = compute_grad ? task_weight[t] / static_cast<T>(Q) : T(0);
      loss[t] = query_loss(Xq + t * Q * D, yq + t * Q, Wt.data() + K * CD, bt.data() + K * C, Z.data(),
                           ZT.data(), Q, D, C, compute_grad, gq, compute_grad ? dXq + t * Q * D : nullptr, Lam, lam,
                           correct ? correct + t : nullptr);
      if (compute_grad)
        reverse_task(Xt, yt, aW, ab, Wt.data(), bt.data(), Lam, lam, dX + t * S * D, daW + t * CD,
                     dab + t * C, S, D, C, K, a.first_order, need_dlr, w);
    }
  });
}

template <typename T>
void anil_apply(const T* X, const T* W0, const AnilDeferred<T>& d, T g, T* dX, T* dXq, int64_t T_,
                int64_t S, int64_t Q, int64_t D, int64_t C, int nthreads) {
  const int64_t CD = C * D, NC = (S + 2 * C) * S;
  parallel_chunks(T_, nthreads, [&](int64_t t0, int64_t t1, int) {
    for (int64_t t = t0; t < t1; ++t) {
      const T* coef = d.coef + t * NC;
      T* dx = dX + t * S * D;
      atx<T, 6>(coef, X + t * S * D, dx, S, D, S, g, false);               // (dG + dG^T) X
      atx<T, 6>(coef + S * S, d.lamK + t * CD, dx, C, D, S, g, true);      // - (A diag a) Lambda
      atx<T, 6>(coef + S * S + C * S, W0, dx, C, D, S, g, true);           // + dZ_0 W_0
      atx<T, 6>(d.dzqT + t * C * Q, d.WK + t * CD, dXq + t * Q * D, C, D, Q, g, false);  // dZq W_K
    }
  });
}

template void inner_loop_forward<float>(const float*, const int64_t*, const float*, const float*,
                                        const float*, const float*, float*, float*,
                                        const InnerLoopArgs&, int);
template void inner_loop_forward<double>(const double*, const int64_t*, const double*, const double*,
                                         const double*, const double*, double*, double*,
                                         const InnerLoopArgs&, int);
template void inner_loop_backward<float>(const float*, const int64_t*, const float*, const float*,
                                         const float*, const float*, const float*, const float*,
                                         float*, float*, float*, float*, float*,
                                         const InnerLoopArgs&, int);
template void anil_loss<float>(const float*, const int64_t*, const float*, const int64_t*,
                               const float*, const float*, const float*, const float*, const float*,
                               float*, float*, float*, float*, float*, float*, float*, float*,
                               const InnerLoopArgs&, int64_t, bool, bool, const AnilDeferred<float>&,
                               int);
template void anil_apply<float>(const float*, const float*, const AnilDeferred<float>&, float, float*,
                                float*, int64_t, int64_t, int64_t, int64_t, int64_t, int);
template void anil_apply<double>(const double*, const double*, const AnilDeferred<double>&, double,
                                 double*, double*, int64_t, int64_t, int64_t, int64_t, int64_t, int);
template void anil_loss<double>(const double*, const int64_t*, const double*, const int64_t*,
                                const double*, const double*, const double*, const double*,
                                const double*, double*, double*, double*, double*, double*, double*,
                                double*, double*, const InnerLoopArgs&, int64_t, bool, bool,
                                const AnilDeferred<double>&, int);
template void inner_loop_backward<double>(const double*, const int64_t*, const double*,
                                          const double*, const double*, const double*,
                                          const double*, const double*, double*, double*, double*,
                                          double*, double*, const InnerLoopArgs&, int);

}  // namespace msf
