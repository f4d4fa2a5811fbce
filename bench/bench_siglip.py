"""Benchmark of siglip_loss (ops/siglip): its drop-in against open_clip's SigLipLoss (CPU,
the siglip row of `metassl-fast bench --section family`), or with --gpu the GPU siglip
row of the contrastive GPU table."""
import sys

from metassl_fast.benchmarks import contrastive_gpu, family

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--gpu" in argv:
        argv.remove("--gpu")
        contrastive_gpu.main(["--ops", "siglip", *argv])
    else:
        family.main(["--op", "siglip", *argv])
