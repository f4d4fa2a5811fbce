// CUDA C++ kernels of the labelled-row losses (SupCon, NT-Xent, pytorch-metric-learning's
// pairwise NT-Xent, explicit positives), the same passes and buffers as the Triton kernels
// (kernels/labeled.py, whose header gives the math):
//
//     S = s Q K^T; anchor i, label yq_i; column j, label yk_j; with self, column
//     i + self_col0 is the anchor itself and in no set
//     mean-positive: l_i = LSE_valid S_i - mean_pos S_i,  G_ij = g_i (softmax_ij [valid] - [pos] / npos_i)
//     pairwise:      l_i = sum_pos softplus(lse_neg_i - S_ip),
//                    G_ip = -g_i sigmoid(lse_neg_i - S_ip),  G_in = g_i sig_i exp(S_in - lse_neg_i)
//
// Forward (labeled_fwd_kernel): one block per 64 anchors streams the column tiles once
// (pairwise twice: the positives' terms need the finished lse over the negatives) and
// stores per anchor the loss and (stat_a, stat_b).  Backward: grad_kernel
// (cuda/_tiles.cuh) with the LabeledGrad policy.  No atomics: bit-for-bit repeatable.
// Tiles, products and limits: cuda/_tiles.cuh.
#include "cuda/_tiles.cuh"

namespace msf {
namespace cuda {
namespace {

// Labelled rows (SupCon, NT-Xent, pml's pairwise NT-Xent; kernels/labeled.py): per
// anchor i (g, stat_a, stat_b) = (weight, lse or lse over the negatives, npos or the
// positives' sigmoid sum) and its label; per column its label.
template <bool kSelf, bool kPairwise>
struct LabeledGrad {
  static constexpr int kParts = 1;
  float scale;
  const int64_t *yq, *yk;
  const float *g, *stat_a, *stat_b;
  int64_t self_col0;
  __device__ RowData query(int64_t i) const { return RowData{g[i], stat_a[i], stat_b[i], yq[i]}; }
  __device__ RowData key(int64_t j) const { return RowData{0.f, 0.f, 0.f, yk[j]}; }
  __device__ float grad(float s, int64_t i, int64_t j, const RowData& q, const RowData& k, float* p) const {
    const bool valid = !(kSelf && j == i + self_col0);
    const bool same = q.y == k.y;
    const bool pos = valid && same, neg = !same;
    // an anchor whose LSE ran over nothing (stat_a = -inf) has no column that uses this exp
    const float e = expf(q.b == -INFINITY ? 0.f : s - q.b);
    float gv;
    if (kPairwise)
      gv = pos ? -q.a * sigmoidf(q.b - s) : (neg ? q.a * q.c * e : 0.f);
    else
      gv = (valid && q.c > 0.f) ? q.a * e - (pos ? q.a / fmaxf(q.c, 1.f) : 0.f) : 0.f;
    if (p) p[0] += gv * s;
    return gv;
  }
};

// Per anchor: loss, stat_a = lse (pairwise: lse over the negatives), stat_b = npos
// (pairwise: the positives' sigmoid sum); ext: one more logit per row outside S.
template <typename T, bool kSelf, bool kPairwise>
__global__ void __launch_bounds__(kThreads)
    labeled_fwd_kernel(const T* __restrict__ Q, const T* __restrict__ K, const int64_t* __restrict__ yq,
                       const int64_t* __restrict__ yk, const float* __restrict__ ext, bool ext_pos,
                       float* __restrict__ loss, float* __restrict__ stat_a, float* __restrict__ stat_b, int N, int C,
                       int D, int64_t ldq, int64_t ldk, float scale, int64_t self_col0) {
  __shared__ ChunkSmem<T> sm;
  __shared__ __align__(32) float S[kTile][kLdS];
  __shared__ int64_t ycol[kTile];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int r = threadIdx.x / 4, part = threadIdx.x % 4;
  const int64_t i = r0 + r;
  const int64_t y = i < N ? yq[i] : 0;
  float m = -INFINITY, l = 0.f, pos_sum = 0.f, npos = 0.f;
  {
    for (int64_t c0 = 0; c0 < C; c0 += kTile) {
      if (threadIdx.x < kTile) ycol[threadIdx.x] = c0 + threadIdx.x < C ? yk[c0 + threadIdx.x] : 0;
      s_tile<T>(S, sm, Q, ldq, r0, N, K, ldk, c0, C, D, scale);
      float mx = -INFINITY;
      for (int c = part * 16; c < part * 16 + 16; ++c) {
        const int64_t j = c0 + c;
        if (j >= C) continue;
        const bool valid = !(kSelf && j == i + self_col0), same = ycol[c] == y;
        if (valid && same) {
          npos += 1.f;
          if (!kPairwise) pos_sum += S[r][c];
        }
        if (kPairwise ? !same : valid) mx = fmaxf(mx, S[r][c]);
      }
      mx = quad_max(mx);
      const float m_new = fmaxf(m, mx);
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;  // nothing in this row's LSE yet
      float sum = 0.f;
      for (int c = part * 16; c < part * 16 + 16; ++c) {
        const int64_t j = c0 + c;
        if (j >= C) continue;
        const bool valid = !(kSelf && j == i + self_col0), same = ycol[c] == y;
        if (kPairwise ? !same : valid) sum += expf(S[r][c] - m_safe);
      }
      l = l * expf(m - m_safe) + quad_sum(sum);
      m = m_new;
      __syncthreads();
    }
  }
  npos = quad_sum(npos);
  pos_sum = quad_sum(pos_sum);
  const bool has = l > 0.f;  // padded rows, and anchors with nothing in their LSE, have l = 0
  float log_l = has ? logf(l) : -INFINITY;
  if constexpr (kPairwise) {
    const float lse = m + log_l;
    float total = 0.f, sig = 0.f;
    for (int64_t c0 = 0; c0 < C; c0 += kTile) {
      if (threadIdx.x < kTile) ycol[threadIdx.x] = c0 + threadIdx.x < C ? yk[c0 + threadIdx.x] : 0;
      s_tile<T>(S, sm, Q, ldq, r0, N, K, ldk, c0, C, D, scale);
      for (int c = part * 16; c < part * 16 + 16; ++c) {
        const int64_t j = c0 + c;
        if (j >= C || (kSelf && j == i + self_col0) || ycol[c] != y) continue;
        const float t = lse - S[r][c];
        total += softplusf(t);
        sig += sigmoidf(t);
      }
      __syncthreads();
    }
    total = quad_sum(total);
    sig = quad_sum(sig);
    if (part == 0 && i < N) {
      loss[i] = npos > 0.f ? total : 0.f;
      stat_a[i] = lse;
      stat_b[i] = sig;
    }
  } else {
    if (ext != nullptr && i < N) {
      const float e = ext[i];
      const float m_new = fmaxf(m, e);
      l = l * expf(m - m_new) + expf(e - m_new);
      m = m_new;
      if (ext_pos) {
        pos_sum += e;
        npos += 1.f;
      }
      log_l = logf(l);
    }
    if (part == 0 && i < N) {
      const float li = (m - pos_sum / fmaxf(npos, 1.f)) + log_l;
      loss[i] = npos > 0.f ? li : 0.f;
      stat_a[i] = m + log_l;
      stat_b[i] = npos;
    }
  }
}

}  // namespace

#ifndef MSF_CPU_EMULATION
void labeled_fwd(int dtype, const void* Q, const void* K, const int64_t* yq, const int64_t* yk, const float* ext,
                 bool ext_pos, float* loss, float* stat_a, float* stat_b, int N, int C, int D, int64_t ldq,
                 int64_t ldk, float scale, bool self, int64_t self_col0, bool pairwise, cudaStream_t stream) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    by_flags(self, pairwise, [&](auto s, auto pw) {
      labeled_fwd_kernel<T, decltype(s)::value, decltype(pw)::value>
          <<<dim3(static_cast<unsigned>(cdiv(N, kTile))), kThreads, 0, stream>>>(
              static_cast<const T*>(Q), static_cast<const T*>(K), yq, yk, ext, ext_pos, loss, stat_a, stat_b, N, C,
              D, ldq, ldk, scale, self_col0);
    });
    check(cudaGetLastError(), "labeled_fwd_kernel launch");
  });
}

void labeled_bwd(int dtype, bool dk, const void* Q, const void* K, const int64_t* yq, const int64_t* yk,
                 const float* g, const float* stat_a, const float* stat_b, float* out, float* part, int N, int C,
                 int D, int64_t ldq, int64_t ldk, int64_t ldo, float scale, bool self, int64_t self_col0,
                 bool pairwise, cudaStream_t stream) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    by_flags(self, pairwise, [&](auto s, auto pw) {
      const LabeledGrad<decltype(s)::value, decltype(pw)::value> loss{scale, yq, yk, g, stat_a, stat_b, self_col0};
      launch_grad<T>(dk, Q, K, loss, out, part, N, C, D, 0, C, ldq, ldk, ldo, stream);
    });
  });
}
#endif  // MSF_CPU_EMULATION

}  // namespace cuda
}  // namespace msf
