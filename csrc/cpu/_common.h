// What the CPU row-block kernels of the contrastive family share (contrastive.cpp,
// labeled.cpp, siglip.cpp): row max, exp-and-sum of a row, scalar softplus / sigmoid,
// and the per-thread partial sums of a parallel sweep over a block's rows.
#pragma once
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/simd.h"

namespace msf {
namespace detail {

template <typename T>
T row_max(const T* row, int64_t C) {
  using X = Vec<T>;
  typename X::V m = X::splat(-std::numeric_limits<T>::infinity());
  int64_t j = 0;
  for (; j + X::W <= C; j += X::W) {
    typename X::V v = X::load(row + j);
    m = v > m ? v : m;
  }
  T out = X::hmax(m);
  for (; j < C; ++j) out = row[j] > out ? row[j] : out;
  return out;
}

// e_j = exp(row_j - m) into e (e may be row: in place); returns sum_j e_j and sets *dot = sum_j e_j row_j.
// With rest, also *rest = sum_j e_j - 1 without the rounding of adding to 1 (the terms of
// the entries below m, plus one per further entry equal to m), so log1p(*rest) keeps the
// relative precision of a tiny loss whatever order the vector width sums in (m is the row's max).
template <typename T>
T exp_sum(const T* row, int64_t C, T m, T* e, T* dot, T* rest = nullptr) {
  using X = Vec<T>;
  typename X::V s = X::splat(0), d = X::splat(0), o = X::splat(0), ties = X::splat(0);
  const typename X::V mv = X::splat(m), zero = X::splat(0), one = X::splat(1);
  int64_t j = 0;
  for (; j + X::W <= C; j += X::W) {
    typename X::V x = X::load(row + j);
    typename X::V v = exp_t(x - m);
    X::store(e + j, v);
    s += v;
    d += v * x;
    if (rest) {
      o += x == mv ? zero : v;
      ties += x == mv ? one : zero;
    }
  }
  T out = X::hsum(s), dd = X::hsum(d), oo = X::hsum(o), tt = X::hsum(ties);
  for (; j < C; ++j) {
    const T x = row[j];  // read before the store: e may be row itself
    T v = exp_t(x - m);
    e[j] = v;
    out += v;
    dd += v * x;
    if (x == m) tt += 1;
    else oo += v;
  }
  *dot = dd;
  if (rest) *rest = tt >= 1 ? (tt - 1) + oo : out - 1;  // no entry equals m: NaN or inf rows
  return out;
}

template <typename T>
T softplus(T t) {  // log(1 + e^t), t may be -inf
  return (t > 0 ? t : T(0)) + std::log1p(std::exp(-std::fabs(t)));
}

template <typename T>
T sigmoid(T t) {
  const T e = std::exp(-std::fabs(t));
  return t >= 0 ? 1 / (1 + e) : e / (1 + e);
}

// fn(r0, r1, acc) over nthreads chunks of [0, B) (cpu/simd.h, parallel_chunks), each
// adding into its own acc[0 .. K); returns the K sums, the chunks added in order (the
// result does not depend on the scheduling).
template <int K, typename F>
std::array<double, K> parallel_sums(int64_t B, int nthreads, F&& fn) {
  std::vector<std::array<double, K>> partial(static_cast<size_t>(std::max(1, nthreads)), std::array<double, K>{});
  parallel_chunks(B, nthreads, [&](int64_t r0, int64_t r1, int tid) { fn(r0, r1, partial[tid].data()); });
  std::array<double, K> total{};
  for (const auto& p : partial)
    for (int k = 0; k < K; ++k) total[k] += p[k];
  return total;
}

}  // namespace detail
}  // namespace msf
