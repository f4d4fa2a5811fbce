"""`metassl-fast` command line: `info` (what is built and usable) and `bench` (the main job)."""
from __future__ import annotations

import argparse
import platform
import sys


def info(stream=sys.stdout) -> None:
    import torch

    import metassl_fast
    from metassl_fast import _ext
    from metassl_fast.benchmarks import cpu_name

    print(f"metassl_fast {metassl_fast.__version__}", file=stream)
    print(f"python {platform.python_version()}, torch {torch.__version__}", file=stream)
    try:
        import triton

        print(f"triton {triton.__version__}", file=stream)
    except ImportError:
        print("triton not installed", file=stream)
    if _ext.available("_C"):
        mod = _ext.require("_C")
        levels = ", ".join(k for k, v in mod.cpu_levels().items() if v) or "x86-64 baseline"
        print(f"_C: built, using {mod.__name__.rsplit('.', 1)[-1]} (simd: {mod.simd}, {mod.vec_bytes}-byte vectors; "
              f"this CPU: {levels})", file=stream)
        from metassl_fast.ops._common import GEMM_ENV, sweep_gemm

        try:
            gemm = sweep_gemm()
            products = f"{gemm} ({'csrc/cpu/gemm.cpp' if gemm == 'own' else 'torch BLAS'}; {GEMM_ENV}=own|blas|auto)"
        except ValueError as exc:
            products = f"none ({exc})"
        print(f"contrastive CPU products: {products}", file=stream)
    if _ext.available("_C_cuda"):
        mod = _ext.require("_C_cuda")
        print(f"_C_cuda: built against CUDA runtime {mod.runtime_version()}, "
              f"{mod.device_count()} device(s) visible", file=stream)
    print("backends:", file=stream)
    for name, state in metassl_fast.available_backends().items():
        print(f"  {name:7s} {state}", file=stream)
    if torch.cuda.is_available():
        print(f"device: cuda: {torch.cuda.get_device_name()}", file=stream)
    else:
        print(f"device: {cpu_name()}, torch threads {torch.get_num_threads()}", file=stream)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="metassl-fast", description=__doc__)
    parser.add_argument("command", choices=["info", "bench"])
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "info":
        info()
    else:
        bench(argv[1:])


def bench(argv) -> None:
    """The contrastive section (on the GPU where CUDA is available, else the CPU), the
    drop-ins against the original packages (CPU), then the inner-loop section (CPU), then the
    convex heads (CPU).  --section contrastive|family|inner_loop|heads runs one of them; --device picks the
    contrastive section's device; other options go to the CPU contrastive section
    (metassl-fast bench --help)."""
    import torch

    from metassl_fast.benchmarks import contrastive, contrastive_gpu, family, heads, inner_loop

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--section", choices=["all", "contrastive", "family", "inner_loop", "heads"], default="all")
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print("metassl-fast bench [--section all|contrastive|family|inner_loop|heads] [--out DIR] "
              "[--device auto|cpu|cuda] [contrastive options]\n"
              "  --device: auto (default) runs the GPU contrastive benchmark where CUDA is available, "
              "else the CPU one\n")
        contrastive.main(["--help"])  # the CPU section's options; exits
    if args.section in ("all", "contrastive"):
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
            contrastive_gpu.main(["--out", args.out])
        else:
            contrastive.main(rest + ["--out", args.out])
    if args.section in ("all", "family"):
        family.run(args.out)
    if args.section in ("all", "inner_loop"):
        inner_loop.run(args.out)
    if args.section in ("all", "heads"):
        heads.run(args.out)


if __name__ == "__main__":
    main()
