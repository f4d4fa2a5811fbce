"""Benchmark of info_nce and clip_loss (ops/contrastive): the contrastive section of
`metassl-fast bench`, on the GPU where CUDA is available, else the CPU (see --help)."""
import sys

from metassl_fast.cli import bench

if __name__ == "__main__":
    bench(["--section", "contrastive", *sys.argv[1:]])
