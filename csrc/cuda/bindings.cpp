// pybind11 module _C_cuda: CUDA kernels, called with raw pointers and torch's current
// stream handle (DESIGN.md).  Python owns allocation and validation; this layer checks
// again that every buffer is device memory on the current device and large enough for
// what the kernel will touch, so no call from Python can make a kernel read or write
// out of bounds.  Runtime errors become RuntimeError, bad arguments ValueError.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace msf {
namespace cuda {
int device_count();
int runtime_version();
void check(cudaError_t err, const char* what);
void contrastive_fwd(int dtype, const void* Q, const void* K, float* lse, float* pos, float* row_loss,
                     float* col_max, float* col_sum, int* lock, int N, int C, int D, int64_t ldq, int64_t ldk,
                     float scale, bool symmetric, cudaStream_t stream);
void contrastive_bwd(int dtype, bool dk, const void* Q, const void* K, const float* lse, const float* g_row,
                     const float* lse_col, const float* g_col, float* out, float* ds_part, int N, int C, int D,
                     int64_t col0, int64_t col1, int64_t ldq, int64_t ldk, int64_t ldo, float scale,
                     bool symmetric, cudaStream_t stream);
void siglip_fwd(int dtype, const void* Q, const void* K, float* loss, int N, int C, int D, int64_t ldq, int64_t ldk,
                float logit_scale, float bias, int64_t diag_col0, cudaStream_t stream);
void siglip_bwd(int dtype, bool dk, const void* Q, const void* K, float* out, float* part, int N, int C, int D,
                int64_t ldq, int64_t ldk, int64_t ldo, float logit_scale, float bias, int64_t diag_col0, float w,
                cudaStream_t stream);
void labeled_fwd(int dtype, const void* Q, const void* K, const int64_t* yq, const int64_t* yk, const float* ext,
                 bool ext_pos, float* loss, float* stat_a, float* stat_b, int N, int C, int D, int64_t ldq,
                 int64_t ldk, float scale, bool self, int64_t self_col0, bool pairwise, cudaStream_t stream);
void labeled_bwd(int dtype, bool dk, const void* Q, const void* K, const int64_t* yq, const int64_t* yk,
                 const float* g, const float* stat_a, const float* stat_b, float* out, float* part, int N, int C,
                 int D, int64_t ldq, int64_t ldk, int64_t ldo, float scale, bool self, int64_t self_col0,
                 bool pairwise, cudaStream_t stream);
int64_t inner_loop_smem_bytes(int S, int Q, int C);
void inner_loop(int mode, const float* X, const int64_t* y, const float* Xq, const int64_t* yq, const float* W0,
                const float* b0, const float* aW, const float* ab, const float* task_weight, const float* dWK,
                const float* dbK, float* loss, float* correct, float* dX, float* dXq, float* dW0, float* db0,
                float* daW, float* dab, float* W_traj, float* b_traj, int T, int S, int Q, int D, int C, int K,
                bool grad, bool first_order, bool need_dlr, cudaStream_t stream);
}  // namespace cuda
}  // namespace msf

namespace {

constexpr int64_t kTile = 64;  // csrc/cuda/_tiles.cuh

void require(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error("metassl_fast._C_cuda: " + msg);
}

// The buffers of one call: every size is checked first (no CUDA call), then every
// pointer is verified as device memory on the current device.
struct Buffers {
  std::vector<std::pair<uintptr_t, const char*>> ptrs;

  // a buffer of `numel` elements that must hold `need`
  void add(uintptr_t ptr, int64_t numel, int64_t need, const char* name) {
    if (ptr == 0) require(false, std::string(name) + " is a null pointer");
    if (numel < need)
      require(false, std::string(name) + " holds " + std::to_string(numel) + " elements, the sizes need " +
                         std::to_string(need));
    ptrs.emplace_back(ptr, name);
  }

  void require_on_device() const {
    int dev = -1;
    msf::cuda::check(cudaGetDevice(&dev), "cudaGetDevice");
    for (const auto& [ptr, name] : ptrs) {
      cudaPointerAttributes attr{};
      msf::cuda::check(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)), name);
      if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
        require(false, std::string(name) + " is not CUDA device memory");
      if (attr.device != dev)
        require(false, std::string(name) + " is on device " + std::to_string(attr.device) +
                           ", the current device is " + std::to_string(dev));
    }
  }
};

// Products of sizes, refused (not wrapped) when they overflow int64.
int64_t mul(int64_t a, int64_t b) {
  int64_t r = 0;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r)) require(false, "buffer sizes overflow int64");
  return r;
}
int64_t mul(int64_t a, int64_t b, int64_t c) { return mul(mul(a, b), c); }
int64_t mul(int64_t a, int64_t b, int64_t c, int64_t d) { return mul(mul(a, b, c), d); }

// Rows of `rows` x D elements with stride ld: the last element read is (rows - 1) ld + D - 1.
int64_t span(int64_t rows, int64_t D, int64_t ld) {
  if (rows <= 0) return 0;
  int64_t r = 0;
  if (__builtin_add_overflow(mul(rows - 1, ld), D, &r)) require(false, "buffer sizes overflow int64");
  return r;
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Q (N rows) and K (C rows) of D features, row strides ldq and ldk: every op's operands.
void add_operands(Buffers& b, uintptr_t Q, int64_t Q_numel, uintptr_t K, int64_t K_numel, int64_t N, int64_t C,
                  int64_t D, int64_t ldq, int64_t ldk) {
  b.add(Q, Q_numel, span(N, D, ldq), "Q");
  b.add(K, K_numel, span(C, D, ldk), "K");
}

void require_common(int dtype, int64_t N, int64_t C, int64_t D, int64_t ldq, int64_t ldk, double scale) {
  require(dtype == 0 || dtype == 2 || dtype == 3, "dtype code must be 0 (float32), 2 (float16) or 3 (bfloat16)");
  require(N >= 1 && C >= 1 && D >= 1, "need N >= 1, C >= 1 and D >= 1");
  require(N < (int64_t{1} << 31) && C < (int64_t{1} << 31) && D < (int64_t{1} << 31), "N, C and D must fit in int32");
  require(ldq >= D && ldk >= D, "row strides must be >= D");
  require(D <= 65535 * kTile, "D is too large for the kernels' grid (at most 65535 x 64)");
  require(std::isfinite(scale), "scale must be finite");
}

void require_shapes(int dtype, int64_t N, int64_t C, int64_t D, int64_t ldq, int64_t ldk, double scale) {
  require_common(dtype, N, C, D, ldq, ldk, scale);
  require(C >= N, "need C >= N (keys are the first N columns)");
}

template <typename P>
P ptr(uintptr_t p) {
  return reinterpret_cast<P>(p);
}

void contrastive_fwd(int dtype, uintptr_t Q, int64_t Q_numel, uintptr_t K, int64_t K_numel, uintptr_t lse,
                     int64_t lse_numel, uintptr_t pos, int64_t pos_numel, uintptr_t row_loss,
                     int64_t row_loss_numel, uintptr_t col_max, int64_t col_max_numel, uintptr_t col_sum,
                     int64_t col_sum_numel, uintptr_t lock, int64_t lock_numel, int64_t N, int64_t C, int64_t D,
                     int64_t ldq, int64_t ldk, double scale, bool symmetric, uintptr_t stream) {
  require_shapes(dtype, N, C, D, ldq, ldk, scale);
  Buffers b;
  add_operands(b, Q, Q_numel, K, K_numel, N, C, D, ldq, ldk);
  b.add(lse, lse_numel, N, "lse");
  b.add(pos, pos_numel, N, "pos");
  b.add(row_loss, row_loss_numel, N, "row_loss");
  if (symmetric) {
    b.add(col_max, col_max_numel, N, "col_max");
    b.add(col_sum, col_sum_numel, N, "col_sum");
    b.add(lock, lock_numel, cdiv(C, kTile), "lock");
  }
  b.require_on_device();
  msf::cuda::contrastive_fwd(dtype, reinterpret_cast<const void*>(Q), reinterpret_cast<const void*>(K),
                             reinterpret_cast<float*>(lse), reinterpret_cast<float*>(pos),
                             reinterpret_cast<float*>(row_loss), reinterpret_cast<float*>(col_max),
                             reinterpret_cast<float*>(col_sum), reinterpret_cast<int*>(lock), static_cast<int>(N),
                             static_cast<int>(C), static_cast<int>(D), ldq, ldk, static_cast<float>(scale),
                             symmetric, reinterpret_cast<cudaStream_t>(stream));
}

void contrastive_bwd(int dtype, bool dk, uintptr_t Q, int64_t Q_numel, uintptr_t K, int64_t K_numel,
                     uintptr_t lse, int64_t lse_numel, uintptr_t g_row, int64_t g_row_numel, uintptr_t lse_col,
                     int64_t lse_col_numel, uintptr_t g_col, int64_t g_col_numel, uintptr_t out, int64_t out_numel,
                     uintptr_t ds_part, int64_t ds_part_numel, int64_t N, int64_t C, int64_t D, int64_t col0,
                     int64_t col1, int64_t ldq, int64_t ldk, int64_t ldo, double scale, bool symmetric,
                     uintptr_t stream) {
  require_shapes(dtype, N, C, D, ldq, ldk, scale);
  require(ldo >= D, "the output row stride must be >= D");
  if (dk) require(0 <= col0 && col0 <= col1 && col1 <= C, "key rows must satisfy 0 <= col0 <= col1 <= C");
  if (dk && col1 == col0) return;
  Buffers b;
  add_operands(b, Q, Q_numel, K, K_numel, N, C, D, ldq, ldk);
  b.add(lse, lse_numel, N, "lse");
  b.add(g_row, g_row_numel, N, "g_row");
  if (symmetric) {
    b.add(lse_col, lse_col_numel, N, "lse_col");
    b.add(g_col, g_col_numel, N, "g_col");
  }
  if (dk) {
    b.add(out, out_numel, span(col1 - col0, D, ldo), "dK");
  } else {
    b.add(out, out_numel, span(N, D, ldo), "dQ");
    b.add(ds_part, ds_part_numel, cdiv(N, kTile), "ds_part");
  }
  b.require_on_device();
  msf::cuda::contrastive_bwd(dtype, dk, reinterpret_cast<const void*>(Q), reinterpret_cast<const void*>(K),
                             reinterpret_cast<const float*>(lse), reinterpret_cast<const float*>(g_row),
                             reinterpret_cast<const float*>(lse_col), reinterpret_cast<const float*>(g_col),
                             reinterpret_cast<float*>(out), reinterpret_cast<float*>(ds_part), static_cast<int>(N),
                             static_cast<int>(C), static_cast<int>(D), col0, col1, ldq, ldk, ldo,
                             static_cast<float>(scale), symmetric, reinterpret_cast<cudaStream_t>(stream));
}

void siglip_fwd(int dtype, uintptr_t Q, int64_t Q_numel, uintptr_t K, int64_t K_numel, uintptr_t loss,
                int64_t loss_numel, int64_t N, int64_t C, int64_t D, int64_t ldq, int64_t ldk, double logit_scale,
                double bias, int64_t diag_col0, uintptr_t stream) {
  require_common(dtype, N, C, D, ldq, ldk, logit_scale);
  require(std::isfinite(bias), "bias must be finite");
  Buffers b;
  add_operands(b, Q, Q_numel, K, K_numel, N, C, D, ldq, ldk);
  b.add(loss, loss_numel, N, "loss");
  b.require_on_device();
  msf::cuda::siglip_fwd(dtype, ptr<const void*>(Q), ptr<const void*>(K), ptr<float*>(loss), static_cast<int>(N),
                        static_cast<int>(C), static_cast<int>(D), ldq, ldk, static_cast<float>(logit_scale),
                        static_cast<float>(bias), diag_col0, ptr<cudaStream_t>(stream));
}

void siglip_bwd(int dtype, bool dk, uintptr_t Q, int64_t Q_numel, uintptr_t K, int64_t K_numel, uintptr_t out,
                int64_t out_numel, uintptr_t part, int64_t part_numel, int64_t N, int64_t C, int64_t D, int64_t ldq,
                int64_t ldk, int64_t ldo, double logit_scale, double bias, int64_t diag_col0, double w,
                uintptr_t stream) {
  require_common(dtype, N, C, D, ldq, ldk, logit_scale);
  require(std::isfinite(bias) && std::isfinite(w), "bias and w must be finite");
  require(ldo >= D, "the output row stride must be >= D");
  Buffers b;
  add_operands(b, Q, Q_numel, K, K_numel, N, C, D, ldq, ldk);
  b.add(out, out_numel, span(dk ? C : N, D, ldo), dk ? "dK" : "dQ");
  if (!dk) b.add(part, part_numel, 2 * cdiv(N, kTile), "part");
  b.require_on_device();
  msf::cuda::siglip_bwd(dtype, dk, ptr<const void*>(Q), ptr<const void*>(K), ptr<float*>(out), ptr<float*>(part),
                        static_cast<int>(N), static_cast<int>(C), static_cast<int>(D), ldq, ldk, ldo,
                        static_cast<float>(logit_scale), static_cast<float>(bias), diag_col0, static_cast<float>(w),
                        ptr<cudaStream_t>(stream));
}

void require_labeled(int dtype, int64_t N, int64_t C, int64_t D, int64_t ldq, int64_t ldk, double scale,
                     bool self, int64_t self_col0) {
  require_common(dtype, N, C, D, ldq, ldk, scale);
  if (self) require(self_col0 >= 0 && self_col0 + N <= C, "the anchors' own columns [self_col0, self_col0 + N) "
                                                          "must lie inside the C columns");
}

void labeled_fwd(int dtype, uintptr_t Q, int64_t Q_numel, uintptr_t K, int64_t K_numel, uintptr_t yq,
                 int64_t yq_numel, uintptr_t yk, int64_t yk_numel, uintptr_t ext, int64_t ext_numel, bool has_ext,
                 bool ext_pos, uintptr_t loss, int64_t loss_numel, uintptr_t stat_a, int64_t stat_a_numel,
                 uintptr_t stat_b, int64_t stat_b_numel, int64_t N, int64_t C, int64_t D, int64_t ldq, int64_t ldk,
                 double scale, bool self, int64_t self_col0, bool pairwise, uintptr_t stream) {
  require_labeled(dtype, N, C, D, ldq, ldk, scale, self, self_col0);
  require(!(has_ext && pairwise), "the extra logit goes with the mean-positive loss only");
  Buffers b;
  add_operands(b, Q, Q_numel, K, K_numel, N, C, D, ldq, ldk);
  b.add(yq, yq_numel, N, "labels");
  b.add(yk, yk_numel, C, "key_labels");
  if (has_ext) b.add(ext, ext_numel, N, "ext");
  b.add(loss, loss_numel, N, "loss");
  b.add(stat_a, stat_a_numel, N, "stat_a");
  b.add(stat_b, stat_b_numel, N, "stat_b");
  b.require_on_device();
  msf::cuda::labeled_fwd(dtype, ptr<const void*>(Q), ptr<const void*>(K), ptr<const int64_t*>(yq),
                         ptr<const int64_t*>(yk), has_ext ? ptr<const float*>(ext) : nullptr, ext_pos,
                         ptr<float*>(loss), ptr<float*>(stat_a), ptr<float*>(stat_b), static_cast<int>(N),
                         static_cast<int>(C), static_cast<int>(D), ldq, ldk, static_cast<float>(scale), self,
                         self_col0, pairwise, ptr<cudaStream_t>(stream));
}

void labeled_bwd(int dtype, bool dk, uintptr_t Q, int64_t Q_numel, uintptr_t K, int64_t K_numel, uintptr_t yq,
                 int64_t yq_numel, uintptr_t yk, int64_t yk_numel, uintptr_t g, int64_t g_numel, uintptr_t stat_a,
                 int64_t stat_a_numel, uintptr_t stat_b, int64_t stat_b_numel, uintptr_t out, int64_t out_numel,
                 uintptr_t part, int64_t part_numel, int64_t N, int64_t C, int64_t D, int64_t ldq, int64_t ldk,
                 int64_t ldo, double scale, bool self, int64_t self_col0, bool pairwise, uintptr_t stream) {
  require_labeled(dtype, N, C, D, ldq, ldk, scale, self, self_col0);
  require(ldo >= D, "the output row stride must be >= D");
  Buffers b;
  add_operands(b, Q, Q_numel, K, K_numel, N, C, D, ldq, ldk);
  b.add(yq, yq_numel, N, "labels");
  b.add(yk, yk_numel, C, "key_labels");
  b.add(g, g_numel, N, "g");
  b.add(stat_a, stat_a_numel, N, "stat_a");
  b.add(stat_b, stat_b_numel, N, "stat_b");
  b.add(out, out_numel, span(dk ? C : N, D, ldo), dk ? "dK" : "dQ");
  if (!dk) b.add(part, part_numel, cdiv(N, kTile), "part");
  b.require_on_device();
  msf::cuda::labeled_bwd(dtype, dk, ptr<const void*>(Q), ptr<const void*>(K), ptr<const int64_t*>(yq),
                         ptr<const int64_t*>(yk), ptr<const float*>(g), ptr<const float*>(stat_a),
                         ptr<const float*>(stat_b), ptr<float*>(out), ptr<float*>(part), static_cast<int>(N),
                         static_cast<int>(C), static_cast<int>(D), ldq, ldk, ldo, static_cast<float>(scale), self,
                         self_col0, pairwise, ptr<cudaStream_t>(stream));
}

// The inner loop (csrc/cuda/inner_loop.cu), float32.  mode 0: ANIL meta-loss (loss,
// and with grad every gradient); 1: the adapted heads' trajectory; 2: its reverse pass
// from dW_K, db_K.  Buffers a mode does not touch may be null.
void inner_loop(int mode, uintptr_t X, int64_t X_numel, uintptr_t y, int64_t y_numel, uintptr_t Xq,
                int64_t Xq_numel, uintptr_t yq, int64_t yq_numel, uintptr_t W0, int64_t W0_numel, uintptr_t b0,
                int64_t b0_numel, uintptr_t aW, int64_t aW_numel, uintptr_t ab, int64_t ab_numel,
                uintptr_t task_weight, int64_t task_weight_numel, uintptr_t dWK, int64_t dWK_numel, uintptr_t dbK,
                int64_t dbK_numel, uintptr_t loss, int64_t loss_numel, uintptr_t dX, int64_t dX_numel,
                uintptr_t dXq, int64_t dXq_numel, uintptr_t dW0, int64_t dW0_numel, uintptr_t db0,
                int64_t db0_numel, uintptr_t daW, int64_t daW_numel, uintptr_t dab, int64_t dab_numel,
                uintptr_t W_traj, int64_t W_traj_numel, uintptr_t b_traj, int64_t b_traj_numel, int64_t T,
                int64_t S, int64_t Q, int64_t D, int64_t C, int64_t K, bool grad, bool first_order, bool need_dlr,
                uintptr_t stream, uintptr_t correct, int64_t correct_numel) {
  require(mode >= 0 && mode <= 2, "mode must be 0 (ANIL loss), 1 (adapt forward) or 2 (adapt backward)");
  require(T >= 1 && S >= 1 && D >= 1 && C >= 1 && K >= 0 && (mode != 0 || Q >= 1),
          "need T, S, D, C >= 1, K >= 0 and (ANIL) Q >= 1");
  require(T < (int64_t{1} << 31) && S < (1 << 20) && Q < (1 << 20) && D <= (int64_t{1} << 30) && C < (1 << 20) &&
              K < (1 << 20),
          "sizes out of range (T < 2^31, D <= 2^30, S, Q, C, K < 2^20)");
  const int64_t qq = mode == 0 ? Q : 0;
  require(msf::cuda::inner_loop_smem_bytes(static_cast<int>(S), static_cast<int>(qq), static_cast<int>(C)) <=
              48 * 1024,
          "(3 S + Q) C is too large for the kernel's shared memory; use backend='cpu' or 'torch'");
  const bool backward = mode == 2 || (mode == 0 && grad);
  Buffers b;
  b.add(X, X_numel, mul(T, S, D), "X");
  b.add(y, y_numel, mul(T, S), "labels");
  b.add(aW, aW_numel, mul(C, D), "lr_w");
  b.add(ab, ab_numel, C, "lr_b");
  b.add(W_traj, W_traj_numel, mul(T, K + 1, C, D), "W_traj");
  b.add(b_traj, b_traj_numel, mul(T, K + 1, C), "b_traj");
  if (mode != 2) {
    b.add(W0, W0_numel, mul(C, D), "weight");
    b.add(b0, b0_numel, C, "bias");
  }
  if (mode == 0) {
    b.add(Xq, Xq_numel, mul(T, Q, D), "query");
    b.add(yq, yq_numel, mul(T, Q), "query_labels");
    b.add(loss, loss_numel, T, "loss");
    if (correct) b.add(correct, correct_numel, T, "correct");
    if (grad) {
      b.add(task_weight, task_weight_numel, T, "task_weight");
      b.add(dXq, dXq_numel, mul(T, Q, D), "dXq");
    }
  }
  if (mode == 2) {
    b.add(dWK, dWK_numel, mul(T, C, D), "dW_K");
    b.add(dbK, dbK_numel, mul(T, C), "db_K");
  }
  if (backward) {
    b.add(dX, dX_numel, mul(T, S, D), "dX");
    b.add(dW0, dW0_numel, mul(T, C, D), "dW0");
    b.add(db0, db0_numel, mul(T, C), "db0");
    if (need_dlr) {
      b.add(daW, daW_numel, mul(T, C, D), "daW");
      b.add(dab, dab_numel, mul(T, C), "dab");
    }
  }
  b.require_on_device();
  msf::cuda::inner_loop(static_cast<int>(mode), ptr<const float*>(X), ptr<const int64_t*>(y), ptr<const float*>(Xq),
                        ptr<const int64_t*>(yq), ptr<const float*>(W0), ptr<const float*>(b0), ptr<const float*>(aW),
                        ptr<const float*>(ab), ptr<const float*>(task_weight), ptr<const float*>(dWK),
                        ptr<const float*>(dbK), ptr<float*>(loss), mode == 0 ? ptr<float*>(correct) : nullptr,
                        ptr<float*>(dX), ptr<float*>(dXq),
                        ptr<float*>(dW0), ptr<float*>(db0), ptr<float*>(daW), ptr<float*>(dab), ptr<float*>(W_traj),
                        ptr<float*>(b_traj), static_cast<int>(T), static_cast<int>(S), static_cast<int>(qq),
                        static_cast<int>(D), static_cast<int>(C), static_cast<int>(K), grad, first_order,
                        need_dlr && backward, ptr<cudaStream_t>(stream));
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "metassl_fast CUDA kernels (raw-pointer interface; use metassl_fast's Python API)";
  m.def("device_count", &msf::cuda::device_count, "CUDA devices visible to the runtime (0 without a driver)");
  m.def("runtime_version", &msf::cuda::runtime_version, "CUDA runtime version this module was built with");
  m.attr("TILE") = kTile;
  m.def("contrastive_fwd", &contrastive_fwd, py::arg("dtype"), py::arg("Q"), py::arg("Q_numel"), py::arg("K"),
        py::arg("K_numel"), py::arg("lse"), py::arg("lse_numel"), py::arg("pos"), py::arg("pos_numel"),
        py::arg("row_loss"), py::arg("row_loss_numel"), py::arg("col_max"), py::arg("col_max_numel"),
        py::arg("col_sum"), py::arg("col_sum_numel"), py::arg("lock"), py::arg("lock_numel"), py::arg("N"),
        py::arg("C"), py::arg("D"), py::arg("ldq"), py::arg("ldk"), py::arg("scale"), py::arg("symmetric"),
        py::arg("stream"),
        "Forward of the fused contrastive loss: row LSE, positive, row loss; symmetric: column "
        "(max, sum) merged into col_max / col_sum (initialised -inf / 0), lock zeroed "
        "(csrc/cuda/contrastive.cu).");
  m.def("contrastive_bwd", &contrastive_bwd, py::arg("dtype"), py::arg("dk"), py::arg("Q"), py::arg("Q_numel"),
        py::arg("K"), py::arg("K_numel"), py::arg("lse"), py::arg("lse_numel"), py::arg("g_row"),
        py::arg("g_row_numel"), py::arg("lse_col"), py::arg("lse_col_numel"), py::arg("g_col"),
        py::arg("g_col_numel"), py::arg("out"), py::arg("out_numel"), py::arg("ds_part"), py::arg("ds_part_numel"),
        py::arg("N"), py::arg("C"), py::arg("D"), py::arg("col0"), py::arg("col1"), py::arg("ldq"), py::arg("ldk"),
        py::arg("ldo"), py::arg("scale"), py::arg("symmetric"), py::arg("stream"),
        "Backward: dk=False writes G K (dQ / s) and per-block sums of G S; dk=True writes G^T Q "
        "(dK / s) for key rows [col0, col1) (csrc/cuda/contrastive.cu).");
  m.def("inner_loop", &inner_loop, py::arg("mode"), py::arg("X"), py::arg("X_numel"), py::arg("y"),
        py::arg("y_numel"), py::arg("Xq"), py::arg("Xq_numel"), py::arg("yq"), py::arg("yq_numel"), py::arg("W0"),
        py::arg("W0_numel"), py::arg("b0"), py::arg("b0_numel"), py::arg("aW"), py::arg("aW_numel"), py::arg("ab"),
        py::arg("ab_numel"), py::arg("task_weight"), py::arg("task_weight_numel"), py::arg("dWK"),
        py::arg("dWK_numel"), py::arg("dbK"), py::arg("dbK_numel"), py::arg("loss"), py::arg("loss_numel"),
        py::arg("dX"), py::arg("dX_numel"), py::arg("dXq"), py::arg("dXq_numel"), py::arg("dW0"),
        py::arg("dW0_numel"), py::arg("db0"), py::arg("db0_numel"), py::arg("daW"), py::arg("daW_numel"),
        py::arg("dab"), py::arg("dab_numel"), py::arg("W_traj"), py::arg("W_traj_numel"), py::arg("b_traj"),
        py::arg("b_traj_numel"), py::arg("T"), py::arg("S"), py::arg("Q"), py::arg("D"), py::arg("C"), py::arg("K"),
        py::arg("grad"), py::arg("first_order"), py::arg("need_dlr"), py::arg("stream"), py::arg("correct") = 0,
        py::arg("correct_numel") = 0,
        "Batched linear-head inner loop, float32, one block per task (csrc/cuda/inner_loop.cu); mode 0 with a "
        "correct buffer also counts each task's correctly classified queries.");
  m.def("siglip_fwd", &siglip_fwd, py::arg("dtype"), py::arg("Q"), py::arg("Q_numel"), py::arg("K"),
        py::arg("K_numel"), py::arg("loss"), py::arg("loss_numel"), py::arg("N"), py::arg("C"), py::arg("D"),
        py::arg("ldq"), py::arg("ldk"), py::arg("logit_scale"), py::arg("bias"), py::arg("diag_col0"),
        py::arg("stream"), "SigLIP forward: per-row sums of softplus(-z x) (kernels/siglip.py's contract).");
  m.def("siglip_bwd", &siglip_bwd, py::arg("dtype"), py::arg("dk"), py::arg("Q"), py::arg("Q_numel"), py::arg("K"),
        py::arg("K_numel"), py::arg("out"), py::arg("out_numel"), py::arg("part"), py::arg("part_numel"),
        py::arg("N"), py::arg("C"), py::arg("D"), py::arg("ldq"), py::arg("ldk"), py::arg("ldo"),
        py::arg("logit_scale"), py::arg("bias"), py::arg("diag_col0"), py::arg("w"), py::arg("stream"),
        "SigLIP backward: (dL/dx) K (dk=False, with per-block (sum dL/dx S, sum dL/dx)) or (dL/dx)^T Q.");
  m.def("labeled_fwd", &labeled_fwd, py::arg("dtype"), py::arg("Q"), py::arg("Q_numel"), py::arg("K"),
        py::arg("K_numel"), py::arg("yq"), py::arg("yq_numel"), py::arg("yk"), py::arg("yk_numel"), py::arg("ext"),
        py::arg("ext_numel"), py::arg("has_ext"), py::arg("ext_pos"), py::arg("loss"), py::arg("loss_numel"),
        py::arg("stat_a"), py::arg("stat_a_numel"), py::arg("stat_b"), py::arg("stat_b_numel"), py::arg("N"),
        py::arg("C"), py::arg("D"), py::arg("ldq"), py::arg("ldk"), py::arg("scale"), py::arg("self"),
        py::arg("self_col0"), py::arg("pairwise"), py::arg("stream"),
        "Labelled rows forward (SupCon / NT-Xent / pairwise): loss, stat_a, stat_b per anchor.");
  m.def("labeled_bwd", &labeled_bwd, py::arg("dtype"), py::arg("dk"), py::arg("Q"), py::arg("Q_numel"),
        py::arg("K"), py::arg("K_numel"), py::arg("yq"), py::arg("yq_numel"), py::arg("yk"), py::arg("yk_numel"),
        py::arg("g"), py::arg("g_numel"), py::arg("stat_a"), py::arg("stat_a_numel"), py::arg("stat_b"),
        py::arg("stat_b_numel"), py::arg("out"), py::arg("out_numel"), py::arg("part"), py::arg("part_numel"),
        py::arg("N"), py::arg("C"), py::arg("D"), py::arg("ldq"), py::arg("ldk"), py::arg("ldo"), py::arg("scale"),
        py::arg("self"), py::arg("self_col0"), py::arg("pairwise"), py::arg("stream"),
        "Labelled rows backward: G K (dk=False, with per-block sums of G S) or G^T Q.");
}
