// Row-block kernel of the SigLIP loss; the math is in siglip.h.
//
// The columns left and right of the diagonal are negatives, swept with vectors; the
// diagonal, the positive, is done apart: no per-element branch on z.
#include "cpu/siglip.h"

#include "cpu/_common.h"

namespace msf {

using detail::sigmoid;
using detail::softplus;

template <typename T>
void block_sigmoid(T* S, const SigmoidArgs& a, double out[3], int nthreads) {
  const T s = static_cast<T>(a.scale), b = static_cast<T>(a.bias), w = static_cast<T>(a.weight);
  const auto sums = detail::parallel_sums<3>(a.B, nthreads, [&](int64_t r0, int64_t r1, double* acc) {
    using X = Vec<T>;
    for (int64_t r = r0; r < r1; ++r) {
      T* row = S + r * a.ld;
      const int64_t i = a.row0 + r;
      const T s_diag = row[i];
      // every column but the diagonal as a negative (z = -1): loss softplus(x), dL/dx = w sigmoid(x).
      // Two sweeps around the diagonal, not one sweep and a swap of its terms: a swap takes
      // softplus(x_ii) out again, inf - inf = NaN where the logit overflowed.
      typename X::V vl = X::splat(0), vs = X::splat(0), vb = X::splat(0);
      T l = 0, ds = 0, db = 0;
      auto sweep = [&](int64_t j, int64_t end) {
        for (; j + X::W <= end; j += X::W) {
          const typename X::V v = X::load(row + j);
          const typename X::V x = s * v + b;
          const typename X::V ax = x < 0 ? -x : x;
          const typename X::V ex = exp_t(-ax);
          vl += (x > 0 ? x : X::splat(0)) + log1p_unit(ex);
          const typename X::V dx = w * (x >= 0 ? 1 / (1 + ex) : ex / (1 + ex));
          vs += dx * v;
          vb += dx;
          if (a.write_grad) X::store(row + j, dx);
        }
        for (; j < end; ++j) {
          const T v = row[j], x = s * v + b;
          l += softplus(x);
          const T dx = w * sigmoid(x);
          ds += dx * v;
          db += dx;
          if (a.write_grad) row[j] = dx;
        }
      };
      sweep(0, i);
      sweep(i + 1, a.C);
      l += X::hsum(vl), ds += X::hsum(vs), db += X::hsum(vb);
      // the diagonal is the positive (z = +1): loss softplus(-x), dL/dx = -w sigmoid(-x)
      const T x = s * s_diag + b;
      const T dpos = -w * sigmoid(-x);
      l += softplus(-x);
      ds += dpos * s_diag;
      db += dpos;
      if (a.write_grad) row[i] = dpos;
      acc[0] += static_cast<double>(w * l);
      acc[1] += static_cast<double>(ds);
      acc[2] += static_cast<double>(db);
    }
  });
  for (int k = 0; k < 3; ++k) out[k] = sums[k];
}

template void block_sigmoid<float>(float*, const SigmoidArgs&, double[3], int);
template void block_sigmoid<double>(double*, const SigmoidArgs&, double[3], int);

}  // namespace msf
