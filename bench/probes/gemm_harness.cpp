// Issue 14 probe (2026-12-08): csrc/cpu/gemm.cpp against a float64 loop on edge shapes, then GFLOP/s at the
// contrastive sweep's block shapes (256 x 8192 x 128, fp32, 2 threads).  Build and run from the repository root:
//   g++ -O3 -march=x86-64-v4 -mprefer-vector-width=512 -DMSF_VEC_BYTES=64 -fopenmp -fno-math-errno -Wno-psabi
//       -Icsrc bench/probes/gemm_harness.cpp -o /tmp/gemm_harness  (one line), then
//   OMP_NUM_THREADS=2 /tmp/gemm_harness
//   (AVX2: -march=x86-64-v3 -DMSF_VEC_BYTES=32)
#include "cpu/gemm.cpp"
#include <chrono>
#include <cstdio>
#include <random>
#include <array>
using namespace msf::gemm;
template<class F> double tm(F f, int n=15){ f(); std::vector<double> t; for(int i=0;i<n;i++){auto a=std::chrono::steady_clock::now(); f(); t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now()-a).count());} std::sort(t.begin(),t.end()); return t[n/2]; }
template<typename T> void check(int64_t M,int64_t N,int64_t K){
  std::mt19937 g(1); std::normal_distribution<double> d;
  std::vector<T> A(M*K), B(N*K), At(K*M), Bn(K*N), C(M*N), C2(M*N), C3(M*N);
  for(auto&x:A)x=d(g); for(auto&x:B)x=d(g);
  for(int64_t i=0;i<M;i++)for(int64_t k=0;k<K;k++)At[k*M+i]=A[i*K+k];
  for(int64_t j=0;j<N;j++)for(int64_t k=0;k<K;k++)Bn[k*N+j]=B[j*K+k];
  std::vector<T> Bp(packed_numel(sizeof(T),N,K)); pack(B.data(),N,K,K,Bp.data(),2);
  std::vector<T> wk(nt_work_numel(sizeof(T),M,K)); nt(A.data(),K,Bp.data(),C.data(),N,M,N,K,T(1.5),wk.data(),2);
  for(auto&x:C2)x=1; nn(A.data(),K,Bn.data(),N,C2.data(),N,M,N,K,T(1.5),true,2);
  for(auto&x:C3)x=1; tn(At.data(),M,Bn.data(),N,C3.data(),N,M,N,K,T(1.5),true,2);
  double e=0;
  for(int64_t i=0;i<M;i++)for(int64_t j=0;j<N;j++){double s=0; for(int64_t k=0;k<K;k++) s+=double(A[i*K+k])*B[j*K+k]; s*=1.5;
    e=std::max({e,std::abs(C[i*N+j]-s),std::abs(C2[i*N+j]-1-s),std::abs(C3[i*N+j]-1-s)});}
  printf("check %s M=%ld N=%ld K=%ld maxerr %.3g\n", sizeof(T)==4?"f32":"f64", M,N,K,e);
}
int main(){
  for (auto s: std::vector<std::array<int64_t,3>>{{1,1,1},{13,33,7},{25,70,300},{12,32,256},{37,129,513}}) { check<float>(s[0],s[1],s[2]); check<double>(s[0],s[1],s[2]); }
  const int64_t Bk=256,N=8192,D=128;
  std::vector<float> q(Bk*D,1.f), K(N*D,0.5f), S(Bk*N,0.1f), dq(Bk*D), dk(N*D), Kp(packed_numel(4,N,D)), wk(nt_work_numel(4,Bk,D));
  pack(K.data(),N,D,D,Kp.data(),2);
  double fl=2.0*Bk*N*D;
  double t1=tm([&]{nt(q.data(),D,Kp.data(),S.data(),N,Bk,N,D,1.f,wk.data(),2);});
  double t2=tm([&]{nn(S.data(),N,K.data(),D,dq.data(),D,Bk,D,N,1.f,false,2);});
  double t3=tm([&]{tn(S.data(),N,q.data(),D,dk.data(),D,N,D,Bk,1.f,true,2);});
  double t4=tm([&]{pack(K.data(),N,D,D,Kp.data(),2);});
  printf("nt %.2f ms %.1f GF/s | nn %.2f ms %.1f | tn %.2f ms %.1f | pack %.2f ms\n",t1*1e3,fl/t1/1e9,t2*1e3,fl/t2/1e9,t3*1e3,fl/t3/1e9,t4*1e3);
}
