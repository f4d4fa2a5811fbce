// Shared CPU building blocks: one SIMD register of T (GCC vector extensions), a
// vectorisable exp, and the OpenMP chunking used by every kernel of the _C module.
//
// Why explicit vectors: the auto-vectoriser does not vectorise float reductions or
// this exp without -ffast-math, and -ffast-math would drop the NaN propagation the
// kernels promise.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <omp.h>
#include <type_traits>
#include <utility>
#include <vector>

namespace msf {

// The bytes of one Vec: 32 (AVX2 registers; pairs of SSE registers in the base build) or 64
// (the avx512 build's registers).  Set per build by CMakeLists.txt (MSF_VEC_BYTES).
#ifndef MSF_VEC_BYTES
#define MSF_VEC_BYTES 32
#endif
static_assert(MSF_VEC_BYTES == 32 || MSF_VEC_BYTES == 64, "MSF_VEC_BYTES must be 32 or 64");

// __builtin_shufflevector (Vec::hsums' tree): clang, and GCC from 12; older GCC sums each
// vector on its own (the same results up to rounding order, the epilogue slower).
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define MSF_HAS_SHUFFLEVECTOR 1
#else
#define MSF_HAS_SHUFFLEVECTOR 0
#endif

// One SIMD register of T: GCC vector extensions, lowered to what the build's -march offers
// (AVX2, AVX-512; pairs of SSE registers in the base build).
template <typename T>
struct Vec {
  typedef T V __attribute__((vector_size(MSF_VEC_BYTES)));
  static constexpr int W = MSF_VEC_BYTES / sizeof(T);
  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }

 private:
#if MSF_HAS_SHUFFLEVECTOR
  using Lanes = std::make_index_sequence<W>;
  template <int O, std::size_t... I>
  static V pick(V a, V b, std::index_sequence<I...>) {
    return __builtin_shufflevector(a, b, (2 * I + O)...);
  }
#endif
  static constexpr int ceil_pow2(int n) { return n <= 1 ? 1 : 2 * ceil_pow2((n + 1) / 2); }

 public:
  // x - (+0) is x for every x (-0 and NaN included), so the compiler drops the subtraction and
  // emits a bare broadcast (with GCC's defaults, -fno-rounding-math -fno-signaling-nans, which
  // the builds keep); V{} + x would keep an add (-0 + 0 is +0).
  static V splat(T x) { return x - V{}; }
  static T hsum(V v) {
    T s = 0;
    for (int l = 0; l < W; ++l) s += v[l];
    return s;
  }
#if MSF_HAS_SHUFFLEVECTOR
  // (a0 + a1, a2 + a3, ..., b0 + b1, b2 + b3, ...): the pair sums of a's lanes, then b's.
  static V pair_sums(V a, V b) { return pick<0>(a, b, Lanes{}) + pick<1>(a, b, Lanes{}); }
#endif
  // out[k] = hsum(v[k]) for k < N, all at once: a tree of pair_sums halves the vectors and
  // their lanes together (N - 1 of them for N = W vectors, instead of N chains of W adds);
  // vector k's sum ends in lanes [k L, (k + 1) L) of vector k / (W / L).  The epilogue of
  // the thin products' many short dot products (_products.h).
  // Only for 16-lane vectors: with 8 lanes (AVX2) the cross-lane shuffles cost more than
  // the per-vector sums they replace (measured: 24 x 6 products of length 128, 0.65 -> 0.78 us).
  template <int N>
  static void hsums(const V* v, T* out) {
#if MSF_HAS_SHUFFLEVECTOR
    if constexpr (W >= 16) {
      hsums_tree<N>(v, out);
      return;
    }
#endif
    for (int k = 0; k < N; ++k) out[k] = hsum(v[k]);
  }
#if MSF_HAS_SHUFFLEVECTOR
  template <int N>
  static void hsums_tree(const V* v, T* out) {
    constexpr int P = ceil_pow2(N);
    V b[P];
    for (int k = 0; k < P; ++k) b[k] = k < N ? v[k] : splat(0);
    int n = P, lanes = W;
    for (; n > 1 && lanes > 1; n /= 2, lanes /= 2)
      for (int k = 0; k < n / 2; ++k) b[k] = pair_sums(b[2 * k], b[2 * k + 1]);
    const int per = W / lanes;  // vectors' sums per remaining vector
    for (int k = 0; k < N; ++k) {
      T l[W];
      std::memcpy(l, &b[k / per], sizeof(V));
      T s = 0;
      for (int i = 0; i < lanes; ++i) s += l[(k % per) * lanes + i];
      out[k] = s;
    }
  }
#endif
  static T hmax(V v) {
    T m = v[0];
    for (int l = 1; l < W; ++l) m = v[l] > m ? v[l] : m;
    return m;
  }
};

// exp for float: Cephes' range reduction and degree-6 polynomial (about 1 ulp on
// [-87, 88]), written for a scalar and for a vector alike.  NaN stays NaN, x < -87
// gives 0 (such softmax terms are 0 in float32 anyway), x > 88.7 gives inf.
template <typename F, typename I>
inline F exp_poly(F x) {
  const F lo = F{} - 87.0f, hi = F{} + 88.5f;
  F xc = x < lo ? lo : x;  // comparisons are false for NaN: NaN stays NaN
  xc = xc > hi ? hi : xc;
  // round(x log2 e) by the 1.5 * 2^23 trick: exact for |x log2 e| < 2^22
  F n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  F r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  F nn = n == n ? n : F{};  // keep the integer conversion defined for NaN
  I bits;
  if constexpr (std::is_same_v<F, float>) {
    bits = (static_cast<int32_t>(nn) + 127) << 23;
  } else {
    bits = (__builtin_convertvector(nn, I) + 127) << 23;
  }
  F scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  F res = p * scale;
  res = x < lo ? F{} : res;
  return x > 88.7f ? F{} + std::numeric_limits<float>::infinity() : res;
}

typedef int32_t VI __attribute__((vector_size(MSF_VEC_BYTES)));
inline float exp_t(float x) { return exp_poly<float, int32_t>(x); }
inline Vec<float>::V exp_t(Vec<float>::V x) { return exp_poly<Vec<float>::V, VI>(x); }
// float64 is the precision of the tests and gradcheck: the exact libm exp.
inline double exp_t(double x) { return std::exp(x); }
inline Vec<double>::V exp_t(Vec<double>::V x) {
  for (int l = 0; l < Vec<double>::W; ++l) x[l] = std::exp(x[l]);
  return x;
}

// log(1 + u) for u in [0, 1] (the softplus tail log1p(exp(-|x|))): with t = u / (2 + u),
// log1p(u) = 2 atanh(t) = 2 (t + t^3/3 + ... + t^15/15), t <= 1/3, so the truncation
// is below 2e-8 relative, and t carries u's full precision when u is tiny.
template <typename F>
inline F log1p_unit_poly(F u) {
  F t = u / (u + 2.0f);
  F t2 = t * t;
  F p = F{} + (1.0f / 15);
  p = p * t2 + (1.0f / 13);
  p = p * t2 + (1.0f / 11);
  p = p * t2 + (1.0f / 9);
  p = p * t2 + (1.0f / 7);
  p = p * t2 + (1.0f / 5);
  p = p * t2 + (1.0f / 3);
  p = p * t2 + 1.0f;
  return 2.0f * t * p;
}
inline float log1p_unit(float u) { return log1p_unit_poly(u); }
inline Vec<float>::V log1p_unit(Vec<float>::V u) { return log1p_unit_poly(u); }
inline double log1p_unit(double u) { return std::log1p(u); }
inline Vec<double>::V log1p_unit(Vec<double>::V u) {
  for (int l = 0; l < Vec<double>::W; ++l) u[l] = std::log1p(u[l]);
  return u;
}

// Run fn(begin, end, t) on `nthreads` contiguous chunks of [0, n) with OpenMP.
// OpenMP, not std::thread: torch's CPU wheel loads libgomp.so.1 first, so this module
// binds to the same runtime and its thread pool.  Threads of our own would fight
// torch's OpenMP workers, which spin for a while after each GEMM (measured here:
// N = 8192 info_nce 760 ms with two std::threads, 620 ms with one).
// An exception thrown by fn (std::bad_alloc of a chunk's scratch, say) must not leave the
// parallel region (that is std::terminate): each chunk catches its own, and the first one
// is rethrown here, after the region, where pybind11 turns it into a Python exception.
template <typename F>
void parallel_chunks(int64_t n, int nthreads, F&& fn) {
  // at most the runtime's own thread count, whatever the caller asks (a raw call may pass any int)
  const int t = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({nthreads, n, omp_get_max_threads()})));
  const int64_t step = (n + t - 1) / t;
  std::vector<std::exception_ptr> failed(static_cast<size_t>(t));
#pragma omp parallel for num_threads(t) schedule(static, 1)
  for (int k = 0; k < t; ++k) {
    const int64_t b = std::min(n, k * step), e = std::min(n, (k + 1) * step);
    try {
      if (b < e) fn(b, e, k);
    } catch (...) {
      failed[static_cast<size_t>(k)] = std::current_exception();
    }
  }
  for (const auto& p : failed)
    if (p) std::rethrow_exception(p);
}

}  // namespace msf
