// Convex few-shot heads on the CPU, one task per thread chunk: ridge (R2-D2), the
// Crammer-Singer SVM dual (MetaOptNet), L2 multinomial logistic regression; exact
// gradients (closed form for ridge, implicit differentiation for the other two).
//
// Per task t: support X (S, D), labels y (S) in [0, C), Y = onehot(y), K = X X^T;
// query Xq (Q, D), yq (Q).  Every head is a dual matrix A (S, C) (and a bias b (C)):
//   ridge   A = (K + reg I)^-1 Y                          (Cholesky; factor saved)
//   svm     A = argmin 1/2 <A, K A> + r/2 |A|^2 - <A, Y>,  A_ic <= reg Y_ic, sum_c A_ic = 0
//           (exact block coordinate descent, one example's C variables at a time)
//   logreg  (W, b) = argmin mean_i CE(W x_i + b, y_i) + reg/2 |W|^2, W = A^T X
//           (Newton, each step by conjugate gradients in the metric of K)
//   W = A^T X (C, D);  logits = scale (Xq W^T + b);  loss = mean_q CE_ls(logits_q, yq_q)
// Backward, from Lbar = dloss/dlogits (Q, C): Gbar = scale Lbar, dXq = Gbar W,
// Wbar = Gbar^T Xq, bbar = colsum Gbar, Abar = X Wbar^T, and per head an adjoint U:
//   ridge   U = (K + reg I)^-1 Abar;  dX = A Wbar - U W - A U^T X;  dreg = -<U, A>
//   svm     U from the KKT system on the active set (H_FF U_F + E_F^T mu = Abar_F,
//           E_F U_F = 0; per class the inverse of (K + r I)_FF, from the one inverse of
//           K + r I, and an S x S Schur complement on mu; its accuracy degrades as
//           cond(K + r I) ~ |K| / r grows: S > D with r -> 0);
//           dX as ridge;  dreg = sum over (i, y_i) at the bound of Abar - (K U) - mu_i
//   logreg  (a, u_b) solves the Newton system at the solution with right-hand side
//           (-J Abar / (reg S), bbar - colsum(J Abar) / (reg S)), J the softmax Jacobians;
//           M = J (Abar / reg + K a + 1 u_b^T) / S, R = (P - Y) / S:
//           dX = -(R / reg) (Wbar + reg a^T X) - M W;  dreg = -<Wbar + reg a^T X, W> / reg
// The solvers and everything S x S run in float64; the D-long products in T.
// Limits: T is float or double; every tensor contiguous; labels already checked.
#pragma once
#include <cstdint>

namespace msf {

struct ConvexArgs {
  int64_t T = 0, S = 0, Q = 0, D = 0, C = 0;
  int kind = 0;  // 0 ridge, 1 svm, 2 logreg
  double reg = 1, scale = 1, label_smoothing = 0, dual_reg = 1, tol = 1e-6;
  int64_t max_iter = 1;
};

// Per task: A (T, S, C), b (T, C), W (T, C, D), fac (T, S, S): the Cholesky factor of
// K + reg I (ridge) or K; residual (T): the solver's final residual (svm: the KKT
// residual max_i [max_c g_ic - min over free c of g_ic], g = K A + r A - Y; logreg:
// |gradient| / |first gradient|; ridge 0).
// With Xq (non-null): logits (T, Q, C) = Xq W^T + b (before the scale), loss (T), correct (T).
template <typename T>
void convex_forward(const T* X, const int64_t* y, const T* Xq, const int64_t* yq, double* A, double* b, T* W,
                    double* fac, T* logits, T* loss, T* correct, double* residual, const ConvexArgs& a,
                    int nthreads);

// The gradient of sum_t g_t loss_t from what convex_forward saved: dX (T, S, D),
// dXq (T, Q, D), and per task dreg (T), dscale (T).
template <typename T>
void convex_backward(const T* X, const int64_t* y, const T* Xq, const int64_t* yq, const double* A,
                     const double* b, const T* W, const double* fac, const T* logits, const T* g, T* dX, T* dXq,
                     double* dreg, double* dscale, const ConvexArgs& a, int nthreads);

}  // namespace msf
