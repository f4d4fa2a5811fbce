// pybind11 module _C: the CPU kernels, called with raw data pointers.
//
// Python owns allocation, validation and autograd (DESIGN.md); this layer checks
// again everything that could make a kernel read or write outside the buffers
// Python says it passed (pointer, element count), whatever the caller sends.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/contrastive.h"
#include "cpu/convex.h"
#include "cpu/gemm.h"
#include "cpu/inner_loop.h"
#include "cpu/labeled.h"
#include "cpu/siglip.h"

namespace py = pybind11;

namespace {

enum DType : int { kFloat32 = 0, kFloat64 = 1 };

void require(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error("metassl_fast._C: " + msg);
}

// Size arithmetic that cannot wrap: a product or sum of non-negative sizes past 2^60
// elements (no buffer is that large) is refused, so no check below passes on a wrapped value.
constexpr int64_t kMaxElements = int64_t(1) << 60;

int64_t checked(bool overflow, int64_t r) {
  if (overflow || r < 0 || r > kMaxElements)
    require(false, "the sizes passed overflow (a size product is past 2^60 elements)");
  return r;
}
int64_t add(int64_t a, int64_t b) {
  int64_t r = 0;
  const bool overflow = __builtin_add_overflow(a, b, &r);
  return checked(overflow, r);
}
int64_t prod(int64_t a) { return checked(false, a); }
template <typename... Ts>
int64_t prod(int64_t a, int64_t b, Ts... rest) {
  int64_t r = 0;
  const bool overflow = __builtin_mul_overflow(a, b, &r);
  return prod(checked(overflow, r), rest...);
}

// A buffer of `numel` elements must hold `need` of them.
// (Messages are built only on failure: these checks run on every call.)
void require_buffer(uintptr_t ptr, int64_t numel, int64_t need, const char* name) {
  if (ptr == 0) require(false, std::string(name) + " is a null pointer");
  if (numel < need)
    require(false, std::string(name) + " holds " + std::to_string(numel) + " elements, the sizes need " +
                       std::to_string(need));
}

void require_dtype(int dtype) {
  require(dtype == kFloat32 || dtype == kFloat64, "dtype code must be 0 (float32) or 1 (float64)");
}

// Run f(float{}) or f(double{}) for a checked dtype code.
template <typename F>
auto by_dtype(int dtype, F&& f) {
  return dtype == kFloat32 ? f(float{}) : f(double{});
}

// A raw address as a pointer to T (read-only or writable).
template <typename T>
const T* in(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}
template <typename T>
T* out(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// Elements a row-major (rows x cols, row stride ld) view touches.
int64_t span(int64_t rows, int64_t cols, int64_t ld) {
  return rows == 0 ? 0 : add(prod(rows - 1, ld), cols);
}

double block_rows(int dtype, uintptr_t S, int64_t S_numel, int64_t B, int64_t C, int64_t ld,
                  int64_t row0, int64_t n_pairs, uintptr_t lse, int64_t lse_numel,
                  bool compute_lse, uintptr_t pos, int64_t pos_numel, uintptr_t row_loss,
                  int64_t row_loss_numel, uintptr_t g_row,
                  int64_t g_row_numel, uintptr_t lse_col, uintptr_t g_col, int64_t col_numel,
                  bool write_grad, int nthreads) {
  require_dtype(dtype);
  require(B >= 0 && C >= 1 && ld >= C, "need B >= 0, C >= 1 and ld >= C");
  require(row0 >= 0 && n_pairs >= 1 && n_pairs <= C && B <= n_pairs - row0,
          "rows [row0, row0 + B) must be positive pairs: row0 >= 0, row0 + B <= n_pairs <= C");
  require(nthreads >= 1, "nthreads must be >= 1");
  require(compute_lse || write_grad, "a call must compute lse or write the gradient");
  require_buffer(S, S_numel, span(B, C, ld), "S");
  require_buffer(lse, lse_numel, B, "lse");
  if (pos) require_buffer(pos, pos_numel, B, "pos");
  if (row_loss) {
    require(compute_lse, "row_loss needs compute_lse");
    require_buffer(row_loss, row_loss_numel, B, "row_loss");
  }
  if (write_grad) {
    require_buffer(g_row, g_row_numel, B, "g_row");
    require((lse_col == 0) == (g_col == 0), "lse_col and g_col come together");
    if (lse_col) {
      require(!compute_lse, "the column term needs the final row lse (compute_lse=False)");
      require_buffer(lse_col, col_numel, n_pairs, "lse_col");
      require_buffer(g_col, col_numel, n_pairs, "g_col");
    }
  }
  msf::RowBlockArgs a;
  a.B = B, a.C = C, a.ld = ld, a.row0 = row0, a.n_pairs = n_pairs;
  a.compute_lse = compute_lse, a.write_grad = write_grad;
  py::gil_scoped_release nogil;
  return by_dtype(dtype, [&](auto tag) {
    using F = decltype(tag);
    return msf::block_rows<F>(out<F>(S), a, out<F>(lse), out<F>(pos), out<F>(row_loss), in<F>(g_row),
                              in<F>(lse_col), in<F>(g_col), nthreads);
  });
}

void block_col_stats(int dtype, uintptr_t S, int64_t S_numel, int64_t B, int64_t n_cols,
                     int64_t ld, uintptr_t col_max, uintptr_t col_sum, int64_t col_numel,
                     int nthreads) {
  require_dtype(dtype);
  require(B >= 0 && n_cols >= 0 && ld >= n_cols && ld >= 1, "need B, n_cols >= 0 and ld >= n_cols");
  require(nthreads >= 1, "nthreads must be >= 1");
  require_buffer(S, S_numel, span(B, n_cols, ld), "S");
  require_buffer(col_max, col_numel, n_cols, "col_max");
  require_buffer(col_sum, col_numel, n_cols, "col_sum");
  py::gil_scoped_release nogil;
  by_dtype(dtype, [&](auto tag) {
    using F = decltype(tag);
    msf::block_col_stats<F>(in<F>(S), B, n_cols, ld, out<F>(col_max), out<F>(col_sum), nthreads);
  });
}

// Labels are only compared, never used as indices: any int64 value is safe.
double block_rows_labeled(int dtype, uintptr_t S, int64_t S_numel, int64_t B, int64_t C, int64_t ld,
                          int64_t row0, bool exclude_self, bool pairwise, uintptr_t y_row,
                          int64_t y_row_numel, uintptr_t y_col, int64_t y_col_numel,
                          uintptr_t row_loss, int64_t row_loss_numel, uintptr_t g_row,
                          int64_t g_row_numel, uintptr_t ext, int64_t ext_numel, uintptr_t dext,
                          int64_t dext_numel, bool ext_positive, bool write_grad, int nthreads) {
  require_dtype(dtype);
  require(B >= 0 && C >= 1 && ld >= C && row0 >= 0, "need B >= 0, C >= 1, ld >= C and row0 >= 0");
  require(!exclude_self || B <= C - row0, "exclude_self needs rows [row0, row0 + B) inside the C columns");
  require(nthreads >= 1, "nthreads must be >= 1");
  require_buffer(S, S_numel, span(B, C, ld), "S");
  require_buffer(y_row, y_row_numel, B, "y_row");
  require_buffer(y_col, y_col_numel, C, "y_col");
  require_buffer(row_loss, row_loss_numel, B, "row_loss");
  if (write_grad) require_buffer(g_row, g_row_numel, B, "g_row");
  if (ext) {
    require(!pairwise, "ext (an extra positive logit per row) is for the mean-positive loss only");
    require_buffer(ext, ext_numel, B, "ext");
    if (write_grad) require_buffer(dext, dext_numel, B, "dext");
  }
  msf::LabeledArgs a;
  a.B = B, a.C = C, a.ld = ld, a.row0 = row0;
  a.exclude_self = exclude_self, a.pairwise = pairwise, a.write_grad = write_grad;
  a.ext_positive = ext_positive;
  py::gil_scoped_release nogil;
  return by_dtype(dtype, [&](auto tag) {
    using F = decltype(tag);
    return msf::block_rows_labeled<F>(out<F>(S), a, in<int64_t>(y_row), in<int64_t>(y_col),
                                      out<F>(row_loss), in<F>(g_row), in<F>(ext),
                                      write_grad ? out<F>(dext) : nullptr, nthreads);
  });
}

py::tuple block_sigmoid(int dtype, uintptr_t S, int64_t S_numel, int64_t B, int64_t C, int64_t ld,
                        int64_t row0, double scale, double bias, double weight, bool write_grad,
                        int nthreads) {
  require_dtype(dtype);
  require(B >= 0 && C >= 1 && ld >= C && row0 >= 0 && row0 <= C && B <= C - row0,
          "need B >= 0, C >= 1, ld >= C and the diagonal rows [row0, row0 + B) inside the C columns");
  require(nthreads >= 1, "nthreads must be >= 1");
  require_buffer(S, S_numel, span(B, C, ld), "S");
  msf::SigmoidArgs a;
  a.B = B, a.C = C, a.ld = ld, a.row0 = row0;
  a.scale = scale, a.bias = bias, a.weight = weight, a.write_grad = write_grad;
  double res[3];
  {
    py::gil_scoped_release nogil;
    by_dtype(dtype, [&](auto tag) {
      using F = decltype(tag);
      msf::block_sigmoid<F>(out<F>(S), a, res, nthreads);
    });
  }
  return py::make_tuple(res[0], res[1], res[2]);
}

msf::InnerLoopArgs inner_args(int64_t T, int64_t S, int64_t D, int64_t C, int64_t K, bool first_order) {
  require(T >= 1 && S >= 1 && D >= 1 && C >= 1 && K >= 0, "need T, S, D, C >= 1 and K >= 0");
  // the scratch the kernels size from these (csrc/cpu/inner_loop.cpp: a task's trajectory
  // (K+1) C D, TaskWork, GramWork): refused here if a product would wrap, std::bad_alloc
  // (MemoryError) if it is merely too large
  prod(T, add(K, 1), C, D);
  prod(std::max<int64_t>(K, 1), S, C);
  prod(S, S);
  prod(add(S, prod(2, C)), S);
  msf::InnerLoopArgs a;
  a.T = T, a.S = S, a.D = D, a.C = C, a.K = K, a.first_order = first_order;
  return a;
}

// Labels index rows of the head: every one must be in [0, C) before a kernel reads it.
void require_labels(uintptr_t y, int64_t y_numel, int64_t n, int64_t C) {
  require_buffer(y, y_numel, n, "labels");
  const int64_t* lab = in<int64_t>(y);
  for (int64_t i = 0; i < n; ++i)
    if (lab[i] < 0 || lab[i] >= C)  // the message only when it is needed: n can be large
      require(false, "labels[" + std::to_string(i) + "] = " + std::to_string(lab[i]) +
                         " is outside [0, " + std::to_string(C) + ")");
}

// What every inner-loop entry reads: the support block X (T, S, D), its labels (T, S) in
// [0, C), and the step sizes aW (C, D), ab (C).
void require_support(uintptr_t X, int64_t X_numel, uintptr_t y, int64_t y_numel, uintptr_t aW, int64_t aW_numel,
                     uintptr_t ab, int64_t ab_numel, const msf::InnerLoopArgs& a) {
  require_buffer(X, X_numel, prod(a.T, a.S, a.D), "X");
  require_labels(y, y_numel, a.T * a.S, a.C);
  require_buffer(aW, aW_numel, prod(a.C, a.D), "aW");
  require_buffer(ab, ab_numel, a.C, "ab");
}

// The trajectory W_0 .. W_K (T, K+1, C, D) and b_0 .. b_K (T, K+1, C).
void require_trajectory(uintptr_t W_traj, int64_t W_traj_numel, uintptr_t b_traj, int64_t b_traj_numel,
                        const msf::InnerLoopArgs& a) {
  require_buffer(W_traj, W_traj_numel, prod(a.T, add(a.K, 1), a.C, a.D), "W_traj");
  require_buffer(b_traj, b_traj_numel, prod(a.T, add(a.K, 1), a.C), "b_traj");
}

// The per-task gradient outputs of the inner loop: dX (T, S, D), dW0 and daW (T, C, D),
// db0 and dab (T, C).
void require_task_grads(uintptr_t dX, int64_t dX_numel, uintptr_t dW0, int64_t dW0_numel,
                        uintptr_t db0, int64_t db0_numel, uintptr_t daW, int64_t daW_numel,
                        uintptr_t dab, int64_t dab_numel, const msf::InnerLoopArgs& a) {
  require_buffer(dX, dX_numel, prod(a.T, a.S, a.D), "dX");
  require_buffer(dW0, dW0_numel, prod(a.T, a.C, a.D), "dW0");
  require_buffer(db0, db0_numel, prod(a.T, a.C), "db0");
  require_buffer(daW, daW_numel, prod(a.T, a.C, a.D), "daW");
  require_buffer(dab, dab_numel, prod(a.T, a.C), "dab");
}

// What anil_loss defers to anil_apply (csrc/cpu/inner_loop.h, AnilDeferred).
void require_deferred(uintptr_t coef, int64_t coef_numel, uintptr_t lamK, int64_t lamK_numel,
                      uintptr_t dzqT, int64_t dzqT_numel, uintptr_t WK, int64_t WK_numel, int64_t T,
                      int64_t S, int64_t Q, int64_t D, int64_t C) {
  require_buffer(coef, coef_numel, prod(T, add(S, prod(2, C)), S), "coef");
  require_buffer(lamK, lamK_numel, prod(T, C, D), "lamK");
  require_buffer(dzqT, dzqT_numel, prod(T, C, Q), "dzqT");
  require_buffer(WK, WK_numel, prod(T, C, D), "WK");
}

void inner_loop_forward(int dtype, uintptr_t X, int64_t X_numel, uintptr_t y, int64_t y_numel,
                        uintptr_t W0, int64_t W0_numel, uintptr_t b0, int64_t b0_numel,
                        uintptr_t aW, int64_t aW_numel, uintptr_t ab, int64_t ab_numel,
                        uintptr_t W_traj, int64_t W_traj_numel, uintptr_t b_traj,
                        int64_t b_traj_numel, int64_t T, int64_t S, int64_t D, int64_t C, int64_t K,
                        int nthreads) {
  require_dtype(dtype);
  require(nthreads >= 1, "nthreads must be >= 1");
  const msf::InnerLoopArgs a = inner_args(T, S, D, C, K, false);
  require_support(X, X_numel, y, y_numel, aW, aW_numel, ab, ab_numel, a);
  require_buffer(W0, W0_numel, prod(C, D), "W0");
  require_buffer(b0, b0_numel, C, "b0");
  require_trajectory(W_traj, W_traj_numel, b_traj, b_traj_numel, a);
  py::gil_scoped_release nogil;
  by_dtype(dtype, [&](auto tag) {
    using F = decltype(tag);
    msf::inner_loop_forward<F>(in<F>(X), in<int64_t>(y), in<F>(W0), in<F>(b0), in<F>(aW), in<F>(ab),
                               out<F>(W_traj), out<F>(b_traj), a, nthreads);
  });
}

void inner_loop_backward(int dtype, uintptr_t X, int64_t X_numel, uintptr_t y, int64_t y_numel,
                         uintptr_t aW, int64_t aW_numel, uintptr_t ab, int64_t ab_numel,
                         uintptr_t W_traj, int64_t W_traj_numel, uintptr_t b_traj,
                         int64_t b_traj_numel, uintptr_t dW_K, int64_t dW_K_numel, uintptr_t db_K,
                         int64_t db_K_numel, uintptr_t dX, int64_t dX_numel, uintptr_t dW0,
                         int64_t dW0_numel, uintptr_t db0, int64_t db0_numel, uintptr_t daW,
                         int64_t daW_numel, uintptr_t dab, int64_t dab_numel, int64_t T, int64_t S,
                         int64_t D, int64_t C, int64_t K, bool first_order, int nthreads) {
  require_dtype(dtype);
  require(nthreads >= 1, "nthreads must be >= 1");
  const msf::InnerLoopArgs a = inner_args(T, S, D, C, K, first_order);
  require_support(X, X_numel, y, y_numel, aW, aW_numel, ab, ab_numel, a);
  require_trajectory(W_traj, W_traj_numel, b_traj, b_traj_numel, a);
  require_buffer(dW_K, dW_K_numel, prod(T, C, D), "dW_K");
  require_buffer(db_K, db_K_numel, prod(T, C), "db_K");
  require_task_grads(dX, dX_numel, dW0, dW0_numel, db0, db0_numel, daW, daW_numel, dab, dab_numel, a);
  py::gil_scoped_release nogil;
  by_dtype(dtype, [&](auto tag) {
    using F = decltype(tag);
    msf::inner_loop_backward<F>(in<F>(X), in<int64_t>(y), in<F>(aW), in<F>(ab), in<F>(W_traj),
                                in<F>(b_traj), in<F>(dW_K), in<F>(db_K), out<F>(dX), out<F>(dW0),
                                out<F>(db0), out<F>(daW), out<F>(dab), a, nthreads);
  });
}

void anil_loss(int dtype, uintptr_t X, int64_t X_numel, uintptr_t y, int64_t y_numel, uintptr_t Xq,
               int64_t Xq_numel, uintptr_t yq, int64_t yq_numel, uintptr_t W0, int64_t W0_numel,
               uintptr_t b0, int64_t b0_numel, uintptr_t aW, int64_t aW_numel, uintptr_t ab,
               int64_t ab_numel, uintptr_t task_weight, int64_t task_weight_numel, uintptr_t loss,
               int64_t loss_numel, uintptr_t dX, int64_t dX_numel, uintptr_t dXq, int64_t dXq_numel,
               uintptr_t dW0, int64_t dW0_numel, uintptr_t db0, int64_t db0_numel, uintptr_t daW,
               int64_t daW_numel, uintptr_t dab, int64_t dab_numel, int64_t T, int64_t S, int64_t Q,
               int64_t D, int64_t C, int64_t K, bool first_order, bool compute_grad, bool need_dlr,
               bool defer, uintptr_t coef, int64_t coef_numel, uintptr_t lamK, int64_t lamK_numel,
               uintptr_t dzqT, int64_t dzqT_numel, uintptr_t WK, int64_t WK_numel, int nthreads,
               uintptr_t correct, int64_t correct_numel) {
  require_dtype(dtype);
  require(nthreads >= 1 && Q >= 1, "need nthreads >= 1 and Q >= 1");
  const msf::InnerLoopArgs a = inner_args(T, S, D, C, K, first_order);
  prod(Q, C);
  if (correct) require_buffer(correct, correct_numel, T, "correct");
  require_support(X, X_numel, y, y_numel, aW, aW_numel, ab, ab_numel, a);
  require_buffer(Xq, Xq_numel, prod(T, Q, D), "Xq");
  require_labels(yq, yq_numel, T * Q, C);
  require_buffer(W0, W0_numel, prod(C, D), "W0");
  require_buffer(b0, b0_numel, C, "b0");
  require_buffer(loss, loss_numel, T, "loss");
  require(!defer || compute_grad, "defer needs compute_grad");
  if (compute_grad) {
    require_buffer(task_weight, task_weight_numel, T, "task_weight");
    if (defer) {
      require_deferred(coef, coef_numel, lamK, lamK_numel, dzqT, dzqT_numel, WK, WK_numel, T, S, Q, D, C);
    } else {
      require_buffer(dXq, dXq_numel, prod(T, Q, D), "dXq");
      require_buffer(dX, dX_numel, prod(T, S, D), "dX");
    }
    require_buffer(dW0, dW0_numel, prod(T, C, D), "dW0");
    require_buffer(db0, db0_numel, prod(T, C), "db0");
    if (need_dlr) {
      require_buffer(daW, daW_numel, prod(T, C, D), "daW");
      require_buffer(dab, dab_numel, prod(T, C), "dab");
    }
  }
  py::gil_scoped_release nogil;
  by_dtype(dtype, [&](auto tag) {
    using F = decltype(tag);
    msf::AnilDeferred<F> d;
    if (defer) d = {out<F>(coef), out<F>(lamK), out<F>(dzqT), out<F>(WK)};
    msf::anil_loss<F>(in<F>(X), in<int64_t>(y), in<F>(Xq), in<int64_t>(yq), in<F>(W0), in<F>(b0),
                      in<F>(aW), in<F>(ab), in<F>(task_weight), out<F>(loss), out<F>(dX), out<F>(dXq),
                      out<F>(dW0), out<F>(db0), out<F>(daW), out<F>(dab), out<F>(correct), a, Q,
                      compute_grad, need_dlr, d, nthreads);
  });
}

void anil_apply(int dtype, uintptr_t X, int64_t X_numel, uintptr_t W0, int64_t W0_numel, uintptr_t coef,
                int64_t coef_numel, uintptr_t lamK, int64_t lamK_numel, uintptr_t dzqT, int64_t dzqT_numel,
                uintptr_t WK, int64_t WK_numel, double g, uintptr_t dX, int64_t dX_numel, uintptr_t dXq,
                int64_t dXq_numel, int64_t T, int64_t S, int64_t Q, int64_t D, int64_t C, int nthreads) {
  require_dtype(dtype);
  require(nthreads >= 1 && Q >= 1, "need nthreads >= 1 and Q >= 1");
  inner_args(T, S, D, C, 0, false);
  require_buffer(X, X_numel, prod(T, S, D), "X");
  require_buffer(W0, W0_numel, prod(C, D), "W0");
  require_deferred(coef, coef_numel, lamK, lamK_numel, dzqT, dzqT_numel, WK, WK_numel, T, S, Q, D, C);
  require_buffer(dX, dX_numel, prod(T, S, D), "dX");
  require_buffer(dXq, dXq_numel, prod(T, Q, D), "dXq");
  py::gil_scoped_release nogil;
  by_dtype(dtype, [&](auto tag) {
    using F = decltype(tag);
    const msf::AnilDeferred<F> d{out<F>(coef), out<F>(lamK), out<F>(dzqT), out<F>(WK)};
    msf::anil_apply<F>(in<F>(X), in<F>(W0), d, static_cast<F>(g), out<F>(dX), out<F>(dXq), T, S, Q, D, C,
                       nthreads);
  });
}

// What both convex-head entries check: sizes, scalars, the support block and labels, the
// saved solution (A, b, W, fac) and, with a query set, its labels and logits.
msf::ConvexArgs convex_args(int64_t T, int64_t S, int64_t Q, int64_t D, int64_t C, int kind, double reg,
                            double scale, double label_smoothing, double dual_reg, double tol, int64_t max_iter,
                            int nthreads) {
  require(T >= 1 && S >= 1 && D >= 1 && C >= 1 && Q >= 0, "need T, S, D, C >= 1 and Q >= 0");
  require(kind >= 0 && kind <= 2, "kind must be 0 (ridge), 1 (svm) or 2 (logreg)");
  require(std::isfinite(reg) && reg > 0 && std::isfinite(scale) && scale > 0, "reg and scale must be finite and > 0");
  require(label_smoothing >= 0 && label_smoothing <= 1, "label_smoothing must be in [0, 1]");
  require(std::isfinite(dual_reg) && dual_reg > 0, "dual_reg must be finite and > 0");
  require(tol > 0 && tol < 1 && max_iter >= 1, "need tol in (0, 1) and max_iter >= 1");
  require(nthreads >= 1, "nthreads must be >= 1");
  // per-task scratch: S x S (Gram, Schur complement), C inverses of up to S x S (svm), S x C
  prod(C, S, S);
  prod(C, C);
  prod(S, D);
  prod(add(S, Q), C);
  msf::ConvexArgs a;
  a.T = T, a.S = S, a.Q = Q, a.D = D, a.C = C, a.kind = kind, a.reg = reg, a.scale = scale;
  a.label_smoothing = label_smoothing, a.dual_reg = dual_reg, a.tol = tol, a.max_iter = max_iter;
  return a;
}

// The support block X (T, S, D), its labels in [0, C), and the solution A, b, W.
void require_convex_heads(uintptr_t X, int64_t X_numel, uintptr_t y, int64_t y_numel, uintptr_t A, int64_t A_numel,
                          uintptr_t b, int64_t b_numel, uintptr_t W, int64_t W_numel, const msf::ConvexArgs& a) {
  require_buffer(X, X_numel, prod(a.T, a.S, a.D), "X");
  require_labels(y, y_numel, prod(a.T, a.S), a.C);
  require_buffer(A, A_numel, prod(a.T, a.S, a.C), "A");
  require_buffer(b, b_numel, prod(a.T, a.C), "b");
  require_buffer(W, W_numel, prod(a.T, a.C, a.D), "W");
}

// The query block Xq (T, Q, D), its labels in [0, C), and the query logits (T, Q, C).
void require_convex_queries(uintptr_t Xq, int64_t Xq_numel, uintptr_t yq, int64_t yq_numel, uintptr_t logits,
                            int64_t logits_numel, const msf::ConvexArgs& a) {
  require_buffer(Xq, Xq_numel, prod(a.T, a.Q, a.D), "Xq");
  require_labels(yq, yq_numel, prod(a.T, a.Q), a.C);
  require_buffer(logits, logits_numel, prod(a.T, a.Q, a.C), "logits");
}

void convex_forward(int dtype, uintptr_t X, int64_t X_numel, uintptr_t y, int64_t y_numel, uintptr_t Xq,
                    int64_t Xq_numel, uintptr_t yq, int64_t yq_numel, uintptr_t A, int64_t A_numel, uintptr_t b,
                    int64_t b_numel, uintptr_t W, int64_t W_numel, uintptr_t fac, int64_t fac_numel,
                    uintptr_t logits, int64_t logits_numel, uintptr_t loss, int64_t loss_numel, uintptr_t correct,
                    int64_t correct_numel, uintptr_t residual, int64_t residual_numel, int64_t T, int64_t S,
                    int64_t Q, int64_t D, int64_t C, int kind, double reg, double scale, double label_smoothing,
                    double dual_reg, double tol, int64_t max_iter, int nthreads) {
  require_dtype(dtype);
  const msf::ConvexArgs a = convex_args(T, S, Xq ? Q : 0, D, C, kind, reg, scale, label_smoothing, dual_reg, tol,
                                        max_iter, nthreads);
  require_convex_heads(X, X_numel, y, y_numel, A, A_numel, b, b_numel, W, W_numel, a);
  require_buffer(residual, residual_numel, T, "residual");
  if (fac || Xq) require_buffer(fac, fac_numel, prod(T, S, S), "fac");
  if (Xq) {
    require(Q >= 1, "a query set needs Q >= 1");
    require_convex_queries(Xq, Xq_numel, yq, yq_numel, logits, logits_numel, a);
    require_buffer(loss, loss_numel, T, "loss");
    require_buffer(correct, correct_numel, T, "correct");
  }
  py::gil_scoped_release nogil;
  by_dtype(dtype, [&](auto tag) {
    using F = decltype(tag);
    msf::convex_forward<F>(in<F>(X), in<int64_t>(y), in<F>(Xq), in<int64_t>(yq), out<double>(A), out<double>(b),
                           out<F>(W), out<double>(fac), out<F>(logits), out<F>(loss), out<F>(correct),
                           out<double>(residual), a, nthreads);
  });
}

void convex_backward(int dtype, uintptr_t X, int64_t X_numel, uintptr_t y, int64_t y_numel, uintptr_t Xq,
                     int64_t Xq_numel, uintptr_t yq, int64_t yq_numel, uintptr_t A, int64_t A_numel, uintptr_t b,
                     int64_t b_numel, uintptr_t W, int64_t W_numel, uintptr_t fac, int64_t fac_numel,
                     uintptr_t logits, int64_t logits_numel, uintptr_t g, int64_t g_numel, uintptr_t dX,
                     int64_t dX_numel, uintptr_t dXq, int64_t dXq_numel, uintptr_t dreg, int64_t dreg_numel,
                     uintptr_t dscale, int64_t dscale_numel, int64_t T, int64_t S, int64_t Q, int64_t D, int64_t C,
                     int kind, double reg, double scale, double label_smoothing, double dual_reg, int nthreads) {
  require_dtype(dtype);
  const msf::ConvexArgs a = convex_args(T, S, Q, D, C, kind, reg, scale, label_smoothing, dual_reg, 0.5, 1, nthreads);
  require(Q >= 1, "need Q >= 1");
  require_convex_heads(X, X_numel, y, y_numel, A, A_numel, b, b_numel, W, W_numel, a);
  require_convex_queries(Xq, Xq_numel, yq, yq_numel, logits, logits_numel, a);
  require_buffer(fac, fac_numel, prod(T, S, S), "fac");
  require_buffer(g, g_numel, T, "g");
  require_buffer(dX, dX_numel, prod(T, S, D), "dX");
  require_buffer(dXq, dXq_numel, prod(T, Q, D), "dXq");
  require_buffer(dreg, dreg_numel, T, "dreg");
  require_buffer(dscale, dscale_numel, T, "dscale");
  py::gil_scoped_release nogil;
  by_dtype(dtype, [&](auto tag) {
    using F = decltype(tag);
    msf::convex_backward<F>(in<F>(X), in<int64_t>(y), in<F>(Xq), in<int64_t>(yq), in<double>(A), in<double>(b),
                            in<F>(W), in<double>(fac), in<F>(logits), in<F>(g), out<F>(dX), out<F>(dXq),
                            out<double>(dreg), out<double>(dscale), a, nthreads);
  });
}

}  // namespace

#ifndef MSF_MODULE
#define MSF_MODULE _C_base
#define MSF_ISA "base"
#endif

namespace {

// Ask the kernel for transparent huge pages on the 2 MiB-aligned interior of a buffer that
// has not been written yet (a gradient about to be formed): a large fresh allocation is a
// new mapping whose first touch otherwise faults in one 4 KiB page at a time (38 MB: 11 ms
// of faults against 0.9 ms of writing, bench/RESULTS.md).  Advice only: the contents and
// the mapping's ownership are unchanged, and an error (no THP, an odd mapping) is ignored.
// Returns whether the advice was given.
bool advise_huge_pages(uintptr_t p, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (p == 0 || nbytes < 2 * static_cast<int64_t>(kHuge) || p > UINTPTR_MAX - static_cast<uintptr_t>(nbytes))
    return false;
  const uintptr_t lo = (p + kHuge - 1) / kHuge * kHuge;
  const uintptr_t hi = (p + static_cast<uintptr_t>(nbytes)) / kHuge * kHuge;
  if (hi <= lo) return false;
  return madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE) == 0;
#else
  (void)p;
  (void)nbytes;
  return false;
#endif
}


// The row sweep's products (cpu/gemm.h).  Every matrix row-major; each buffer must hold
// the span its sizes and row stride touch; C must not overlap A or B, nor gemm_nt's work
// overlap A, Bp or C (not checked: an overlap gives wrong numbers, never an access outside
// the buffers).
void require_gemm_sizes(int dtype, int64_t M, int64_t N, int64_t K, int nthreads) {
  require_dtype(dtype);
  require(M >= 1 && N >= 1 && K >= 1, "need M, N, K >= 1");
  require(nthreads >= 1, "nthreads must be >= 1");
}

// A (rows x k) matrix padded to whole tiles (at most 64 rows more): sizes checked so that
// the padded count cannot wrap.  Returns the element size.
int padded_sizes(int dtype, int64_t rows, int64_t k) {
  require_dtype(dtype);
  require(rows >= 1 && k >= 1, "need n, k >= 1");
  prod(add(rows, 64), k);
  return dtype == kFloat32 ? 4 : 8;
}

int64_t gemm_packed_numel(int dtype, int64_t n, int64_t k) {
  return msf::gemm::packed_numel(padded_sizes(dtype, n, k), n, k);
}

void gemm_pack(int dtype, uintptr_t B, int64_t B_numel, int64_t n, int64_t k, int64_t ldb, uintptr_t Bp,
               int64_t Bp_numel, int nthreads) {
  require_gemm_sizes(dtype, n, 1, k, nthreads);
  require(ldb >= k, "need ldb >= k");
  require_buffer(B, B_numel, span(n, k, ldb), "B");
  require_buffer(Bp, Bp_numel, gemm_packed_numel(dtype, n, k), "Bp");
  py::gil_scoped_release nogil;
  by_dtype(dtype, [&](auto tag) {
    using F = decltype(tag);
    msf::gemm::pack<F>(in<F>(B), n, k, ldb, out<F>(Bp), nthreads);
  });
}

int64_t gemm_nt_work_numel(int dtype, int64_t m, int64_t k) {
  return msf::gemm::nt_work_numel(padded_sizes(dtype, m, k), m, k);
}

void gemm_nt(int dtype, uintptr_t A, int64_t A_numel, int64_t lda, uintptr_t Bp, int64_t Bp_numel, uintptr_t C,
             int64_t C_numel, int64_t ldc, int64_t M, int64_t N, int64_t K, double alpha, uintptr_t work,
             int64_t work_numel, int nthreads) {
  require_gemm_sizes(dtype, M, N, K, nthreads);
  require(lda >= K && ldc >= N, "need lda >= K and ldc >= N");
  require_buffer(A, A_numel, span(M, K, lda), "A");
  require_buffer(Bp, Bp_numel, gemm_packed_numel(dtype, N, K), "Bp");
  require_buffer(C, C_numel, span(M, N, ldc), "C");
  require_buffer(work, work_numel, gemm_nt_work_numel(dtype, M, K), "work");
  py::gil_scoped_release nogil;
  by_dtype(dtype, [&](auto tag) {
    using F = decltype(tag);
    msf::gemm::nt<F>(in<F>(A), lda, in<F>(Bp), out<F>(C), ldc, M, N, K, static_cast<F>(alpha), out<F>(work),
                     nthreads);
  });
}

// transpose_a: C = alpha A^T B with A stored (K x M); otherwise C = alpha A B, A (M x K).
void gemm_nn_tn(int dtype, bool transpose_a, uintptr_t A, int64_t A_numel, int64_t lda, uintptr_t B,
                int64_t B_numel, int64_t ldb, uintptr_t C, int64_t C_numel, int64_t ldc, int64_t M, int64_t N,
                int64_t K, double alpha, bool accumulate, int nthreads) {
  require_gemm_sizes(dtype, M, N, K, nthreads);
  require(lda >= (transpose_a ? M : K) && ldb >= N && ldc >= N,
          transpose_a ? "need lda >= M, ldb >= N and ldc >= N" : "need lda >= K, ldb >= N and ldc >= N");
  require_buffer(A, A_numel, transpose_a ? span(K, M, lda) : span(M, K, lda), "A");
  require_buffer(B, B_numel, span(K, N, ldb), "B");
  require_buffer(C, C_numel, span(M, N, ldc), "C");
  py::gil_scoped_release nogil;
  by_dtype(dtype, [&](auto tag) {
    using F = decltype(tag);
    auto f = transpose_a ? &msf::gemm::tn<F> : &msf::gemm::nn<F>;
    f(in<F>(A), lda, in<F>(B), ldb, out<F>(C), ldc, M, N, K, static_cast<F>(alpha), accumulate, nthreads);
  });
}
}  // namespace

PYBIND11_MODULE(MSF_MODULE, m) {
  m.doc() = "metassl_fast CPU kernels (raw-pointer interface; use metassl_fast's Python API)";
  m.def("gemm_packed_numel", &gemm_packed_numel, py::arg("dtype"), py::arg("n"), py::arg("k"),
        "Elements gemm_pack writes for an (n x k) B. See csrc/cpu/gemm.h.");
  m.def("gemm_pack", &gemm_pack, py::arg("dtype"), py::arg("B"), py::arg("B_numel"), py::arg("n"), py::arg("k"),
        py::arg("ldb"), py::arg("Bp"), py::arg("Bp_numel"), py::arg("nthreads"),
        "Bp <- B (n x k) in the column panels gemm_nt reads.");
  m.def("gemm_nt", &gemm_nt, py::arg("dtype"), py::arg("A"), py::arg("A_numel"), py::arg("lda"), py::arg("Bp"),
        py::arg("Bp_numel"), py::arg("C"), py::arg("C_numel"), py::arg("ldc"), py::arg("M"), py::arg("N"),
        py::arg("K"), py::arg("alpha"), py::arg("work"), py::arg("work_numel"), py::arg("nthreads"),
        "C (M x N) = alpha A B^T, B packed by gemm_pack; work (gemm_nt_work_numel elements) is scratch.");
  m.def("gemm_nt_work_numel", &gemm_nt_work_numel, py::arg("dtype"), py::arg("m"), py::arg("k"),
        "Elements of gemm_nt's workspace for an (m x k) A.");
  m.def("gemm_nn_tn", &gemm_nn_tn, py::arg("dtype"), py::arg("transpose_a"), py::arg("A"), py::arg("A_numel"),
        py::arg("lda"), py::arg("B"), py::arg("B_numel"), py::arg("ldb"), py::arg("C"), py::arg("C_numel"),
        py::arg("ldc"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("alpha"), py::arg("accumulate"),
        py::arg("nthreads"), "C (M x N) (+)= alpha op(A) B, op(A) = A (M x K) or A^T (A stored K x M).");
  m.def("block_rows", &block_rows, py::arg("dtype"), py::arg("S"), py::arg("S_numel"),
        py::arg("B"), py::arg("C"), py::arg("ld"), py::arg("row0"), py::arg("n_pairs"),
        py::arg("lse"), py::arg("lse_numel"), py::arg("compute_lse"), py::arg("pos"),
        py::arg("pos_numel"), py::arg("row_loss"), py::arg("row_loss_numel"), py::arg("g_row"), py::arg("g_row_numel"), py::arg("lse_col"),
        py::arg("g_col"), py::arg("col_numel"), py::arg("write_grad"), py::arg("nthreads"),
        "Row statistics and, optionally, the in-place gradient of one row block of S; "
        "returns sum(G * S). See csrc/cpu/contrastive.h.");
  m.def("block_col_stats", &block_col_stats, py::arg("dtype"), py::arg("S"), py::arg("S_numel"),
        py::arg("B"), py::arg("n_cols"), py::arg("ld"), py::arg("col_max"), py::arg("col_sum"),
        py::arg("col_numel"), py::arg("nthreads"),
        "Merge one row block of S into running per-column (max, sum of exp).");
  m.def("block_rows_labeled", &block_rows_labeled, py::arg("dtype"), py::arg("S"), py::arg("S_numel"),
        py::arg("B"), py::arg("C"), py::arg("ld"), py::arg("row0"), py::arg("exclude_self"),
        py::arg("pairwise"), py::arg("y_row"), py::arg("y_row_numel"), py::arg("y_col"),
        py::arg("y_col_numel"), py::arg("row_loss"), py::arg("row_loss_numel"), py::arg("g_row"),
        py::arg("g_row_numel"), py::arg("ext") = 0, py::arg("ext_numel") = 0, py::arg("dext") = 0,
        py::arg("dext_numel") = 0, py::arg("ext_positive") = true, py::arg("write_grad"), py::arg("nthreads"),
        "Labelled-row losses (SupCon, NT-Xent, pairwise NT-Xent) of one row block of S and, "
        "optionally, its in-place gradient; returns sum(G * S). See csrc/cpu/labeled.h.");
  m.def("block_sigmoid", &block_sigmoid, py::arg("dtype"), py::arg("S"), py::arg("S_numel"),
        py::arg("B"), py::arg("C"), py::arg("ld"), py::arg("row0"), py::arg("scale"), py::arg("bias"),
        py::arg("weight"), py::arg("write_grad"), py::arg("nthreads"),
        "SigLIP's pairwise sigmoid loss of one row block of S = Q K^T and, optionally, dL/dx in "
        "place; returns (loss, sum dL/dx * S, sum dL/dx). See csrc/cpu/siglip.h.");
  m.def("inner_loop_forward", &inner_loop_forward, py::arg("dtype"), py::arg("X"), py::arg("X_numel"),
        py::arg("y"), py::arg("y_numel"), py::arg("W0"), py::arg("W0_numel"), py::arg("b0"),
        py::arg("b0_numel"), py::arg("aW"), py::arg("aW_numel"), py::arg("ab"), py::arg("ab_numel"),
        py::arg("W_traj"), py::arg("W_traj_numel"), py::arg("b_traj"), py::arg("b_traj_numel"),
        py::arg("T"), py::arg("S"), py::arg("D"), py::arg("C"), py::arg("K"), py::arg("nthreads"),
        "K inner SGD steps of a linear head for T tasks; fills the W/b trajectories. "
        "See csrc/cpu/inner_loop.h.");
  m.def("inner_loop_backward", &inner_loop_backward, py::arg("dtype"), py::arg("X"),
        py::arg("X_numel"), py::arg("y"), py::arg("y_numel"), py::arg("aW"), py::arg("aW_numel"),
        py::arg("ab"), py::arg("ab_numel"), py::arg("W_traj"), py::arg("W_traj_numel"),
        py::arg("b_traj"), py::arg("b_traj_numel"), py::arg("dW_K"), py::arg("dW_K_numel"),
        py::arg("db_K"), py::arg("db_K_numel"), py::arg("dX"), py::arg("dX_numel"), py::arg("dW0"),
        py::arg("dW0_numel"), py::arg("db0"), py::arg("db0_numel"), py::arg("daW"),
        py::arg("daW_numel"), py::arg("dab"), py::arg("dab_numel"), py::arg("T"), py::arg("S"),
        py::arg("D"), py::arg("C"), py::arg("K"), py::arg("first_order"), py::arg("nthreads"),
        "Closed-form (second- or first-order) reverse pass of inner_loop_forward, per task.");
  m.def("anil_loss", &anil_loss, py::arg("dtype"), py::arg("X"), py::arg("X_numel"), py::arg("y"),
        py::arg("y_numel"), py::arg("Xq"), py::arg("Xq_numel"), py::arg("yq"), py::arg("yq_numel"),
        py::arg("W0"), py::arg("W0_numel"), py::arg("b0"), py::arg("b0_numel"), py::arg("aW"),
        py::arg("aW_numel"), py::arg("ab"), py::arg("ab_numel"), py::arg("task_weight"),
        py::arg("task_weight_numel"), py::arg("loss"), py::arg("loss_numel"), py::arg("dX"),
        py::arg("dX_numel"), py::arg("dXq"), py::arg("dXq_numel"), py::arg("dW0"),
        py::arg("dW0_numel"), py::arg("db0"), py::arg("db0_numel"), py::arg("daW"),
        py::arg("daW_numel"), py::arg("dab"), py::arg("dab_numel"), py::arg("T"), py::arg("S"),
        py::arg("Q"), py::arg("D"), py::arg("C"), py::arg("K"), py::arg("first_order"),
        py::arg("compute_grad"), py::arg("need_dlr"), py::arg("defer"), py::arg("coef"),
        py::arg("coef_numel"), py::arg("lamK"), py::arg("lamK_numel"), py::arg("dzqT"),
        py::arg("dzqT_numel"), py::arg("WK"), py::arg("WK_numel"), py::arg("nthreads"),
        py::arg("correct") = 0, py::arg("correct_numel") = 0,
        "The ANIL meta-loss per task, optionally its gradient and the per-task number of correct "
        "queries (csrc/cpu/inner_loop.h).");
  m.def("anil_apply", &anil_apply, py::arg("dtype"), py::arg("X"), py::arg("X_numel"), py::arg("W0"),
        py::arg("W0_numel"), py::arg("coef"), py::arg("coef_numel"), py::arg("lamK"), py::arg("lamK_numel"),
        py::arg("dzqT"), py::arg("dzqT_numel"), py::arg("WK"), py::arg("WK_numel"), py::arg("g"), py::arg("dX"),
        py::arg("dX_numel"), py::arg("dXq"), py::arg("dXq_numel"), py::arg("T"), py::arg("S"), py::arg("Q"),
        py::arg("D"), py::arg("C"), py::arg("nthreads"),
        "dX and dXq from the coefficients a deferred anil_loss call left (csrc/cpu/inner_loop.h).");
  m.def("convex_forward", &convex_forward, py::arg("dtype"), py::arg("X"), py::arg("X_numel"), py::arg("y"),
        py::arg("y_numel"), py::arg("Xq"), py::arg("Xq_numel"), py::arg("yq"), py::arg("yq_numel"), py::arg("A"),
        py::arg("A_numel"), py::arg("b"), py::arg("b_numel"), py::arg("W"), py::arg("W_numel"), py::arg("fac"),
        py::arg("fac_numel"), py::arg("logits"), py::arg("logits_numel"), py::arg("loss"), py::arg("loss_numel"),
        py::arg("correct"), py::arg("correct_numel"), py::arg("residual"), py::arg("residual_numel"), py::arg("T"),
        py::arg("S"), py::arg("Q"), py::arg("D"), py::arg("C"), py::arg("kind"), py::arg("reg"), py::arg("scale"),
        py::arg("label_smoothing"), py::arg("dual_reg"), py::arg("tol"), py::arg("max_iter"), py::arg("nthreads"),
        "Convex few-shot heads (ridge, svm, logreg) per task: the solution and, with a query set, the "
        "query loss (csrc/cpu/convex.h).");
  m.def("convex_backward", &convex_backward, py::arg("dtype"), py::arg("X"), py::arg("X_numel"), py::arg("y"),
        py::arg("y_numel"), py::arg("Xq"), py::arg("Xq_numel"), py::arg("yq"), py::arg("yq_numel"), py::arg("A"),
        py::arg("A_numel"), py::arg("b"), py::arg("b_numel"), py::arg("W"), py::arg("W_numel"), py::arg("fac"),
        py::arg("fac_numel"), py::arg("logits"), py::arg("logits_numel"), py::arg("g"), py::arg("g_numel"),
        py::arg("dX"), py::arg("dX_numel"), py::arg("dXq"), py::arg("dXq_numel"), py::arg("dreg"),
        py::arg("dreg_numel"), py::arg("dscale"), py::arg("dscale_numel"), py::arg("T"), py::arg("S"), py::arg("Q"),
        py::arg("D"), py::arg("C"), py::arg("kind"), py::arg("reg"), py::arg("scale"), py::arg("label_smoothing"),
        py::arg("dual_reg"), py::arg("nthreads"),
        "The exact gradient of sum_t g_t loss_t of convex_forward's heads (csrc/cpu/convex.h).");
  m.def("advise_huge_pages", &advise_huge_pages, py::arg("ptr"), py::arg("nbytes"),
        "madvise(MADV_HUGEPAGE) on the 2 MiB-aligned interior of [ptr, ptr + nbytes), a buffer "
        "not yet written; advice only, False where not given.");
  // The build's instruction set (CMakeLists.txt) and what its compiler flags enabled.
  m.attr("isa") = MSF_ISA;
  m.attr("vec_bytes") = MSF_VEC_BYTES;
#if defined(__AVX512F__)
  m.attr("simd") = "avx512";
#elif defined(__AVX2__)
  m.attr("simd") = "avx2";
#else
  m.attr("simd") = "baseline";
#endif
  // The x86-64 levels this CPU (and its OS's register state) supports, from cpuid through
  // libgcc; _ext.py asks the base build before it imports a wider one, which would stop the
  // process at its first AVX-512 instruction on a CPU without it.
  m.def("cpu_levels", []() {
    py::dict d;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    d["x86-64-v3"] = __builtin_cpu_supports("x86-64-v3") != 0;
    d["x86-64-v4"] = __builtin_cpu_supports("x86-64-v4") != 0;
#endif
    return d;
  }, "The x86-64 instruction-set levels this CPU supports (cpuid): {'x86-64-v3': bool, 'x86-64-v4': bool}.");
}
