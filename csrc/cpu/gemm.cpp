// The row sweep's register-blocked products (what and why: cpu/gemm.h).
#include "cpu/gemm.h"

#include <algorithm>
#include <vector>

#include "cpu/simd.h"

namespace msf {
namespace gemm {
namespace {

// MR x NR accumulators in registers, plus two vectors of B and one broadcast of A: 27 of
// the 32 AVX-512 registers (MR = 12), 15 of the 16 AVX2 ones (MR = 6).
template <typename T>
struct Tile {
  static constexpr int W = Vec<T>::W;
  static constexpr int NR = 2 * W;
  static constexpr int MR = MSF_VEC_BYTES == 64 ? 12 : 6;
};

// K is taken kKc steps at a time: a chunk of B's rows (kKc x N) stays in L2 while every
// row group of A passes over it.
constexpr int64_t kKc = 256;
// gemm_nn / gemm_tn: a panel's chunk of B (kKcStored x NR) is what stays in L1.
constexpr int64_t kKcStored = 128;
// Row stride of gemm_nn's copy of a row group (kKcStored + one cache line): not a power of
// two, so the MR rows land in different L1 sets.
constexpr int64_t kRowPad = kKcStored + 16;
// Row groups packed and swept together (their copies, kGroupBlock x MR x kRowPad elements,
// 55 KB in float: in L2, and under glibc's mmap threshold, so no fresh pages per call).
constexpr int64_t kGroupBlock = 8;

// c (rows x cols of an MR x NR tile, row stride ldc) = alpha sum_k a_r[k] b[k b_ks + j]
// (+ c when add), where a_r[k] is a[k a_ks + r] (MR-interleaved A: a_rs = 0) or
// a[r a_rs + k] (A's rows read in place: a_ks = 1, a_rs = A's row stride).  a and b hold
// MR and NR readable elements per step whatever rows and cols are (zero-filled copies at
// the edges); only the tile's rows x cols are written.
template <typename T>
inline void micro(int64_t kc, const T* a, int64_t a_ks, int64_t a_rs, const T* b, int64_t b_ks, T* c, int64_t ldc,
                  int rows, int cols, T alpha, bool add) {
  using X = Vec<T>;
  using V = typename X::V;
  constexpr int W = Tile<T>::W, MR = Tile<T>::MR, NR = Tile<T>::NR;
  V acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = X::splat(0);
  if (a_rs == 0) {
    for (int64_t k = 0; k < kc; ++k) {
      const V b0 = X::load(b), b1 = X::load(b + W);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const V av = X::splat(a[r]);
        acc[r][0] += av * b0;
        acc[r][1] += av * b1;
      }
      a += a_ks;
      b += b_ks;
    }
  } else {
    const T* ar[MR];
    for (int r = 0; r < MR; ++r) ar[r] = a + r * a_rs;
    for (int64_t k = 0; k < kc; ++k) {
      const V b0 = X::load(b), b1 = X::load(b + W);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const V av = X::splat(ar[r][k]);
        acc[r][0] += av * b0;
        acc[r][1] += av * b1;
      }
      b += b_ks;
    }
  }
  if (rows == MR && cols == NR) {
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < 2; ++v) {
        T* p = c + r * ldc + v * W;
        V o = acc[r][v] * alpha;
        if (add) o += X::load(p);
        X::store(p, o);
      }
    return;
  }
  T t[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 2; ++v) X::store(&t[r][v * W], acc[r][v]);
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < cols; ++j) {
      T* p = c + r * ldc + j;
      *p = add ? *p + alpha * t[r][j] : alpha * t[r][j];  // never 0 * (what C held)
    }
}

// dst[k WIDTH + r] = src[r ld + k] for r < rows, k < kc; zero for rows <= r < WIDTH: rows
// of src interleaved step by step (A's row groups for gemm_nt, MR wide; B's column panels
// for gemm_pack, NR wide).
template <int WIDTH, typename T>
void interleave(const T* src, int64_t ld, int rows, int64_t kc, T* dst) {
  for (int r = 0; r < WIDTH; ++r) {
    if (r < rows) {
      const T* row = src + r * ld;
      for (int64_t k = 0; k < kc; ++k) dst[k * WIDTH + r] = row[k];
    } else {
      for (int64_t k = 0; k < kc; ++k) dst[k * WIDTH + r] = T(0);
    }
  }
}

// dst[k WIDTH + j] = src[k ld + j] for j < n, zero for n <= j < WIDTH, k < kc: the
// MR-wide columns of A that are A^T's rows (gemm_tn), or the last, partial column panel of
// B (so the micro-kernel reads NR elements per step inside the copy).
template <int WIDTH, typename T>
void copy_padded(const T* src, int64_t ld, int n, int64_t kc, T* dst) {
  for (int64_t k = 0; k < kc; ++k, src += ld, dst += WIDTH) {
    if (n == WIDTH) {
      std::copy_n(src, WIDTH, dst);  // a constant count: a few vector moves
    } else {
      for (int j = 0; j < n; ++j) dst[j] = src[j];
      for (int j = n; j < WIDTH; ++j) dst[j] = T(0);
    }
  }
}

// Where the micro-kernel reads a row group's chunk of op(A): a[k a_ks + r] or a[r a_rs + k].
template <typename T>
struct GroupA {
  const T* a;
  int64_t ks, rs;
};

// C (M x N) (+)= alpha op(A) B, with group(g, rows, k0, kc, scratch) saying where row group
// g's chunk of op(A) is (in place, or copied into scratch: kRowPad x MR), and B (K x N, row
// stride ldb) read as stored: the row groups are split across threads, each thread going
// over K in chunks.
template <typename T, typename Group>
void product_b_as_stored(const T* B, int64_t ldb, T* C, int64_t ldc, int64_t M, int64_t N, int64_t K, T alpha,
                         bool accumulate, int nthreads, Group&& group) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR;
  const int64_t groups = (M + MR - 1) / MR;
  const int64_t full = N / NR;  // panels read in place
  const int edge = static_cast<int>(N - full * NR);
  parallel_chunks(groups, nthreads, [&](int64_t g0, int64_t g1, int) {
    std::vector<T> scratch(static_cast<size_t>(kGroupBlock * kRowPad * MR));
    GroupA<T> ga[kGroupBlock];
    std::vector<T> be(edge ? static_cast<size_t>(kKcStored * NR) : 0);
    for (int64_t k0 = 0; k0 < K; k0 += kKcStored) {
      const int64_t kc = std::min(kKcStored, K - k0);
      const bool add = accumulate || k0 > 0;
      if (edge) copy_padded<NR>(B + k0 * ldb + full * NR, ldb, edge, kc, be.data());
      for (int64_t h0 = g0; h0 < g1; h0 += kGroupBlock) {
        const int64_t h1 = std::min(g1, h0 + kGroupBlock);
        for (int64_t g = h0; g < h1; ++g) {
          const int rows = static_cast<int>(std::min<int64_t>(MR, M - g * MR));
          ga[g - h0] = group(g, rows, k0, kc, scratch.data() + (g - h0) * kRowPad * MR);
        }
        // panel-major within a block of row groups: a panel's chunk of B (kc x NR, 16 KB)
        // stays in L1 while the block's groups (in L2) pass over it
        for (int64_t p = 0; p < full + (edge ? 1 : 0); ++p) {
          const T* b = p < full ? B + k0 * ldb + p * NR : be.data();
          const int64_t b_ks = p < full ? ldb : NR;
          const int cols = p < full ? NR : edge;
          for (int64_t g = h0; g < h1; ++g) {
            const GroupA<T>& a = ga[g - h0];
            micro(kc, a.a, a.ks, a.rs, b, b_ks, C + g * MR * ldc + p * NR, ldc,
                  static_cast<int>(std::min<int64_t>(MR, M - g * MR)), cols, alpha, add);
          }
        }
      }
    }
  });
}

}  // namespace

int64_t packed_numel(int dtype_bytes, int64_t n, int64_t k) {
  const int64_t nr = dtype_bytes == 4 ? Tile<float>::NR : Tile<double>::NR;
  return (n + nr - 1) / nr * nr * k;
}

template <typename T>
void pack(const T* B, int64_t n, int64_t k, int64_t ldb, T* Bp, int nthreads) {
  constexpr int NR = Tile<T>::NR;
  const int64_t panels = (n + NR - 1) / NR;
  parallel_chunks(panels, nthreads, [&](int64_t p0, int64_t p1, int) {
    for (int64_t p = p0; p < p1; ++p)
      interleave<NR>(B + p * NR * ldb, ldb, static_cast<int>(std::min<int64_t>(NR, n - p * NR)), k, Bp + p * k * NR);
  });
}

int64_t nt_work_numel(int dtype_bytes, int64_t m, int64_t k) {
  const int64_t mr = dtype_bytes == 4 ? Tile<float>::MR : Tile<double>::MR;
  return (m + mr - 1) / mr * mr * k;
}

template <typename T>
void nt(const T* A, int64_t lda, const T* Bp, T* C, int64_t ldc, int64_t M, int64_t N, int64_t K, T alpha, T* work,
        int nthreads) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR;
  const int64_t groups = (M + MR - 1) / MR, panels = (N + NR - 1) / NR;
  // A's row groups packed once into work (M x K rounded up to MR rows: the size of A; the
  // caller's, so that a sweep allocates it once), then the column panels split across
  // threads: each panel's chunk of Bp (kKc x NR) stays in L1 while every row group passes
  // over it.
  T* ap = work;
  parallel_chunks(groups, nthreads, [&](int64_t g0, int64_t g1, int) {
    for (int64_t g = g0; g < g1; ++g)
      interleave<MR>(A + g * MR * lda, lda, static_cast<int>(std::min<int64_t>(MR, M - g * MR)), K, ap + g * MR * K);
  });
  parallel_chunks(panels, nthreads, [&](int64_t p0, int64_t p1, int) {
    for (int64_t p = p0; p < p1; ++p) {
      const int cols = static_cast<int>(std::min<int64_t>(NR, N - p * NR));
      for (int64_t k0 = 0; k0 < K; k0 += kKc) {
        const int64_t kc = std::min(kKc, K - k0);
        for (int64_t g = 0; g < groups; ++g) {
          const int rows = static_cast<int>(std::min<int64_t>(MR, M - g * MR));
          micro(kc, ap + g * MR * K + k0 * MR, MR, 0, Bp + p * NR * K + k0 * NR, NR, C + g * MR * ldc + p * NR,
                ldc, rows, cols, alpha, k0 > 0);
        }
      }
    }
  });
}

template <typename T>
void nn(const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, int64_t M, int64_t N, int64_t K,
        T alpha, bool accumulate, int nthreads) {
  product_b_as_stored(B, ldb, C, ldc, M, N, K, alpha, accumulate, nthreads,
                      [&](int64_t g, int rows, int64_t k0, int64_t kc, T* ap) -> GroupA<T> {
                        // the group's rows copied as rows (a contiguous copy per row), kRowPad
                        // apart: read in place, rows a power-of-two stride apart (S's rows of
                        // 8192 floats) all fall in one L1 set and evict each other
                        constexpr int MR = Tile<T>::MR;
                        for (int r = 0; r < MR; ++r) {
                          T* dst = ap + r * kRowPad;
                          if (r < rows) {
                            std::copy_n(A + (g * MR + r) * lda + k0, kc, dst);
                            std::fill(dst + kc, dst + kKcStored, T(0));
                          } else {
                            std::fill(dst, dst + kKcStored, T(0));
                          }
                        }
                        return {ap, 1, kRowPad};
                      });
}

template <typename T>
void tn(const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, int64_t M, int64_t N, int64_t K,
        T alpha, bool accumulate, int nthreads) {
  product_b_as_stored(B, ldb, C, ldc, M, N, K, alpha, accumulate, nthreads,
                      [&](int64_t g, int rows, int64_t k0, int64_t kc, T* ap) -> GroupA<T> {
                        // A^T's rows are A's columns: the step's MR elements are contiguous, but
                        // the steps a row stride apart (one L1 set when it is a power of two),
                        // so they are copied into one MR-interleaved block
                        copy_padded<Tile<T>::MR>(A + k0 * lda + g * Tile<T>::MR, lda, rows, kc, ap);
                        return {ap, Tile<T>::MR, 0};
                      });
}

#define MSF_GEMM_INSTANTIATE(T)                                                                                \
  template void pack<T>(const T*, int64_t, int64_t, int64_t, T*, int);                                       \
  template void nt<T>(const T*, int64_t, const T*, T*, int64_t, int64_t, int64_t, int64_t, T, T*, int);      \
  template void nn<T>(const T*, int64_t, const T*, int64_t, T*, int64_t, int64_t, int64_t, int64_t, T, bool, \
                      int);                                                                                   \
  template void tn<T>(const T*, int64_t, const T*, int64_t, T*, int64_t, int64_t, int64_t, int64_t, T, bool, int);
MSF_GEMM_INSTANTIATE(float)
MSF_GEMM_INSTANTIATE(double)
#undef MSF_GEMM_INSTANTIATE

}  // namespace gemm
}  // namespace msf
