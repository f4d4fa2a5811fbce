"""Benchmark of the fused ANIL meta-loss (ops/inner_loop); the inner-loop section of
`metassl-fast bench` (--gpu: the Triton and CUDA C++ kernels on a CUDA device)."""
from metassl_fast.benchmarks.inner_loop import main

if __name__ == "__main__":
    main()
