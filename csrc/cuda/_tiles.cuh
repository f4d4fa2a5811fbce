// What the CUDA kernels of the contrastive family share (contrastive.cu, labeled.cu,
// siglip.cu): the tile constants and per-dtype traits, the chunk loader and the S-tile
// product, the backward's gradient-tile kernel template (grad_kernel, one per loss policy
// L), small device math, and the host-side launch helpers.
//
//     S tile   = scale * A[a0 .. a0 + 64) B[b0 .. b0 + 64)^T                   (s_tile)
//     backward: out (64 outer rows x a span of D) = G_outer . Inner[:, span]    (grad_kernel)
//
// Products: fp16 / bf16 operands on tensor cores (WMMA 16x16x16, fp32 accumulation);
// fp32 operands on CUDA cores in exact fp32 (no tf32).  Requires sm_80 or newer (bf16
// WMMA, cp.async).  Tiles are zero-filled past the edges, so any N, C, D >= 1 are valid.
// Operands reach shared memory by cp.async (16 bytes a copy where pointer, row stride
// and D allow, else element by element): the S product in a two-stage pipeline over D.
// The two WMMA loops (s_tile, grad_kernel) stay apart: s_tile's second operand is B^T
// (B's rows as a column-major K x N fragment), grad_kernel's is the inner rows as stored
// (row-major), and their accumulators cover 64 x 64 and 64 x 128.
//
// Everything here is in an anonymous namespace: each .cu file (and tests/cuda_emu, which
// includes them all in one host program) gets its own copies of these templates.
#pragma once
#ifndef MSF_CPU_EMULATION  // tests/cuda_emu runs the kernels on host threads
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

// A kernel's dynamic shared memory (sized at launch) as float* name.
#ifdef MSF_CPU_EMULATION
#define MSF_DYNAMIC_SMEM(name) float* name = emu::dynamic_smem
#else
#define MSF_DYNAMIC_SMEM(name)           \
  extern __shared__ __align__(128) float name##_raw[]; \
  float* name = name##_raw
#endif

namespace msf {
namespace cuda {

#ifndef MSF_CPU_EMULATION
void check(cudaError_t err, const char* what);  // _runtime.cu
#endif

namespace {

constexpr int kTile = 64;      // rows and columns of an S tile
constexpr int kThreads = 256;  // 8 warps
constexpr int kLdS = kTile + 4;

template <typename T>
struct Traits;
template <>
struct Traits<float> {
  static constexpr bool kTensorCores = false;
  static constexpr int kChunk = 16;     // features of the S product per pipeline stage
  static constexpr int kOutChunk = 64;  // feature columns of a dQ / dK block
  // elements of padding per shared row: 16 bytes (rows stay 16-byte aligned for the copies);
  // the fp32 products read 16 consecutive rows of 20 floats, 2 lanes to a bank at most
  static constexpr int kPad = 4;
};
template <>
struct Traits<__half> {
  static constexpr bool kTensorCores = true;
  static constexpr int kChunk = 32;
  static constexpr int kOutChunk = 128;
  static constexpr int kPad = 8;  // WMMA: ldm a multiple of 8 elements
};
template <>
struct Traits<__nv_bfloat16> {
  static constexpr bool kTensorCores = true;
  static constexpr int kChunk = 32;
  static constexpr int kOutChunk = 128;
  static constexpr int kPad = 8;  // WMMA: ldm a multiple of 8 elements
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

// Shared memory of one S-tile product: two pipeline stages, each a feature chunk of the
// outer rows (a) and of the inner rows (b).
template <typename T>
struct ChunkSmem {
  static constexpr int kC = Traits<T>::kChunk, kP = Traits<T>::kPad;
  alignas(32) T a[2][kTile][kC + kP];  // WMMA operands need 32-byte aligned tiles
  alignas(32) T b[2][kTile][kC + kP];
};

// 16 bytes from global to shared memory: one 128-bit load (LDG.E.128) and store (STS.128);
// both addresses 16-byte aligned.  (The CPU emulation copies the bytes.)
template <typename T>
__device__ __forceinline__ void copy16(T* dst, const T* src) {
#ifdef MSF_CPU_EMULATION
  std::memcpy(static_cast<void*>(dst), static_cast<const void*>(src), 16);
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

// The same 16 bytes as an asynchronous copy (cp.async.cg, sm_80+: LDGSTS, no registers);
// visible to the block after cp_async_wait<> and a barrier.  (The emulation copies at once.)
template <typename T>
__device__ __forceinline__ void copy16_async(T* dst, const T* src) {
#ifdef MSF_CPU_EMULATION
  std::memcpy(static_cast<void*>(dst), static_cast<const void*>(src), 16);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(src) : "memory");
#endif
}

// Close this thread's group of asynchronous copies; wait until at most N groups are pending.
__device__ __forceinline__ void cp_async_commit() {
#ifndef MSF_CPU_EMULATION
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifndef MSF_CPU_EMULATION
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// 16 zero bytes (+0 in every element type).
template <typename T>
__device__ __forceinline__ void zero16(T* dst) {
#ifdef MSF_CPU_EMULATION
  std::memset(static_cast<void*>(dst), 0, 16);
#else
  *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
#endif
}

// rows [r0, r0 + 64) x features [d0, d0 + W) of X (bound rows < r_end, d < D) into dst,
// zeros outside: the S product's chunks (W = Traits<T>::kChunk) and the backward's
// output-chunk operand (W = Traits<T>::kOutChunk).  kAsync: the 16-byte pieces as
// asynchronous copies (the caller commits and waits before its barrier).
// Where X, its row stride and D are whole 16-byte pieces (d0 is a multiple of W), each
// thread moves 16 bytes at a time (8 fp16 / bf16 or 4 fp32 elements): a piece is then all
// inside or all outside the rows' D.  Otherwise one element at a time (as Triton's kernels,
// pad D to a multiple of 8 / 4 for the wide loads).  The branch is uniform: it depends on
// the kernel's arguments only.
template <int W, bool kAsync, typename T>
__device__ __forceinline__ void load_rows(T (*dst)[W + Traits<T>::kPad], const T* X, int64_t ld, int64_t r0, int64_t r_end,
                                          int d0, int D) {
  constexpr int kVec = static_cast<int>(16 / sizeof(T));
  static_assert(W % kVec == 0 && ((W + Traits<T>::kPad) * sizeof(T)) % 16 == 0,
                "16-byte pieces must tile a shared row");
  if (reinterpret_cast<uintptr_t>(X) % 16 == 0 && ld % kVec == 0 && D % kVec == 0) {
    // not unrolled: the 1-4 pieces per thread, unrolled, had their addresses computed up
    // front, which pushed the kernels at their __launch_bounds__ cap into spills
#pragma unroll 1
    for (int idx = threadIdx.x; idx < kTile * (W / kVec); idx += kThreads) {
      const int r = idx / (W / kVec), k = (idx % (W / kVec)) * kVec;
      const int64_t gr = r0 + r;
      const int gd = d0 + k;
      if (gr < r_end && gd < D) {
        if constexpr (kAsync)
          copy16_async(&dst[r][k], X + gr * ld + gd);
        else
          copy16(&dst[r][k], X + gr * ld + gd);
      } else {
        zero16(&dst[r][k]);
      }
    }
    return;
  }
  for (int idx = threadIdx.x; idx < kTile * W; idx += kThreads) {
    const int r = idx / W, k = idx % W;
    const int64_t gr = r0 + r;
    const int gd = d0 + k;
    dst[r][k] = (gr < r_end && gd < D) ? X[gr * ld + gd] : from_float<T>(0.f);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// acc += a b^T for one thread's 4 x 4 block (the CUDA-core products).
__device__ __forceinline__ void fma_4x4(float (&acc)[4][4], const float (&a)[4], const float (&b)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
}

// Stage st of the S product's chunk c (features [c kChunk, (c + 1) kChunk)), as
// asynchronous copies in one committed group.
template <typename T>
__device__ __forceinline__ void issue_chunk(ChunkSmem<T>& sm, int st, int c, const T* A, int64_t lda, int64_t a0,
                                            int64_t a_end, const T* B, int64_t ldb, int64_t b0, int64_t b_end,
                                            int D) {
  constexpr int kC = Traits<T>::kChunk;
  load_rows<kC, true>(sm.a[st], A, lda, a0, a_end, c * kC, D);
  load_rows<kC, true>(sm.b[st], B, ldb, b0, b_end, c * kC, D);
  cp_async_commit();
}

// The two-stage pipeline over D's chunks: multiply(st) runs on stage st once its copies
// have landed (every thread's: wait, then barrier) while the next chunk's are in flight;
// a stage is refilled only after the barrier that ends the product reading it.  Ends with
// the block synchronised and no copy pending.
template <typename T, typename F>
__device__ __forceinline__ void chunk_pipeline(ChunkSmem<T>& sm, const T* A, int64_t lda, int64_t a0, int64_t a_end,
                                               const T* B, int64_t ldb, int64_t b0, int64_t b_end, int D,
                                               F&& multiply) {
  const int n = (D + Traits<T>::kChunk - 1) / Traits<T>::kChunk;
  issue_chunk(sm, 0, 0, A, lda, a0, a_end, B, ldb, b0, b_end, D);
  for (int c = 0; c < n; ++c) {
    const int st = c & 1;
    if (c + 1 < n) {
      issue_chunk(sm, st ^ 1, c + 1, A, lda, a0, a_end, B, ldb, b0, b_end, D);
      cp_async_wait<1>();  // chunk c has landed; c + 1 may be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    multiply(st);
    __syncthreads();  // stage st is refilled by the next iteration's copies
  }
}

// S[r][c] = scale * A[a0 + r] . B[b0 + c] for the 64 x 64 tile (0 where a row is out of
// range).  All threads take part; S is complete and visible on return.  D streams
// through chunk_pipeline; S may share memory with sm: it is written after the last
// chunk's barrier, no copy pending.
template <typename T>
__device__ void s_tile(float (*S)[kLdS], ChunkSmem<T>& sm, const T* A, int64_t lda, int64_t a0,
                       int64_t a_end, const T* B, int64_t ldb, int64_t b0, int64_t b_end, int D,
                       float scale) {
  constexpr int kC = Traits<T>::kChunk;
  if constexpr (Traits<T>::kTensorCores) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int fr = warp / 2;        // fragment row: rows 16 fr ..
    const int fc = (warp % 2) * 2;  // two fragment columns: cols 16 fc, 16 (fc + 1)
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.f);
    wmma::fill_fragment(acc[1], 0.f);
    chunk_pipeline(sm, A, lda, a0, a_end, B, ldb, b0, b_end, D, [&](int st) {
#pragma unroll
      for (int kk = 0; kk < kC; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, &sm.a[st][16 * fr][kk], kC + Traits<T>::kPad);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          // B^T as a column-major K x N operand is B's rows as stored
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, &sm.b[st][16 * (fc + j)][kk], kC + Traits<T>::kPad);
          wmma::mma_sync(acc[j], fa, fb, acc[j]);
        }
      }
    });
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < acc[j].num_elements; ++e) acc[j].x[e] *= scale;
      wmma::store_matrix_sync(&S[16 * fr][16 * (fc + j)], acc[j], kLdS, wmma::mem_row_major);
    }
    __syncthreads();
  } else {
    // rows ty + 16 i, columns tx + 16 j: a warp reads 2 rows of A (broadcast) and 16
    // consecutive rows of B, writes 16 consecutive columns of S
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    float acc[4][4] = {};
    chunk_pipeline(sm, A, lda, a0, a_end, B, ldb, b0, b_end, D, [&](int st) {
#pragma unroll
      for (int k = 0; k < kC; ++k) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = to_float(sm.a[st][ty + 16 * i][k]);
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = to_float(sm.b[st][tx + 16 * j][k]);
        fma_4x4(acc, a, b);
      }
    });
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) S[ty + 16 * i][tx + 16 * j] = scale * acc[i][j];
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------
// Backward, shared by every loss: out (64 outer rows x a span of D) = G_outer .
// Inner[:, span] over every inner tile, G recomputed from S by the loss's policy L.
// kDK false: outer = queries (rows [r0, N)), inner = keys (C columns), out = dQ / s,
// and the block's partial sums (L::kParts of them: sum G S, and SigLIP's sum G) go to
// part[L::kParts * block].  kDK true: outer = keys [col0, col1), inner = queries (N),
// out row r = key row col0 + r, dK / s.
//
// A block computes each S tile once and applies its G to every output chunk (kOutChunk
// columns) of its span: span = kOutChunk keeps the accumulators in registers (one chunk
// per block, S computed once per chunk of D: ceil(D / kOutChunk) times in all); a wider
// span (grad_span: all of D where it fits) keeps them in dynamic shared memory, fp32,
// kTile x (span + kAccPad), so S is computed once per span, once in all where D fits.
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

constexpr int kAccPad = 4;  // floats of padding per row of the shared accumulators (16 B)

// Output columns one grad_kernel block covers, a multiple of out_chunk: all of D (rounded
// up to whole chunks) where kTile x (span + kAccPad) fp32 accumulators fit budget_bytes
// of dynamic shared memory, else the fewest near-equal pieces that fit; pieces of at most
// ceil(chunks / min_pieces) chunks, so that a grid of few row blocks still has about a
// block for every SM; out_chunk (the register path, no dynamic shared memory) where not
// even two chunks fit or a piece is one chunk.  cap > 0 caps the span (rounded down to
// whole chunks, at least one).
inline int grad_span(int64_t D, int out_chunk, int64_t budget_bytes, int64_t cap, int64_t min_pieces) {
  const int64_t chunks = (D + out_chunk - 1) / out_chunk;
  int64_t fit = (budget_bytes / (kTile * static_cast<int64_t>(sizeof(float))) - kAccPad) / out_chunk;
  if (cap > 0) fit = fit < cap / out_chunk ? fit : cap / out_chunk;
  if (chunks <= 1 || fit < 2) return out_chunk;
  int64_t pieces = (chunks + fit - 1) / fit;
  if (pieces < min_pieces) pieces = min_pieces < chunks ? min_pieces : chunks;
  return static_cast<int>((chunks + pieces - 1) / pieces * out_chunk);
}

// Dynamic shared memory of a grad_kernel launch with this span.
inline int64_t grad_smem_bytes(int span, int out_chunk) {
  return span > out_chunk ? static_cast<int64_t>(kTile) * (span + kAccPad) * static_cast<int64_t>(sizeof(float)) : 0;
}

// METASSL_FAST_CUDA_GRAD_SPAN: a cap on grad_span's span in columns (unset or 0: none;
// e.g. 64 / 128, one output chunk, gives the register path of every earlier version).
inline int64_t grad_span_cap() {
  const char* v = std::getenv("METASSL_FAST_CUDA_GRAD_SPAN");
  if (v == nullptr || *v == '\0') return 0;
  char* end = nullptr;
  const long long cap = std::strtoll(v, &end, 10);
  if (*end != '\0' || cap < 0)
    throw std::invalid_argument(std::string("metassl_fast._C_cuda: METASSL_FAST_CUDA_GRAD_SPAN must be a "
                                            "non-negative integer (columns), got '") + v + "'");
  return cap;
}

// The span a launch of grad_kernel uses for `outer` rows on a card with `optin` bytes of
// shared memory per block (opt-in limit) and `sms` multiprocessors, the kernel holding
// `static_bytes` of static shared memory; METASSL_FAST_CUDA_GRAD_SPAN caps it.  (The
// launcher and the CPU emulation both plan through it.)
inline int grad_launch_span(int64_t D, int out_chunk, int64_t optin, int64_t static_bytes, int64_t sms,
                            int64_t outer) {
  const int64_t row_blocks = (outer + kTile - 1) / kTile;
  return grad_span(D, out_chunk, optin - static_bytes, grad_span_cap(), (sms + row_blocks - 1) / row_blocks);
}

// grad_kernel's static shared memory.  Lifetimes within one inner tile: the S product's
// stages (chunk), then S, then (16-bit types) G from S, then the inner rows of each output
// chunk (inner) against G; the result's staging (stage) after the last tile.  With 16-bit
// operands G has its own buffer, so S shares the union (a barrier separates the G pass
// from the first inner load); fp32 G is S itself, rewritten in place, and lives beside
// the inner rows.
template <typename T, bool k16 = Traits<T>::kTensorCores>
struct GradSmem;
template <typename T>
struct GradSmem<T, true> {
  static constexpr int kOut = Traits<T>::kOutChunk;
  union alignas(32) {
    ChunkSmem<T> chunk;
    float S[kTile][kLdS];
    T inner[kTile][kOut + Traits<T>::kPad];  // the inner rows' features of one output chunk
    float stage[8][16][16];       // per-warp staging of the result
  } u;
  alignas(32) T G[kTile][kTile + Traits<T>::kPad];  // G as the product's operand
  RowData outer[kTile], inner_row[kTile];
  float red[2][kThreads / 32];
  __device__ float (*s())[kLdS] { return u.S; }
};
template <typename T>
struct GradSmem<T, false> {
  static constexpr int kOut = Traits<T>::kOutChunk;
  union alignas(32) {
    ChunkSmem<T> chunk;
    T inner[kTile][kOut + Traits<T>::kPad];
  } u;
  alignas(32) float S[kTile][kLdS];  // S, then G in place
  RowData outer[kTile], inner_row[kTile];
  float red[2][kThreads / 32];
  __device__ float (*s())[kLdS] { return S; }
};

// span: grad_span's, a multiple of kOutChunk; block (x, y) covers output columns
// [y span, min(D, (y + 1) span)); with span > kOutChunk the launch gives it
// grad_smem_bytes(span) of dynamic shared memory.
template <typename T, typename L, bool kDK>
__global__ void __launch_bounds__(kThreads)
    grad_kernel(const T* __restrict__ Q, const T* __restrict__ K, const L loss, float* __restrict__ out,
                float* __restrict__ part, int N, int C, int D, int64_t col0, int64_t col1, int64_t ldq, int64_t ldk,
                int64_t ldo, int span) {
  constexpr int kOut = Traits<T>::kOutChunk;
  __shared__ GradSmem<T> sm;
  MSF_DYNAMIC_SMEM(acc_sm);  // span > kOut: the accumulators, kTile x (span + kAccPad)
  float(*S)[kLdS] = sm.s();
  // outer rows [o0, o_end) of matrix A; inner rows [0, i_end) of matrix B
  const T* A = kDK ? K : Q;
  const T* B = kDK ? Q : K;
  const int64_t lda = kDK ? ldk : ldq, ldb = kDK ? ldq : ldk;
  const int64_t o0 = (kDK ? col0 : 0) + static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t o_end = kDK ? col1 : N;
  const int64_t i_end = kDK ? N : C;
  const int d_base = static_cast<int>(blockIdx.y) * span;
  const bool shared_acc = span > kOut;
  const int ld_acc = span + kAccPad;
  // this block's output chunks (the last span may hold fewer than span / kOut)
  const int rest = (D - d_base + kOut - 1) / kOut;
  const int n_chunks = span / kOut < rest ? span / kOut : rest;
  if (threadIdx.x < kTile) {
    const int64_t o = o0 + threadIdx.x;
    sm.outer[threadIdx.x] = o < o_end ? (kDK ? loss.key(o) : loss.query(o)) : RowData{};
  }
  if (shared_acc)
    for (int idx = threadIdx.x; idx < kTile * ld_acc; idx += kThreads) acc_sm[idx] = 0.f;
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
    s_tile<T>(S, sm.u.chunk, A, lda, o0, o_end, B, ldb, i0, i_end, D, loss.scale);
    // G on the tile: rows = outer, columns = inner
    for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
      const int r = idx / kTile, c = idx % kTile;
      const int64_t o = o0 + r, i = i0 + c;
      float g = 0.f;
      if (o < o_end && i < i_end) {
        float* pp = kDK ? nullptr : p;  // partial sums from the dQ direction only
        g = kDK ? loss.grad(S[r][c], i, o, sm.inner_row[c], sm.outer[r], pp)
                : loss.grad(S[r][c], o, i, sm.outer[r], sm.inner_row[c], pp);
      }
      if constexpr (Traits<T>::kTensorCores)
        sm.G[r][c] = from_float<T>(g);
      else
        S[r][c] = g;  // in place: fp32 G is its own operand
    }
    if constexpr (Traits<T>::kTensorCores) __syncthreads();  // S, which inner overwrites, is read until here
    for (int ch = 0; ch < n_chunks; ++ch) {  // G (this tile) times every output chunk of the span
      const int ca = ch * kOut;               // the chunk's first column in the accumulators
      // the inner rows' features of this output chunk (the S product's stages are free)
      load_rows<kOut, true>(sm.u.inner, B, ldb, i0, i_end, d_base + ca, D);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      if constexpr (Traits<T>::kTensorCores) {
        using namespace nvcuda;
        if (shared_acc) {
#pragma unroll
          for (int j = 0; j < 4; ++j)
            wmma::load_matrix_sync(facc[j], &acc_sm[16 * fr * ld_acc + ca + 16 * (fc0 + j)], ld_acc,
                                   wmma::mem_row_major);
        }
#pragma unroll
        for (int kk = 0; kk < kTile; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
          wmma::load_matrix_sync(fa, &sm.G[16 * fr][kk], kTile + Traits<T>::kPad);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
            wmma::load_matrix_sync(fb, &sm.u.inner[kk][16 * (fc0 + j)], kOut + Traits<T>::kPad);
            wmma::mma_sync(facc[j], fa, fb, facc[j]);
          }
        }
        if (shared_acc) {
#pragma unroll
          for (int j = 0; j < 4; ++j)
            wmma::store_matrix_sync(&acc_sm[16 * fr * ld_acc + ca + 16 * (fc0 + j)], facc[j], ld_acc,
                                    wmma::mem_row_major);
        }
      } else {
        if (shared_acc) {
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = acc_sm[(ty + 16 * i) * ld_acc + ca + tx + 16 * j];
        }
#pragma unroll 8
        for (int k = 0; k < kTile; ++k) {
          float a[4], b[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) a[i] = S[ty + 16 * i][k];
#pragma unroll
          for (int j = 0; j < 4; ++j) b[j] = to_float(sm.u.inner[k][tx + 16 * j]);
          fma_4x4(acc, a, b);
        }
        if (shared_acc) {
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc_sm[(ty + 16 * i) * ld_acc + ca + tx + 16 * j] = acc[i][j];
        }
      }
      __syncthreads();  // the inner rows are rewritten by the next chunk; S and G by the next tile
    }
  }
  // results, bounded by the outer rows and D
  const int64_t out0 = kDK ? col0 : 0;
  if (shared_acc) {  // complete and visible after the loop's last barrier
    const int cols = n_chunks * kOut;
    for (int idx = threadIdx.x; idx < kTile * cols; idx += kThreads) {
      const int r = idx / cols, k = d_base + idx % cols;
      const int64_t row = o0 + r;
      if (row < o_end && k < D) out[(row - out0) * ldo + k] = acc_sm[r * ld_acc + idx % cols];
    }
  } else if constexpr (Traits<T>::kTensorCores) {
    const int lane = threadIdx.x % 32;
    for (int j = 0; j < 4; ++j) {
      nvcuda::wmma::store_matrix_sync(&sm.u.stage[warp][0][0], facc[j], 16, nvcuda::wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int r = 16 * fr + e / 16, k = d_base + 16 * (fc0 + j) + e % 16;
        const int64_t row = o0 + r;
        if (row < o_end && k < D) out[(row - out0) * ldo + k] = sm.u.stage[warp][e / 16][e % 16];
      }
      __syncwarp();
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = o0 + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int k = d_base + tx + 16 * j;
        if (row < o_end && k < D) out[(row - out0) * ldo + k] = acc[i][j];
      }
    }
  }
  if (!kDK) {  // the block's partial sums (first span of D only: the others repeat them)
    for (int q = 0; q < L::kParts; ++q) {
      float v = p[q];
      v = warp_sum(v);
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

// 4 consecutive lanes share a row (or a column) of a tile, 16 of its entries apiece.
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

#ifndef MSF_CPU_EMULATION
int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, typename L, bool kDK>
void launch_grad_as(const T* q, const T* k, const L& loss, float* out, float* part, int N, int C, int D, int64_t col0,
                    int64_t col1, int64_t ldq, int64_t ldk, int64_t ldo, int64_t outer, cudaStream_t stream) {
  constexpr int kOut = Traits<T>::kOutChunk;
  auto* kernel = grad_kernel<T, L, kDK>;
  const char* what = kDK ? "grad_kernel (dK)" : "grad_kernel (dQ)";
  // the dynamic shared memory this card gives a block beside the kernel's static buffers
  cudaFuncAttributes attr;
  check(cudaFuncGetAttributes(&attr, kernel), what);
  int dev = 0, optin = 0, sms = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "shared memory per block");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "multiprocessor count");
  const int64_t budget = static_cast<int64_t>(optin) - static_cast<int64_t>(attr.sharedSizeBytes);
  const int span = grad_launch_span(D, kOut, optin, static_cast<int64_t>(attr.sharedSizeBytes), sms, outer);
  const int64_t smem = grad_smem_bytes(span, kOut);
  // the kernel's limit is set to all the card allows, never to this launch's need: a launch
  // on another host thread with a wider span must not find it lowered
  if (smem > 0)
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(budget)), what);
  const dim3 grid(static_cast<unsigned>(cdiv(outer, kTile)), static_cast<unsigned>(cdiv(D, span)));
  kernel<<<grid, kThreads, static_cast<size_t>(smem), stream>>>(q, k, loss, out, part, N, C, D, col0, col1, ldq, ldk,
                                                                ldo, span);
  check(cudaGetLastError(), what);
}

template <typename T, typename L>
void launch_grad(bool dk, const void* Q, const void* K, const L& loss, float* out, float* part, int N, int C, int D,
                 int64_t col0, int64_t col1, int64_t ldq, int64_t ldk, int64_t ldo, cudaStream_t stream) {
  const int64_t outer = dk ? col1 - col0 : N;
  if (outer <= 0) return;
  const T* q = static_cast<const T*>(Q);
  const T* k = static_cast<const T*>(K);
  if (dk)
    launch_grad_as<T, L, true>(q, k, loss, out, part, N, C, D, col0, col1, ldq, ldk, ldo, outer, stream);
  else
    launch_grad_as<T, L, false>(q, k, loss, out, part, N, C, D, col0, col1, ldq, ldk, ldo, outer, stream);
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
#endif  // MSF_CPU_EMULATION

}  // namespace
}  // namespace cuda
}  // namespace msf
