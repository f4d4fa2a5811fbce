// Row-block kernel of the labelled-row losses; the math is in labeled.h.
//
// One anchor row at a time, finished before the next is touched (it sits in L1/L2), on
// the vector loops of cpu/_common.h.
#include "cpu/labeled.h"

#include <algorithm>
#include <vector>

#include "cpu/_common.h"

namespace msf {
namespace {

using detail::exp_sum;
using detail::row_max;
using detail::sigmoid;
using detail::softplus;

// A column that belongs to no set (the anchor itself): exp of it minus any finite max
// is exactly 0 and 0 times it is 0, so the vector loops need no mask (-inf would give
// 0 * -inf = NaN in the sum of G S).
template <typename T>
constexpr T kExcluded = -std::numeric_limits<T>::max();

// One anchor row of the mean-positive loss; returns its sum G S (0 without write_grad).
// ext (optional): this row's extra logit outside S, a positive when ext_pos (the
// query's own key when the columns are a bank of negatives), else a negative (the LSE
// of the query's paired negatives); its gradient goes to *dext.
template <typename T>
double labeled_mean_row(T* row, int64_t C, int64_t self, int64_t y, const int64_t* y_col, T g,
                        bool write_grad, T* e, T* loss, const T* ext, bool ext_pos, T* dext) {
  T pos_sum = 0;  // over the columns of S only
  int64_t npos = 0;
  for (int64_t j = 0; j < C; ++j)
    if (y_col[j] == y && j != self) pos_sum += row[j], ++npos;
  if (ext && ext_pos) ++npos;
  if (npos == 0) {
    *loss = 0;
    if (write_grad) std::fill(row, row + C, T(0));
    return 0.0;
  }
  if (self >= 0) row[self] = kExcluded<T>;
  T m = row_max(row, C);
  if (ext && *ext > m) m = *ext;
  T dot;
  T sum = exp_sum(row, C, m, e, &dot);
  const T e_ext = ext ? exp_t(*ext - m) : T(0);
  sum += e_ext;
  const T pos_mean = (pos_sum + (ext && ext_pos ? *ext : T(0))) / static_cast<T>(npos);
  *loss = (m - pos_mean) + std::log(sum);
  if (!write_grad) return 0.0;
  const T f = g / sum, gp = g / static_cast<T>(npos);
  for (int64_t j = 0; j < C; ++j) row[j] = f * e[j];
  for (int64_t j = 0; j < C; ++j)
    if (y_col[j] == y && j != self) row[j] -= gp;
  if (ext) *dext = f * e_ext - (ext_pos ? gp : T(0));
  return static_cast<double>(f * dot) - static_cast<double>(gp) * static_cast<double>(pos_sum);
}

// One anchor row of the pairwise (pytorch-metric-learning) loss.
template <typename T>
double labeled_pair_row(T* row, int64_t C, int64_t self, int64_t y, const int64_t* y_col, T g,
                        bool write_grad, T* e, std::vector<int64_t>& pidx, std::vector<T>& psig,
                        T* loss) {
  pidx.clear();
  int64_t nneg = 0;
  for (int64_t j = 0; j < C; ++j) {
    if (y_col[j] != y) {
      e[j] = row[j], ++nneg;
    } else {
      e[j] = kExcluded<T>;
      if (j != self) pidx.push_back(j);
    }
  }
  if (pidx.empty()) {
    *loss = 0;
    if (write_grad) std::fill(row, row + C, T(0));
    return 0.0;
  }
  T lse = -std::numeric_limits<T>::infinity(), sum = 0, dot = 0;
  if (nneg > 0) {
    const T m = row_max(e, C);
    sum = exp_sum(e, C, m, e, &dot);  // in place: e_j <- exp(e_j - m), 0 off Neg(i)
    lse = m + std::log(sum);
  }
  T total = 0, sig_sum = 0;
  psig.resize(pidx.size());
  for (size_t k = 0; k < pidx.size(); ++k) {
    const T t = lse - row[pidx[k]];
    total += softplus(t);
    psig[k] = sigmoid(t);
    sig_sum += psig[k];
  }
  *loss = total;
  if (!write_grad) return 0.0;
  double gs = 0.0;
  for (size_t k = 0; k < pidx.size(); ++k)
    gs -= static_cast<double>(g * psig[k]) * static_cast<double>(row[pidx[k]]);
  const T f = nneg > 0 ? g * sig_sum / sum : T(0);
  for (int64_t j = 0; j < C; ++j) row[j] = f * e[j];
  for (size_t k = 0; k < pidx.size(); ++k) row[pidx[k]] = -g * psig[k];
  return gs + static_cast<double>(f * dot);
}

}  // namespace

template <typename T>
double block_rows_labeled(T* S, const LabeledArgs& a, const int64_t* y_row, const int64_t* y_col,
                          T* row_loss, const T* g_row, const T* ext, T* dext, int nthreads) {
  return detail::parallel_sums<1>(a.B, nthreads, [&](int64_t r0, int64_t r1, double* acc) {
    std::vector<T> e(a.C);
    std::vector<int64_t> pidx;
    std::vector<T> psig;
    for (int64_t r = r0; r < r1; ++r) {
      T* row = S + r * a.ld;
      const int64_t self = a.exclude_self ? a.row0 + r : -1;
      const T g = a.write_grad ? g_row[r] : T(0);
      acc[0] += a.pairwise ? labeled_pair_row(row, a.C, self, y_row[r], y_col, g, a.write_grad, e.data(),
                                           pidx, psig, row_loss + r)
                        : labeled_mean_row(row, a.C, self, y_row[r], y_col, g, a.write_grad, e.data(),
                                           row_loss + r, ext ? ext + r : nullptr, a.ext_positive,
                                           dext ? dext + r : nullptr);
    }
  })[0];
}

template double block_rows_labeled<float>(float*, const LabeledArgs&, const int64_t*, const int64_t*,
                                          float*, const float*, const float*, float*, int);
template double block_rows_labeled<double>(double*, const LabeledArgs&, const int64_t*, const int64_t*,
                                           double*, const double*, const double*, double*, int);

}  // namespace msf
