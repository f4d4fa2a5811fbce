// Runs csrc/cuda/contrastive.cu's kernels under the host emulation (emu.h) on the
// inputs of a file and writes every output: the driver of tests/test_cuda_emulated.py.
//   run_contrastive DTYPE N C D SYMMETRIC SCALE IN OUT
// DTYPE 0 float32, 2 float16, 3 bfloat16.  IN: Q (N D), K (C D), g (N) as float32.
// OUT (float32): lse, pos, row_loss, lse_col (N each; lse_col 0 one-sided), dq (N D),
// ds (1: the sum of the blocks' partials), dk (C D).
#define MSF_CPU_EMULATION
#include "emu.h"
// the kernels themselves
#include "../../csrc/cuda/contrastive.cu"

#include <cstdio>
#include <cstdlib>
#include <string>

using namespace msf::cuda;

template <typename T>
int run(int N, int C, int D, bool sym, float scale, const std::vector<float>& in, std::vector<float>& out) {
  constexpr int kOut = Traits<T>::kOutChunk;
  std::vector<T> Q(static_cast<size_t>(N) * D), K(static_cast<size_t>(C) * D);
  for (size_t i = 0; i < Q.size(); ++i) Q[i] = from_float<T>(in[i]);
  for (size_t i = 0; i < K.size(); ++i) K[i] = from_float<T>(in[Q.size() + i]);
  const float* g = in.data() + Q.size() + K.size();
  std::vector<float> lse(N), pos(N), row_loss(N), col_max(N, -INFINITY), col_sum(N, 0.f), lse_col(N, 0.f);
  std::vector<int> lock((C + kTile - 1) / kTile, 0);
  const unsigned rb = static_cast<unsigned>((N + kTile - 1) / kTile);
  auto fwd = [&] {
    if (sym)
      fwd_kernel<T, true>(Q.data(), K.data(), lse.data(), pos.data(), row_loss.data(), col_max.data(),
                          col_sum.data(), lock.data(), N, C, D, D, D, scale);
    else
      fwd_kernel<T, false>(Q.data(), K.data(), lse.data(), pos.data(), row_loss.data(), col_max.data(),
                           col_sum.data(), lock.data(), N, C, D, D, D, scale);
  };
  emu::launch(dim3(rb), kThreads, fwd);
  if (sym)
    for (int i = 0; i < N; ++i) lse_col[i] = col_max[i] + std::log(col_sum[i]);
  std::vector<float> dq(static_cast<size_t>(N) * D, NAN), parts(rb, NAN), dk(static_cast<size_t>(C) * D, NAN);
  const unsigned dchunks = static_cast<unsigned>((D + kOut - 1) / kOut);
  auto dq_body = [&] {
    if (sym)
      grad_kernel<T, true, false>(Q.data(), K.data(), lse.data(), g, lse_col.data(), g, dq.data(), parts.data(),
                                  N, C, D, 0, 0, D, D, D, scale);
    else
      grad_kernel<T, false, false>(Q.data(), K.data(), lse.data(), g, lse_col.data(), g, dq.data(), parts.data(),
                                   N, C, D, 0, 0, D, D, D, scale);
  };
  emu::launch(dim3(rb, dchunks), kThreads, dq_body);
  // dK in two calls, [0, c1) and [c1, C), as Python asks for keys and negatives apart
  const int c1 = C > 1 ? C / 2 + 1 : C;
  for (auto [a, b] : {std::pair<int, int>{0, c1}, std::pair<int, int>{c1, C}}) {
    if (b <= a) continue;
    auto dk_body = [&, a = a, b = b] {
      float* o = dk.data() + static_cast<size_t>(a) * D;
      if (sym)
        grad_kernel<T, true, true>(Q.data(), K.data(), lse.data(), g, lse_col.data(), g, o, nullptr, N, C, D, a, b,
                                   D, D, D, scale);
      else
        grad_kernel<T, false, true>(Q.data(), K.data(), lse.data(), g, lse_col.data(), g, o, nullptr, N, C, D, a,
                                    b, D, D, D, scale);
    };
    emu::launch(dim3(static_cast<unsigned>((b - a + kTile - 1) / kTile), dchunks), kThreads, dk_body);
  }
  float ds = 0.f;
  for (float p : parts) ds += p;
  for (auto* v : {&lse, &pos, &row_loss, &lse_col}) out.insert(out.end(), v->begin(), v->end());
  out.insert(out.end(), dq.begin(), dq.end());
  out.push_back(ds);
  out.insert(out.end(), dk.begin(), dk.end());
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 9) {
    std::fprintf(stderr, "usage: run_contrastive DTYPE N C D SYMMETRIC SCALE IN OUT\n");
    return 2;
  }
  const int dtype = std::atoi(argv[1]), N = std::atoi(argv[2]), C = std::atoi(argv[3]), D = std::atoi(argv[4]);
  const bool sym = std::atoi(argv[5]) != 0;
  const float scale = std::strtof(argv[6], nullptr);
  const size_t n_in = static_cast<size_t>(N) * D + static_cast<size_t>(C) * D + N;
  std::vector<float> in(n_in), out;
  FILE* f = std::fopen(argv[7], "rb");
  if (!f || std::fread(in.data(), sizeof(float), n_in, f) != n_in) return 3;
  std::fclose(f);
  if (dtype == 0)
    run<float>(N, C, D, sym, scale, in, out);
  else if (dtype == 2)
    run<__half>(N, C, D, sym, scale, in, out);
  else
    run<__nv_bfloat16>(N, C, D, sym, scale, in, out);
  f = std::fopen(argv[8], "wb");
  if (!f || std::fwrite(out.data(), sizeof(float), out.size(), f) != out.size()) return 4;
  std::fclose(f);
  return 0;
}
