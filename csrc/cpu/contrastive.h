// Fused row-block kernels of the contrastive (InfoNCE / CLIP) loss on the CPU.
//
// The caller (python/metassl_fast/ops/contrastive/cpu.py) streams row blocks of the
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

}  // namespace msf
