// Runs the kernels of csrc/cuda/{contrastive,labeled,siglip,inner_loop}.cu under the host emulation (emu.h) on the
// inputs of a file and writes every output: the driver of tests/test_cuda_emulated.py.
//   run_kernels MODE DTYPE N C D P0 P1 P2 P3 P4 IN OUT
//   run_kernels span DTYPE D BUDGET CAP MIN_PIECES  (prints grad_span's span, the output chunk, the dynamic smem bytes)
// MSF_EMU_SMEM, MSF_EMU_SMS: the emulated card's shared memory opt-in per block and its
// multiprocessors (see emu_span).
// DTYPE 0 float32, 2 float16, 3 bfloat16; all files float32.
// MODE contrastive: P0 symmetric, P1 scale.  IN: Q (N D), K (C D), g (N).
//   OUT: lse, pos, row_loss, lse_col (N each; lse_col 0 one-sided), dq (N D), ds, dk (C D).
// MODE siglip: P0 logit scale, P1 bias, P2 diag_col0, P3 w.  IN: Q, K.
//   OUT: loss (N), dq (N D), sum G S_raw, sum G, dk (C D).
// MODE labeled: P0 scale, P1 self (-1: no; else self_col0), P2 pairwise, P3 ext (0 none,
//   1 extra logit not positive, 2 positive).  IN: Q, K, yq (N), yk (C), ext (N), g (N).
//   OUT: loss, stat_a, stat_b (N each), dq (N D), ds, dk (C D).
// MODE inner (DTYPE 0): N = T tasks, C classes, D; P0 S, P1 Q, P2 K, P3 kernel mode (0 ANIL
//   loss, 1 adapt forward, 2 adapt backward), P4 flags (1 grad, 2 first order, 4 need_dlr).
//   IN: X (T S D), y (T S), Xq (T Q D), yq (T Q), W0 (C D), b0 (C), aW (C D), ab (C),
//   task_weight (T), dW_K (T C D), db_K (T C).  OUT: loss (T), dX (T S D), dXq (T Q D),
//   dW0 (T C D), db0 (T C), daW (T C D), dab (T C), W_traj (T (K+1) C D), b_traj (T (K+1) C).
#define MSF_CPU_EMULATION
#include "emu.h"
// the kernels themselves
#include "../../csrc/cuda/contrastive.cu"
#include "../../csrc/cuda/labeled.cu"
#include "../../csrc/cuda/siglip.cu"
#include "../../csrc/cuda/inner_loop.cu"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>

using namespace msf::cuda;

template <typename T>
std::vector<T> operand(const float* x, size_t n) {
  std::vector<T> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = from_float<T>(x[i]);
  return out;
}

// The backward's span (grad_span) for `outer` rows on a card whose per-block shared memory
// opt-in is MSF_EMU_SMEM bytes (default 232448, sm_90's; 0: the register path) with
// MSF_EMU_SMS multiprocessors (default 1), capped by METASSL_FAST_CUDA_GRAD_SPAN as on a
// GPU.  The static buffers subtracted are the emulation's own (its 16-bit types are 4
// bytes wide, so 16-bit spans here are narrower than on the card).
template <typename T>
int emu_span(int D, int64_t outer) {
  const char* env = std::getenv("MSF_EMU_SMEM");
  const char* sms = std::getenv("MSF_EMU_SMS");
  const int span = grad_launch_span(D, Traits<T>::kOutChunk, env ? std::atoll(env) : 232448,
                                    static_cast<int64_t>(sizeof(GradSmem<T>)), sms ? std::atoll(sms) : 1, outer);
  if (grad_smem_bytes(span, Traits<T>::kOutChunk) > static_cast<int64_t>(sizeof emu::dynamic_smem)) {
    std::fprintf(stderr, "span %d needs more than the emulation's dynamic shared memory\n", span);
    std::exit(5);
  }
  return span;
}

// dQ over the query blocks and dK in two calls, [0, c1) and [c1, C), as Python may ask
// for keys and negatives apart; part: kParts per query block, summed.
template <typename T, typename L>
void backward(const L& loss, const T* Q, const T* K, int N, int C, int D, bool split_dk, std::vector<float>& out,
              int64_t ld = 0) {
  if (ld == 0) ld = D;  // the inputs' row stride (the outputs' is D)
  const int span = emu_span<T>(D, N);
  const unsigned rb = static_cast<unsigned>((N + kTile - 1) / kTile);
  std::vector<float> dq(static_cast<size_t>(N) * D, NAN), parts(L::kParts * rb, NAN),
      dk(static_cast<size_t>(C) * D, NAN);
  emu::launch(dim3(rb, static_cast<unsigned>((D + span - 1) / span)), kThreads, [&] {
    grad_kernel<T, L, false>(Q, K, loss, dq.data(), parts.data(), N, C, D, 0, 0, ld, ld, D, span);
  });
  const int c1 = split_dk && C > 1 ? C / 2 + 1 : C;
  for (auto [a, b] : {std::pair<int, int>{0, c1}, std::pair<int, int>{c1, C}}) {
    if (b <= a) continue;
    const int span_k = emu_span<T>(D, b - a);
    const dim3 grid(static_cast<unsigned>((b - a + kTile - 1) / kTile), static_cast<unsigned>((D + span_k - 1) / span_k));
    emu::launch(grid, kThreads, [&, a = a, b = b] {
      grad_kernel<T, L, true>(Q, K, loss, dk.data() + static_cast<size_t>(a) * D, nullptr, N, C, D, a, b, ld, ld, D,
                              span_k);
    });
  }
  out.insert(out.end(), dq.begin(), dq.end());
  for (int q = 0; q < L::kParts; ++q) {
    float total = 0.f;
    for (unsigned blk = 0; blk < rb; ++blk) total += parts[L::kParts * blk + q];
    out.push_back(total);
  }
  out.insert(out.end(), dk.begin(), dk.end());
}

template <typename T>
void run_siglip(int N, int C, int D, const float* p, const std::vector<float>& in, std::vector<float>& out) {
  const auto Q = operand<T>(in.data(), static_cast<size_t>(N) * D);
  const auto K = operand<T>(in.data() + Q.size(), static_cast<size_t>(C) * D);
  const int64_t diag = static_cast<int64_t>(p[2]);
  std::vector<float> loss(N, NAN);
  emu::launch(dim3(static_cast<unsigned>((N + kTile - 1) / kTile)), kThreads,
              [&] { siglip_fwd_kernel<T>(Q.data(), K.data(), loss.data(), N, C, D, D, D, p[0], p[1], diag); });
  out.insert(out.end(), loss.begin(), loss.end());
  backward<T>(SiglipGrad{1.f, p[0], p[1], p[3], diag}, Q.data(), K.data(), N, C, D, false, out);
}

template <typename T, bool kSelf, bool kPairwise>
void run_labeled(int N, int C, int D, const float* p, const std::vector<float>& in, std::vector<float>& out) {
  const auto Q = operand<T>(in.data(), static_cast<size_t>(N) * D);
  const auto K = operand<T>(in.data() + Q.size(), static_cast<size_t>(C) * D);
  const float* rest = in.data() + Q.size() + K.size();
  std::vector<int64_t> yq(N), yk(C);
  for (int i = 0; i < N; ++i) yq[i] = static_cast<int64_t>(rest[i]);
  for (int j = 0; j < C; ++j) yk[j] = static_cast<int64_t>(rest[N + j]);
  const float* ext = rest + N + C;
  const float* g = ext + N;
  const int ext_mode = static_cast<int>(p[3]);
  const int64_t col0 = kSelf ? static_cast<int64_t>(p[1]) : 0;
  std::vector<float> loss(N, NAN), sa(N, NAN), sb(N, NAN);
  emu::launch(dim3(static_cast<unsigned>((N + kTile - 1) / kTile)), kThreads, [&] {
    labeled_fwd_kernel<T, kSelf, kPairwise>(Q.data(), K.data(), yq.data(), yk.data(), ext_mode ? ext : nullptr,
                                            ext_mode == 2, loss.data(), sa.data(), sb.data(), N, C, D, D, D, p[0],
                                            col0);
  });
  for (auto* v : {&loss, &sa, &sb}) out.insert(out.end(), v->begin(), v->end());
  backward<T>(LabeledGrad<kSelf, kPairwise>{p[0], yq.data(), yk.data(), g, sa.data(), sb.data(), col0}, Q.data(),
              K.data(), N, C, D, false, out);
}

// MSF_EMU_LD (contrastive mode): the inputs' row stride, >= D (default D); the elements past
// D in each row are NaN, so a kernel that reads them poisons its outputs.
template <typename T>
int run(int N, int C, int D, bool sym, float scale, const std::vector<float>& in, std::vector<float>& out) {
  const char* ld_env = std::getenv("MSF_EMU_LD");
  const int64_t ld = ld_env ? std::max<int64_t>(D, std::atoll(ld_env)) : D;
  std::vector<T> Q(static_cast<size_t>(N * ld), from_float<T>(NAN)), K(static_cast<size_t>(C * ld), from_float<T>(NAN));
  const size_t nq = static_cast<size_t>(N) * D, nk = static_cast<size_t>(C) * D;
  for (size_t i = 0; i < nq; ++i) Q[i / D * ld + i % D] = from_float<T>(in[i]);
  for (size_t i = 0; i < nk; ++i) K[i / D * ld + i % D] = from_float<T>(in[nq + i]);
  const float* g = in.data() + nq + nk;
  std::vector<float> lse(N), pos(N), row_loss(N), col_max(N, -INFINITY), col_sum(N, 0.f), lse_col(N, 0.f);
  std::vector<int> lock((C + kTile - 1) / kTile, 0);
  const unsigned rb = static_cast<unsigned>((N + kTile - 1) / kTile);
  auto fwd = [&] {
    if (sym)
      fwd_kernel<T, true>(Q.data(), K.data(), lse.data(), pos.data(), row_loss.data(), col_max.data(),
                          col_sum.data(), lock.data(), N, C, D, ld, ld, scale);
    else
      fwd_kernel<T, false>(Q.data(), K.data(), lse.data(), pos.data(), row_loss.data(), col_max.data(),
                           col_sum.data(), lock.data(), N, C, D, ld, ld, scale);
  };
  emu::launch(dim3(rb), kThreads, fwd);
  if (sym)
    for (int i = 0; i < N; ++i) lse_col[i] = col_max[i] + std::log(col_sum[i]);
  for (auto* v : {&lse, &pos, &row_loss, &lse_col}) out.insert(out.end(), v->begin(), v->end());
  if (sym)
    backward<T>(ContrastiveGrad<true>{scale, lse.data(), g, lse_col.data(), g, N}, Q.data(), K.data(), N, C, D,
                true, out, ld);
  else
    backward<T>(ContrastiveGrad<false>{scale, lse.data(), g, lse_col.data(), g, N}, Q.data(), K.data(), N, C, D,
                true, out, ld);
  return 0;
}

void run_inner(int T, int C, int D, const float* p, const std::vector<float>& in, std::vector<float>& out) {
  const int S = static_cast<int>(p[0]), Q = static_cast<int>(p[1]), K = static_cast<int>(p[2]);
  const int mode = static_cast<int>(p[3]), flags = static_cast<int>(p[4]);
  const float* at = in.data();
  auto take = [&](size_t n) {
    const float* r = at;
    at += n;
    return r;
  };
  const float* X = take(static_cast<size_t>(T) * S * D);
  const float* yf = take(static_cast<size_t>(T) * S);
  const float* Xq = take(static_cast<size_t>(T) * Q * D);
  const float* yqf = take(static_cast<size_t>(T) * Q);
  const float* W0 = take(static_cast<size_t>(C) * D);
  const float* b0 = take(C);
  const float* aW = take(static_cast<size_t>(C) * D);
  const float* ab = take(C);
  const float* tw = take(T);
  const float* dWK = take(static_cast<size_t>(T) * C * D);
  const float* dbK = take(static_cast<size_t>(T) * C);
  std::vector<int64_t> y(static_cast<size_t>(T) * S), yq(static_cast<size_t>(T) * Q);
  for (size_t i = 0; i < y.size(); ++i) y[i] = static_cast<int64_t>(yf[i]);
  for (size_t i = 0; i < yq.size(); ++i) yq[i] = static_cast<int64_t>(yqf[i]);
  const size_t TCD = static_cast<size_t>(T) * C * D;
  std::vector<float> loss(T, NAN), dX(static_cast<size_t>(T) * S * D, NAN), dXq(static_cast<size_t>(T) * Q * D, NAN),
      dW0(TCD, NAN), db0(static_cast<size_t>(T) * C, NAN), daW(TCD, NAN), dab(static_cast<size_t>(T) * C, NAN),
      Wt(TCD * (K + 1), NAN), bt(static_cast<size_t>(T) * C * (K + 1), NAN), correct(T, NAN);
  if (mode == 2) {  // the adapt backward reads a trajectory: run the forward first
    emu::launch(dim3(T), kInnerThreads, [&] {
      inner_loop_kernel(1, X, y.data(), Xq, yq.data(), W0, b0, aW, ab, tw, dWK, dbK, loss.data(), nullptr, dX.data(),
                        dXq.data(), dW0.data(), db0.data(), daW.data(), dab.data(), Wt.data(), bt.data(), S, Q, D, C,
                        K, false, false, false);
    });
  }
  emu::launch(dim3(T), kInnerThreads, [&] {
    inner_loop_kernel(mode, X, y.data(), Xq, yq.data(), W0, b0, aW, ab, tw, dWK, dbK, loss.data(),
                      mode == 0 ? correct.data() : nullptr, dX.data(),
                      dXq.data(), dW0.data(), db0.data(), daW.data(), dab.data(), Wt.data(), bt.data(), S, Q, D, C, K,
                      flags & 1, flags & 2, flags & 4);
  });
  for (auto* v : {&loss, &dX, &dXq, &dW0, &db0, &daW, &dab, &Wt, &bt, &correct})
    out.insert(out.end(), v->begin(), v->end());
}

template <typename T>
void dispatch(const std::string& mode, int N, int C, int D, const float* p, const std::vector<float>& in,
              std::vector<float>& out) {
  if (mode == "contrastive") {
    run<T>(N, C, D, p[0] != 0.f, p[1], in, out);
  } else if (mode == "siglip") {
    run_siglip<T>(N, C, D, p, in, out);
  } else {
    const bool self = p[1] >= 0.f, pairwise = p[2] != 0.f;
    if (self && pairwise) run_labeled<T, true, true>(N, C, D, p, in, out);
    else if (self) run_labeled<T, true, false>(N, C, D, p, in, out);
    else if (pairwise) run_labeled<T, false, true>(N, C, D, p, in, out);
    else run_labeled<T, false, false>(N, C, D, p, in, out);
  }
}

int main(int argc, char** argv) {
  if (argc == 7 && std::string(argv[1]) == "span") {  // span DTYPE D BUDGET CAP MIN_PIECES: grad_span's span
    const int dtype = std::atoi(argv[2]);
    const int out_chunk = dtype == 0 ? Traits<float>::kOutChunk : Traits<__half>::kOutChunk;
    const int span = grad_span(std::atoll(argv[3]), out_chunk, std::atoll(argv[4]), std::atoll(argv[5]),
                               std::atoll(argv[6]));
    std::printf("%d %d %lld\n", span, out_chunk, static_cast<long long>(grad_smem_bytes(span, out_chunk)));
    return 0;
  }
  if (argc != 13) {
    std::fprintf(stderr, "usage: run_kernels MODE DTYPE N C D P0 P1 P2 P3 P4 IN OUT\n");
    return 2;
  }
  const std::string mode = argv[1];
  const int dtype = std::atoi(argv[2]), N = std::atoi(argv[3]), C = std::atoi(argv[4]), D = std::atoi(argv[5]);
  float p[5];
  for (int i = 0; i < 5; ++i) p[i] = std::strtof(argv[6 + i], nullptr);
  size_t n_in = static_cast<size_t>(N) * D + static_cast<size_t>(C) * D;
  if (mode == "inner") {
    const size_t S = static_cast<size_t>(p[0]), Q = static_cast<size_t>(p[1]), T = static_cast<size_t>(N);
    n_in = T * S * D + T * S + T * Q * D + T * Q + 2 * (static_cast<size_t>(C) * D + C) + T + T * C * D + T * C;
  } else if (mode == "contrastive") n_in += N;
  else if (mode == "labeled") n_in += static_cast<size_t>(3) * N + C;
  std::vector<float> in(n_in), out;
  FILE* f = std::fopen(argv[11], "rb");
  if (!f || std::fread(in.data(), sizeof(float), n_in, f) != n_in) return 3;
  std::fclose(f);
  if (mode == "inner")
    run_inner(N, C, D, p, in, out);
  else if (dtype == 0)
    dispatch<float>(mode, N, C, D, p, in, out);
  else if (dtype == 2)
    dispatch<__half>(mode, N, C, D, p, in, out);
  else
    dispatch<__nv_bfloat16>(mode, N, C, D, p, in, out);
  f = std::fopen(argv[12], "wb");
  if (!f || std::fwrite(out.data(), sizeof(float), out.size(), f) != out.size()) return 4;
  std::fclose(f);
  return 0;
}
