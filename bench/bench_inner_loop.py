"""Benchmark of the fused ANIL meta-loss; the inner-loop section of `metassl-fast bench`."""
from metassl_fast.benchmarks.inner_loop import main

if __name__ == "__main__":
    main()
