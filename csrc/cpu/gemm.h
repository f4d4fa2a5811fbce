// Register-blocked matrix products for the row sweep of the contrastive family
// (python/metassl_fast/ops/_common.py row_sweep), in place of torch's BLAS where that is
// slower (MKL on AMD CPUs runs these shapes at 34-58% of the FMA peak: bench/RESULTS.md).
//
//     gemm_nt:  C (M x N)  = alpha A (M x K) Bp^T          S = (s Q) K^T; Bp = gemm_pack(B)
//     gemm_nn:  C (M x N) (+)= alpha A (M x K) B (K x N)   dQ = G K
//     gemm_tn:  C (M x N) (+)= alpha A^T B, A (K x M)     dK += G^T (s Q)
//
// One micro-kernel serves all three: an MR x NR tile of C (NR = two vectors) in registers,
// each step k broadcasting MR elements of A and loading one NR-wide row of B.  A's MR
// elements of a step are contiguous: gemm_nt and gemm_nn copy A into MR-interleaved
// panels, gemm_tn reads them in place (A^T's rows are A's columns).  B is read as stored
// (gemm_nn, gemm_tn) or from panels packed once per sweep (gemm_nt).  K is taken in
// chunks of kKc so the B rows a chunk touches stay in L2.  Edges (M, N, K any size >= 1)
// go through zero-filled copies; nothing reads or writes past the sizes given.  No call
// allocates more than a few tens of KB: gemm_nt packs A into the caller's workspace.
//
// Limits: T is float or double; every matrix row-major with unit column stride; the row
// strides are at least the row lengths; C does not overlap A or B.
#pragma once
#include <cstdint>

namespace msf {
namespace gemm {

// Elements of gemm_pack's output for an (n x k) B: ceil(n / NR) panels of k x NR.
int64_t packed_numel(int dtype_bytes, int64_t n, int64_t k);

// Bp <- B (n x k, row stride ldb) as panels of NR rows, each stored k-major (k x NR),
// zero past row n.
template <typename T>
void pack(const T* B, int64_t n, int64_t k, int64_t ldb, T* Bp, int nthreads);

// Elements of gemm_nt's workspace for an (m x k) A: A packed in row groups of MR.
int64_t nt_work_numel(int dtype_bytes, int64_t m, int64_t k);

template <typename T>
void nt(const T* A, int64_t lda, const T* Bp, T* C, int64_t ldc, int64_t M, int64_t N, int64_t K, T alpha, T* work,
        int nthreads);

template <typename T>
void nn(const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, int64_t M, int64_t N, int64_t K,
        T alpha, bool accumulate, int nthreads);

template <typename T>
void tn(const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, int64_t M, int64_t N, int64_t K,
        T alpha, bool accumulate, int nthreads);

}  // namespace gemm
}  // namespace msf
