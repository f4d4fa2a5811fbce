// A host emulation of the CUDA features the csrc/cuda kernels use, so that they
// run (slowly) on CPU threads in CI: one std::thread per CUDA thread, blocks one after
// another (so __shared__ can be a function-local static), __syncthreads / __syncwarp as
// barriers, warp shuffles through a shared exchange buffer, atomics as std::atomic_ref.
// WMMA follows the documented semantics of load/store (row/column major, ldm) and
// mma (D = A B + C): each thread holds the whole 16 x 16 tile, lane 0 stores it; an
// operation applied to every element of .x is then the same as on the hardware.
// __half / __nv_bfloat16 store floats rounded to the 16-bit type.
// What this does not check: the hardware's fragment layout, timing, memory model (the
// kernels' cp.async copies are plain copies here: a missing wait shows no error).
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

namespace emu {
inline thread_local dim3 tidx, bidx;
inline std::barrier<>* block_barrier = nullptr;
inline std::barrier<>* warp_barrier[32] = {};
inline float exchange[1024];
alignas(128) inline float dynamic_smem[1 << 16];  // extern __shared__ of the kernels that size it at launch
}  // namespace emu

#define threadIdx emu::tidx
#define blockIdx emu::bidx

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier[threadIdx.x / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const unsigned t = threadIdx.x;
  emu::exchange[t] = v;
  __syncwarp();
  const float r = emu::exchange[(t & ~31u) | ((t & 31u) ^ static_cast<unsigned>(lane_mask))];
  __syncwarp();
  return r;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int atomicCAS(int* p, int compare, int val) {
  std::atomic_ref<int>(*p).compare_exchange_strong(compare, val);
  return compare;  // the old value
}
inline int atomicExch(int* p, int val) { return std::atomic_ref<int>(*p).exchange(val); }
template <typename T>
T __ldcg(const T* p) {
  return *p;
}
template <typename T>
void __stcg(T* p, T v) {
  *p = v;
}

struct __half {
  float f;
  explicit operator float() const { return f; }
};
inline __half __float2half_rn(float x) { return __half{static_cast<float>(static_cast<_Float16>(x))}; }
struct __nv_bfloat16 {
  float f;
  explicit operator float() const { return f; }
};
inline __nv_bfloat16 __float2bfloat16_rn(float x) {  // round to nearest even on the top 16 bits
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  float r;
  std::memcpy(&r, &u, 4);
  return __nv_bfloat16{r};
}

namespace emu {
// WMMA's documented requirements on a float tile in memory: a 256-bit aligned pointer and
// ldm a multiple of 4 elements (16 bytes).  (16-bit tiles: ldm a multiple of 8 elements;
// their pointers are not checked, the emulated 16-bit types being 4 bytes wide.)
inline void wmma_requires(const float* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || ldm % 4 != 0) {
    std::fprintf(stderr, "emu: WMMA float tile at %p with ldm %u: needs 32-byte alignment, ldm %% 4 == 0\n",
                 static_cast<const void*>(p), ldm);
    std::abort();
  }
}
inline void wmma_requires_ldm16(unsigned ldm) {
  if (ldm % 8 != 0) {
    std::fprintf(stderr, "emu: WMMA 16-bit tile with ldm %u: needs ldm %% 8 == 0\n", ldm);
    std::abort();
  }
}
}  // namespace emu

namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int num_elements = 256;
  float x[256];  // element (r, c) at x[16 r + c]: A is M x K, B is K x N, C is M x N
};

template <typename F>
void fill_fragment(F& f, float v) {
  for (float& e : f.x) e = v;
}
template <typename T>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  emu::wmma_requires_ldm16(ldm);
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 16; ++k) f.x[16 * r + k] = static_cast<float>(p[r * ldm + k]);
}
template <typename T>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  emu::wmma_requires_ldm16(ldm);
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 16; ++n) f.x[16 * k + n] = static_cast<float>(p[k * ldm + n]);
}
template <typename T>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  emu::wmma_requires_ldm16(ldm);
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 16; ++n) f.x[16 * k + n] = static_cast<float>(p[n * ldm + k]);
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  emu::wmma_requires(p, ldm);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[16 * r + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}
template <typename FA, typename FB, typename FC>
void mma_sync(FC& d, const FA& a, const FB& b, const FC& c) {
  float out[256];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float acc = c.x[16 * m + n];
      for (int k = 0; k < 16; ++k) acc += a.x[16 * m + k] * b.x[16 * k + n];
      out[16 * m + n] = acc;
    }
  std::memcpy(d.x, out, sizeof out);
}
// Warp-collective, as on the hardware (where each lane stores its own fragment elements,
// which depend through mma_sync on every lane's loads): the warp meets before lane 0
// writes the tile (its lanes' earlier loads of it are done) and after (the tile is
// visible to the warp's next loads).
template <typename F>
void store_matrix_sync(float* p, const F& f, unsigned ldm, layout_t layout) {
  emu::wmma_requires(p, ldm);
  __syncwarp();
  if (threadIdx.x % 32 == 0)
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) {
        if (layout == mem_row_major)
          p[r * ldm + c] = f.x[16 * r + c];
        else
          p[c * ldm + r] = f.x[16 * r + c];
      }
  __syncwarp();
}
}  // namespace wmma
}  // namespace nvcuda

namespace emu {
// Run body() as grid x block CUDA threads, one block at a time.
template <typename F>
void launch(dim3 grid, unsigned block, F body) {
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::barrier<> bar(static_cast<std::ptrdiff_t>(block));
      std::vector<std::unique_ptr<std::barrier<>>> warps;
      for (unsigned w = 0; w < block / 32; ++w) {
        warps.push_back(std::make_unique<std::barrier<>>(32));
        warp_barrier[w] = warps.back().get();
      }
      block_barrier = &bar;
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < block; ++t)
        threads.emplace_back([=] {
          tidx = dim3(t);
          bidx = dim3(bx, by);
          body();
        });
      for (auto& th : threads) th.join();
    }
}
}  // namespace emu
