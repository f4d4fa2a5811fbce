// Batched linear-head inner loop and its closed-form reverse pass; math in inner_loop.h.
//
// A task's support block (S x D) and head (C x D) are small (25 x 640 and 5 x 640 in
// the few-shot benchmarks): every step is three thin matrix products with C tiny and
// D long, done with the classes' accumulators in registers; one thread keeps a task
// in L1/L2 and tasks run in parallel.
#include "cpu/inner_loop.h"

#include <vector>

#include "cpu/simd.h"

namespace msf {
namespace {

// The three small matrix products every step needs, with C (classes) tiny and D
// long.  Classes go in blocks of up to CB so that each block's accumulators stay in
// registers and every row chunk of X is loaded once per block.
constexpr int CB = 8;

// out (R, C) = X (R, D) W (C, D)^T + bias (C, may be null).  Two rows at a time: each
// loaded vector of W feeds two FMAs (NC <= 8 classes x 2 rows = 16 accumulators at most,
// the ymm register file).
template <typename T, int NC>
void xwt_block(const T* X, const T* W, const T* bias, T* out, int64_t R, int64_t D, int64_t C,
               int64_t c0) {
  using Xv = Vec<T>;
  constexpr int RB = NC <= 6 ? 2 : 1;
  int64_t r = 0;
  for (; r + RB <= R; r += RB) {
    typename Xv::V acc[RB][NC];
    for (int i = 0; i < RB; ++i)
      for (int j = 0; j < NC; ++j) acc[i][j] = Xv::splat(0);
    int64_t d = 0;
    for (; d + Xv::W <= D; d += Xv::W) {
      typename Xv::V xv[RB];
      for (int i = 0; i < RB; ++i) xv[i] = Xv::load(X + (r + i) * D + d);
      for (int j = 0; j < NC; ++j) {
        const typename Xv::V wv = Xv::load(W + (c0 + j) * D + d);
        for (int i = 0; i < RB; ++i) acc[i][j] += xv[i] * wv;
      }
    }
    for (int i = 0; i < RB; ++i)
      for (int j = 0; j < NC; ++j) {
        const T* x = X + (r + i) * D;
        T v = Xv::hsum(acc[i][j]);
        for (int64_t e = d; e < D; ++e) v += x[e] * W[(c0 + j) * D + e];
        out[(r + i) * C + c0 + j] = v + (bias ? bias[c0 + j] : T(0));
      }
  }
  for (; r < R; ++r) {
    const T* x = X + r * D;
    typename Xv::V acc[NC];
    for (int j = 0; j < NC; ++j) acc[j] = Xv::splat(0);
    int64_t d = 0;
    for (; d + Xv::W <= D; d += Xv::W) {
      const typename Xv::V xv = Xv::load(x + d);
      for (int j = 0; j < NC; ++j) acc[j] += xv * Xv::load(W + (c0 + j) * D + d);
    }
    for (int j = 0; j < NC; ++j) {
      T v = Xv::hsum(acc[j]);
      for (int64_t e = d; e < D; ++e) v += x[e] * W[(c0 + j) * D + e];
      out[r * C + c0 + j] = v + (bias ? bias[c0 + j] : T(0));
    }
  }
}

// out (C, D) = alpha A (R, C)^T X (R, D), added to out when accumulate.  Two vectors of
// D at a time for small class blocks: each broadcast of A feeds two FMAs.
template <typename T, int NC>
void atx_block(const T* A, const T* X, T* out, int64_t R, int64_t D, int64_t C, int64_t c0, T alpha,
               bool accumulate) {
  using Xv = Vec<T>;
  constexpr int DB = NC <= 6 ? 2 : 1;
  int64_t d = 0;
  for (; d + DB * Xv::W <= D; d += DB * Xv::W) {
    typename Xv::V acc[DB][NC];
    for (int u = 0; u < DB; ++u)
      for (int j = 0; j < NC; ++j) acc[u][j] = Xv::splat(0);
    for (int64_t r = 0; r < R; ++r) {
      typename Xv::V xv[DB];
      for (int u = 0; u < DB; ++u) xv[u] = Xv::load(X + r * D + d + u * Xv::W);
      for (int j = 0; j < NC; ++j) {
        const T a = A[r * C + c0 + j];
        for (int u = 0; u < DB; ++u) acc[u][j] += a * xv[u];
      }
    }
    for (int u = 0; u < DB; ++u)
      for (int j = 0; j < NC; ++j) {
        T* o = out + (c0 + j) * D + d + u * Xv::W;
        Xv::store(o, (accumulate ? Xv::load(o) : Xv::splat(0)) + alpha * acc[u][j]);
      }
  }
  for (; d + Xv::W <= D; d += Xv::W) {
    typename Xv::V acc[NC];
    for (int j = 0; j < NC; ++j) acc[j] = Xv::splat(0);
    for (int64_t r = 0; r < R; ++r) {
      const typename Xv::V xv = Xv::load(X + r * D + d);
      for (int j = 0; j < NC; ++j) acc[j] += A[r * C + c0 + j] * xv;
    }
    for (int j = 0; j < NC; ++j) {
      T* o = out + (c0 + j) * D + d;
      Xv::store(o, (accumulate ? Xv::load(o) : Xv::splat(0)) + alpha * acc[j]);
    }
  }
  for (; d < D; ++d)
    for (int j = 0; j < NC; ++j) {
      T v = 0;
      for (int64_t r = 0; r < R; ++r) v += A[r * C + c0 + j] * X[r * D + d];
      T* o = out + (c0 + j) * D + d;
      *o = (accumulate ? *o : T(0)) + alpha * v;
    }
}

// Run blk<NC>(c0) over the class blocks of C.
template <typename F>
void class_blocks(int64_t C, F&& blk) {
  int64_t c0 = 0;
  for (; c0 + CB <= C; c0 += CB) blk(std::integral_constant<int, CB>{}, c0);
  switch (C - c0) {
    case 1: blk(std::integral_constant<int, 1>{}, c0); break;
    case 2: blk(std::integral_constant<int, 2>{}, c0); break;
    case 3: blk(std::integral_constant<int, 3>{}, c0); break;
    case 4: blk(std::integral_constant<int, 4>{}, c0); break;
    case 5: blk(std::integral_constant<int, 5>{}, c0); break;
    case 6: blk(std::integral_constant<int, 6>{}, c0); break;
    case 7: blk(std::integral_constant<int, 7>{}, c0); break;
    default: break;
  }
}

template <typename T>
void xwt(const T* X, const T* W, const T* bias, T* out, int64_t R, int64_t D, int64_t C) {
  class_blocks(C, [&](auto nc, int64_t c0) { xwt_block<T, decltype(nc)::value>(X, W, bias, out, R, D, C, c0); });
}

template <typename T>
void atx(const T* A, const T* X, T* out, int64_t R, int64_t D, int64_t C, T alpha, bool accumulate) {
  class_blocks(C, [&](auto nc, int64_t c0) {
    atx_block<T, decltype(nc)::value>(A, X, out, R, D, C, c0, alpha, accumulate);
  });
}

// out (R, D) += A (R, C) W (C, D) + B (R, C) V (C, D)   (B, V may be null)
template <typename T>
void aw_add(const T* A, const T* W, const T* B, const T* V, T* out, int64_t R, int64_t D, int64_t C) {
  using Xv = Vec<T>;
  for (int64_t r = 0; r < R; ++r) {
    T* o = out + r * D;
    const T* a = A + r * C;
    const T* bb = B ? B + r * C : nullptr;
    int64_t d = 0;
    for (; d + Xv::W <= D; d += Xv::W) {
      typename Xv::V acc = Xv::load(o + d);
      for (int64_t c = 0; c < C; ++c) {
        acc += a[c] * Xv::load(W + c * D + d);
        if (bb) acc += bb[c] * Xv::load(V + c * D + d);
      }
      Xv::store(o + d, acc);
    }
    for (; d < D; ++d)
      for (int64_t c = 0; c < C; ++c) o[d] += a[c] * W[c * D + d] + (bb ? bb[c] * V[c * D + d] : T(0));
  }
}

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
                    int64_t C, T* P, T* R, T* GW, T* Gb) {
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
  atx(R, X, GW, S, D, C, T(1), false);
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
                  bool first_order, TaskWork<T>& w) {
  const int64_t CD = C * D;
  const T inv_s = T(1) / static_cast<T>(S);
  std::fill(dX, dX + S * D, T(0));
  std::fill(daW, daW + CD, T(0));
  std::fill(dab, dab + C, T(0));
  for (int64_t k = K - 1; k >= 0; --k) {
    const T* W = Wt + k * CD;
    const T* b = bt + k * C;
    probs_and_grad(X, y, W, b, S, D, C, w.P.data(), w.R.data(), w.GW.data(), w.Gb.data());
    for (int64_t i = 0; i < CD; ++i) daW[i] -= Lam[i] * w.GW[i];
    for (int64_t c = 0; c < C; ++c) dab[c] -= lam[c] * w.Gb[c];
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
                   daW + t * CD, dab + t * C, S, D, C, K, a.first_order, w);
    }
  });
}

template <typename T>
void anil_loss(const T* X, const int64_t* y, const T* Xq, const int64_t* yq, const T* W0,
               const T* b0, const T* aW, const T* ab, const T* task_weight, T* loss, T* dX, T* dXq,
               T* dW0, T* db0, T* daW, T* dab, const InnerLoopArgs& a, int64_t Q, bool compute_grad,
               int nthreads) {
  const int64_t S = a.S, D = a.D, C = a.C, K = a.K, CD = C * D;
  parallel_chunks(a.T, nthreads, [&](int64_t t0, int64_t t1, int) {
    TaskWork<T> w(S, D, C);
    std::vector<T> Wt((K + 1) * CD), bt((K + 1) * C), Z(Q * C);
    for (int64_t t = t0; t < t1; ++t) {
      const T* Xt = X + t * S * D;
      const int64_t* yt = y + t * S;
      forward_task(Xt, yt, W0, b0, aW, ab, Wt.data(), bt.data(), S, D, C, K, w);
      const T* WK = Wt.data() + K * CD;
      const T* bK = bt.data() + K * C;
      T* Lam = compute_grad ? dW0 + t * CD : nullptr;
      T* lam = compute_grad ? db0 + t * C : nullptr;
      const T gq = compute_grad ? task_weight[t] / static_cast<T>(Q) : T(0);
      const T* Xqt = Xq + t * Q * D;
      const int64_t* yqt = yq + t * Q;
      xwt(Xqt, WK, bK, Z.data(), Q, D, C);
      T total = 0;
      for (int64_t q = 0; q < Q; ++q) {
        T* z = Z.data() + q * C;
        T m = -std::numeric_limits<T>::infinity();
        for (int64_t c = 0; c < C; ++c) m = z[c] > m ? z[c] : m;
        T sum = 0;
        for (int64_t c = 0; c < C; ++c) sum += std::exp(z[c] - m);
        const T lse = m + std::log(sum);
        total += lse - z[yqt[q]];
        for (int64_t c = 0; c < C; ++c)  // z becomes dL/dz
          z[c] = gq * (std::exp(z[c] - lse) - (c == yqt[q] ? T(1) : T(0)));
      }
      if (compute_grad) {
        T* dxq = dXq + t * Q * D;
        std::fill(dxq, dxq + Q * D, T(0));
        aw_add<T>(Z.data(), WK, nullptr, nullptr, dxq, Q, D, C);  // dXq = dz W_K
        atx(Z.data(), Xqt, Lam, Q, D, C, T(1), false);             // Lambda = dz^T Xq
        for (int64_t c = 0; c < C; ++c) lam[c] = 0;
        for (int64_t q = 0; q < Q; ++q)
          for (int64_t c = 0; c < C; ++c) lam[c] += Z[q * C + c];
      }
      loss[t] = total / static_cast<T>(Q);
      if (compute_grad)
        reverse_task(Xt, yt, aW, ab, Wt.data(), bt.data(), Lam, lam, dX + t * S * D, daW + t * CD,
                     dab + t * C, S, D, C, K, a.first_order, w);
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
                               float*, float*, float*, float*, float*, float*, float*,
                               const InnerLoopArgs&, int64_t, bool, int);
template void anil_loss<double>(const double*, const int64_t*, const double*, const int64_t*,
                                const double*, const double*, const double*, const double*,
                                const double*, double*, double*, double*, double*, double*, double*,
                                double*, const InnerLoopArgs&, int64_t, bool, int);
template void inner_loop_backward<double>(const double*, const int64_t*, const double*,
                                          const double*, const double*, const double*,
                                          const double*, const double*, double*, double*, double*,
                                          double*, double*, const InnerLoopArgs&, int);

}  // namespace msf
