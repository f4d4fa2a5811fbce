"""benchmarks.fma_peak: the FMA loop computes its closed form (so a timed run cannot be a dead
loop), its rate is sane and float64's is about half of float32's, share() is the fraction it
says, and without a compiler the result says why.  Runs are short (about 0.1 s each): these
check properties of the measurement, not the machine's speed."""
import pytest
import torch

from metassl_fast.benchmarks import fma_peak


@pytest.fixture
def fma_loop():
    """Skip, with the reason, where there is no loop to build: no C compiler, or a CPU with
    neither AVX2+FMA nor AVX-512F.  Where both exist the loop must build."""
    if fma_peak.compiler() is None:
        pytest.skip("no C compiler ($CC, cc or gcc) to build the FMA loop")
    isa, why = fma_peak.cpu_isa()
    if isa is None:
        pytest.skip(f"no FMA loop for this CPU: {why}")
    lib, info = fma_peak.kernel()
    assert lib is not None, info["note"]
    return info


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("iterations,x,y", [
    (0, 1.0, 1.0),            # the starting values: i + 1
    (1, 1.0, 1.0),
    (1 << 20, 1.0, 1.0),      # a0 + n, exact below 2^24 in float32
    (1001, -1.0, 2.0),        # the timed x, y: odd n gives 2 - a0
    (1000, -1.0, 2.0),        # even n gives a0
    (3, 2.0, -1.0),           # 8 a0 - 7
])
def test_loop_returns_its_closed_form(fma_loop, dtype, iterations, x, y):
    assert fma_peak.loop(dtype, iterations, x, y) == fma_peak.closed_form(dtype, iterations, x, y)


def test_closed_form_counts_every_lane_and_accumulator(fma_loop):
    lanes = fma_loop["vector_bytes"] // 4
    acc = fma_loop["accumulators"]
    assert fma_peak.closed_form("float32", 0, 1.0, 1.0) == lanes * acc * (acc + 1) / 2
    assert fma_peak.closed_form("float32", 5, 1.0, 1.0) == lanes * (acc * (acc + 1) / 2 + 5 * acc)


def test_rate_is_sane_at_the_machines_thread_count(fma_loop):
    threads = torch.get_num_threads()
    r = fma_peak.measure("float32", threads=threads, seconds=0.1, repeats=2)
    assert r["note"] is None and r["isa"] == fma_loop["isa"] and r["threads"] == threads
    assert len(r["per_thread_gflops"]) == threads and all(g > 0 for g in r["per_thread_gflops"])
    assert 1 < r["gflops"] and r["gflops_per_thread"] < 10_000
    assert r["gflops"] == max(r["repeats_gflops"])  # the peak is the best repeat


def test_float64_peak_is_about_half_float32(fma_loop):
    # One thread: the same vector width holds half as many float64 lanes at the same FMA rate.
    f32 = fma_peak.measure("float32", threads=1, seconds=0.1)["gflops"]
    f64 = fma_peak.measure("float64", threads=1, seconds=0.1)["gflops"]
    assert 0.3 < f64 / f32 < 0.7, (f32, f64)


def test_main_says_how_it_measured(fma_loop, capsys):
    fma_peak.main(["--dtype", "float64", "--threads", "1", "--seconds", "0.05", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "GFLOP/s" in out and "closed form" in out and fma_loop["isa"] in out and "-mfma" in out


def test_share():
    assert fma_peak.share(2e9, 1000.0, 4.0) == pytest.approx(0.5)
    assert fma_peak.share(3e6, 0.5, 12.0) == pytest.approx(0.5)
    assert fma_peak.share(1e9, 1.0, None) is None
    with pytest.raises(ValueError, match="peak_gflops"):
        fma_peak.share(1e9, 1.0, 0.0)
    with pytest.raises(ValueError, match="ms"):
        fma_peak.share(1e9, 0.0, 1.0)


def test_without_a_compiler_the_result_says_why(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    r = fma_peak.measure("float32", threads=1)
    assert r["gflops"] is None and "/nonexistent/cc" in r["note"]
    assert "not measured" in fma_peak.describe(r)
    with pytest.raises(RuntimeError, match="no FMA loop"):
        fma_peak.loop("float32", 1, 1.0, 1.0)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="dtype"):
        fma_peak.measure("float16")
    with pytest.raises(ValueError, match="threads"):
        fma_peak.measure(threads=0)
    with pytest.raises(ValueError, match="seconds"):
        fma_peak.measure(seconds=float("nan"))
    with pytest.raises(ValueError, match="iterations"):
        fma_peak.loop("float32", -1, 1.0, 1.0)
