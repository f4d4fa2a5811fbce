// Fused row-block kernels of the contrastive (InfoNCE / CLIP) loss on the CPU.
//
// The caller (python/metassl_fast/ops/contrastive.py) streams row blocks of the
// similarity matrix S = s * Q K^T through a B x C buffer: torch's BLAS fills the
// block, these kernels do everything else on it while it is still in cache, then
// BLAS multiplies the gradient block back.  The whole N x C matrix never exists.
//
// For row r of a block (global row i = row0 + r, positive column i < n_pairs):
//   lse_r   = log sum_j exp(S_rj)                                (online max/sum)
//   pos_r   = S_ri
//   G_rj    = g_row_r (exp(S_rj - lse_r) - [j == i])
//           + [j < n_pairs] g_col_j (exp(S_rj - lse_col_j) - [j == i])
// G overwrites S in place; the return value is sum_rj G_rj * S_rj (old S), from
// which the caller gets dL/ds = sum G S / s.
// Column statistics for the symmetric loss merge each block into a running
// (max, sum) per column: lse_col_j = max_j + log(sum_j).
//
// Limits: T is float or double (bf16/fp16 inputs are multiplied in float32 by the
// caller); rows are contiguous (column stride 1), row stride ld >= C.
#pragma once
#include <cstdint>

namespace msf {

struct RowBlockArgs {
  int64_t B = 0, C = 0, ld = 0;  // block rows, columns, row stride of S
  int64_t row0 = 0;              // global index of the block's first row
  int64_t n_pairs = 0;           // columns [0, n_pairs) are keys (have positives / column loss)
  bool compute_lse = false;      // write lse[r]; otherwise read it
  bool write_grad = false;       // overwrite S with G
};

// row_loss (optional, with compute_lse): (max_j S_rj - S_ri) + log sum_j exp(S_rj - max),
// the row loss without the cancellation of lse_r - pos_r when it is tiny.
template <typename T>
double block_rows(T* S, const RowBlockArgs& a, T* lse, T* pos, T* row_loss, const T* g_row,
                  const T* lse_col, const T* g_col, int nthreads);

template <typename T>
void block_col_stats(const T* S, int64_t B, int64_t n_cols, int64_t ld, T* col_max, T* col_sum,
                     int nthreads);

// ---- Labelled rows: SupCon, NT-Xent (SimCLR) and pytorch-metric-learning's NT-Xent ----
// Row r of a block is an anchor with label y_row[r]; column j has label y_col[j].
// With exclude_self, column i = row0 + r is the anchor itself and belongs to no set
// (row0 is a column index: the block's offset, plus the rank's offset when the
// columns are keys gathered from every rank).  P(i) = {j != self : y_col[j] == y_row[r]}, Neg(i) = {j : y_col[j] != y_row[r]}.
//   mean-positive (SupCon; NT-Xent with labels [0..N, 0..N]):
//     l_i = LSE_{j != self} S_ij - mean_{p in P(i)} S_ip
//     G_ij = g_i (softmax_{j != self}(S_i)_j - [j in P(i)] / |P(i)|)
//   pairwise (pytorch-metric-learning NTXentLoss: one term per positive pair,
//   denominator = that positive + the anchor's negatives):
//     l_i = sum_{p in P(i)} softplus(LSE_{n in Neg(i)} S_in - S_ip)
//     G_ip = -g_i sigmoid(t_ip),  G_in = g_i (sum_p sigmoid(t_ip)) softmax_Neg(S_i)_n
// An anchor without positives has l_i = 0 and G_i = 0.  G overwrites S when
// write_grad; the return value is sum_rj G_rj S_rj (old S, the columns only).
// ext (optional, mean-positive only): one more logit per row, outside S; with
// ext_positive it is a positive of its row (info-nce-pytorch's and lightly's
// memory-bank form: the columns are negatives, the positive is q_i . k_i), otherwise
// it only enters the LSE (the log-sum-exp of each query's own paired negatives).
// Its gradient is written to dext[r].
struct LabeledArgs {
  int64_t B = 0, C = 0, ld = 0;
  int64_t row0 = 0;
  bool exclude_self = false;
  bool pairwise = false;
  bool write_grad = false;
  bool ext_positive = true;
};

template <typename T>
double block_rows_labeled(T* S, const LabeledArgs& a, const int64_t* y_row, const int64_t* y_col,
                          T* row_loss, const T* g_row, const T* ext, T* dext, int nthreads);

// ---- SigLIP: sigmoid loss of every pair -------------------------------------------
// x_rj = scale S_rj + bias, z = +1 on the diagonal (column row0 + r: row0 is a column
// index, offset by the rank when the columns are gathered from every rank), -1 elsewhere;
// loss += w softplus(-z x);  dL/dx = -z w sigmoid(-z x), written over S when write_grad.
// out[0] = sum of w softplus(-z x), out[1] = sum dL/dx * S (for d scale), out[2] =
// sum dL/dx (for d bias).
struct SigmoidArgs {
  int64_t B = 0, C = 0, ld = 0;
  int64_t row0 = 0;
  double scale = 1.0, bias = 0.0, weight = 1.0;
  bool write_grad = false;
};

template <typename T>
void block_sigmoid(T* S, const SigmoidArgs& a, double out[3], int nthreads);

}  // namespace msf
