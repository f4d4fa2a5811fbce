// Issue 13/14 probe, run as-is for bench/RESULTS.md (2026-12-07): one task's thin products of the
// few-shot kernels (cpu/_products.h), single thread, the inputs of 8 tasks rotated so that a task's
// rows are not cache-hot (as in the kernels): microseconds and GFLOP/s per product.
//   g++ -O3 -march=x86-64-v4 -mtune=generic -mprefer-vector-width=512 -fno-math-errno \
//       -DMSF_VEC_BYTES=64 -Icsrc -o /tmp/products bench/probes/products.cpp && /tmp/products 25 640
//   (the avx2 build: -march=x86-64-v3 -DMSF_VEC_BYTES=32; on the commit before a change: -I<its csrc>)
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <vector>

#include "cpu/_products.h"

using namespace msf::products;

static double time_us(const std::function<void()>& f, int n) {
  f();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < n; ++i) f();
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / n;
}

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s S D [T]\n", argv[0]);
    return 2;
  }
  const int64_t S = std::atoi(argv[1]), D = std::atoi(argv[2]), C = 5, Q = 75, T = argc > 3 ? std::atoi(argv[3]) : 8;
  std::mt19937 g(0);
  std::normal_distribution<float> n;
  std::vector<float> X(T * S * D), Xq(T * Q * D), W(C * D), G(S * S), A(S * C), out(Q * C), WB(C * D);
  for (auto* v : {&X, &Xq, &W, &A})
    for (auto& x : *v) x = n(g);
  const int N = D > 5000 ? 5 : 100;
  int64_t t = 0;
  const double gr = time_us([&] { gram_matrix(X.data() + (t++ % T) * S * D, G.data(), S, D); }, N);
  const double ax = time_us([&] { atx(A.data(), X.data() + (t++ % T) * S * D, WB.data(), S, D, C, 1.f, false); }, N);
  const double xw = time_us(
      [&] { xwt(Xq.data() + (t++ % T) * Q * D, W.data(), static_cast<const float*>(nullptr), out.data(), Q, D, C); }, N);
  const double aq = time_us([&] {
    aw_add(out.data(), W.data(), static_cast<const float*>(nullptr), static_cast<const float*>(nullptr),
           Xq.data() + (t++ % T) * Q * D, Q, D, C);
  }, N);
  const double axq = time_us([&] { atx(out.data(), Xq.data() + (t++ % T) * Q * D, WB.data(), Q, D, C, 1.f, false); }, N);
  auto gf = [](double macs, double us) { return 2 * macs / us / 1e3; };
  std::printf("S=%ld D=%ld: gram %.0f us (%.0f GF/s on the triangle) | atx S %.0f us (%.0f) | xwt Q %.0f us (%.0f) | "
              "aw_add Q %.0f us (%.0f) | atx Q %.0f us (%.0f)\n",
              static_cast<long>(S), static_cast<long>(D), gr, gf(S * (S + 1) / 2.0 * D, gr), ax, gf(double(S * C * D), ax),
              xw, gf(double(Q * C * D), xw), aq, gf(double(Q * C * D), aq), axq, gf(double(Q * C * D), axq));
}
