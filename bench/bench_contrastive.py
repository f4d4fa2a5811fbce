"""Benchmark of the contrastive losses; same as `metassl-fast bench` (see --help)."""
from metassl_fast.benchmarks.contrastive import main

if __name__ == "__main__":
    main()
