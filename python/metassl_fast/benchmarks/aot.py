"""Ahead-of-time compile table of every Triton kernel configuration the launchers can
choose, for sm_90 (H100/H200) and sm_80 (A100), without a GPU (issue 11).

    python -m metassl_fast.benchmarks.aot --write          # regenerate bench/aot/ for this triton
    python -m metassl_fast.benchmarks.aot --write --python /path/to/other/venv/bin/python
                                                           # ... with the triton of another venv
    python -m metassl_fast.benchmarks.aot --check          # is the committed table current?

What is compiled is not a copy of the launchers' choices: `capture()` runs the real
launchers (ops/<op>/triton.py, which call their own config functions) on meta-device
tensors with every kernel of kernels/ replaced by a recorder, for every D bucket the
launchers accept (16 .. 16384: D streams in chunks, so the tiles change only up to D = 256;
larger D is refused with a ValueError), every operand
precision (bf16, fp16, fp32 "ieee", fp32 tf32) and every constexpr variant the host code
passes, and the inner loop at its caps, at 64 and at its smallest blocks.  Launches that pick the
same binary (same kernel, signature, constexprs, warps, stages) are compiled once.
The compile itself (_aot_compile.py) needs triton only, so another triton version
(3.6, the GPU machine's) runs it from a venv of its own.

The table is keyed by a hash of kernels/, the launchers and their config code: the CI
test (tests/test_aot.py) fails when the key no longer matches the code, checks every
committed row against the limits (shared memory per block, spills, wgmma), and compiles
a representative subset again to confirm the committed numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

from . import _aot_compile

ARCHS = (90, 80)
# D buckets: every tile choice of triton_config (it changes up to D = 256), and large D
# up to TRITON_MAX_D, which stream through the same binaries
D_BUCKETS = (16, 32, 64, 128, 256, 1024, 2048, 16384)
# the same tiles with sizes that are not multiples of 16 (triton specialises on
# divisibility by 16): one shape, both D and N odd; mixed cases are not swept
ODD_SHAPES = ((1000, 4097),)
PRECISIONS = (("bf16", torch.bfloat16, False), ("fp16", torch.float16, False),
              ("fp32-ieee", torch.float32, False), ("fp32-tf32", torch.float32, True))
N_ROWS = 4096  # rows of Q / K in the recorded launches: a size, not a config choice
TABLE_DIR = os.path.join("bench", "aot")

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS_DIR = os.path.join(_PKG, "kernels")
_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
          torch.int32: "i32", torch.float64: "fp64"}


# ----------------------------------------------------------------------------- capture

class _Recorder:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **meta) records the launch."""

    def __init__(self, fn, module: str, sink: list):
        self.fn, self.module, self.sink = fn, module, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append(_spec(self.fn, self.module, args, kwargs))


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


def _spec(fn, module, args, kwargs) -> dict:
    """A launch as triton.compile needs it.  Divisibility by 16 as Triton's launcher
    specialises it: tensors (torch allocations are aligned) and ints whose value is."""
    kwargs = dict(kwargs)
    num_warps = kwargs.pop("num_warps", 4)
    num_stages = kwargs.pop("num_stages", 3)  # triton's default on CUDA
    names = fn.arg_names
    bound = dict(zip(names, args))
    signature, divisible = {}, []
    for i, name in enumerate(names):
        if name in kwargs:
            signature[name] = "constexpr"
            continue
        value = bound[name]
        signature[name] = _arg_type(value)
        if isinstance(value, torch.Tensor) or (type(value) is int and value % 16 == 0):
            divisible.append(i)
    return {"kernel": f"{module}.{fn.__name__}", "signature": signature, "constexprs": kwargs,
            "divisible": divisible, "num_warps": num_warps, "num_stages": num_stages}


@contextlib.contextmanager
def _recording(sink: list):
    """Every launchable kernel of kernels/ replaced by a recorder; the launchers' GPU
    config (not the interpreter's small tiles) in force."""
    import triton

    from .. import _backend
    from ..kernels import contrastive, inner_loop, labeled, siglip

    saved = []
    for mod in (contrastive, inner_loop, labeled, siglip):
        short = mod.__name__.rsplit(".", 1)[1]
        for name, obj in vars(mod).items():
            # JITFunction, or InterpretedFunction under TRITON_INTERPRET=1 (the test suite)
            if isinstance(obj, triton.runtime.jit.KernelInterface) and name.endswith("_kernel"):
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, short, sink))
    saved_interp, saved_tf32 = _backend.interpreting, torch.backends.cuda.matmul.allow_tf32
    _backend.interpreting = lambda: False
    try:
        yield
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)
        _backend.interpreting = saved_interp
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32


def _contrastive_family(d, dtype, n=N_ROWS):
    """The contrastive, labelled-row and SigLIP launchers at feature dimension d, n rows."""
    from ..ops.contrastive import triton as ct
    from ..ops.labeled import triton as lt
    from ..ops.siglip import triton as st

    q = torch.empty(n, d, dtype=dtype, device="meta")
    vec = lambda: torch.empty(n, dtype=torch.float32, device="meta")  # noqa: E731
    mat = lambda: torch.empty(n, d, dtype=torch.float32, device="meta")  # noqa: E731
    for symmetric in (False, True):
        ct.launch_fwd(q, q, vec(), vec(), vec(), vec(), vec(), 14.3, symmetric)
        ct.launch_bwd(q, q, vec(), vec(), vec(), 14.3, symmetric, True, (0, n))
    y = torch.empty(n, dtype=torch.int64, device="meta")
    for col0 in (None, 0):
        for pairwise in (False, True):
            launch = lt.Launch(q, q, y, y, 14.3, col0, pairwise)
            for ext, ext_positive in ((None, False), (vec(), False), (vec(), True)):
                launch.forward(ext, ext_positive, vec(), vec(), vec())
            for dk in (False, True):
                launch.backward(dk, vec(), vec(), vec(), mat())
    launch = st.Launch(q, q, 10.0, -10.0, 0)
    launch.forward(vec())
    for dk in (False, True):
        launch.backward(dk, 1.0 / n, mat())


def _inner_loop(s, q, c):
    """The inner-loop launchers at S support rows, Q query rows, C classes (CPU tensors:
    the host checks read label values; the recorders keep the kernels from running)."""
    from ..ops.inner_loop import triton as it

    d = 64
    X, Xq = torch.zeros(1, s, d), torch.zeros(1, q, d)
    y, yq = torch.zeros(1, s, dtype=torch.int64), torch.zeros(1, q, dtype=torch.int64)
    W, b = torch.zeros(c, d), torch.zeros(c)
    aW, ab = torch.full((c, d), 0.1), torch.full((c,), 0.1)
    it.adapt_forward(X, y, W, b, aW, ab, 2)
    traj, btraj = torch.zeros(1, 3, c, d), torch.zeros(1, 3, c)
    for first_order in (False, True):
        it.adapt_backward(W[None], b[None], X, y, aW, ab, traj, btraj, first_order)
    it.anil(X, y, Xq, yq, W, b, aW, ab, torch.ones(1), 2, False, False)
    for first_order in (False, True):
        it.anil(X, y, Xq, yq, W, b, aW, ab, torch.ones(1), 2, first_order, True)


def inner_loop_sizes():
    """(BLOCK_S, BLOCK_Q, BLOCK_C) for the inner-loop launcher (captured at one less than
    each, odd sizes as real tasks have): its caps (the largest blocks it can pick), the mid
    size 64, the smallest blocks, and a small support with the largest query (the launcher's
    warps follow the larger of the two row blocks).  Other block sizes are not compiled
    (5-30 s a binary before this change); their shared memory lies between these."""
    from ..ops.inner_loop._shared import MAX_TRITON_CLASSES, MAX_TRITON_ROWS

    return [(16, 16, 16), (64, 64, min(64, MAX_TRITON_CLASSES)), (16, MAX_TRITON_ROWS, MAX_TRITON_CLASSES),
            (MAX_TRITON_ROWS, MAX_TRITON_ROWS, MAX_TRITON_CLASSES)]


def capture() -> list:
    """Every distinct launch (one per binary) for every arch, each with the cases that pick it."""
    sink, by_id = [], {}
    family = [(d, N_ROWS, f"D<={d}") for d in D_BUCKETS] + [(d, n, f"D={d} N={n}") for d, n in ODD_SHAPES]
    with _recording(sink):
        for d, n, label in family:
            for pname, dtype, tf32 in PRECISIONS:
                torch.backends.cuda.matmul.allow_tf32 = tf32
                start = len(sink)
                _contrastive_family(d, dtype, n)
                for spec in sink[start:]:
                    spec["case"] = f"{label} {pname}"
        torch.backends.cuda.matmul.allow_tf32 = False
        for s, q, c in inner_loop_sizes():
            start = len(sink)
            _inner_loop(s - 1, q - 1, c - 1)  # odd sizes, as real tasks have (S = 25, C = 5)
            for spec in sink[start:]:
                spec["case"] = f"S<={s} Q<={q} C<={c} fp32"
    for spec in sink:
        case = spec.pop("case")
        for arch in ARCHS:
            full = dict(spec, arch=arch)
            full["id"] = spec_id(full)
            seen = by_id.setdefault(full["id"], dict(full, cases=[]))
            if any(seen[k] != full[k] for k in _SPEC_FIELDS):  # one id, one binary: never merge two
                raise RuntimeError(f"two different launches share the id {full['id']}")
            if case not in seen["cases"]:
                seen["cases"].append(case)
    return list(by_id.values())


def spec_id(spec: dict) -> str:
    """kernel[operand dtype, constexprs, warps, stages(, the integer arguments not divisible
    by 16: triton specialises on it)]@sm_XX: one binary."""
    const = ",".join(f"{k}={v}" for k, v in spec["constexprs"].items())
    operand = next(t for t in spec["signature"].values() if t.startswith("*"))
    odd = [name for i, (name, t) in enumerate(spec["signature"].items())
           if t in ("i32", "i64") and i not in spec["divisible"]]
    if odd:
        const += ",odd=" + "+".join(odd)
    return f"{spec['kernel']}[{operand[1:]},{const},w{spec['num_warps']},s{spec['num_stages']}]@sm_{spec['arch']}"


# ----------------------------------------------------------------------------- CUDA C++

CUDA_SOURCES = ("contrastive.cu", "labeled.cu", "siglip.cu", "inner_loop.cu")
CUDA_STATIC_SMEM_LIMIT = 48 * 1024  # static __shared__ per block, without the dynamic opt-in
_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:[^\n]*?(\d+) bytes smem)?")


def cuda_rows(csrc: str, archs=ARCHS, nvcc: str = "nvcc", sources=CUDA_SOURCES) -> list:
    """Every kernel instantiation of csrc/cuda/*.cu as nvcc -Xptxas -v reports it (registers,
    stack, spill bytes, static shared memory) plus the SASS MMA kind, per arch."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            for arch in archs:
                cubin = os.path.join(tmp, f"{src}.{arch}.cubin")
                log = subprocess.run([nvcc, "-cubin", "-O3", f"-arch=sm_{arch}", "-Xptxas", "-v", f"-I{csrc}",
                                      os.path.join(csrc, "cuda", src), "-o", cubin],
                                     capture_output=True, text=True, check=True).stderr
                sass = subprocess.run([_aot_compile._tool("cuobjdump"), "-sass", cubin], capture_output=True,
                                      text=True, check=True).stdout
                per_fn = {}
                for part in re.split(r"\n\s*Function : ", sass)[1:]:
                    name, body = part.split("\n", 1)
                    per_fn[name.strip()] = _aot_compile.sass_census(body)
                for block in log.split("ptxas info    : Compiling entry function")[1:]:
                    block = "Compiling entry function" + block
                    name = _PTXAS_ENTRY.search(block).group(1)
                    stack = _PTXAS_STACK.search(block)
                    used = _PTXAS_USED.search(block)
                    ops = per_fn.get(name, {})
                    rows.append({"source": src, "arch": arch, "function": _demangle(name),
                                 "regs": int(used.group(1)), "smem": int(used.group(2) or 0),
                                 "stack": int(stack.group(1)), "spill_stores": int(stack.group(2)),
                                 "spill_loads": int(stack.group(3)), "mma": _aot_compile.mma_kind(ops),
                                 "sass": ops})
    return rows


def _demangle(name: str) -> str:
    """`kernel<args>` from a mangled name (c++filt), without namespaces and parameters."""
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return name
    out = re.sub(r"\(anonymous namespace\)::|msf::cuda::|^void ", "", out)
    return out.split("(", 1)[0]


def cuda_key(csrc: str) -> str:
    """sha256 of csrc/cuda/* (what decides the CUDA table, with the nvcc version)."""
    h = hashlib.sha256()
    cuda_dir = os.path.join(csrc, "cuda")
    for name in sorted(os.listdir(cuda_dir)):
        h.update(name.encode())
        with open(os.path.join(cuda_dir, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def nvcc_version(nvcc: str = "nvcc") -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    return re.search(r"release (\d+\.\d+)", out).group(1)


def cuda_table(csrc: str, nvcc: str = "nvcc") -> dict:
    return {"key": cuda_key(csrc), "nvcc": nvcc_version(nvcc), "rows": cuda_rows(csrc, nvcc=nvcc)}


def cuda_markdown(rows: list) -> str:
    out = ["| arch | source | kernel | regs | stack B | spill st/ld B | static smem KB | MMA | LDGSTS |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-r["arch"], r["source"], r["function"])):
        out.append(f"| sm_{r['arch']} | {r['source']} | `{r['function']}` | {r['regs']} | {r['stack']} | "
                   f"{r['spill_stores']}/{r['spill_loads']} | {r['smem'] / 1024:.1f} | {r['mma']} | "
                   f"{r['sass'].get('LDGSTS', 0)} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- key

def code_key() -> str:
    """sha256 over what decides the table: kernels/*.py, the Triton launchers, their
    config code, the inner loop's caps and this module's capture."""
    from ..ops import _common
    from ..ops.inner_loop import _shared

    h = hashlib.sha256()
    files = sorted(os.path.join(KERNELS_DIR, f) for f in os.listdir(KERNELS_DIR) if f.endswith(".py"))
    files += sorted(os.path.join(_PKG, "ops", op, "triton.py") for op in ("contrastive", "inner_loop", "labeled",
                                                                         "siglip"))
    files += [os.path.abspath(__file__), _aot_compile.__file__]  # the capture and the measurement
    for path in files:
        h.update(os.path.basename(os.path.dirname(path)).encode() + os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    for obj in (_common.TritonTiles, _common.triton_config, _common.precision, _common.check_int32_offsets):
        h.update(inspect.getsource(obj).encode())
    h.update(f"{_shared.MAX_TRITON_ROWS},{_shared.MAX_TRITON_CLASSES}".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- table

def table_path(version: str, out_dir: str = TABLE_DIR) -> str:
    return os.path.join(out_dir, f"triton-{version}.json")


def load_table(version: str, out_dir: str = TABLE_DIR) -> dict:
    with open(table_path(version, out_dir)) as f:
        return json.load(f)


def _triton_version(python: str) -> str:
    return subprocess.run([python, "-c", "import triton; print(triton.__version__)"], capture_output=True,
                          text=True, check=True).stdout.strip()


def kernels_key() -> str:
    """sha256 of kernels/*.py and of the compile-and-measure code: a binary compiled from
    the same spec and the same kernel source, measured the same way, is the same row,
    whatever the launchers choose elsewhere."""
    h = hashlib.sha256()
    paths = [os.path.join(KERNELS_DIR, f) for f in sorted(os.listdir(KERNELS_DIR)) if f.endswith(".py")]
    for path in paths + [_aot_compile.__file__]:
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def build(python: str = sys.executable, jobs: int = 1, specs=None, reuse: dict | None = None) -> dict:
    """Compile every spec (default: capture()) with the triton of `python`.  Rows of
    `reuse` (an earlier table of the same triton and kernel source) whose spec is the
    same are taken as they are instead of compiled again."""
    specs = capture() if specs is None else specs
    version = _triton_version(python)
    old = {}
    if reuse and reuse.get("triton") == version and reuse.get("kernels_key") == kernels_key():
        old = {r["id"]: r for r in reuse["rows"] if r.get("spec")}
    todo = [s for s in specs if not _same_spec(old.get(s["id"]), s)]
    rows = {}
    if todo:
        with tempfile.TemporaryDirectory() as tmp:
            spec_file, out_file = os.path.join(tmp, "specs.json"), os.path.join(tmp, "rows.json")
            with open(spec_file, "w") as f:
                json.dump(todo, f)
            # real compiles: not the interpreter, and not triton's on-disk cache of earlier ones
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            env["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton-cache")
            subprocess.run([python, _aot_compile.__file__, spec_file, out_file, "--kernels", KERNELS_DIR,
                            "--jobs", str(jobs)], check=True, env=env)
            with open(out_file) as f:
                rows = {r["id"]: r for r in json.load(f)}
    out = []
    for spec in specs:
        row = dict(rows[spec["id"]]) if spec["id"] in rows else dict(old[spec["id"]])
        row["kernel"], row["cases"] = spec["kernel"], spec["cases"]
        row["config"] = spec["id"].split("[", 1)[1].rsplit("]@", 1)[0]
        row["spec"] = {k: spec[k] for k in _SPEC_FIELDS}
        out.append(row)
    return {"key": code_key(), "kernels_key": kernels_key(), "triton": version, "rows": out}


_SPEC_FIELDS = ("signature", "constexprs", "divisible", "num_warps", "num_stages")


def _same_spec(row, spec) -> bool:
    return row is not None and all(row["spec"][k] == spec[k] for k in _SPEC_FIELDS)


def dumps(table: dict) -> str:
    """The table as JSON with one row a line (diffs between regenerations stay readable)."""
    head = json.dumps({k: v for k, v in table.items() if k != "rows"})[:-1]
    return head + ', "rows": [\n' + ",\n".join(json.dumps(r, sort_keys=True) for r in table["rows"]) + "\n]}\n"


def _cases_summary(cases: list) -> str:
    return "; ".join(cases) if len(cases) <= 3 else f"{'; '.join(cases[:2])}; ... ({len(cases)} cases)"


def markdown(table: dict) -> str:
    rows = sorted(table["rows"], key=lambda r: (-r["arch"], r["kernel"], r["config"]))
    out = [f"### Triton {table['triton']} (code key {table['key']}): {len(rows)} binaries", "",
           "| arch | kernel | config | regs | stack B | smem KB (limit) | MMA | LDGSTS | cases |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["ok"]:
            out.append(f"| sm_{r['arch']} | {r['kernel']} | {r['config']} | compile failed: {r['error']} ||||| "
                       f"{_cases_summary(r['cases'])} |")
            continue
        fit = "" if r["fits"] else " **over**"
        out.append(f"| sm_{r['arch']} | {r['kernel']} | {r['config']} | {r['regs']} | {r['stack']} | "
                   f"{r['smem'] / 1024:.1f} ({r['smem_limit'] // 1024}){fit} | {r['mma']} | {r['sass']['LDGSTS']} | "
                   f"{_cases_summary(r['cases'])} |")
    return "\n".join(out) + "\n"


def summary(table: dict) -> str:
    """Per arch and kernel: binaries, how many are over the shared-memory limit, spill, or
    (16-bit operands on sm_90) miss wgmma."""
    from collections import defaultdict

    agg = defaultdict(lambda: [0, 0, 0, 0, 0])
    for r in table["rows"]:
        a = agg[(r["arch"], r["kernel"])]
        a[0] += 1
        if not r["ok"]:
            a[1] += 1
            continue
        a[2] += not r["fits"]
        a[3] += r["stack"] > 0
        a[4] += needs_wgmma(r) and r["mma"] != "wgmma"
    out = [f"Triton {table['triton']}, key {table['key']}", "",
           "| arch | kernel | binaries | compile failures | over smem | spilling | 16-bit without wgmma |",
           "|---|---|---|---|---|---|---|"]
    for (arch, kernel), a in sorted(agg.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        out.append(f"| sm_{arch} | {kernel} | " + " | ".join(map(str, a)) + " |")
    return "\n".join(out) + "\n"


def operand(row: dict) -> str:
    """The operand dtype of a table row ("bf16", "fp16", "fp32"): its config's first field."""
    return row["config"].split(",", 1)[0]


def needs_wgmma(row: dict) -> bool:
    """16-bit operands on sm_90, where the MMA tile has at least 64 rows (wgmma's M).
    The 64-row condition is read from the config's block sizes: the kernel's smaller
    block of rows and columns is the MMA's M in the row-outer and column-outer passes."""
    if row["arch"] != 90 or operand(row) not in ("bf16", "fp16"):
        return False
    blocks = dict(kv.split("=") for kv in row["config"].split(",") if kv.startswith("BLOCK_M=")
                  or kv.startswith("BLOCK_N="))
    return bool(blocks) and min(int(v) for v in blocks.values()) >= 64


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="AOT compile table of the Triton kernels (sm_90, sm_80)")
    p.add_argument("--write", action="store_true", help="compile everything and write bench/aot/triton-<v>.json/.md")
    p.add_argument("--check", action="store_true", help="exit 1 if a committed table's key is stale")
    p.add_argument("--python", default=sys.executable, help="the interpreter whose triton compiles")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)))
    p.add_argument("--out-dir", default=TABLE_DIR)
    p.add_argument("--cuda", action="store_true", help="with --write: the _C_cuda table (nvcc -Xptxas -v) instead")
    p.add_argument("--csrc", default="csrc", help="the csrc/ folder of the checkout (--cuda)")
    a = p.parse_args(argv)
    if a.write and a.cuda:
        table = cuda_table(a.csrc)
        os.makedirs(a.out_dir, exist_ok=True)
        base = os.path.join(a.out_dir, f"cuda-nvcc-{table['nvcc']}")
        with open(base + ".json", "w") as f:
            f.write(dumps(table))
        with open(base + ".md", "w") as f:
            f.write(f"### _C_cuda, nvcc {table['nvcc']} (key {table['key']}): {len(table['rows'])} kernels\n\n"
                    + cuda_markdown(table["rows"]))
        return 0
    if a.check:
        key, stale = code_key(), []
        for name in sorted(os.listdir(a.out_dir)):
            if name.startswith("triton-") and name.endswith(".json"):
                with open(os.path.join(a.out_dir, name)) as f:
                    if json.load(f)["key"] != key:
                        stale.append(name)
        print(f"code key {key}; stale: {stale or 'none'}")
        return 1 if stale else 0
    if a.write:
        version = _triton_version(a.python)
        old = load_table(version, a.out_dir) if os.path.exists(table_path(version, a.out_dir)) else None
        table = build(a.python, a.jobs, reuse=old)
        os.makedirs(a.out_dir, exist_ok=True)
        with open(table_path(table["triton"], a.out_dir), "w") as f:
            f.write(dumps(table))
        with open(table_path(table["triton"], a.out_dir)[:-5] + ".md", "w") as f:
            f.write(summary(table) + "\n" + markdown(table))
        print(summary(table))
        return 0
    specs = capture()
    print(f"{len(specs)} distinct binaries ({len(ARCHS)} archs); code key {code_key()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
