// CUDA C++ kernel of the batched linear-head inner loop (ANIL / Meta-SGD): one block per
// task, the weight-space recursion and its closed-form reverse pass of
// csrc/cpu/inner_loop.h, float32 throughout:
//   Z = X W_k^T + b_k,  P = softmax(Z),  R = (P - onehot(y)) / S
//   W_{k+1} = W_k - aW * R^T X,  b_{k+1} = b_k - ab * colsum(R)
// reverse from Lambda = dL/dW_K, lambda = dL/db_K, for k = K-1 .. 0:
//   daW -= Lambda * R^T X,  dab -= lambda * colsum(R)                   (need_dlr)
//   U = X (aW * Lambda)^T + ab * lambda,  M = P * (U - rowsum(P * U))
//   dX -= R (aW * Lambda) + M W_k / S;  Lambda -= M^T X / S;  lambda -= colsum(M) / S
// first order: only the daW / dab terms.
//
// Modes: kAnil runs the inner loop, the query cross-entropy and (with grad) the reverse
// pass from the query loss's gradient; kAdaptForward writes the trajectory only;
// kAdaptBackward runs the reverse pass from a given dL/dW_K, dL/db_K over a stored
// trajectory.  The trajectory W_0 .. W_K (K+1 C D per task) lives in global memory (the
// caller's buffer); the small S x C, Q x C blocks in shared memory.  Products over D:
// a warp per (row, class) pair with the lanes along D (rows_dot), or a thread per
// element of the C x D / S x D result.  Correctness first: no tensor cores, no tiling
// of D; the CPU emulation (tests/cuda_emu) checks it against the autograd loop.
#ifndef MSF_CPU_EMULATION
#include <cuda_runtime.h>
#endif

#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "cuda/_tiles.cuh"  // warp_sum, MSF_DYNAMIC_SMEM

namespace msf {
namespace cuda {

enum InnerMode : int { kAnil = 0, kAdaptForward = 1, kAdaptBackward = 2 };

namespace {

constexpr int kInnerThreads = 256;

// out (R, C) = A (R, D) (W1 * W2)^T (C, D) + bias (C), W2 and bias may be null: a warp
// per (row, class) pair, lanes along D.  Ends with the block synchronised.
__device__ void rows_dot(const float* A, int R, const float* W1, const float* W2, const float* bias, int C, int D,
                         float* out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = kInnerThreads / 32;
  for (int p = warp; p < R * C; p += n_warps) {
    const int r = p / C, c = p % C;
    const float* a = A + static_cast<int64_t>(r) * D;
    const float* w1 = W1 + static_cast<int64_t>(c) * D;
    const float* w2 = W2 ? W2 + static_cast<int64_t>(c) * D : nullptr;
    float acc = 0.f;
    for (int d = lane; d < D; d += 32) acc += a[d] * (w2 ? w1[d] * w2[d] : w1[d]);
    acc = warp_sum(acc);
    if (lane == 0) out[p] = acc + (bias ? bias[c] : 0.f);
  }
  __syncthreads();
}

// P = softmax(Z) row-wise in place, R = (P - onehot(y)) / S, colsum(R) into gb (C).
__device__ void probs(float* P, float* R, float* gb, const int64_t* y, int S, int C) {
  for (int s = threadIdx.x; s < S; s += kInnerThreads) {
    float* z = P + s * C;
    float m = -INFINITY;
    for (int c = 0; c < C; ++c) m = fmaxf(m, z[c]);
    float sum = 0.f;
    for (int c = 0; c < C; ++c) sum += (z[c] = expf(z[c] - m));
    for (int c = 0; c < C; ++c) {
      z[c] /= sum;
      R[s * C + c] = (z[c] - (y[s] == c ? 1.f : 0.f)) / static_cast<float>(S);
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += kInnerThreads) {
    float g = 0.f;
    for (int s = 0; s < S; ++s) g += R[s * C + c];
    gb[c] = g;
  }
  __syncthreads();
}

// (A^T X)[c][d] = sum_r A[r][c] X[r][d] for one element
__device__ __forceinline__ float atx_at(const float* A, const float* X, int R, int C, int D, int c, int d) {
  float g = 0.f;
  for (int r = 0; r < R; ++r) g += A[r * C + c] * X[static_cast<int64_t>(r) * D + d];
  return g;
}

// Shared memory of one task: P, R, M (S x C), Zq (Q x C), gb, lam, v (C), ql, qh (Q).
__host__ __device__ inline int64_t inner_smem_floats(int S, int Q, int C) {
  return static_cast<int64_t>(3 * S + Q) * C + 3 * C + 2 * Q;
}

__global__ void __launch_bounds__(kInnerThreads)
    inner_loop_kernel(int mode, const float* __restrict__ X, const int64_t* __restrict__ y,
                      const float* __restrict__ Xq, const int64_t* __restrict__ yq, const float* __restrict__ W0,
                      const float* __restrict__ b0, const float* __restrict__ aW, const float* __restrict__ ab,
                      const float* __restrict__ task_weight, const float* __restrict__ dWK,
                      const float* __restrict__ dbK, float* __restrict__ loss, float* __restrict__ correct,
                      float* __restrict__ dX,
                      float* __restrict__ dXq, float* __restrict__ dW0, float* __restrict__ db0,
                      float* __restrict__ daW, float* __restrict__ dab, float* __restrict__ W_traj,
                      float* __restrict__ b_traj, int S, int Q, int D, int C, int K, bool grad, bool first_order,
                      bool need_dlr) {
  MSF_DYNAMIC_SMEM(sm);
  float* P = sm;
  float* R = P + S * C;
  float* M = R + S * C;
  float* Zq = M + S * C;
  float* gb = Zq + Q * C;
  float* lam = gb + C;
  float* v = lam + C;
  float* ql = v + C;
  float* qh = ql + Q;  // 1 where query q's first largest logit is its label
  const int64_t t = blockIdx.x, CD = static_cast<int64_t>(C) * D;
  const float* Xt = X + t * S * D;
  const int64_t* yt = y + t * S;
  float* Wt = W_traj + t * (K + 1) * CD;
  float* bt = b_traj + t * (K + 1) * C;
  const float inv_s = 1.f / static_cast<float>(S);

  if (mode != kAdaptBackward) {  // forward: W_0 .. W_K
    for (int64_t i = threadIdx.x; i < CD; i += kInnerThreads) Wt[i] = W0[i];
    for (int c = threadIdx.x; c < C; c += kInnerThreads) bt[c] = b0[c];
    __syncthreads();
    for (int k = 0; k < K; ++k) {
      const float* W = Wt + k * CD;
      const float* b = bt + k * C;
      rows_dot(Xt, S, W, nullptr, b, C, D, P);
      probs(P, R, gb, yt, S, C);
      float* Wn = Wt + (k + 1) * CD;
      for (int64_t i = threadIdx.x; i < CD; i += kInnerThreads) {
        const int c = static_cast<int>(i / D), d = static_cast<int>(i % D);
        Wn[i] = W[i] - aW[i] * atx_at(R, Xt, S, C, D, c, d);
      }
      for (int c = threadIdx.x; c < C; c += kInnerThreads) bt[(k + 1) * C + c] = b[c] - ab[c] * gb[c];
      __syncthreads();
    }
  }
  if (mode == kAdaptForward) return;

  float* Lam = nullptr;  // dL/dW_K, then dL/dW_0 (the dW0 output; null without a gradient)
  if (mode == kAnil) {
    const float* WK = Wt + K * CD;
    const float* bK = bt + K * C;
    const float* Xqt = Xq + t * Q * D;
    const int64_t* yqt = yq + t * Q;
    rows_dot(Xqt, Q, WK, nullptr, bK, C, D, Zq);
    const float gq = grad ? task_weight[t] / static_cast<float>(Q) : 0.f;
    for (int q = threadIdx.x; q < Q; q += kInnerThreads) {
      float* z = Zq + q * C;
      float m = -INFINITY;
      int arg = 0;
      for (int c = 0; c < C; ++c)
        if (z[c] > m) m = z[c], arg = c;
      float sum = 0.f;
      for (int c = 0; c < C; ++c) sum += expf(z[c] - m);
      const float lse = m + logf(sum);
      const int64_t label = yqt[q];  // checked by the caller; out of range: NaN, never a stray read
      ql[q] = lse - ((label >= 0 && label < C) ? z[label] : NAN);
      qh[q] = arg == label ? 1.f : 0.f;
      if (grad)
        for (int c = 0; c < C; ++c) z[c] = gq * (expf(z[c] - lse) - (yqt[q] == c ? 1.f : 0.f));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.f, hits = 0.f;
      for (int q = 0; q < Q; ++q) total += ql[q], hits += qh[q];
      loss[t] = total / static_cast<float>(Q);
      if (correct) correct[t] = hits;
    }
    if (!grad) return;
    Lam = dW0 + t * CD;
    float* dxq = dXq + t * Q * D;
    for (int64_t i = threadIdx.x; i < static_cast<int64_t>(Q) * D; i += kInnerThreads) {
      const int q = static_cast<int>(i / D), d = static_cast<int>(i % D);
      float acc = 0.f;
      for (int c = 0; c < C; ++c) acc += Zq[q * C + c] * WK[static_cast<int64_t>(c) * D + d];
      dxq[i] = acc;
    }
    for (int64_t i = threadIdx.x; i < CD; i += kInnerThreads) {
      const int c = static_cast<int>(i / D), d = static_cast<int>(i % D);
      Lam[i] = atx_at(Zq, Xqt, Q, C, D, c, d);
    }
    for (int c = threadIdx.x; c < C; c += kInnerThreads) {
      float g = 0.f;
      for (int q = 0; q < Q; ++q) g += Zq[q * C + c];
      lam[c] = g;
    }
  } else {  // kAdaptBackward: the upstream gradient of W_K, b_K
    Lam = dW0 + t * CD;
    for (int64_t i = threadIdx.x; i < CD; i += kInnerThreads) Lam[i] = dWK[t * CD + i];
    for (int c = threadIdx.x; c < C; c += kInnerThreads) lam[c] = dbK[t * C + c];
  }
  float* dxt = dX + t * S * D;
  float* daWt = daW + t * CD;
  float* dabt = dab + t * C;
  for (int64_t i = threadIdx.x; i < static_cast<int64_t>(S) * D; i += kInnerThreads) dxt[i] = 0.f;
  if (need_dlr) {
    for (int64_t i = threadIdx.x; i < CD; i += kInnerThreads) daWt[i] = 0.f;
    for (int c = threadIdx.x; c < C; c += kInnerThreads) dabt[c] = 0.f;
  }
  __syncthreads();
  for (int k = K - 1; k >= 0 && (need_dlr || !first_order); --k) {
    const float* W = Wt + k * CD;
    const float* b = bt + k * C;
    rows_dot(Xt, S, W, nullptr, b, C, D, P);
    probs(P, R, gb, yt, S, C);
    if (need_dlr) {
      for (int64_t i = threadIdx.x; i < CD; i += kInnerThreads) {
        const int c = static_cast<int>(i / D), d = static_cast<int>(i % D);
        daWt[i] -= Lam[i] * atx_at(R, Xt, S, C, D, c, d);
      }
      for (int c = threadIdx.x; c < C; c += kInnerThreads) dabt[c] -= lam[c] * gb[c];
    }
    if (first_order) {
      __syncthreads();
      continue;
    }
    for (int c = threadIdx.x; c < C; c += kInnerThreads) v[c] = ab[c] * lam[c];
    __syncthreads();
    rows_dot(Xt, S, aW, Lam, v, C, D, M);  // U = X (aW * Lambda)^T + ab * lambda
    for (int s = threadIdx.x; s < S; s += kInnerThreads) {
      const float* p = P + s * C;
      float* m = M + s * C;
      float pu = 0.f;
      for (int c = 0; c < C; ++c) pu += p[c] * m[c];
      for (int c = 0; c < C; ++c) m[c] = p[c] * (m[c] - pu);
    }
    __syncthreads();
    // dX -= R (aW * Lambda) + M W_k / S  (Lambda before this step's update)
    for (int64_t i = threadIdx.x; i < static_cast<int64_t>(S) * D; i += kInnerThreads) {
      const int s = static_cast<int>(i / D), d = static_cast<int>(i % D);
      float acc = 0.f;
      for (int c = 0; c < C; ++c) {
        const int64_t cd = static_cast<int64_t>(c) * D + d;
        acc += R[s * C + c] * aW[cd] * Lam[cd] + M[s * C + c] * W[cd] * inv_s;
      }
      dxt[i] -= acc;
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < CD; i += kInnerThreads) {
      const int c = static_cast<int>(i / D), d = static_cast<int>(i % D);
      Lam[i] -= atx_at(M, Xt, S, C, D, c, d) * inv_s;
    }
    for (int c = threadIdx.x; c < C; c += kInnerThreads) {
      float g = 0.f;
      for (int s = 0; s < S; ++s) g += M[s * C + c];
      lam[c] -= g * inv_s;
    }
    __syncthreads();
  }
  for (int c = threadIdx.x; c < C; c += kInnerThreads) db0[t * C + c] = lam[c];
}

}  // namespace

#ifndef MSF_CPU_EMULATION
int64_t inner_loop_smem_bytes(int S, int Q, int C) { return inner_smem_floats(S, Q, C) * 4; }

void inner_loop(int mode, const float* X, const int64_t* y, const float* Xq, const int64_t* yq, const float* W0,
                const float* b0, const float* aW, const float* ab, const float* task_weight, const float* dWK,
                const float* dbK, float* loss, float* correct, float* dX, float* dXq, float* dW0, float* db0,
                float* daW, float* dab, float* W_traj, float* b_traj, int T, int S, int Q, int D, int C, int K,
                bool grad, bool first_order, bool need_dlr, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(inner_smem_floats(S, Q, C)) * sizeof(float);
  inner_loop_kernel<<<dim3(static_cast<unsigned>(T)), kInnerThreads, smem, stream>>>(
      mode, X, y, Xq, yq, W0, b0, aW, ab, task_weight, dWK, dbK, loss, correct, dX, dXq, dW0, db0, daW, dab, W_traj,
      b_traj, S,
      Q, D, C, K, grad, first_order, need_dlr);
  check(cudaGetLastError(), "inner_loop_kernel launch");
}
#endif

}  // namespace cuda
}  // namespace msf
