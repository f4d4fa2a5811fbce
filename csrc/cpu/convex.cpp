// Convex few-shot heads; math and layout in convex.h.
//
// A task's problem is small (S <= a few hundred support rows, C classes): the Gram
// matrix and the D-long products use the SIMD kernels of cpu/_products.h, the solvers
// run in float64 on S x S and S x C arrays that stay in cache; tasks run in parallel.
#include "cpu/convex.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu/_products.h"
#include "cpu/simd.h"

namespace msf {
namespace {

using products::atx;
using products::aw_add;
using products::gram_matrix;
using products::xwt;
using dvec = std::vector<double>;

constexpr double kTiny = 1e-300;

// ---------------------------------------------------------------------------
// dense float64 helpers (row-major)
// ---------------------------------------------------------------------------

// sum_i a_i b_i with explicit vectors (a float reduction the compiler does not vectorise).
double dot(const double* a, const double* b, int64_t n) {
  using V = Vec<double>;
  V::V acc = V::splat(0);
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) acc += V::load(a + i) * V::load(b + i);
  double s = V::hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// In place: the lower triangle of M (n x n) becomes L with L L^T = M.  A pivot that
// rounding made <= 0 (M is positive definite in exact arithmetic wherever this is called)
// is raised to eps times the largest diagonal entry, so the factor stays finite.
void cholesky(double* M, int64_t n) {
  double dmax = 0;
  for (int64_t i = 0; i < n; ++i) dmax = std::max(dmax, std::fabs(M[i * n + i]));
  const double floor = std::max(kTiny, 1e-15 * dmax);
  for (int64_t j = 0; j < n; ++j) {
    double* Lj = M + j * n;
    double d = Lj[j] - dot(Lj, Lj, j);
    d = d > floor ? std::sqrt(d) : std::sqrt(floor);
    Lj[j] = d;
    for (int64_t i = j + 1; i < n; ++i) {
      double* Li = M + i * n;
      Li[j] = (Li[j] - dot(Li, Lj, j)) / d;
    }
  }
}

// M^-1 (n x n, full) for M = L L^T (L from cholesky, destroyed): G = L^-1 row by row
// (row i = -(sum_{k<i} L_ik G_k) / L_ii, axpys over the rows above), then M^-1 = G^T G.
void chol_inverse(double* L, int64_t n, double* out, dvec& row) {
  row.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    double* Li = L + i * n;
    std::copy(Li, Li + i, row.data());
    const double inv = 1.0 / Li[i];
    std::fill(Li, Li + n, 0.0);
    for (int64_t k = 0; k < i; ++k) {
      const double l = row[k];
      const double* Gk = L + k * n;
      for (int64_t j = 0; j <= k; ++j) Li[j] -= l * Gk[j];
    }
    for (int64_t j = 0; j < i; ++j) Li[j] *= inv;
    Li[i] = inv;
  }
  std::fill(out, out + n * n, 0.0);
  for (int64_t k = 0; k < n; ++k) {  // out += G_k^T G_k (row k of G is zero past k)
    const double* Gk = L + k * n;
    for (int64_t p = 0; p <= k; ++p) {
      const double g = Gk[p];
      double* o = out + p * n;
      for (int64_t q = 0; q <= k; ++q) o[q] += g * Gk[q];
    }
  }
}

// B (n x m) <- M^-1 B for M = L L^T (L from cholesky, leading dimension n).
void chol_solve(const double* L, int64_t n, double* B, int64_t m) {
  for (int64_t i = 0; i < n; ++i) {  // L z = B
    double* bi = B + i * m;
    for (int64_t k = 0; k < i; ++k) {
      const double l = L[i * n + k];
      const double* bk = B + k * m;
      for (int64_t c = 0; c < m; ++c) bi[c] -= l * bk[c];
    }
    const double inv = 1.0 / L[i * n + i];
    for (int64_t c = 0; c < m; ++c) bi[c] *= inv;
  }
  for (int64_t i = n - 1; i >= 0; --i) {  // L^T x = z
    double* bi = B + i * m;
    for (int64_t k = i + 1; k < n; ++k) {
      const double l = L[k * n + i];
      const double* bk = B + k * m;
      for (int64_t c = 0; c < m; ++c) bi[c] -= l * bk[c];
    }
    const double inv = 1.0 / L[i * n + i];
    for (int64_t c = 0; c < m; ++c) bi[c] *= inv;
  }
}

// out (n x m) = K (n x n, symmetric) V (n x m): V transposed first (m is the class count,
// too short a loop to vectorise), then n m dot products of length n.
void symm_mul(const double* K, const double* V, double* out, int64_t n, int64_t m) {
  thread_local dvec vt;
  vt.resize(static_cast<size_t>(n * m));
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < m; ++c) vt[c * n + j] = V[j * m + c];
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < m; ++c) out[i * m + c] = dot(K + i * n, vt.data() + c * n, n);
}

// Row-wise softmax of Z (n x m) into P.
void softmax(const double* Z, double* P, int64_t n, int64_t m) {
  for (int64_t i = 0; i < n; ++i) {
    const double* z = Z + i * m;
    double* p = P + i * m;
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t c = 0; c < m; ++c) mx = std::max(mx, z[c]);
    double s = 0;
    for (int64_t c = 0; c < m; ++c) s += (p[c] = std::exp(z[c] - mx));
    for (int64_t c = 0; c < m; ++c) p[c] /= s;
  }
}

// out_i = J_i v_i per row, J_i = diag(p_i) - p_i p_i^T (the softmax Jacobian), scaled by alpha.
void softmax_jvp(const double* P, const double* V, double* out, int64_t n, int64_t m, double alpha) {
  for (int64_t i = 0; i < n; ++i) {
    const double* p = P + i * m;
    const double* v = V + i * m;
    const double pv = dot(p, v, m);
    for (int64_t c = 0; c < m; ++c) out[i * m + c] = alpha * p[c] * (v[c] - pv);
  }
}

// ---------------------------------------------------------------------------
// SVM: the Crammer-Singer dual by exact block coordinate descent
// ---------------------------------------------------------------------------

// argmin 1/2 |a - v|^2 s.t. sum(a) = 0, a <= u (one example's block; u = Cbox at the
// label, 0 elsewhere): a = min(u, v - phi).  With t = v - u sorted ascending, component
// j is unclamped exactly when t_j < phi; for the first k unclamped phi = (sum of their v +
// sum of the other u) / k, the root is the one inside [t_(k), t_(k+1)].
void project_block(const double* v, const double* u, double* a, int64_t C, std::vector<int64_t>& order) {
  order.resize(static_cast<size_t>(C));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return v[i] - u[i] < v[j] - u[j]; });
  double usum = 0;
  for (int64_t c = 0; c < C; ++c) usum += u[c];
  double vs = 0, us = 0, phi = 0;
  for (int64_t k = 1; k <= C; ++k) {
    const int64_t j = order[static_cast<size_t>(k - 1)];
    vs += v[j];
    us += u[j];
    phi = (vs + usum - us) / static_cast<double>(k);
    const double t_next = k < C ? v[order[static_cast<size_t>(k)]] - u[order[static_cast<size_t>(k)]]
                                : std::numeric_limits<double>::infinity();
    if (phi <= t_next) break;
  }
  for (int64_t c = 0; c < C; ++c) a[c] = std::min(u[c], v[c] - phi);
}

// max_i [max_c g_ic - min over free c of g_ic], g = G + r A - Y (G = K A).
double svm_residual(const double* G, const double* A, const int64_t* y, int64_t S, int64_t C, double Cbox,
                    double r) {
  double worst = 0;
  for (int64_t i = 0; i < S; ++i) {
    double hi = -std::numeric_limits<double>::infinity(), lo = std::numeric_limits<double>::infinity();
    for (int64_t c = 0; c < C; ++c) {
      const bool lab = c == y[i];
      const double g = G[i * C + c] + r * A[i * C + c] - (lab ? 1.0 : 0.0);
      hi = std::max(hi, g);
      if (A[i * C + c] < (lab ? Cbox : 0.0)) lo = std::min(lo, g);
    }
    if (lo < std::numeric_limits<double>::infinity()) worst = std::max(worst, hi - lo);
  }
  return worst;
}

double svm_solve(const double* K, const int64_t* y, double* A, int64_t S, int64_t C, double Cbox, double r,
                 double tol, int64_t max_iter) {
  dvec G(static_cast<size_t>(S * C), 0.0), v(static_cast<size_t>(C)), u(static_cast<size_t>(C)),
      na(static_cast<size_t>(C)), delta(static_cast<size_t>(C));
  std::vector<int64_t> order;
  std::fill(A, A + S * C, 0.0);
  // tol is absolute: the dual gradient's linear term is the one-hot labels, so its scale is 1
  // whatever the features' (a tolerance relative to C max K_ii let the gradient error grow with D)
  double res = svm_residual(G.data(), A, y, S, C, Cbox, r);
  for (int64_t sweep = 0; sweep < max_iter && res > tol; ++sweep) {
    for (int64_t i = 0; i < S; ++i) {
      const double Aii = std::max(K[i * S + i] + r, kTiny);
      double* ai = A + i * C;
      for (int64_t c = 0; c < C; ++c) {
        const bool lab = c == y[i];
        u[c] = lab ? Cbox : 0.0;
        const double g = G[i * C + c] + r * ai[c] - (lab ? 1.0 : 0.0);
        v[c] = ai[c] - g / Aii;
      }
      project_block(v.data(), u.data(), na.data(), C, order);
      bool moved = false;
      for (int64_t c = 0; c < C; ++c) {
        delta[c] = na[c] - ai[c];
        moved |= delta[c] != 0.0;
        ai[c] = na[c];
      }
      if (!moved) continue;
      const double* ki = K + i * S;  // K symmetric: column i is row i
      for (int64_t j = 0; j < S; ++j) {
        const double kji = ki[j];
        double* gj = G.data() + j * C;
        for (int64_t c = 0; c < C; ++c) gj[c] += kji * delta[c];
      }
    }
    res = svm_residual(G.data(), A, y, S, C, Cbox, r);
  }
  return res;
}

// Scratch of svm_adjoint, kept across a thread's tasks.
struct SvmScratch {
  dvec N, z, H, Minv, inv, row, Z, Y;
  std::vector<int64_t> idx, start, bound;
};

// The adjoint of the SVM's solution map (convex.h): U (S, C) zero on the active bounds;
// returns d loss / d Cbox.  Per class c the free examples F_c get H_c = K_FF + r I, its
// inverse (kept), N += H_c^-1 and z += H_c^-1 Abar_c on F_c; then mu = N^-1 z and
// U_c = H_c^-1 (Abar_c - mu) on F_c.  (K + r I is positive definite for r > 0, so are
// its principal blocks and those of its inverse.)
double svm_adjoint(const double* K, const int64_t* y, const double* A, const double* Abar, double* U, int64_t S,
                   int64_t C, double Cbox, double r, SvmScratch& w) {
  w.N.assign(static_cast<size_t>(S * S), 0.0);
  w.z.assign(static_cast<size_t>(S), 0.0);
  w.idx.clear();
  w.start.assign(static_cast<size_t>(C + 1), 0);
  for (int64_t c = 0; c < C; ++c) {
    w.start[c] = static_cast<int64_t>(w.idx.size());
    for (int64_t i = 0; i < S; ++i)
      if (A[i * C + c] < (c == y[i] ? Cbox : 0.0)) w.idx.push_back(i);
  }
  w.start[C] = static_cast<int64_t>(w.idx.size());
  int64_t inv_size = 0;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t n = w.start[c + 1] - w.start[c];
    inv_size += n * n;
  }
  w.inv.resize(static_cast<size_t>(inv_size));
  // Minv = (K + r I)^-1 once; each class's H_c^-1 = ((K + r I)_FF)^-1 is then Minv itself
  // when no coordinate of c is at a bound, else Minv_FF - Minv_FB (Minv_BB)^-1 Minv_BF (the
  // inverse of a principal block, from the whole inverse): O(S^2 |B|) instead of O(|F|^3).
  w.H.resize(static_cast<size_t>(S * S));
  for (int64_t p = 0; p < S * S; ++p) w.H[p] = K[p];
  for (int64_t p = 0; p < S; ++p) w.H[p * S + p] += r;
  cholesky(w.H.data(), S);
  w.Minv.resize(static_cast<size_t>(S * S));
  chol_inverse(w.H.data(), S, w.Minv.data(), w.row);
  const double* Mi = w.Minv.data();
  double* Hi = w.inv.data();
  for (int64_t c = 0; c < C; ++c) {
    const int64_t* F = w.idx.data() + w.start[c];
    const int64_t n = w.start[c + 1] - w.start[c];
    if (n == 0) continue;
    w.bound.clear();
    for (int64_t i = 0, p = 0; i < S; ++i) {
      if (p < n && F[p] == i) ++p;
      else w.bound.push_back(i);
    }
    const int64_t nb = static_cast<int64_t>(w.bound.size());
    for (int64_t p = 0; p < n; ++p)
      for (int64_t q = 0; q < n; ++q) Hi[p * n + q] = Mi[F[p] * S + F[q]];
    if (nb > 0) {
      const int64_t* B = w.bound.data();
      w.Z.resize(static_cast<size_t>(nb * nb));
      for (int64_t p = 0; p < nb; ++p)
        for (int64_t q = 0; q < nb; ++q) w.Z[p * nb + q] = Mi[B[p] * S + B[q]];
      cholesky(w.Z.data(), nb);
      w.Y.resize(static_cast<size_t>(nb * n));  // Y = (Minv_BB)^-1 Minv_BF  (nb x n)
      for (int64_t p = 0; p < nb; ++p)
        for (int64_t q = 0; q < n; ++q) w.Y[p * n + q] = Mi[B[p] * S + F[q]];
      chol_solve(w.Z.data(), nb, w.Y.data(), n);
      for (int64_t p = 0; p < n; ++p) {  // Hi -= Minv_FB Y
        double* h = Hi + p * n;
        for (int64_t k = 0; k < nb; ++k) {
          const double m = Mi[F[p] * S + B[k]];
          const double* yk = w.Y.data() + k * n;
          for (int64_t q = 0; q < n; ++q) h[q] -= m * yk[q];
        }
      }
    }
    for (int64_t p = 0; p < n; ++p) {
      double zp = 0;
      double* Np = w.N.data() + F[p] * S;
      for (int64_t q = 0; q < n; ++q) {
        Np[F[q]] += Hi[p * n + q];
        zp += Hi[p * n + q] * Abar[F[q] * C + c];
      }
      w.z[F[p]] += zp;
    }
    Hi += n * n;
  }
  for (int64_t i = 0; i < S; ++i)  // an example with no free variable (impossible for Cbox > 0): mu_i = 0
    if (w.N[i * S + i] <= 0) w.N[i * S + i] = 1.0;
  cholesky(w.N.data(), S);
  chol_solve(w.N.data(), S, w.z.data(), 1);  // z = mu
  std::fill(U, U + S * C, 0.0);
  Hi = w.inv.data();
  for (int64_t c = 0; c < C; ++c) {
    const int64_t* F = w.idx.data() + w.start[c];
    const int64_t n = w.start[c + 1] - w.start[c];
    w.row.resize(static_cast<size_t>(std::max<int64_t>(n, 1)));
    for (int64_t q = 0; q < n; ++q) w.row[q] = Abar[F[q] * C + c] - w.z[F[q]];
    for (int64_t p = 0; p < n; ++p) U[F[p] * C + c] = dot(Hi + p * n, w.row.data(), n);
    Hi += n * n;
  }
  // d Cbox: the bound coordinates (i, y_i) at Cbox move with it
  double dC = 0;
  for (int64_t i = 0; i < S; ++i) {
    const int64_t c = y[i];
    if (A[i * C + c] < Cbox) continue;
    double ku = 0;
    for (int64_t j = 0; j < S; ++j) ku += K[i * S + j] * U[j * C + c];
    dC += Abar[i * C + c] - ku - w.z[i];
  }
  return dC;
}

// ---------------------------------------------------------------------------
// logistic regression: Newton with conjugate-gradient steps in K's metric
// ---------------------------------------------------------------------------

// The Newton system at P, in coordinates (A, b) with W = X^T A:
//   H (V, v) = (J (K V + 1 v^T) / S + lam V,  colsum(J (K V + 1 v^T)) / S),
// J the per-example softmax Jacobians; self-adjoint in <(A1, b1), (A2, b2)> = <A1, K A2> +
// <b1, b2>, the primal inner product.  The bias block H_bb = sum_i J_i / S is nearly
// singular where the support is separated (p near one-hot: the unpenalised bias is barely
// determined), which stalls conjugate gradients on the whole system.  So the bias is
// eliminated exactly (a C x C Cholesky; softmax's null direction 1 pinned by adding
// 1 1^T / C) and CG runs on the Schur complement in A, whose spectrum lies in
// [lam, lam + |K| max J / S] in the primal metric.
struct LogregSystem {
  const double* K;
  const double* P;
  int64_t S, C;
  double lam;
  dvec Hbb, m, Km, h;

  void prepare() {  // H_bb + 1 1^T / C, factored
    Hbb.assign(static_cast<size_t>(C * C), 1.0 / static_cast<double>(C));
    const double inv_s = 1.0 / static_cast<double>(S);
    for (int64_t i = 0; i < S; ++i) {
      const double* p = P + i * C;
      for (int64_t c = 0; c < C; ++c) {
        Hbb[c * C + c] += p[c] * inv_s;
        for (int64_t e = 0; e < C; ++e) Hbb[c * C + e] -= p[c] * p[e] * inv_s;
      }
    }
    cholesky(Hbb.data(), C);
  }

  // out = J (1 v^T) / S subtracted from out (the H_Ab v term), per example
  void sub_bias(const double* v, double* out) {
    for (int64_t i = 0; i < S; ++i) {
      const double* p = P + i * C;
      const double pv = dot(p, v, C);
      for (int64_t c = 0; c < C; ++c) out[i * C + c] -= p[c] * (v[c] - pv) / static_cast<double>(S);
    }
  }

  // h = colsum(J (K V)) / S given KV
  void bias_of(const double* KV, double* hout) {
    m.resize(static_cast<size_t>(S * C));
    softmax_jvp(P, KV, m.data(), S, C, 1.0 / static_cast<double>(S));
    std::fill(hout, hout + C, 0.0);
    for (int64_t i = 0; i < S; ++i)
      for (int64_t c = 0; c < C; ++c) hout[c] += m[i * C + c];
  }

  // out = Schur(V) = J (K V) / S + lam V - J (1 (H_bb^-1 colsum(J K V) / S)^T) / S, given KV
  void schur(const double* V, const double* KV, double* out) {
    h.resize(static_cast<size_t>(C));
    bias_of(KV, h.data());  // also leaves m = J K V / S
    chol_solve(Hbb.data(), C, h.data(), 1);
    for (int64_t j = 0; j < S * C; ++j) out[j] = m[j] + lam * V[j];
    sub_bias(h.data(), out);
  }

  // Solve H (x, xb) = (rhsA, rhsb) (rhsb summing to 0) with the Schur complement's CG
  // residual at most atol in the primal norm; x, K x and xb out.
  void solve(const double* rhsA, const double* rhsb, double* xA, double* xb, double* KxA, double atol,
             int64_t maxit) {
    const int64_t n = S * C;
    dvec v0(rhsb, rhsb + C);
    chol_solve(Hbb.data(), C, v0.data(), 1);
    dvec rA(rhsA, rhsA + n), KrA(static_cast<size_t>(n)), pA, KpA, qA(static_cast<size_t>(n));
    sub_bias(v0.data(), rA.data());
    std::fill(xA, xA + n, 0.0);
    std::fill(KxA, KxA + n, 0.0);
    symm_mul(K, rA.data(), KrA.data(), S, C);
    pA = rA, KpA = KrA;
    double rr = std::max(0.0, dot(rA.data(), KrA.data(), n));
    for (int64_t k = 0; k < maxit && std::sqrt(rr) > atol; ++k) {
      schur(pA.data(), KpA.data(), qA.data());
      const double pq = dot(KpA.data(), qA.data(), n);
      if (!(pq > 0)) break;
      const double alpha = rr / pq;
      for (int64_t j = 0; j < n; ++j) {
        xA[j] += alpha * pA[j];
        KxA[j] += alpha * KpA[j];
        rA[j] -= alpha * qA[j];
      }
      symm_mul(K, rA.data(), KrA.data(), S, C);
      const double rr_new = std::max(0.0, dot(rA.data(), KrA.data(), n));
      const double beta = rr_new / rr;
      for (int64_t j = 0; j < n; ++j) {
        pA[j] = rA[j] + beta * pA[j];
        KpA[j] = KrA[j] + beta * KpA[j];
      }
      rr = rr_new;
    }
    // the bias: H_bb xb = rhsb - colsum(J K x) / S
    h.resize(static_cast<size_t>(C));
    bias_of(KxA, h.data());
    for (int64_t c = 0; c < C; ++c) xb[c] = rhsb[c] - h[c];
    chol_solve(Hbb.data(), C, xb, 1);
  }
};

// Z = KA + 1 b^T, P = softmax(Z); returns mean_i CE(Z_i, y_i) + lam/2 <A, KA>.
double logreg_objective(const double* A, const double* KA, const double* b, const int64_t* y, double* Z, double* P,
                        int64_t S, int64_t C, double lam) {
  double ce = 0;
  for (int64_t i = 0; i < S; ++i) {
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t c = 0; c < C; ++c) mx = std::max(mx, Z[i * C + c] = KA[i * C + c] + b[c]);
    double s = 0;
    for (int64_t c = 0; c < C; ++c) s += std::exp(Z[i * C + c] - mx);
    ce += mx + std::log(s) - Z[i * C + y[i]];
  }
  softmax(Z, P, S, C);
  return ce / static_cast<double>(S) + 0.5 * lam * dot(A, KA, S * C);
}

// |X^T G|^2 in float64 from the support rows themselves: the primal gradient's squared norm
// without the cancellation of <G, K G>, which floors at ~eps |G|^2 when K is singular (the
// coordinates G then carry components in K's null space that the primal never sees).
template <typename T>
double primal_sq(const T* X, const double* G, int64_t S, int64_t D, int64_t C, dvec& w) {
  w.assign(static_cast<size_t>(C * D), 0.0);
  for (int64_t i = 0; i < S; ++i) {
    const T* x = X + i * D;
    for (int64_t c = 0; c < C; ++c) {
      const double g = G[i * C + c];
      double* wc = w.data() + c * D;
      for (int64_t d = 0; d < D; ++d) wc[d] += g * static_cast<double>(x[d]);
    }
  }
  return dot(w.data(), w.data(), C * D);
}

// Newton in coordinates A (W = X^T A); stops when |gradient| <= tol |first gradient| both in
// K's metric and in the primal, from X itself (that metric's rounding can hide ~sqrt(eps)).
template <typename T>
double logreg_solve(const double* K, const T* X, int64_t D, const int64_t* y, double* A, double* b, int64_t S,
                    int64_t C, double lam, double tol, int64_t max_iter) {
  const int64_t n = S * C;
  const double inv_s = 1.0 / static_cast<double>(S);
  dvec KA(static_cast<size_t>(n), 0.0), Z(static_cast<size_t>(n)), P(static_cast<size_t>(n)),
      GA(static_cast<size_t>(n)), gb(static_cast<size_t>(C)), KGA(static_cast<size_t>(n)),
      xA(static_cast<size_t>(n)), xb(static_cast<size_t>(C)), KxA(static_cast<size_t>(n)),
      A2(static_cast<size_t>(n)), KA2(static_cast<size_t>(n)), b2(static_cast<size_t>(C)),
      Z2(static_cast<size_t>(n)), P2(static_cast<size_t>(n)), mgA(static_cast<size_t>(n)),
      mgb(static_cast<size_t>(C));
  dvec wscratch;
  bool canonical = false;
  std::fill(A, A + n, 0.0);
  std::fill(b, b + C, 0.0);
  LogregSystem sys{K, P.data(), S, C, lam, {}, {}, {}, {}};
  double f = logreg_objective(A, KA.data(), b, y, Z.data(), P.data(), S, C, lam);
  double g0 = 0, rel = 0;
  for (int64_t it = 0;; ++it) {
    std::fill(gb.begin(), gb.end(), 0.0);
    for (int64_t i = 0; i < S; ++i)
      for (int64_t c = 0; c < C; ++c) {
        const double r = (P[i * C + c] - (c == y[i] ? 1.0 : 0.0)) * inv_s;
        GA[i * C + c] = r + lam * A[i * C + c];
        gb[c] += r;
      }
    symm_mul(K, GA.data(), KGA.data(), S, C);
    const double gn = std::sqrt(std::max(0.0, dot(GA.data(), KGA.data(), n) + dot(gb.data(), gb.data(), C)));
    if (it == 0) g0 = std::max(gn, kTiny);
    rel = gn / g0;
    if (rel <= std::max(tol, 1e-6) && !canonical) {
      // Once near the optimum, re-express W by the representer the optimality condition gives,
      // A = (Y - P) / (lam S) (W moves by -X^T G_A / lam, of the size of the gradient): the
      // coordinates' null-space components, invisible to the primal, leave G_A, and the K-metric
      // computations after it resolve the gradient to ~eps instead of ~sqrt(eps).
      canonical = true;
      for (int64_t i = 0; i < S; ++i)
        for (int64_t c = 0; c < C; ++c) A[i * C + c] = ((c == y[i] ? 1.0 : 0.0) - P[i * C + c]) * inv_s / lam;
      symm_mul(K, A, KA.data(), S, C);
      f = logreg_objective(A, KA.data(), b, y, Z.data(), P.data(), S, C, lam);
      sys.P = P.data();
      continue;
    }
    if (rel <= tol)  // converged in K's metric: confirm in the primal (one S C D product)
      rel = std::max(rel, std::sqrt(primal_sq(X, GA.data(), S, D, C, wscratch) + dot(gb.data(), gb.data(), C)) / g0);
    if (rel <= tol || it >= max_iter) break;
    for (int64_t j = 0; j < n; ++j) mgA[j] = -GA[j];
    for (int64_t c = 0; c < C; ++c) mgb[c] = -gb[c];
    const double eta = std::min(0.5, std::sqrt(rel)) * gn;  // inexact Newton (Eisenstat-Walker)
    sys.prepare();
    sys.solve(mgA.data(), mgb.data(), xA.data(), xb.data(), KxA.data(), eta, 2 * (n + C) + 10);
    const double slope = dot(GA.data(), KxA.data(), n) + dot(gb.data(), xb.data(), C);
    if (!(slope < 0)) break;  // no descent direction left (rounding): converged as far as float64 goes
    double t = 1;
    bool accepted = false;
    for (int ls = 0; ls < 40; ++ls, t *= 0.5) {
      for (int64_t j = 0; j < n; ++j) {
        A2[j] = A[j] + t * xA[j];
        KA2[j] = KA[j] + t * KxA[j];
      }
      for (int64_t c = 0; c < C; ++c) b2[c] = b[c] + t * xb[c];
      const double f2 = logreg_objective(A2.data(), KA2.data(), b2.data(), y, Z2.data(), P2.data(), S, C, lam);
      // Armijo, with the objective's rounding allowed: near the optimum a Newton step changes f
      // by ~|g|^2, below float64's resolution of f, and would otherwise be refused (|g| stalls ~1e-8)
      if (f2 <= f + 1e-4 * t * slope + 8 * std::numeric_limits<double>::epsilon() * std::fabs(f)) {
        accepted = true;
        f = f2;
        break;
      }
    }
    if (!accepted) break;
    std::copy(A2.begin(), A2.end(), A);
    std::copy(b2.begin(), b2.end(), b);
    // K A afresh, not by the step's recurrence: where K is singular the carried K x drifts
    // from K times the x that is kept, and the objective and residual would judge another point
    symm_mul(K, A, KA.data(), S, C);
    f = logreg_objective(A, KA.data(), b, y, Z.data(), P.data(), S, C, lam);
    sys.P = P.data();
  }
  const double mean_b = std::accumulate(b, b + C, 0.0) / static_cast<double>(C);
  for (int64_t c = 0; c < C; ++c) b[c] -= mean_b;  // softmax ignores a shift: report mean 0
  return rel;
}

// ---------------------------------------------------------------------------
// per task
// ---------------------------------------------------------------------------

template <typename T>
struct Scratch {
  std::vector<T> KT, AT, bT, Wbar, WF;
  dvec Kd;
  SvmScratch svm;
};

template <typename T>
void forward_task(int64_t t, const T* X, const int64_t* y, const T* Xq, const int64_t* yq, double* A, double* b,
                  T* W, double* fac, T* logits, T* loss, T* correct, double* residual, const ConvexArgs& a,
                  Scratch<T>& s) {
  const int64_t S = a.S, D = a.D, C = a.C, Q = a.Q;
  const T* Xt = X + t * S * D;
  const int64_t* yt = y + t * S;
  double* At = A + t * S * C;
  double* bt = b + t * C;
  T* Wt = W + t * C * D;
  s.KT.resize(static_cast<size_t>(S * S));
  gram_matrix(Xt, s.KT.data(), S, D);
  double* K = fac ? fac + t * S * S : (s.Kd.resize(static_cast<size_t>(S * S)), s.Kd.data());
  for (int64_t j = 0; j < S * S; ++j) K[j] = static_cast<double>(s.KT[j]);
  double res = 0;
  std::fill(bt, bt + C, 0.0);
  if (a.kind == 0) {
    for (int64_t i = 0; i < S; ++i) K[i * S + i] += a.reg;
    cholesky(K, S);
    std::fill(At, At + S * C, 0.0);
    for (int64_t i = 0; i < S; ++i) At[i * C + yt[i]] = 1.0;
    chol_solve(K, S, At, C);
  } else if (a.kind == 1) {
    res = svm_solve(K, yt, At, S, C, a.reg, a.dual_reg, a.tol, a.max_iter);
  } else {
    res = logreg_solve(K, Xt, D, yt, At, bt, S, C, a.reg, a.tol, a.max_iter);
  }
  residual[t] = res;
  s.AT.resize(static_cast<size_t>(S * C));
  for (int64_t j = 0; j < S * C; ++j) s.AT[j] = static_cast<T>(At[j]);
  atx(s.AT.data(), Xt, Wt, S, D, C, T(1), false);
  if (!Xq) return;
  s.bT.resize(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) s.bT[c] = static_cast<T>(bt[c]);
  T* Zt = logits + t * Q * C;  // the backward's saved logits, formed in place
  xwt(Xq + t * Q * D, Wt, s.bT.data(), Zt, Q, D, C);
  const double ls = a.label_smoothing;
  double total = 0, right = 0;
  for (int64_t q = 0; q < Q; ++q) {
    const T* z = Zt + q * C;
    const int64_t lab = yq[t * Q + q];
    double mx = -std::numeric_limits<double>::infinity(), zsum = 0;
    int64_t arg = 0;
    for (int64_t c = 0; c < C; ++c) {
      const double l = a.scale * static_cast<double>(z[c]);
      if (l > mx) mx = l, arg = c;
      zsum += l;
    }
    if (!(mx > -std::numeric_limits<double>::infinity())) mx = 0;  // NaN logits: NaN flows into the loss
    double se = 0;
    for (int64_t c = 0; c < C; ++c) se += std::exp(a.scale * static_cast<double>(z[c]) - mx);
    const double lse = mx + std::log(se);
    total += lse - (1 - ls) * a.scale * static_cast<double>(z[lab]) - ls * zsum / static_cast<double>(C);
    right += arg == lab ? 1.0 : 0.0;
  }
  loss[t] = static_cast<T>(total / static_cast<double>(Q));
  correct[t] = static_cast<T>(right);
}

template <typename T>
void backward_task(int64_t t, const T* X, const int64_t* y, const T* Xq, const int64_t* yq, const double* A,
                   const double* b, const T* W, const double* fac, const T* logits, const T* g, T* dX, T* dXq,
                   double* dreg, double* dscale, const ConvexArgs& a, Scratch<T>& s) {
  const int64_t S = a.S, D = a.D, C = a.C, Q = a.Q, n = S * C;
  const T* Xt = X + t * S * D;
  const T* Xqt = Xq + t * Q * D;
  const int64_t* yt = y + t * S;
  const double* At = A + t * S * C;
  const double* bt = b + t * C;
  const T* Wt = W + t * C * D;
  const double* K = fac + t * S * S;
  const double gt = static_cast<double>(g[t]);
  // query side: P = softmax(scale Z0), Lbar = g/Q (P - target), dscale = <Lbar, Z0>, Gbar = scale Lbar
  const T* Z0 = logits + t * Q * C;
  std::vector<T> Gbar(static_cast<size_t>(Q * C));
  dvec p(static_cast<size_t>(C));
  const double ls = a.label_smoothing, wq = gt / static_cast<double>(Q);
  double ds = 0;
  for (int64_t q = 0; q < Q; ++q) {
    const int64_t lab = yq[t * Q + q];
    const T* z = Z0 + q * C;
    double mx = -std::numeric_limits<double>::infinity(), se = 0;
    for (int64_t c = 0; c < C; ++c) mx = std::max(mx, a.scale * static_cast<double>(z[c]));
    if (!(mx > -std::numeric_limits<double>::infinity())) mx = 0;
    for (int64_t c = 0; c < C; ++c) se += (p[c] = std::exp(a.scale * static_cast<double>(z[c]) - mx));
    for (int64_t c = 0; c < C; ++c) {
      const double target = (c == lab ? 1 - ls : 0.0) + ls / static_cast<double>(C);
      const double lb = wq * (p[c] / se - target);
      ds += lb * static_cast<double>(z[c]);
      Gbar[q * C + c] = static_cast<T>(a.scale * lb);
    }
  }
  dscale[t] = ds;
  T* dXqt = dXq + t * Q * D;
  std::fill(dXqt, dXqt + Q * D, T(0));
  aw_add(Gbar.data(), Wt, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr), dXqt, Q, D, C);
  s.Wbar.resize(static_cast<size_t>(C * D));
  atx(Gbar.data(), Xqt, s.Wbar.data(), Q, D, C, T(1), false);
  dvec bbar(static_cast<size_t>(C), 0.0);
  for (int64_t q = 0; q < Q; ++q)
    for (int64_t c = 0; c < C; ++c) bbar[c] += static_cast<double>(Gbar[q * C + c]);
  std::vector<T> AbarT(static_cast<size_t>(n));
  xwt(Xt, s.Wbar.data(), static_cast<const T*>(nullptr), AbarT.data(), S, D, C);
  dvec Abar(AbarT.begin(), AbarT.end());
  // the head's adjoint: dX = P1 (Wbar + F) + E W with F = fcoef U2^T X
  dvec P1(static_cast<size_t>(n)), E(static_cast<size_t>(n)), U2(static_cast<size_t>(n));
  double fcoef = -1, dr = 0;
  if (a.kind == 0 || a.kind == 1) {
    if (a.kind == 0) {
      U2 = Abar;
      chol_solve(K, S, U2.data(), C);
    } else {
      dr = svm_adjoint(K, yt, At, Abar.data(), U2.data(), S, C, a.reg, a.dual_reg, s.svm);
    }
    for (int64_t j = 0; j < n; ++j) {
      P1[j] = At[j];
      E[j] = -U2[j];
    }
    if (a.kind == 0) dr = -dot(U2.data(), At, n);
  } else {
    const double lam = a.reg, inv_s = 1.0 / static_cast<double>(S);
    dvec KA(static_cast<size_t>(n)), Z(static_cast<size_t>(n)), P(static_cast<size_t>(n)),
        JA(static_cast<size_t>(n)), rhsb(static_cast<size_t>(C), 0.0), xb(static_cast<size_t>(C)),
        Kx(static_cast<size_t>(n)), tt(static_cast<size_t>(n));
    symm_mul(K, At, KA.data(), S, C);
    logreg_objective(At, KA.data(), bt, yt, Z.data(), P.data(), S, C, lam);
    softmax_jvp(P.data(), Abar.data(), JA.data(), S, C, -inv_s / lam);  // -J Abar / (lam S)
    for (int64_t i = 0; i < S; ++i)
      for (int64_t c = 0; c < C; ++c) rhsb[c] += JA[i * C + c];
    for (int64_t c = 0; c < C; ++c) rhsb[c] += bbar[c];
    LogregSystem sys{K, P.data(), S, C, lam, {}, {}, {}, {}};
    sys.prepare();
    double rn = std::sqrt(std::max(0.0, dot(rhsb.data(), rhsb.data(), C)));
    {
      dvec KJ(static_cast<size_t>(n));
      symm_mul(K, JA.data(), KJ.data(), S, C);
      rn = std::sqrt(std::max(0.0, rn * rn + dot(JA.data(), KJ.data(), n)));
    }
    sys.solve(JA.data(), rhsb.data(), U2.data(), xb.data(), Kx.data(), 1e-12 * std::max(rn, kTiny),
              4 * (n + C) + 10);
    symm_mul(K, U2.data(), Kx.data(), S, C);  // K a afresh (see logreg_solve)
    for (int64_t i = 0; i < S; ++i)
      for (int64_t c = 0; c < C; ++c) tt[i * C + c] = Abar[i * C + c] / lam + Kx[i * C + c] + xb[c];
    softmax_jvp(P.data(), tt.data(), E.data(), S, C, -inv_s);  // E = -M
    for (int64_t i = 0; i < S; ++i)
      for (int64_t c = 0; c < C; ++c) P1[i * C + c] = -(P[i * C + c] - (c == yt[i] ? 1.0 : 0.0)) * inv_s / lam;
    fcoef = lam;
  }
  // F = fcoef U2^T X into WF, then WF += Wbar
  std::vector<T> U2T(static_cast<size_t>(n)), P1T(static_cast<size_t>(n)), ET(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    U2T[j] = static_cast<T>(U2[j]);
    P1T[j] = static_cast<T>(P1[j]);
    ET[j] = static_cast<T>(E[j]);
  }
  s.WF.resize(static_cast<size_t>(C * D));
  atx(U2T.data(), Xt, s.WF.data(), S, D, C, static_cast<T>(fcoef), false);
  for (int64_t j = 0; j < C * D; ++j) s.WF[j] += s.Wbar[j];
  if (a.kind == 2) {
    double wf = 0;
    for (int64_t j = 0; j < C * D; ++j) wf += static_cast<double>(s.WF[j]) * static_cast<double>(Wt[j]);
    dr = -wf / a.reg;
  }
  dreg[t] = dr;
  T* dXt = dX + t * S * D;
  std::fill(dXt, dXt + S * D, T(0));
  aw_add(P1T.data(), s.WF.data(), ET.data(), Wt, dXt, S, D, C);
}

}  // namespace

template <typename T>
void convex_forward(const T* X, const int64_t* y, const T* Xq, const int64_t* yq, double* A, double* b, T* W,
                    double* fac, T* logits, T* loss, T* correct, double* residual, const ConvexArgs& a,
                    int nthreads) {
  parallel_chunks(a.T, nthreads, [&](int64_t t0, int64_t t1, int) {
    Scratch<T> s;
    for (int64_t t = t0; t < t1; ++t) forward_task(t, X, y, Xq, yq, A, b, W, fac, logits, loss, correct, residual, a, s);
  });
}

template <typename T>
void convex_backward(const T* X, const int64_t* y, const T* Xq, const int64_t* yq, const double* A,
                     const double* b, const T* W, const double* fac, const T* logits, const T* g, T* dX, T* dXq,
                     double* dreg, double* dscale, const ConvexArgs& a, int nthreads) {
  parallel_chunks(a.T, nthreads, [&](int64_t t0, int64_t t1, int) {
    Scratch<T> s;
    for (int64_t t = t0; t < t1; ++t)
      backward_task(t, X, y, Xq, yq, A, b, W, fac, logits, g, dX, dXq, dreg, dscale, a, s);
  });
}

template void convex_forward<float>(const float*, const int64_t*, const float*, const int64_t*, double*, double*,
                                    float*, double*, float*, float*, float*, double*, const ConvexArgs&, int);
template void convex_forward<double>(const double*, const int64_t*, const double*, const int64_t*, double*,
                                     double*, double*, double*, double*, double*, double*, double*,
                                     const ConvexArgs&, int);
template void convex_backward<float>(const float*, const int64_t*, const float*, const int64_t*, const double*,
                                     const double*, const float*, const double*, const float*, const float*,
                                     float*, float*, double*, double*, const ConvexArgs&, int);
template void convex_backward<double>(const double*, const int64_t*, const double*, const int64_t*,
                                      const double*, const double*, const double*, const double*, const double*,
                                      const double*, double*, double*, double*, double*, const ConvexArgs&, int);

}  // namespace msf
