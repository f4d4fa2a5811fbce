"""The pytest-benchmark regression suites under bench/: one test_bench_<op>.py per op
(ops/<op>), each timing its public functions against the pure-torch reference
(reference/<op>.py) and torch.compile of that reference, so that

    pytest bench --benchmark-only --benchmark-autosave      # on the base commit
    pytest bench --benchmark-only --benchmark-compare       # on yours

shows a regression between two commits.  Nothing here asserts a time (STYLE 6): CI runs
them once with --benchmark-disable --bench-size tiny (tests/test_bench_suites.py)
so that they keep working.

A suite module defines CASES, {name: builder}; builder(size) with size "default" or
"tiny" returns a dict:
    shape   the label of the shapes ("N=2048 D=128"), part of the benchmark's group
    args    the inputs, shared by the three providers; the floating tensors that require
            grad are the ones the backward differentiates
    ours    the public op (default backend: the CPU kernel for these CPU tensors)
    eager   the reference computing the same loss from the same args
and optionally FORWARD_ONLY, the cases that have no gradient to time.  Every test is
parametrised over provider (ours, eager, compile) and phase:
    forward   the loss with grad mode on, as in training (the graph is built and dropped)
    backward  the gradient only: the forward runs in setup, the timed call is
              torch.autograd.grad(loss, leaves, retain_graph=True) on that one graph
    full      forward and torch.autograd.grad
Each group (one case, one shape, one phase; --benchmark-group-by=group, the default)
holds the three providers side by side.  The timed call runs once before timing for
every provider, so first-call costs (torch.compile's compilation, the custom ops'
dispatcher set-up) stay out of the timings; the seconds of that set-up and first call are
in extra_info["first_call_s"], and for compile the graph breaks met and the recompiles
while timed (a recompile there puts compile work in the timings).
Where torch.compile cannot run a phase the test is skipped with the error as its reason
(reported, not hidden: -rs lists them).  Timings on a machine another job is loading
mean little: torch's thread pool waits for the busy cores (threads in extra_info).
"""
from __future__ import annotations

import time

import pytest
import torch

PROVIDERS = ("ours", "eager", "compile")
PHASES = ("forward", "backward", "full")
SIZES = ("default", "tiny")


def pytest_addoption(parser):
    parser.addoption("--bench-size", choices=SIZES, default="default",
                     help="shapes of the bench/ suites: 'default' (representative) or 'tiny' (a smoke test)")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    forward_only = getattr(metafunc.module, "FORWARD_ONLY", ())
    params = [(name, provider, phase) for name in metafunc.module.CASES for provider in PROVIDERS
              for phase in (("forward",) if name in forward_only else PHASES)]
    metafunc.parametrize("case,provider,phase", params, ids=["-".join(p) for p in params])


@pytest.fixture(scope="session")
def bench_size(request):
    return request.config.getoption("--bench-size")


def _phase_call(fn, args, phase):
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if phase == "forward":
        return lambda: fn(*args)
    if not leaves:
        raise ValueError("a backward phase needs args that require grad (or list the case in FORWARD_ONLY)")
    if phase == "full":
        return lambda: torch.autograd.grad(fn(*args), leaves)
    loss = fn(*args)
    return lambda: torch.autograd.grad(loss, leaves, retain_graph=True)


def _dynamo_counts():
    """(graphs dynamo has compiled, graph breaks it has met) in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def _compiled(fn):
    """fn under torch.compile (inductor, dynamic=False, graph breaks allowed), compiled from
    scratch: the references serve several cases, and the recompiles a change of shape
    brings would mark dimensions dynamic, or pass the recompile limit and fall back to
    eager, silently."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


@pytest.fixture
def run_bench(benchmark, bench_size, request):
    """run_bench(case, provider, phase): times one provider's phase of the module's CASES[case]."""

    def run(case, provider, phase):
        spec = request.module.CASES[case](bench_size)
        op = request.module.__name__.rsplit("test_bench_", 1)[-1]
        benchmark.group = f"{op}/{case} {spec['shape']} {phase}"
        benchmark.extra_info.update(provider=provider, phase=phase, shape=spec["shape"], size=bench_size,
                                    threads=torch.get_num_threads(), torch=torch.__version__)
        fn = _compiled(spec["eager"]) if provider == "compile" else spec[provider]
        before = _dynamo_counts()
        t0 = time.perf_counter()
        try:
            call = _phase_call(fn, spec["args"], phase)
            call()
        except Exception as exc:
            if provider != "compile":
                raise
            # an error that is not compile's fails the eager test of the same case too
            first = (str(exc).strip().splitlines() or [""])[0]
            pytest.skip(f"{op}/{case} compile {phase}: torch.compile cannot run it: {type(exc).__name__}: "
                        f"{first[:300]}")
        benchmark.extra_info["first_call_s"] = round(time.perf_counter() - t0, 4)
        compiled = _dynamo_counts()
        benchmark(call)
        if provider == "compile":  # a recompile while timed puts compile work in the timings: say so
            benchmark.extra_info.update(graph_breaks=compiled[1] - before[1],
                                        recompiles_while_timed=_dynamo_counts()[0] - compiled[0])

    return run
