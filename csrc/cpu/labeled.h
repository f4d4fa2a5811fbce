// Fused row-block kernel of the labelled-row losses on the CPU: SupCon, NT-Xent (SimCLR),
// pytorch-metric-learning's pairwise NT-Xent and explicit positives.  The caller
// (python/metassl_fast/ops/labeled/cpu.py) streams row blocks of S = s * Q K^T through a
// B x C buffer, as for the contrastive op (cpu/contrastive.h).
//
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
//
// Limits: T is float or double; rows are contiguous, row stride ld >= C; labels int64.
#pragma once
#include <cstdint>

namespace msf {

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

}  // namespace msf
