"""Benchmark of nt_xent and supcon_loss (ops/labeled): their drop-ins against lightly and
pytorch-metric-learning (CPU, the labeled rows of `metassl-fast bench --section family`),
or with --gpu the GPU nt_xent row of the contrastive GPU table."""
import sys

from metassl_fast.benchmarks import contrastive_gpu, family

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--gpu" in argv:
        argv.remove("--gpu")
        contrastive_gpu.main(["--ops", "nt_xent", *argv])
    else:
        family.main(["--op", "labeled", *argv])
