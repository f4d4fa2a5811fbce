// CUDA C++ kernels of the SigLIP loss, the same passes and buffers as the Triton kernels
// (kernels/siglip.py):
//
//     x_ij = s Q_i . K_j + b,  z_ij = +1 at column i + diag_col0 of row i, -1 elsewhere
//     loss_i = sum_j softplus(-z_ij x_ij),   G = dL/dx = -z w sigmoid(-z x)
//     dQ = s G K,  dK = s G^T Q  (the kernels write G K and G^T Q; Python scales),
//     partials per query block: sum G S_raw (for ds) and sum G (for db)
//
// Forward (siglip_fwd_kernel): one block per 64 query rows streams the 64-column tiles of
// the raw products S_raw = Q K^T.  Backward: grad_kernel (cuda/_tiles.cuh) with the
// SiglipGrad policy, S tile scale 1.  No atomics: bit-for-bit repeatable.
// Tiles, products and limits: cuda/_tiles.cuh.
#include "cuda/_tiles.cuh"

namespace msf {
namespace cuda {
namespace {

// SigLIP (kernels/siglip.py): x = scale S_raw + bias, z = +1 at column i + diag_col0, -1
// elsewhere; G = dL/dx = -z w sigmoid(-z x); partials sum G S_raw and sum G.
struct SiglipGrad {
  static constexpr int kParts = 2;
  float scale;  // of the S tile: 1, the raw products
  float logit_scale, bias, w;
  int64_t diag_col0;
  __device__ RowData query(int64_t) const { return RowData{}; }
  __device__ RowData key(int64_t) const { return RowData{}; }
  __device__ float grad(float s, int64_t i, int64_t j, const RowData&, const RowData&, float* p) const {
    const float x = logit_scale * s + bias;
    const float z = j == i + diag_col0 ? 1.f : -1.f;
    const float g = -z * w * sigmoidf(-z * x);
    if (p) {
      p[0] += g * s;
      p[1] += g;
    }
    return g;
  }
};

// loss_i = sum_j softplus(-z_ij x_ij)
template <typename T>
__global__ void __launch_bounds__(kThreads)
    siglip_fwd_kernel(const T* __restrict__ Q, const T* __restrict__ K, float* __restrict__ loss, int N, int C, int D,
                      int64_t ldq, int64_t ldk, float logit_scale, float bias, int64_t diag_col0) {
  __shared__ ChunkSmem<T> sm;
  __shared__ __align__(32) float S[kTile][kLdS];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int r = threadIdx.x / 4, part = threadIdx.x % 4;
  float total = 0.f;
  for (int64_t c0 = 0; c0 < C; c0 += kTile) {
    s_tile<T>(S, sm, Q, ldq, r0, N, K, ldk, c0, C, D, 1.f);
    for (int c = part * 16; c < part * 16 + 16; ++c)
      if (c0 + c < C) {
        const float x = logit_scale * S[r][c] + bias;
        const float z = c0 + c == r0 + r + diag_col0 ? 1.f : -1.f;
        total += softplusf(-z * x);
      }
    __syncthreads();
  }
  total = quad_sum(total);
  if (part == 0 && r0 + r < N) loss[r0 + r] = total;
}

}  // namespace

#ifndef MSF_CPU_EMULATION
void siglip_fwd(int dtype, const void* Q, const void* K, float* loss, int N, int C, int D, int64_t ldq, int64_t ldk,
                float logit_scale, float bias, int64_t diag_col0, cudaStream_t stream) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    siglip_fwd_kernel<T><<<dim3(static_cast<unsigned>(cdiv(N, kTile))), kThreads, 0, stream>>>(
        static_cast<const T*>(Q), static_cast<const T*>(K), loss, N, C, D, ldq, ldk, logit_scale, bias, diag_col0);
    check(cudaGetLastError(), "siglip_fwd_kernel launch");
  });
}

void siglip_bwd(int dtype, bool dk, const void* Q, const void* K, float* out, float* part, int N, int C, int D,
                int64_t ldq, int64_t ldk, int64_t ldo, float logit_scale, float bias, int64_t diag_col0, float w,
                cudaStream_t stream) {
  by_dtype(dtype, [&](auto tag) {
    launch_grad<decltype(tag)>(dk, Q, K, SiglipGrad{1.f, logit_scale, bias, w, diag_col0}, out, part, N, C, D, 0, C,
                               ldq, ldk, ldo, stream);
  });
}
#endif  // MSF_CPU_EMULATION

}  // namespace cuda
}  // namespace msf
