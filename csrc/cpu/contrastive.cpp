// Row-block kernels of the fused contrastive loss; the math is in contrastive.h.
//
// Why the loops look like this: a row of S (C <= a few 10^4 floats) sits in L1/L2,
// so each row is finished (max, exp+sum, gradient) before the next is touched; the
// loops run on explicit vectors (cpu/simd.h).
#include "cpu/contrastive.h"

#include <vector>

#include "cpu/simd.h"

namespace msf {
namespace {

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
template <typename T>
T exp_sum(const T* row, int64_t C, T m, T* e, T* dot) {
  using X = Vec<T>;
  typename X::V s = X::splat(0), d = X::splat(0);
  int64_t j = 0;
  for (; j + X::W <= C; j += X::W) {
    typename X::V x = X::load(row + j);
    typename X::V v = exp_t(x - m);
    X::store(e + j, v);
    s += v;
    d += v * x;
  }
  T out = X::hsum(s), dd = X::hsum(d);
  for (; j < C; ++j) {
    const T x = row[j];  // read before the store: e may be row itself
    T v = exp_t(x - m);
    e[j] = v;
    out += v;
    dd += v * x;
  }
  *dot = dd;
  return out;
}

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
  std::vector<double> partial(static_cast<size_t>(std::max(1, nthreads)), 0.0);
  parallel_chunks(a.B, nthreads, [&](int64_t r0, int64_t r1, int tid) {
    std::vector<T> e(a.compute_lse || !a.write_grad ? C : 0);
    double acc = 0.0;
    for (int64_t r = r0; r < r1; ++r) {
      T* row = S + r * a.ld;
      const int64_t i = a.row0 + r;  // positive column of this row
      const T s_pos = row[i];
      if (pos) pos[r] = s_pos;
      if (!a.write_grad) {  // statistics only
        T m = row_max(row, C);
        T dot;
        const T log_sum = std::log(exp_sum(row, C, m, e.data(), &dot));
        lse[r] = m + log_sum;
        if (row_loss) row_loss[r] = (m - s_pos) + log_sum;  // no cancellation when the loss is tiny
        continue;
      }
      const T gr = g_row[r];
      T dot_gs = 0;  // sum_j G_rj S_rj before the diagonal term
      if (a.compute_lse) {
        // one exp per element: e = exp(S - m), lse = m + log(sum e), G = g e / sum e
        T m = row_max(row, C);
        T dot;
        T sum = exp_sum(row, C, m, e.data(), &dot);
        lse[r] = m + std::log(sum);
        if (row_loss) row_loss[r] = (m - s_pos) + std::log(sum);
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
      acc += static_cast<double>(dot_gs) - static_cast<double>(delta) * s_pos;
    }
    partial[tid] = acc;
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
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

namespace {

// A column that belongs to no set (the anchor itself): exp of it minus any finite max
// is exactly 0 and 0 times it is 0, so the vector loops need no mask (-inf would give
// 0 * -inf = NaN in the sum of G S).
template <typename T>
constexpr T kExcluded = -std::numeric_limits<T>::max();

template <typename T>
T softplus(T t) {  // log(1 + e^t), t may be -inf
  return (t > 0 ? t : T(0)) + std::log1p(std::exp(-std::fabs(t)));
}

template <typename T>
T sigmoid(T t) {
  const T e = std::exp(-std::fabs(t));
  return t >= 0 ? 1 / (1 + e) : e / (1 + e);
}

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
  std::vector<double> partial(static_cast<size_t>(std::max(1, nthreads)), 0.0);
  parallel_chunks(a.B, nthreads, [&](int64_t r0, int64_t r1, int tid) {
    std::vector<T> e(a.C);
    std::vector<int64_t> pidx;
    std::vector<T> psig;
    double acc = 0.0;
    for (int64_t r = r0; r < r1; ++r) {
      T* row = S + r * a.ld;
      const int64_t self = a.exclude_self ? a.row0 + r : -1;
      const T g = a.write_grad ? g_row[r] : T(0);
      acc += a.pairwise ? labeled_pair_row(row, a.C, self, y_row[r], y_col, g, a.write_grad, e.data(),
                                           pidx, psig, row_loss + r)
                        : labeled_mean_row(row, a.C, self, y_row[r], y_col, g, a.write_grad, e.data(),
                                           row_loss + r, ext ? ext + r : nullptr, a.ext_positive,
                                           dext ? dext + r : nullptr);
    }
    partial[tid] = acc;
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

template <typename T>
void block_sigmoid(T* S, const SigmoidArgs& a, double out[3], int nthreads) {
  const int n = std::max(1, nthreads);
  std::vector<double> partial(3 * static_cast<size_t>(n), 0.0);
  const T s = static_cast<T>(a.scale), b = static_cast<T>(a.bias), w = static_cast<T>(a.weight);
  parallel_chunks(a.B, nthreads, [&](int64_t r0, int64_t r1, int tid) {
    using X = Vec<T>;
    double acc[3] = {0.0, 0.0, 0.0};
    for (int64_t r = r0; r < r1; ++r) {
      T* row = S + r * a.ld;
      const int64_t i = a.row0 + r;
      const T s_diag = row[i];
      // every column as a negative (z = -1): loss softplus(x), dL/dx = w sigmoid(x)
      typename X::V vl = X::splat(0), vs = X::splat(0), vb = X::splat(0);
      int64_t j = 0;
      for (; j + X::W <= a.C; j += X::W) {
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
      T l = X::hsum(vl), ds = X::hsum(vs), db = X::hsum(vb);
      for (; j < a.C; ++j) {
        const T v = row[j], x = s * v + b;
        l += softplus(x);
        const T dx = w * sigmoid(x);
        ds += dx * v;
        db += dx;
        if (a.write_grad) row[j] = dx;
      }
      // the diagonal is the positive (z = +1): swap its negative terms for positive ones
      const T x = s * s_diag + b;
      const T dneg = w * sigmoid(x), dpos = -w * sigmoid(-x);
      l += softplus(-x) - softplus(x);
      ds += (dpos - dneg) * s_diag;
      db += dpos - dneg;
      if (a.write_grad) row[i] = dpos;
      acc[0] += static_cast<double>(w * l);
      acc[1] += static_cast<double>(ds);
      acc[2] += static_cast<double>(db);
    }
    for (int k = 0; k < 3; ++k) partial[3 * tid + k] = acc[k];
  });
  for (int k = 0; k < 3; ++k) {
    out[k] = 0.0;
    for (int t = 0; t < n; ++t) out[k] += partial[3 * t + k];
  }
}

template double block_rows<float>(float*, const RowBlockArgs&, float*, float*, float*, const float*,
                                  const float*, const float*, int);
template double block_rows<double>(double*, const RowBlockArgs&, double*, double*, double*, const double*,
                                   const double*, const double*, int);
template void block_col_stats<float>(const float*, int64_t, int64_t, int64_t, float*, float*, int);
template void block_col_stats<double>(const double*, int64_t, int64_t, int64_t, double*, double*,
                                      int);

template double block_rows_labeled<float>(float*, const LabeledArgs&, const int64_t*, const int64_t*,
                                          float*, const float*, const float*, float*, int);
template double block_rows_labeled<double>(double*, const LabeledArgs&, const int64_t*, const int64_t*,
                                           double*, const double*, const double*, double*, int);
template void block_sigmoid<float>(float*, const SigmoidArgs&, double[3], int);
template void block_sigmoid<double>(double*, const SigmoidArgs&, double[3], int);

}  // namespace msf
