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

}  // namespace

template <typename T>
void inner_loop_forward(const T* X, const int64_t* y, const T* W0, const T* b0, const T* aW,
                        const T* ab, T* W_traj, T* b_traj, const InnerLoopArgs& a, int nthreads) {
  const int64_t S = a.S, D = a.D, C = a.C, K = a.K, CD = C * D;
  parallel_chunks(a.T, nthreads, [&](int64_t t0, int64_t t1, int) {
    std::vector<T> P(S * C), R(S * C), GW(CD), Gb(C);
    for (int64_t t = t0; t < t1; ++t) {
      const T* Xt = X + t * S * D;
      const int64_t* yt = y + t * S;
      T* Wt = W_traj + t * (K + 1) * CD;
      T* bt = b_traj + t * (K + 1) * C;
      std::copy(W0, W0 + CD, Wt);
      std::copy(b0, b0 + C, bt);
      for (int64_t k = 0; k < K; ++k) {
        const T* W = Wt + k * CD;
        const T* b = bt + k * C;
        probs_and_grad(Xt, yt, W, b, S, D, C, P.data(), R.data(), GW.data(), Gb.data());
        T* Wn = Wt + (k + 1) * CD;
        T* bn = bt + (k + 1) * C;
        for (int64_t i = 0; i < CD; ++i) Wn[i] = W[i] - aW[i] * GW[i];
        for (int64_t c = 0; c < C; ++c) bn[c] = b[c] - ab[c] * Gb[c];
      }
    }
  });
}

template <typename T>
void inner_loop_backward(const T* X, const int64_t* y, const T* aW, const T* ab, const T* W_traj,
                         const T* b_traj, const T* dW_K, const T* db_K, T* dX, T* dW0, T* db0,
                         T* daW, T* dab, const InnerLoopArgs& a, int nthreads) {
  const int64_t S = a.S, D = a.D, C = a.C, K = a.K, CD = C * D;
  const T inv_s = T(1) / static_cast<T>(S);
  parallel_chunks(a.T, nthreads, [&](int64_t t0, int64_t t1, int) {
    std::vector<T> P(S * C), R(S * C), GW(CD), Gb(C), V(CD), v(C), M(S * C);
    for (int64_t t = t0; t < t1; ++t) {
      const T* Xt = X + t * S * D;
      const int64_t* yt = y + t * S;
      T* Lam = dW0 + t * CD;  // Lambda and lambda live in the outputs dW0 / db0
      T* lam = db0 + t * C;
      std::copy(dW_K + t * CD, dW_K + (t + 1) * CD, Lam);
      std::copy(db_K + t * C, db_K + (t + 1) * C, lam);
      T* dXt = dX + t * S * D;
      T* daWt = daW + t * CD;
      T* dabt = dab + t * C;
      std::fill(dXt, dXt + S * D, T(0));
      std::fill(daWt, daWt + CD, T(0));
      std::fill(dabt, dabt + C, T(0));
      for (int64_t k = K - 1; k >= 0; --k) {
        const T* W = W_traj + (t * (K + 1) + k) * CD;
        const T* b = b_traj + (t * (K + 1) + k) * C;
        probs_and_grad(Xt, yt, W, b, S, D, C, P.data(), R.data(), GW.data(), Gb.data());
        for (int64_t i = 0; i < CD; ++i) daWt[i] -= Lam[i] * GW[i];
        for (int64_t c = 0; c < C; ++c) dabt[c] -= lam[c] * Gb[c];
        if (a.first_order) continue;
        for (int64_t i = 0; i < CD; ++i) V[i] = aW[i] * Lam[i];
        for (int64_t c = 0; c < C; ++c) v[c] = ab[c] * lam[c];
        for (int64_t s = 0; s < S; ++s) {
          const T* x = Xt + s * D;
          const T* p = P.data() + s * C;
          T* m = M.data() + s * C;
          T pu = 0;
          for (int64_t c = 0; c < C; ++c) {
            m[c] = dot(x, V.data() + c * D, D) + v[c];  // U
            pu += p[c] * m[c];
          }
          for (int64_t c = 0; c < C; ++c) m[c] = p[c] * (m[c] - pu);
          T* dx = dXt + s * D;
          for (int64_t c = 0; c < C; ++c) {
            axpy(-R[s * C + c], V.data() + c * D, dx, D);
            axpy(-m[c] * inv_s, W + c * D, dx, D);
          }
        }
        for (int64_t s = 0; s < S; ++s)
          for (int64_t c = 0; c < C; ++c) {
            const T mc = M[s * C + c] * inv_s;
            axpy(-mc, Xt + s * D, Lam + c * D, D);
            lam[c] -= mc;
          }
      }
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
template void inner_loop_backward<double>(const double*, const int64_t*, const double*,
                                          const double*, const double*, const double*,
                                          const double*, const double*, double*, double*, double*,
                                          double*, double*, const InnerLoopArgs&, int);

}  // namespace msf
