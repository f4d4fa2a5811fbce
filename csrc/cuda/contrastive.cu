// CUDA C++ kernels of the fused contrastive loss (InfoNCE one-sided / symmetric, CLIP),
// the same three passes as the Triton kernels (kernels/contrastive.py), same buffers:
//
//     S = s Q K^T      Q (N, D) queries, K (C, D) = [keys; negatives], keys are columns < N
//     lse_row_i = log sum_j exp S_ij                       (all C columns)
//     lse_col_j = log sum_i exp S_ij                       (j < N, symmetric only)
//     G_ij = g_row_i (exp(S_ij - lse_row_i) - [i = j])
//          + [j < N] g_col_j (exp(S_ij - lse_col_j) - [i = j])      (second term: symmetric)
//     dQ = s G K,  dK = s G^T Q      (the kernels write G K and G^T Q; Python scales)
//
// Forward (fwd_kernel): one block per 64 query rows streams every 64-column tile of K
// once, keeps an online (max, sum) per row and, symmetric, merges each tile's
// per-column (max, sum) over its rows into global running pairs under a per-tile spin
// lock, so row and column LSE come from one pass.  Blocks start at a column tile offset
// by their index, which spreads them over the locks.  S never reaches global memory.
// Backward (grad_kernel): one block per (64 outer rows, a span of D: all of D where its
// accumulators fit the card's shared memory, see grad_span) recomputes S tile by tile:
// outer = queries (dQ, and the block's share of sum G S) or outer = keys (dK for the key
// rows [col0, col1)).  No atomics in the backward: bit-for-bit repeatable.  The forward's column merge order varies with scheduling, so lse_col can
// differ in the last bits between runs.
//
// Tiles, products and limits: cuda/_tiles.cuh.
//
// Status: compiled in CI (-Werror, sm_80 and sm_90); not yet run on a GPU by this
// project at the time of writing (tests/test_contrastive.py (its gpu-marked tests) runs it where a GPU is).
#include "cuda/_tiles.cuh"

namespace msf {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------
// Forward: LSE, positive logit and row loss per query row; symmetric: column (max, sum).
// ---------------------------------------------------------------------------------
template <typename T, bool kSym>
__global__ void __launch_bounds__(kThreads)
    fwd_kernel(const T* __restrict__ Q, const T* __restrict__ K, float* __restrict__ lse,
               float* __restrict__ pos, float* __restrict__ row_loss, float* col_max, float* col_sum,
               int* lock, int N, int C, int D, int64_t ldq, int64_t ldk, float scale) {
  __shared__ ChunkSmem<T> sm;
  __shared__ __align__(32) float S[kTile][kLdS];
  __shared__ float m_row[kTile], l_row[kTile], p_row[kTile];
  __shared__ float c_max[kTile], c_sum[kTile];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  if (threadIdx.x < kTile) {
    m_row[threadIdx.x] = -INFINITY;
    l_row[threadIdx.x] = 0.f;
    p_row[threadIdx.x] = 0.f;
  }
  __syncthreads();
  const int n_tiles = (C + kTile - 1) / kTile;
  // 4 consecutive lanes share a row (forward stats) or a column (column stats)
  const int line = threadIdx.x / 4, part = threadIdx.x % 4;
  for (int t = 0; t < n_tiles; ++t) {
    const int tile = static_cast<int>((t + blockIdx.x) % n_tiles);
    const int64_t c0 = static_cast<int64_t>(tile) * kTile;
    s_tile<T>(S, sm, Q, ldq, r0, N, K, ldk, c0, C, D, scale);
    {  // rows: online max and sum over this tile's valid columns
      const int r = line;
      float mx = -INFINITY, diag = 0.f;
      for (int c = part * 16; c < part * 16 + 16; ++c)
        if (c0 + c < C) {
          mx = fmaxf(mx, S[r][c]);
          if (r0 + r == c0 + c) diag = S[r][c];
        }
      mx = quad_max(mx);
      const float m_old = m_row[r];
      const float m_new = fmaxf(m_old, mx);  // finite: the tile has a valid column
      float sum = 0.f;
      for (int c = part * 16; c < part * 16 + 16; ++c)
        if (c0 + c < C) sum += expf(S[r][c] - m_new);
      sum = quad_sum(sum);
      diag = quad_sum(diag);
      __syncwarp();
      if (part == 0) {
        l_row[r] = l_row[r] * expf(m_old - m_new) + sum;
        m_row[r] = m_new;
        p_row[r] += diag;
      }
    }
    if (kSym && c0 < N) {  // columns: this block's (max, sum) of each key column
      const int c = line;
      float mx = -INFINITY;
      for (int r = part * 16; r < part * 16 + 16; ++r)
        if (r0 + r < N) mx = fmaxf(mx, S[r][c]);
      mx = quad_max(mx);  // finite: row r0 < N is valid
      float sum = 0.f;
      for (int r = part * 16; r < part * 16 + 16; ++r)
        if (r0 + r < N) sum += expf(S[r][c] - mx);
      sum = quad_sum(sum);
      if (part == 0) {
        c_max[c] = mx;
        c_sum[c] = sum;
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        while (atomicCAS(lock + tile, 0, 1) != 0) {
        }
        __threadfence();
      }
      __syncthreads();
      if (threadIdx.x < kTile && c0 + threadIdx.x < N) {
        const int64_t j = c0 + threadIdx.x;
        // through L2 (.cg): what the last lock holder wrote, not a stale L1 line
        const float om = __ldcg(col_max + j), os = __ldcg(col_sum + j);
        const float cm = c_max[threadIdx.x];
        const float nm = fmaxf(om, cm);
        __stcg(col_max + j, nm);
        __stcg(col_sum + j, os * expf(om - nm) + c_sum[threadIdx.x] * expf(cm - nm));
      }
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) atomicExch(lock + tile, 0);
    }
    __syncthreads();  // S is rewritten by the next tile
  }
  if (threadIdx.x < kTile && r0 + threadIdx.x < N) {
    const int64_t i = r0 + threadIdx.x;
    const float m = m_row[threadIdx.x], logl = logf(l_row[threadIdx.x]);
    lse[i] = m + logl;
    pos[i] = p_row[threadIdx.x];
    // (max - positive) + log sum: the row loss without the cancellation of lse - positive
    row_loss[i] = (m - p_row[threadIdx.x]) + logl;
  }
}

// InfoNCE / CLIP: G_ij = g_i (exp(S_ij - lse_i) - [i = j]) + [sym, j < N] g'_j (exp(S_ij - lse'_j) - [i = j])
template <bool kSym>
struct ContrastiveGrad {
  static constexpr int kParts = 1;
  float scale;
  const float *lse, *g_row, *lse_col, *g_col;
  int N;
  __device__ RowData query(int64_t i) const { return RowData{lse[i], g_row[i]}; }
  __device__ RowData key(int64_t j) const {
    return (kSym && j < N) ? RowData{lse_col[j], g_col[j]} : RowData{};
  }
  __device__ float grad(float s, int64_t i, int64_t j, const RowData& q, const RowData& k, float* p) const {
    const float diag = i == j ? 1.f : 0.f;
    float g = q.b * (expf(s - q.a) - diag);
    if (kSym && j < N) g += k.b * (expf(s - k.a) - diag);
    if (p) p[0] += g * s;
    return g;
  }
};


}  // namespace

#ifndef MSF_CPU_EMULATION
void contrastive_fwd(int dtype, const void* Q, const void* K, float* lse, float* pos, float* row_loss,
                     float* col_max, float* col_sum, int* lock, int N, int C, int D, int64_t ldq, int64_t ldk,
                     float scale, bool symmetric, cudaStream_t stream) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned>(cdiv(N, kTile)));
    const T* q = static_cast<const T*>(Q);
    const T* k = static_cast<const T*>(K);
    if (symmetric)
      fwd_kernel<T, true><<<grid, kThreads, 0, stream>>>(q, k, lse, pos, row_loss, col_max, col_sum, lock, N, C, D,
                                                          ldq, ldk, scale);
    else
      fwd_kernel<T, false><<<grid, kThreads, 0, stream>>>(q, k, lse, pos, row_loss, col_max, col_sum, lock, N, C,
                                                           D, ldq, ldk, scale);
    check(cudaGetLastError(), "fwd_kernel launch");
  });
}

void contrastive_bwd(int dtype, bool dk, const void* Q, const void* K, const float* lse, const float* g_row,
                     const float* lse_col, const float* g_col, float* out, float* ds_part, int N, int C, int D,
                     int64_t col0, int64_t col1, int64_t ldq, int64_t ldk, int64_t ldo, float scale,
                     bool symmetric, cudaStream_t stream) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (symmetric)
      launch_grad<T>(dk, Q, K, ContrastiveGrad<true>{scale, lse, g_row, lse_col, g_col, N}, out, ds_part, N, C, D,
                     col0, col1, ldq, ldk, ldo, stream);
    else
      launch_grad<T>(dk, Q, K, ContrastiveGrad<false>{scale, lse, g_row, lse_col, g_col, N}, out, ds_part, N, C, D,
                     col0, col1, ldq, ldk, ldo, stream);
  });
}
#endif  // MSF_CPU_EMULATION

}  // namespace cuda
}  // namespace msf
