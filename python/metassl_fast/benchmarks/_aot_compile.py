"""Compile Triton launch specs ahead of time for a GPU this machine does not have, and
read what the compiler produced: registers, stack (local memory, i.e. spills), dynamic
shared memory per block, and the SASS instruction mix.

Imports triton and the standard library only, and loads the kernel files by path, so
that it runs in an environment holding nothing but another triton version:

    python _aot_compile.py SPECS.json OUT.json [--kernels DIR] [--jobs N]

SPECS.json is what `aot.build()` writes for it (the launches the launchers chose,
recorded by aot.capture()).  A spec: {"kernel": "contrastive.name",
"signature": {arg: type or "constexpr"}, "constexprs": {...}, "divisible": [arg index
with 16-divisible value], "num_warps", "num_stages", "arch"}.

How: triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) runs the
whole pipeline down to a cubin with the ptxas triton ships; cuobjdump (shipped beside
it) gives the resource usage and the SASS.  wgmma shows as HGMMA, mma.sync as HMMA,
cp.async as LDGSTS, TMA loads as UTMALDG, local-memory traffic (spills) as LDL / STL.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

# opt-in shared memory per block (bytes): H100/H200 227 KB, A100 163 KB
SMEM_LIMIT = {90: 232448, 80: 166912}
SASS_OPS = ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "LDL", "STL", "FFMA")
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_kernel_pkg = None


def _load_kernels(kernels_dir: str):
    """kernels/ as a package of its own (its files use relative imports only)."""
    global _kernel_pkg
    if _kernel_pkg is None:
        name = "_metassl_fast_aot_kernels"
        spec = importlib.util.spec_from_file_location(name, os.path.join(kernels_dir, "__init__.py"),
                                                      submodule_search_locations=[kernels_dir])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[name] = pkg
        spec.loader.exec_module(pkg)
        _kernel_pkg = pkg
    return _kernel_pkg


def _kernel(kernels_dir: str, qualname: str):
    import importlib

    pkg = _load_kernels(kernels_dir)
    module, fn = qualname.split(".")
    return getattr(importlib.import_module(f"{pkg.__name__}.{module}"), fn)


def _tool(name: str) -> str:
    import triton

    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    found = here if os.path.exists(here) else shutil.which(name) or os.path.join("/usr/local/cuda/bin", name)
    if not os.path.exists(found):
        raise FileNotFoundError(f"{name} not found beside triton, on PATH or in /usr/local/cuda/bin")
    return found


def sass_census(sass: str) -> dict:
    """How many of each instruction in SASS_OPS a SASS listing holds."""
    counts = collections.Counter(re.findall(r"\b(" + "|".join(SASS_OPS) + r")\b", sass))
    return {op: counts.get(op, 0) for op in SASS_OPS}


def mma_kind(ops: dict) -> str:
    if ops.get("HGMMA"):
        return "wgmma"
    if ops.get("HMMA"):
        return "mma.sync"
    return "fma"


def compile_spec(spec: dict, kernels_dir: str) -> dict:
    """One spec -> a row: the spec's identity plus what the compiler made of it (or the error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"id": spec["id"], "arch": spec["arch"], "triton": triton.__version__}
    fn = _kernel(kernels_dir, spec["kernel"])
    attrs = {(i,): [["tt.divisibility", 16]] for i in spec["divisible"]}
    src = ASTSource(fn, dict(spec["signature"]), dict(spec["constexprs"]), attrs)
    t0 = time.perf_counter()
    try:
        k = triton.compile(src, target=GPUTarget("cuda", spec["arch"], 32),
                           options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    except Exception as e:  # a compile failure is a result to record, not a crash of the sweep
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        cuobjdump = _tool("cuobjdump")
        res = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    m = _RES.search(res)
    if m is None:
        row.update(ok=False, error=f"no resource usage in cuobjdump's output: {res[-300:]}")
        return row
    regs, stack, static_smem, local = map(int, m.groups())
    ops = sass_census(sass)
    smem = int(k.metadata.shared) + static_smem
    row.update(ok=True, regs=regs, stack=stack, local=local, smem=smem,
               smem_limit=SMEM_LIMIT[spec["arch"]], fits=smem <= SMEM_LIMIT[spec["arch"]],
               mma=mma_kind(ops), sass=ops)
    return row


def _worker(args):
    spec, kernels_dir = args
    return compile_spec(spec, kernels_dir)


def compile_all(specs: list, kernels_dir: str, jobs: int = 1, progress=None) -> list:
    """Rows in the order of specs; jobs > 1 compiles in worker processes."""
    work = [(s, kernels_dir) for s in specs]
    if jobs <= 1:
        rows = []
        for i, w in enumerate(work):
            rows.append(_worker(w))
            if progress:
                progress(i + 1, len(work))
        return rows
    import multiprocessing as mp

    rows = []
    with mp.get_context("spawn").Pool(jobs) as pool:
        for i, r in enumerate(pool.imap(_worker, work, chunksize=1)):
            rows.append(r)
            if progress:
                progress(i + 1, len(work))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("specs")
    p.add_argument("out")
    p.add_argument("--kernels", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
    p.add_argument("--jobs", type=int, default=1)
    a = p.parse_args(argv)
    with open(a.specs) as f:
        specs = json.load(f)
    rows = compile_all(specs, os.path.abspath(a.kernels), a.jobs,
                       progress=lambda i, n: print(f"\r{i}/{n}", end="", file=sys.stderr, flush=True))
    print(file=sys.stderr)
    with open(a.out, "w") as f:
        json.dump(rows, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
