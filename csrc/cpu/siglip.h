// Fused row-block kernel of the SigLIP loss (sigmoid loss of every pair) on the CPU; the
// caller (python/metassl_fast/ops/siglip/cpu.py) streams row blocks of the raw products
// S = Q K^T through a B x C buffer, as for the contrastive op (cpu/contrastive.h).
//
// x_rj = scale S_rj + bias, z = +1 on the diagonal (column row0 + r: row0 is a column
// index, offset by the rank when the columns are gathered from every rank), -1 elsewhere;
// loss += w softplus(-z x);  dL/dx = -z w sigmoid(-z x), written over S when write_grad.
// out[0] = sum of w softplus(-z x), out[1] = sum dL/dx * S (for d scale), out[2] =
// sum dL/dx (for d bias).
//
// Limits: T is float or double; rows are contiguous, row stride ld >= C.
#pragma once
#include <cstdint>

namespace msf {

struct SigmoidArgs {
  int64_t B = 0, C = 0, ld = 0;
  int64_t row0 = 0;
  double scale = 1.0, bias = 0.0, weight = 1.0;
  bool write_grad = false;
};

template <typename T>
void block_sigmoid(T* S, const SigmoidArgs& a, double out[3], int nthreads);

}  // namespace msf
