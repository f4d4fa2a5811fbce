// Batched inner loop of a linear head (ANIL / Meta-SGD) on the CPU, one task per
// thread chunk, with the exact second-order reverse pass in closed form (DESIGN.md).
//
// Per task t: support X (S, D), labels y (S) in [0, C); head W (C, D), b (C); step
// sizes aW (C, D), ab (C) (a scalar lr is expanded by the caller).  For k < K:
//   Z = X W_k^T + b_k,  P = softmax(Z),  R = (P - onehot(y)) / S
//   G_W = R^T X,  G_b = colsum(R),  W_{k+1} = W_k - aW * G_W,  b_{k+1} = b_k - ab * G_b
// Reverse, from Lambda = dL/dW_K, lambda = dL/db_K, for k = K-1 .. 0:
//   daW -= Lambda * G_W(W_k),  dab -= lambda * G_b(W_k)
//   V = aW * Lambda, v = ab * lambda,  U = X V^T + v,  M = P * (U - rowsum(P * U))
//   dX -= R V + M W_k / S;  Lambda -= M^T X / S;  lambda -= colsum(M) / S
// first order: only the daW / dab terms (Lambda passes through unchanged).
// Limits: T is float or double; every tensor contiguous; labels already checked.
#pragma once
#include <cstdint>

namespace msf {

struct InnerLoopArgs {
  int64_t T = 0, S = 0, D = 0, C = 0, K = 0;
  bool first_order = false;
};

// W_traj (T, K+1, C, D) and b_traj (T, K+1, C) receive W_0 .. W_K per task.
template <typename T>
void inner_loop_forward(const T* X, const int64_t* y, const T* W0, const T* b0, const T* aW,
                        const T* ab, T* W_traj, T* b_traj, const InnerLoopArgs& a, int nthreads);

// Per-task outputs: dX (T, S, D), dW0 and daW (T, C, D), db0 and dab (T, C).
template <typename T>
void inner_loop_backward(const T* X, const int64_t* y, const T* aW, const T* ab, const T* W_traj,
                         const T* b_traj, const T* dW_K, const T* db_K, T* dX, T* dW0, T* db0,
                         T* daW, T* dab, const InnerLoopArgs& a, int nthreads);

// Where anil_loss leaves the two big products of its gradient (dX, dXq) to anil_apply,
// per task: coef (S + 2C, S) = [dG + dG^T; -(A diag a)^T; dZ_0^T] so that
// dX = coef^T [X; Lambda_K; W_0], lamK (C, D) = dL/dW_K, dzqT (C, Q) = (dL/dZ_q)^T and
// WK (C, D) the adapted head, so dXq = dzqT^T W_K.  All null: not deferred.
template <typename T>
struct AnilDeferred {
  T* coef = nullptr;
  T* lamK = nullptr;
  T* dzqT = nullptr;
  T* WK = nullptr;
};

// The whole ANIL meta-loss of T tasks in one call: the inner loop above, then the mean
// cross-entropy of the adapted head on each task's queries, loss (T).  With
// compute_grad, also the gradient of sum_t task_weight_t loss_t: dX (T, S, D),
// dXq (T, Q, D), and per task dW0 (T, C, D), db0 (T, C), and with need_dlr the step
// sizes' daW (T, C, D), dab (T, C) (not touched otherwise).  The trajectory lives in
// per-thread scratch: memory O(threads K C D).  Where each class's weight step size is
// constant along D and need_dlr is off, the loop runs in support space instead
// (inner_loop.cpp, gram_task): same result, about half the work.  A non-null
// defer.coef (that path only, with compute_grad; std::invalid_argument otherwise)
// leaves dX and dXq unwritten and fills defer (T tasks of it) for anil_apply.  A
// non-null correct (T) gets each task's number of queries whose first largest logit
// under the adapted head is their label (ANILHead's accuracy, from the logits the
// loss forms anyway).
template <typename T>
void anil_loss(const T* X, const int64_t* y, const T* Xq, const int64_t* yq, const T* W0,
               const T* b0, const T* aW, const T* ab, const T* task_weight, T* loss, T* dX, T* dXq,
               T* dW0, T* db0, T* daW, T* dab, T* correct, const InnerLoopArgs& a, int64_t Q,
               bool compute_grad, bool need_dlr, const AnilDeferred<T>& defer, int nthreads);

// dX (T, S, D) = g coef^T [X; Lambda_K; W_0] and dXq (T, Q, D) = g dzqT^T W_K per task,
// from what anil_loss deferred.
template <typename T>
void anil_apply(const T* X, const T* W0, const AnilDeferred<T>& d, T g, T* dX, T* dXq, int64_t T_,
                int64_t S, int64_t Q, int64_t D, int64_t C, int nthreads);

}  // namespace msf
