# Issue 14 probe, run as-is for bench/RESULTS.md (2026-12-02): torch.mm (MKL) at the contrastive CPU kernel's block shapes (256 x 8192 x 128) and a 2048^3 product.
# PYTHONPATH=python .venv/bin/python bench/probes/mkl_block_gemms.py
import torch, time
print([l for l in torch.__config__.show().splitlines() if 'BLAS' in l or 'MKL' in l or 'oneDNN' in l][:6])
def bench(f, n=10):
    f(); ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return sorted(ts)[n//2]
N,D,B=8192,128,256
q=torch.randn(B,D); K=torch.randn(N,D); G=torch.randn(B,N); out=torch.empty(B,N); o2=torch.empty(B,D); o3=torch.empty(N,D)
for name,f,fl in [("S=qK^T",lambda: torch.mm(q,K.T,out=out),2*B*N*D),("dQ=GK",lambda: torch.mm(G,K,out=o2),2*B*N*D),("dK+=G^Tq",lambda: o3.addmm_(G.T,q),2*B*N*D)]:
    t=bench(f); print(name, f"{t*1e3:.2f} ms {fl/t/1e9:.1f} GFLOP/s")
big=torch.randn(2048,2048); t=bench(lambda: big@big,5); print("2048^3", 2*2048**3/t/1e9)
