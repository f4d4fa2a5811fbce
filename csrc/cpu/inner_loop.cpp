// Batched linear-head inner loop and its closed-form reverse pass; math in inner_loop.h.
//
// A task's support block (S x D) and head (C x D) are small (25 x 640 and 5 x 640 in
// the few-shot benchmarks): everything is dot products and axpys over contiguous
// rows of length D, so one thread keeps a task in L1/L2 and tasks run in parallel.
#include "cpu/inner_loop.h"

#include <vector>

#include "cpu/simd.h"

namespace msf {
namespace {

// P = softmax(X W^T + b) row-wise, R = (P - onehot(y)) / S, G_W = R^T X, G_b = colsum(R).
template <typename T>
void probs_and_grad(const T* X, const int64_t* y, const T* W, const T* b, int64_t S, int64_t D,
                    int64_t C, T* P, T* R, T* GW, T* Gb) {
  const T inv_s = T(1) / static_cast<T>(S);
  for (int64_t c = 0; c < C * D; ++c) GW[c] = 0;
  for (int64_t c = 0; c < C; ++c) Gb[c] = 0;
  for (int64_t s = 0; s < S; ++s) {
    const T* x = X + s * D;
    T* p = P + s * C;
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < C; ++c) {
      p[c] = dot(x, W + c * D, D) + b[c];
      m = p[c] > m ? p[c] : m;
    }
    T sum = 0;
    for (int64_t c = 0; c < C; ++c) sum += (p[c] = std::exp(p[c] - m));
    for (int64_t c = 0; c < C; ++c) {
      p[c] /= sum;
      T r = (p[c] - (y[s] == c ? T(1) : T(0))) * inv_s;
      R[s * C + c] = r;
      axpy(r, x, GW + c * D, D);
      Gb[c] += r;
    }
  }
}

// Scratch of one task, reused across the tasks of a thread.
template <typename T>
struct TaskWork {
  std::vector<T> P, R, GW, Gb, V, v, M;
  TaskWork(int64_t S, int64_t D, int64_t C)
      : P(S * C), R(S * C), GW(C * D), Gb(C), V(C * D), v(C), M(S * C) {}
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
    for (int64_t s = 0; s < S; ++s) {
      const T* x = X + s * D;
      const T* p = w.P.data() + s * C;
      T* m = w.M.data() + s * C;
      T pu = 0;
      for (int64_t c = 0; c < C; ++c) {
        m[c] = dot(x, w.V.data() + c * D, D) + w.v[c];  // U
        pu += p[c] * m[c];
      }
      for (int64_t c = 0; c < C; ++c) m[c] = p[c] * (m[c] - pu);
      T* dx = dX + s * D;
      for (int64_t c = 0; c < C; ++c) {
        axpy(-w.R[s * C + c], w.V.data() + c * D, dx, D);
        axpy(-m[c] * inv_s, W + c * D, dx, D);
      }
    }
    for (int64_t s = 0; s < S; ++s)
      for (int64_t c = 0; c < C; ++c) {
        const T mc = w.M[s * C + c] * inv_s;
        axpy(-mc, X + s * D, Lam + c * D, D);
        lam[c] -= mc;
      }
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
    std::vector<T> Wt((K + 1) * CD), bt((K + 1) * C), z(C);
    for (int64_t t = t0; t < t1; ++t) {
      const T* Xt = X + t * S * D;
      const int64_t* yt = y + t * S;
      forward_task(Xt, yt, W0, b0, aW, ab, Wt.data(), bt.data(), S, D, C, K, w);
      const T* WK = Wt.data() + K * CD;
      const T* bK = bt.data() + K * C;
      T* Lam = compute_grad ? dW0 + t * CD : nullptr;
      T* lam = compute_grad ? db0 + t * C : nullptr;
      if (compute_grad) {
        std::fill(Lam, Lam + CD, T(0));
        std::fill(lam, lam + C, T(0));
      }
      const T gq = compute_grad ? task_weight[t] / static_cast<T>(Q) : T(0);
      T total = 0;
      for (int64_t q = 0; q < Q; ++q) {
        const T* xq = Xq + (t * Q + q) * D;
        const int64_t label = yq[t * Q + q];
        T m = -std::numeric_limits<T>::infinity();
        for (int64_t c = 0; c < C; ++c) {
          z[c] = dot(xq, WK + c * D, D) + bK[c];
          m = z[c] > m ? z[c] : m;
        }
        T sum = 0;
        for (int64_t c = 0; c < C; ++c) sum += std::exp(z[c] - m);
        const T lse = m + std::log(sum);
        total += lse - z[label];
        if (!compute_grad) continue;
        T* dxq = dXq + (t * Q + q) * D;
        std::fill(dxq, dxq + D, T(0));
        for (int64_t c = 0; c < C; ++c) {
          const T dl = gq * (std::exp(z[c] - lse) - (c == label ? T(1) : T(0)));
          axpy(dl, WK + c * D, dxq, D);
          axpy(dl, xq, Lam + c * D, D);
          lam[c] += dl;
        }
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
