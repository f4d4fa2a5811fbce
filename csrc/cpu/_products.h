// The thin matrix products of the few-shot kernels (inner_loop.cpp, convex.cpp): one
// dimension (classes C, or a support set S) small, D long.  Explicit SIMD vectors
// (cpu/simd.h) with the small dimension's accumulators in registers.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/simd.h"

namespace msf {
namespace products {

// The three small matrix products every step needs, with C (classes) tiny and D
// long.  Classes go in blocks of up to CB so that each block's accumulators stay in
// registers and every row chunk of X is loaded once per block.
constexpr int CB = 8;

// Rows from this length on count as long (xwt_block).
constexpr int64_t kLongRow = 1024;

// How far ahead (elements) atx_block asks for each row's next piece.
constexpr int64_t kPrefetchAhead = 512;

// out (R, C) = X (R, D) W (C, D)^T + bias (C, may be null), RB rows at a time: each loaded
// vector of W feeds RB FMAs (RB x NC accumulators in registers).  The epilogue sums each
// accumulator's lanes: with 16-lane vectors all of them at once (Vec::hsums), whose
// per-vector chains of adds cost as much as the main loop at D = 640.
template <typename T, int NC, int RB>
void xwt_rows(const T* X, const T* W, const T* bias, T* out, int64_t R, int64_t D, int64_t C, int64_t c0) {
  using Xv = Vec<T>;
  auto put = [&](int64_t r, int j, const T* x, T v) {
    for (int64_t e = D / Xv::W * Xv::W; e < D; ++e) v += x[e] * W[(c0 + j) * D + e];
    out[r * C + c0 + j] = v + (bias ? bias[c0 + j] : T(0));
  };
  int64_t r = 0;
  for (; r + RB <= R; r += RB) {
    typename Xv::V acc[RB][NC];
    for (int i = 0; i < RB; ++i)
      for (int j = 0; j < NC; ++j) acc[i][j] = Xv::splat(0);
    for (int64_t d = 0; d + Xv::W <= D; d += Xv::W) {
      typename Xv::V xv[RB];
      for (int i = 0; i < RB; ++i) xv[i] = Xv::load(X + (r + i) * D + d);
      for (int j = 0; j < NC; ++j) {
        const typename Xv::V wv = Xv::load(W + (c0 + j) * D + d);
        for (int i = 0; i < RB; ++i) acc[i][j] += xv[i] * wv;
      }
    }
    T sums[RB * NC];
    if constexpr (Xv::W >= 16) Xv::template hsums<RB * NC>(&acc[0][0], sums);
    for (int i = 0; i < RB; ++i)
      for (int j = 0; j < NC; ++j)
        put(r + i, j, X + (r + i) * D, Xv::W >= 16 ? sums[i * NC + j] : Xv::hsum(acc[i][j]));
  }
  for (; r < R; ++r) {
    const T* x = X + r * D;
    typename Xv::V acc[NC];
    for (int j = 0; j < NC; ++j) acc[j] = Xv::splat(0);
    for (int64_t d = 0; d + Xv::W <= D; d += Xv::W) {
      const typename Xv::V xv = Xv::load(x + d);
      for (int j = 0; j < NC; ++j) acc[j] += xv * Xv::load(W + (c0 + j) * D + d);
    }
    T sums[NC];
    if constexpr (Xv::W >= 16) Xv::template hsums<NC>(acc, sums);
    for (int j = 0; j < NC; ++j) put(r, j, x, Xv::W >= 16 ? sums[j] : Xv::hsum(acc[j]));
  }
}

// Rows per pass: 2 (1 past 6 classes: 16 accumulators fill the ymm registers), or with
// 16-lane vectors (32 registers) 4 on long rows, where the classes' rows no longer stay
// in L1 and each of their loads then feeds 4 FMAs (24 rows x 6 classes at D = 2560: 1.9x;
// on short rows the larger epilogue costs more than it saves).
template <typename T, int NC>
void xwt_block(const T* X, const T* W, const T* bias, T* out, int64_t R, int64_t D, int64_t C, int64_t c0) {
  if constexpr (Vec<T>::W >= 16 && NC <= 6) {
    if (D >= kLongRow) return xwt_rows<T, NC, 4>(X, W, bias, out, R, D, C, c0);
  }
  xwt_rows<T, NC, (NC <= 6 ? 2 : 1)>(X, W, bias, out, R, D, C, c0);
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
      // the rows are read in short pieces, R of them in turn: a sequential stream per row
      // that the hardware prefetchers do not follow once the rows outgrow the cache
      if (d + kPrefetchAhead + DB * Xv::W <= D)
        for (int64_t l = 0; l < DB * static_cast<int64_t>(sizeof(typename Xv::V)); l += 64)
          __builtin_prefetch(reinterpret_cast<const char*>(X + r * D + d + kPrefetchAhead) + l);
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

// Run blk<NC>(c0) over the class blocks of C (blocks of CB_, then the rest).
template <int CB_ = CB, typename F>
void class_blocks(int64_t C, F&& blk) {
  static_assert(CB_ >= 1 && CB_ <= 8, "blocks of at most 8 classes");
  int64_t c0 = 0;
  for (; c0 + CB_ <= C; c0 += CB_) blk(std::integral_constant<int, CB_>{}, c0);
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
  class_blocks(C, [&](auto nc, int64_t c0) {
    xwt_block<T, decltype(nc)::value>(X, W, bias, out, R, D, C, c0);
  });
}

// out (C, D) = alpha A^T X (+ out); CB_ = 6 keeps the two-vector blocking for wide C.
template <typename T, int CB_ = CB>
void atx(const T* A, const T* X, T* out, int64_t R, int64_t D, int64_t C, T alpha, bool accumulate) {
  class_blocks<CB_>(C, [&](auto nc, int64_t c0) {
    atx_block<T, decltype(nc)::value>(A, X, out, R, D, C, c0, alpha, accumulate);
  });
}

// G (S, S) = X X^T: the upper triangle by column blocks (two rows per pass), mirrored.
template <typename T>
void gram_matrix(const T* X, T* G, int64_t S, int64_t D) {
  class_blocks<6>(S, [&](auto nc, int64_t c0) {
    constexpr int NC = decltype(nc)::value;
    xwt_block<T, NC>(X, X, static_cast<const T*>(nullptr), G, std::min<int64_t>(S, c0 + NC), D, S, c0);
    for (int64_t r = 0; r < c0; ++r)
      for (int j = 0; j < NC; ++j) G[(c0 + j) * S + r] = G[r * S + c0 + j];
  });
}

// out (R, D) += A (R, C) W (C, D) + B (R, C) V (C, D)   (B, V may be null).  Four rows at a
// time: each loaded vector of W (and V) feeds four FMAs instead of one.
template <typename T>
void aw_add(const T* A, const T* W, const T* B, const T* V, T* out, int64_t R, int64_t D, int64_t C) {
  using Xv = Vec<T>;
  constexpr int RB = 4;
  int64_t r = 0;
  for (; r + RB <= R; r += RB) {
    int64_t d = 0;
    for (; d + Xv::W <= D; d += Xv::W) {
      typename Xv::V acc[RB];
      for (int i = 0; i < RB; ++i) acc[i] = Xv::load(out + (r + i) * D + d);
      for (int64_t c = 0; c < C; ++c) {
        const typename Xv::V w = Xv::load(W + c * D + d);
        for (int i = 0; i < RB; ++i) acc[i] += A[(r + i) * C + c] * w;
        if (B) {
          const typename Xv::V v = Xv::load(V + c * D + d);
          for (int i = 0; i < RB; ++i) acc[i] += B[(r + i) * C + c] * v;
        }
      }
      for (int i = 0; i < RB; ++i) Xv::store(out + (r + i) * D + d, acc[i]);
    }
    for (; d < D; ++d)
      for (int i = 0; i < RB; ++i) {
        T* o = out + (r + i) * D + d;
        for (int64_t c = 0; c < C; ++c)
          *o += A[(r + i) * C + c] * W[c * D + d] + (B ? B[(r + i) * C + c] * V[c * D + d] : T(0));
      }
  }
  for (; r < R; ++r) {
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

}  // namespace products
}  // namespace msf
