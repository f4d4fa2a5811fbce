// Row-block kernels of the fused contrastive loss; the math is in contrastive.h.
//
// Why the loops look like this: a row of S (C <= a few 10^4 floats) sits in L1/L2,
// so each row is finished (max, exp+sum, gradient) before the next is touched; the
// loops run on explicit vectors (cpu/simd.h).
#include "cpu/contrastive.h"

#include <vector>

#include "cpu/_common.h"

namespace msf {
namespace {

using detail::exp_sum;
using detail::row_max;

// row_j <- gr exp(row_j - l) [+ g_col_j exp(row_j - lse_col_j)] on [j0, j1); returns
// the sum of the new row_j times the old.
template <typename T, bool WITH_COL>
T grad_known_lse(T* row, int64_t j0, int64_t j1, T gr, T l, const T* lse_col, const T* g_col) {
  using X = Vec<T>;
  typename X::V d = X::splat(0);
  int64_t j = j0;
  for (; j + X::W <= j1; j += X::W) {
    typename X::V x = X::load(row + j);
    typename X::V gv = gr * exp_t(x - l);
    if constexpr (WITH_COL) gv += X::load(g_col + j) * exp_t(x - X::load(lse_col + j));
    d += gv * x;
    X::store(row + j, gv);
  }
  T out = X::hsum(d);
  for (; j < j1; ++j) {
    T x = row[j];
    T gv = gr * exp_t(x - l);
    if constexpr (WITH_COL) gv += g_col[j] * exp_t(x - lse_col[j]);
    out += gv * x;
    row[j] = gv;
  }
  return out;
}

}  // namespace

template <typename T>
double block_rows(T* S, const RowBlockArgs& a, T* lse, T* pos, T* row_loss, const T* g_row, const T* lse_col,
                  const T* g_col, int nthreads) {
  const int64_t C = a.C, n_pairs = a.n_pairs;
  return detail::parallel_sums<1>(a.B, nthreads, [&](int64_t r0, int64_t r1, double* acc) {
    std::vector<T> e(a.compute_lse || !a.write_grad ? C : 0);
    for (int64_t r = r0; r < r1; ++r) {
      T* row = S + r * a.ld;
      const int64_t i = a.row0 + r;  // positive column of this row
      const T s_pos = row[i];
      if (pos) pos[r] = s_pos;
      if (!a.write_grad) {  // statistics only
        T m = row_max(row, C);
        T dot, rest;
        exp_sum(row, C, m, e.data(), &dot, &rest);
        const T log_sum = std::log1p(rest);
        lse[r] = m + log_sum;
        if (row_loss) row_loss[r] = (m - s_pos) + log_sum;  // no cancellation when the loss is tiny
        continue;
      }
      const T gr = g_row[r];
      T dot_gs = 0;  // sum_j G_rj S_rj before the diagonal term
      if (a.compute_lse) {
        // one exp per element: e = exp(S - m), lse = m + log(sum e), G = g e / sum e
        T m = row_max(row, C);
        T dot, rest;
        T sum = exp_sum(row, C, m, e.data(), &dot, &rest);
        const T log_sum = std::log1p(rest);  // log(sum), no cancellation when the loss is tiny
        lse[r] = m + log_sum;
        if (row_loss) row_loss[r] = (m - s_pos) + log_sum;
        T f = gr / sum;
        for (int64_t j = 0; j < C; ++j) row[j] = f * e[j];
        dot_gs = f * dot;
      } else {
        const T l = lse[r];
        int64_t j0 = 0;
        if (lse_col) {
          dot_gs += grad_known_lse<T, true>(row, 0, n_pairs, gr, l, lse_col, g_col);
          j0 = n_pairs;
        }
        dot_gs += grad_known_lse<T, false>(row, j0, C, gr, l, nullptr, nullptr);
      }
      // the positive: -[j == i] from the row term and, if present, the column term
      const T delta = gr + (lse_col ? g_col[i] : T(0));
      row[i] -= delta;
      acc[0] += static_cast<double>(dot_gs) - static_cast<double>(delta) * s_pos;
    }
  })[0];
}

template <typename T>
void block_col_stats(const T* S, int64_t B, int64_t n_cols, int64_t ld, T* col_max, T* col_sum,
                     int nthreads) {
  parallel_chunks(n_cols, nthreads, [&](int64_t c0, int64_t c1, int) {
    const int64_t w = c1 - c0;
    std::vector<T> bm(w, -std::numeric_limits<T>::infinity()), bs(w, T(0));
    for (int64_t r = 0; r < B; ++r) {
      const T* row = S + r * ld + c0;
      for (int64_t j = 0; j < w; ++j) bm[j] = row[j] > bm[j] ? row[j] : bm[j];
    }
    for (int64_t j = 0; j < w; ++j) {
      T m_old = col_max[c0 + j];
      T m_new = m_old > bm[j] ? m_old : bm[j];
      // exp(-inf - m) is 0: a column seen for the first time starts from sum 0
      bs[j] = col_sum[c0 + j] * exp_t(m_old - m_new);
      bm[j] = m_new;
    }
    using X = Vec<T>;
    for (int64_t r = 0; r < B; ++r) {
      const T* row = S + r * ld + c0;
      int64_t j = 0;
      for (; j + X::W <= w; j += X::W)
        X::store(bs.data() + j, X::load(bs.data() + j) +
                                    exp_t(X::load(row + j) - X::load(bm.data() + j)));
      for (; j < w; ++j) bs[j] += exp_t(row[j] - bm[j]);
    }
    for (int64_t j = 0; j < w; ++j) {
      col_max[c0 + j] = bm[j];
      col_sum[c0 + j] = bs[j];
    }
  });
}

template double block_rows<float>(float*, const RowBlockArgs&, float*, float*, float*, const float*,
                                  const float*, const float*, int);
template double block_rows<double>(double*, const RowBlockArgs&, double*, double*, double*, const double*,
                                   const double*, const double*, int);
template void block_col_stats<float>(const float*, int64_t, int64_t, int64_t, float*, float*, int);
template void block_col_stats<double>(const double*, int64_t, int64_t, int64_t, double*, double*,
                                      int);

}  // namespace msf
