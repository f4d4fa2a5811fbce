"""The pytest-benchmark regression suites under bench/ (bench/conftest.py) keep working: one
run of them at --bench-size tiny with timing off, in a subprocess, collects every
bench/test_bench_<op>.py and no benchmark script, and every case runs each provider and
phase it is parametrised over, or skips with its reason; and each case's ours and eager
compute the same loss and gradients.  No time is asserted (STYLE 6).

torch.compile runs for the COMPILED cases only: on 2 cores with an empty inductor cache
the first compiled case costs about 15 s (torch.compile's start-up), each further one
5-30 s (the convex heads' solver loops the most), every case about 80 s in all; the other
cases' compile tests are deselected, and their count is checked.  The whole run: about 30 s.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import metassl_fast

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
# one contrastive case (fully compiled) and the ANIL meta-loss (compiled with graph breaks
# around torch.autograd.grad, its backward through them)
COMPILED = {("contrastive", "info_nce"), ("inner_loop", "anil_loss")}


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(f"_bench_suite_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SUITES = {path.stem.removeprefix("test_bench_"): _module(path) for path in sorted(BENCH.glob("test_bench_*.py"))}


def _expected():
    """{(op, case, provider, phase)} as bench/conftest.py parametrises the suites."""
    conftest = _module(BENCH / "conftest.py")
    out = set()
    for op, suite in SUITES.items():
        for case in suite.CASES:
            phases = ("forward",) if case in getattr(suite, "FORWARD_ONLY", ()) else conftest.PHASES
            out |= {(op, case, provider, phase) for provider in conftest.PROVIDERS for phase in phases}
    return out


def test_bench_suites_run_at_tiny_size():
    pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install -e '.[test]')")
    expected = _expected()
    ops = {op for op, *_ in expected}
    assert {"contrastive", "labeled", "siglip", "inner_loop", "convex"} <= ops
    compiled = " or ".join(f"{case}-compile" for _, case in sorted(COMPILED))
    cmd = [sys.executable, "-m", "pytest", "bench", "-q", "-rps", "--benchmark-disable", "--bench-size", "tiny",
           "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning", "-k", f"not compile or {compiled}"]
    package_root = str(Path(metassl_fast.__file__).resolve().parent.parent)  # the metassl_fast under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory(prefix="metassl_fast_inductor_") as cache:
        # an empty inductor cache unless the caller chose one: every run pays what CI pays
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", cache)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    files = set(re.findall(r"^[A-Z]+ (bench/[^: ]+)::", out, re.M))
    assert files == {f"bench/{p.name}" for p in BENCH.glob("test_bench_*.py")}  # and no bench_*.py script
    passed = set(re.findall(r"^PASSED bench/test_bench_(\w+)\.py::test_\w+\[(\w+)-(\w+)-(\w+)\]$", out, re.M))
    skipped = {}
    for count, op, case, provider, phase, reason in re.findall(
            r"^SKIPPED \[(\d+)\] \S+: (\w+)/(\w+) (\w+) (\w+): (.*)$", out, re.M):
        assert count == "1", f"folded skips (one reason for several tests): {op}/{case} {provider} {phase}"
        skipped[(op, case, provider, phase)] = reason.strip()
    assert not passed & skipped.keys()
    assert all(skipped.values()), skipped

    run = {k for k in expected if k[2] != "compile" or k[:2] in COMPILED}
    assert passed | skipped.keys() == run, (sorted(run - passed - skipped.keys()), out[-4000:])
    assert all(k[2] == "compile" for k in skipped), skipped  # ours and eager always run
    m = re.search(r"(\d+) deselected", out)
    assert int(m.group(1) if m else 0) == len(expected - run)


def _flat(out):
    return torch.cat([t.flatten() for t in out]) if isinstance(out, tuple) else out


@pytest.mark.parametrize("op,case", [(op, case) for op, suite in SUITES.items() for case in suite.CASES])
def test_bench_providers_compute_the_same_loss(op, case):
    """ours and eager time the same loss and gradients (the default shapes are only built)."""
    builder = SUITES[op].CASES[case]
    assert builder("default")["shape"]
    spec = builder("tiny")
    got, want = _flat(spec["ours"](*spec["args"])), _flat(spec["eager"](*spec["args"]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    leaves = [a for a in spec["args"] if isinstance(a, torch.Tensor) and a.requires_grad]
    if leaves:
        for g, w in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
