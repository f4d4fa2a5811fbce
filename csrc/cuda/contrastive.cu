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
// Backward (grad_kernel): one block per (64 outer rows, a chunk of D) recomputes S
// tile by tile: outer = queries (dQ, and the block's share of sum G S) or outer = keys
// (dK for the key rows [col0, col1)).  No atomics in the backward: bit-for-bit
// repeatable.  The forward's column merge order varies with scheduling, so lse_col can
// differ in the last bits between runs.
//
// Products: fp16 / bf16 operands on tensor cores (WMMA 16x16x16, fp32 accumulation);
// fp32 operands on CUDA cores in exact fp32 (no tf32).  Requires sm_80 or newer
// (bf16 WMMA).  Every kernel reads only rows < its bound and d < D: tiles are
// zero-filled past the edges, so any N, C, D >= 1 are valid.
//
// Status: compiled in CI (-Werror, sm_80 and sm_90); not yet run on a GPU by this
// project at the time of writing (tests/test_contrastive_gpu.py runs it where a GPU is).
#ifndef MSF_CPU_EMULATION  // tests/cuda_emu runs the kernels on host threads
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace msf {
namespace cuda {

#ifndef MSF_CPU_EMULATION
void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("metassl_fast._C_cuda: ") + what + ": " +
                             cudaGetErrorString(err));
}

int device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    cudaGetLastError();  // clear the sticky error: no device is an answer, not a failure
    return 0;
  }
  check(err, "cudaGetDeviceCount");
  return n;
}

int runtime_version() {
  int v = 0;
  check(cudaRuntimeGetVersion(&v), "cudaRuntimeGetVersion");
  return v;
}
#endif

namespace {

constexpr int kTile = 64;      // rows and columns of an S tile
constexpr int kChunk = 32;     // feature chunk of the S product
constexpr int kThreads = 256;  // 8 warps
constexpr int kPad = 8;        // elements of padding per shared row (16-byte aligned rows)
constexpr int kLdS = kTile + 4;

template <typename T>
struct Traits;
template <>
struct Traits<float> {
  static constexpr bool kTensorCores = false;
  static constexpr int kOutChunk = 64;  // feature columns of a dQ / dK block
};
template <>
struct Traits<__half> {
  static constexpr bool kTensorCores = true;
  static constexpr int kOutChunk = 128;
};
template <>
struct Traits<__nv_bfloat16> {
  static constexpr bool kTensorCores = true;
  static constexpr int kOutChunk = 128;
};

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Shared memory of one S-tile product: a chunk of the outer rows and one of the inner.
template <typename T>
struct ChunkSmem {
  alignas(32) T a[kTile][kChunk + kPad];  // WMMA operands need 32-byte aligned tiles
  alignas(32) T b[kTile][kChunk + kPad];
};

// rows [r0, r0 + 64) x features [d0, d0 + kChunk) of X (bound rows < r_end, d < D)
// into dst, zeros outside.
template <typename T>
__device__ __forceinline__ void load_chunk(T (*dst)[kChunk + kPad], const T* X, int64_t ld, int64_t r0,
                                           int64_t r_end, int d0, int D) {
  for (int idx = threadIdx.x; idx < kTile * kChunk; idx += kThreads) {
    const int r = idx / kChunk, k = idx % kChunk;
    const int64_t gr = r0 + r;
    const int gd = d0 + k;
    dst[r][k] = (gr < r_end && gd < D) ? X[gr * ld + gd] : from_float<T>(0.f);
  }
}

// S[r][c] = scale * A[a0 + r] . B[b0 + c] for the 64 x 64 tile (0 where a row is out of
// range).  All threads take part; S is complete and visible on return.
template <typename T>
__device__ void s_tile(float (*S)[kLdS], ChunkSmem<T>& sm, const T* A, int64_t lda, int64_t a0,
                       int64_t a_end, const T* B, int64_t ldb, int64_t b0, int64_t b_end, int D,
                       float scale) {
  if constexpr (Traits<T>::kTensorCores) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int fr = warp / 2;        // fragment row: rows 16 fr ..
    const int fc = (warp % 2) * 2;  // two fragment columns: cols 16 fc, 16 (fc + 1)
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.f);
    wmma::fill_fragment(acc[1], 0.f);
    for (int d0 = 0; d0 < D; d0 += kChunk) {
      load_chunk(sm.a, A, lda, a0, a_end, d0, D);
      load_chunk(sm.b, B, ldb, b0, b_end, d0, D);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kChunk; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, &sm.a[16 * fr][kk], kChunk + kPad);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          // B^T as a column-major K x N operand is B's rows as stored
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, &sm.b[16 * (fc + j)][kk], kChunk + kPad);
          wmma::mma_sync(acc[j], fa, fb, acc[j]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < acc[j].num_elements; ++e) acc[j].x[e] *= scale;
      wmma::store_matrix_sync(&S[16 * fr][16 * (fc + j)], acc[j], kLdS, wmma::mem_row_major);
    }
    __syncthreads();
  } else {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;  // a 4 x 4 block each
    float acc[4][4] = {};
    for (int d0 = 0; d0 < D; d0 += kChunk) {
      load_chunk(sm.a, A, lda, a0, a_end, d0, D);
      load_chunk(sm.b, B, ldb, b0, b_end, d0, D);
      __syncthreads();
#pragma unroll 8
      for (int k = 0; k < kChunk; ++k) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = to_float(sm.a[ty * 4 + i][k]);
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = to_float(sm.b[tx * 4 + j][k]);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) S[ty * 4 + i][tx * 4 + j] = scale * acc[i][j];
    __syncthreads();
  }
}

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
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_old = m_row[r];
      const float m_new = fmaxf(m_old, mx);  // finite: the tile has a valid column
      float sum = 0.f;
      for (int c = part * 16; c < part * 16 + 16; ++c)
        if (c0 + c < C) sum += expf(S[r][c] - m_new);
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      diag += __shfl_xor_sync(0xffffffffu, diag, 1);
      diag += __shfl_xor_sync(0xffffffffu, diag, 2);
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
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));  // finite: row r0 < N is valid
      float sum = 0.f;
      for (int r = part * 16; r < part * 16 + 16; ++r)
        if (r0 + r < N) sum += expf(S[r][c] - mx);
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
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

// ---------------------------------------------------------------------------------
// Backward, shared by every loss: out (64 outer rows x a chunk of D) = G_outer .
// Inner[:, chunk] over every inner tile, G recomputed from S by the loss's policy L.
// kDK false: outer = queries (rows [r0, N)), inner = keys (C columns), out = dQ / s,
// and the block's partial sums (L::kParts of them: sum G S, and SigLIP's sum G) go to
// part[L::kParts * block].  kDK true: outer = keys [col0, col1), inner = queries (N),
// out row r = key row col0 + r, dK / s.
//
// A policy L holds its pointers and scalars and gives
//   float scale                              the S tile is scale * Q K^T
//   RowData query(i), key(j)                 per-row data of query i < N, key j < C
//   float grad(s, i, j, q, k, p)             G_ij, adding its share to the partials p
// ---------------------------------------------------------------------------------
struct RowData {
  float a = 0.f, b = 0.f, c = 0.f;
  int64_t y = 0;
};

template <typename T>
struct GradSmem {
  static constexpr int kOut = Traits<T>::kOutChunk;
  union alignas(32) {
    ChunkSmem<T> chunk;
    T inner[kTile][kOut + kPad];  // the inner rows' features of this block's chunk
    float stage[8][16][16];       // per-warp staging of the result (tensor-core path)
  } u;
  alignas(32) float S[kTile][kLdS];
  alignas(32) T G[Traits<T>::kTensorCores ? kTile : 1][kTile + kPad];  // G as an operand (16-bit types)
  RowData outer[kTile], inner_row[kTile];
  float red[2][kThreads / 32];
};

template <typename T, typename L, bool kDK>
__global__ void __launch_bounds__(kThreads)
    grad_kernel(const T* __restrict__ Q, const T* __restrict__ K, const L loss, float* __restrict__ out,
                float* __restrict__ part, int N, int C, int D, int64_t col0, int64_t col1, int64_t ldq, int64_t ldk,
                int64_t ldo) {
  constexpr int kOut = Traits<T>::kOutChunk;
  __shared__ GradSmem<T> sm;
  // outer rows [o0, o_end) of matrix A; inner rows [0, i_end) of matrix B
  const T* A = kDK ? K : Q;
  const T* B = kDK ? Q : K;
  const int64_t lda = kDK ? ldk : ldq, ldb = kDK ? ldq : ldk;
  const int64_t o0 = (kDK ? col0 : 0) + static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t o_end = kDK ? col1 : N;
  const int64_t i_end = kDK ? N : C;
  const int d_out0 = blockIdx.y * kOut;
  if (threadIdx.x < kTile) {
    const int64_t o = o0 + threadIdx.x;
    sm.outer[threadIdx.x] = o < o_end ? (kDK ? loss.key(o) : loss.query(o)) : RowData{};
  }
  float p[2] = {0.f, 0.f};
  // accumulators: tensor cores 4 fragments per warp over (64 x 128); CUDA cores 4 x 4 per thread
  const int warp = threadIdx.x / 32;
  const int fr = warp / 2, fc0 = (warp % 2) * 4;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> facc[Traits<T>::kTensorCores ? 4 : 1];
  float acc[4][4] = {};
  if constexpr (Traits<T>::kTensorCores)
    for (int j = 0; j < 4; ++j) nvcuda::wmma::fill_fragment(facc[j], 0.f);
  __syncthreads();
  for (int64_t i0 = 0; i0 < i_end; i0 += kTile) {
    if (threadIdx.x < kTile) {
      const int64_t i = i0 + threadIdx.x;
      sm.inner_row[threadIdx.x] = i < i_end ? (kDK ? loss.query(i) : loss.key(i)) : RowData{};
    }
    s_tile<T>(sm.S, sm.u.chunk, A, lda, o0, o_end, B, ldb, i0, i_end, D, loss.scale);
    // G on the tile: rows = outer, columns = inner
    for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
      const int r = idx / kTile, c = idx % kTile;
      const int64_t o = o0 + r, i = i0 + c;
      float g = 0.f;
      if (o < o_end && i < i_end) {
        float* pp = kDK ? nullptr : p;  // partial sums from the dQ direction only
        g = kDK ? loss.grad(sm.S[r][c], i, o, sm.inner_row[c], sm.outer[r], pp)
                : loss.grad(sm.S[r][c], o, i, sm.outer[r], sm.inner_row[c], pp);
      }
      if constexpr (Traits<T>::kTensorCores)
        sm.G[r][c] = from_float<T>(g);
      else
        sm.S[r][c] = g;  // in place: fp32 G is its own operand
    }
    // the inner rows' features of this block's output chunk (the chunk buffers are free)
    for (int idx = threadIdx.x; idx < kTile * kOut; idx += kThreads) {
      const int r = idx / kOut, k = idx % kOut;
      const int64_t gi = i0 + r;
      const int gd = d_out0 + k;
      sm.u.inner[r][k] = (gi < i_end && gd < D) ? B[gi * ldb + gd] : from_float<T>(0.f);
    }
    __syncthreads();
    if constexpr (Traits<T>::kTensorCores) {
      using namespace nvcuda;
#pragma unroll
      for (int kk = 0; kk < kTile; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, &sm.G[16 * fr][kk], kTile + kPad);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, &sm.u.inner[kk][16 * (fc0 + j)], kOut + kPad);
          wmma::mma_sync(facc[j], fa, fb, facc[j]);
        }
      }
    } else {
#pragma unroll 8
      for (int k = 0; k < kTile; ++k) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = sm.S[ty * 4 + i][k];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = to_float(sm.u.inner[k][tx * 4 + j]);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();  // S, G and the inner rows are rewritten by the next tile
  }
  // results, bounded by the outer rows and D
  const int64_t out0 = kDK ? col0 : 0;
  if constexpr (Traits<T>::kTensorCores) {
    const int lane = threadIdx.x % 32;
    for (int j = 0; j < 4; ++j) {
      nvcuda::wmma::store_matrix_sync(&sm.u.stage[warp][0][0], facc[j], 16, nvcuda::wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int r = 16 * fr + e / 16, k = d_out0 + 16 * (fc0 + j) + e % 16;
        const int64_t row = o0 + r;
        if (row < o_end && k < D) out[(row - out0) * ldo + k] = sm.u.stage[warp][e / 16][e % 16];
      }
      __syncwarp();
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = o0 + ty * 4 + i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int k = d_out0 + tx * 4 + j;
        if (row < o_end && k < D) out[(row - out0) * ldo + k] = acc[i][j];
      }
    }
  }
  if (!kDK) {  // the block's partial sums (first chunk of D only: the others repeat them)
    for (int q = 0; q < L::kParts; ++q) {
      float v = p[q];
      for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (threadIdx.x % 32 == 0) sm.red[q][warp] = v;
    }
    __syncthreads();
    if (threadIdx.x == 0 && blockIdx.y == 0)
      for (int q = 0; q < L::kParts; ++q) {
        float total = 0.f;
        for (int w = 0; w < kThreads / 32; ++w) total += sm.red[q][w];
        part[L::kParts * blockIdx.x + q] = total;
      }
  }
}

__device__ __forceinline__ float sigmoidf(float x) {
  const float e = expf(-fabsf(x));
  return x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

__device__ __forceinline__ float softplusf(float x) { return fmaxf(x, 0.f) + log1pf(expf(-fabsf(x))); }

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

// SigLIP (kernels/family.py): x = scale S_raw + bias, z = +1 at column i + diag_col0, -1
// elsewhere; G = dL/dx = -z w sigmoid(-z x); partials sum G S_raw and sum G.
struct SiglipGrad {
  static constexpr int kParts = 2;
  float scale;  // of the S tile: 1, the raw products
  float logit_scale, bias, w;
  int64_t diag_col0;
  __device__ RowData query(int64_t) const { return RowData{}; }
  __device__ RowData key(int64_t) const { return RowData{}; }
  __device__ float grad(float s, int64_t i, int64_t j, const RowData&, const RowData&, float* p) const {
    const float x = logit_scale * s + bias;
    const float z = j == i + diag_col0 ? 1.f : -1.f;
    const float g = -z * w * sigmoidf(-z * x);
    if (p) {
      p[0] += g * s;
      p[1] += g;
    }
    return g;
  }
};

// Labelled rows (SupCon, NT-Xent, pml's pairwise NT-Xent; kernels/family.py): per
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

// ---------------------------------------------------------------------------------
// Forwards of SigLIP and the labelled rows: 4 consecutive lanes share a query row,
// 16 columns of each tile apiece.
// ---------------------------------------------------------------------------------
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// loss_i = sum_j softplus(-z_ij x_ij)
template <typename T>
__global__ void __launch_bounds__(kThreads)
    siglip_fwd_kernel(const T* __restrict__ Q, const T* __restrict__ K, float* __restrict__ loss, int N, int C, int D,
                      int64_t ldq, int64_t ldk, float logit_scale, float bias, int64_t diag_col0) {
  __shared__ ChunkSmem<T> sm;
  __shared__ __align__(32) float S[kTile][kLdS];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int r = threadIdx.x / 4, part = threadIdx.x % 4;
  float total = 0.f;
  for (int64_t c0 = 0; c0 < C; c0 += kTile) {
    s_tile<T>(S, sm, Q, ldq, r0, N, K, ldk, c0, C, D, 1.f);
    for (int c = part * 16; c < part * 16 + 16; ++c)
      if (c0 + c < C) {
        const float x = logit_scale * S[r][c] + bias;
        const float z = c0 + c == r0 + r + diag_col0 ? 1.f : -1.f;
        total += softplusf(-z * x);
      }
    __syncthreads();
  }
  total = quad_sum(total);
  if (part == 0 && r0 + r < N) loss[r0 + r] = total;
}

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

#ifndef MSF_CPU_EMULATION
int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, typename L>
void launch_grad(bool dk, const void* Q, const void* K, const L& loss, float* out, float* part, int N, int C, int D,
                 int64_t col0, int64_t col1, int64_t ldq, int64_t ldk, int64_t ldo, cudaStream_t stream) {
  const int64_t outer = dk ? col1 - col0 : N;
  if (outer <= 0) return;
  const dim3 grid(static_cast<unsigned>(cdiv(outer, kTile)), static_cast<unsigned>(cdiv(D, Traits<T>::kOutChunk)));
  const T* q = static_cast<const T*>(Q);
  const T* k = static_cast<const T*>(K);
  if (dk)
    grad_kernel<T, L, true><<<grid, kThreads, 0, stream>>>(q, k, loss, out, part, N, C, D, col0, col1, ldq, ldk, ldo);
  else
    grad_kernel<T, L, false><<<grid, kThreads, 0, stream>>>(q, k, loss, out, part, N, C, D, col0, col1, ldq, ldk, ldo);
  check(cudaGetLastError(), dk ? "grad_kernel (dK) launch" : "grad_kernel (dQ) launch");
}

// dtype codes (csrc/cuda/bindings.cpp): 0 float32, 2 float16, 3 bfloat16.
template <typename F>
void by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: f(float{}); break;
    case 2: f(__half{}); break;
    case 3: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument("metassl_fast._C_cuda: dtype code must be 0, 2 or 3");
  }
}

// Run f(std::bool_constant<a>{}, std::bool_constant<b>{}) for runtime flags a, b.
template <typename F>
void by_flags(bool a, bool b, F&& f) {
  if (a && b) f(std::true_type{}, std::true_type{});
  else if (a) f(std::true_type{}, std::false_type{});
  else if (b) f(std::false_type{}, std::true_type{});
  else f(std::false_type{}, std::false_type{});
}

}  // namespace

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

void siglip_fwd(int dtype, const void* Q, const void* K, float* loss, int N, int C, int D, int64_t ldq, int64_t ldk,
                float logit_scale, float bias, int64_t diag_col0, cudaStream_t stream) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    siglip_fwd_kernel<T><<<dim3(static_cast<unsigned>(cdiv(N, kTile))), kThreads, 0, stream>>>(
        static_cast<const T*>(Q), static_cast<const T*>(K), loss, N, C, D, ldq, ldk, logit_scale, bias, diag_col0);
    check(cudaGetLastError(), "siglip_fwd_kernel launch");
  });
}

void siglip_bwd(int dtype, bool dk, const void* Q, const void* K, float* out, float* part, int N, int C, int D,
                int64_t ldq, int64_t ldk, int64_t ldo, float logit_scale, float bias, int64_t diag_col0, float w,
                cudaStream_t stream) {
  by_dtype(dtype, [&](auto tag) {
    launch_grad<decltype(tag)>(dk, Q, K, SiglipGrad{1.f, logit_scale, bias, w, diag_col0}, out, part, N, C, D, 0, C,
                               ldq, ldk, ldo, stream);
  });
}

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
#else
}  // namespace
#endif  // MSF_CPU_EMULATION

}  // namespace cuda
}  // namespace msf
