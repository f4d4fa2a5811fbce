"""`metassl-fast info` and the benchmark driver: they run, and what they report is right."""
from __future__ import annotations

import csv
import io
import subprocess
import sys

import pytest

from metassl_fast import cli
from metassl_fast.benchmarks import contrastive as bench


def test_info_lists_backends_and_device():
    out = io.StringIO()
    cli.info(stream=out)
    text = out.getvalue()
    assert "metassl_fast" in text and "torch" in text
    for backend in ("cpu", "cuda", "triton", "torch"):
        assert f"  {backend}" in text
    assert "device:" in text


@pytest.mark.parametrize("choice", ["own", "blas"])
def test_info_says_which_products_the_sweep_runs(monkeypatch, choice):
    monkeypatch.setenv("METASSL_FAST_GEMM", choice)
    out = io.StringIO()
    cli.info(stream=out)
    assert f"contrastive CPU products: {choice} (" in out.getvalue()


def test_bench_small_run_is_correct_and_recorded(tmp_path):
    out = io.StringIO()
    rows = bench.run(sizes=(70,), large=(300,), d=16, repeats=3, out_dir=str(tmp_path), plot=False,
                     check_max=70, stream=out)
    by = {(r["op"], r["impl"], r["N"]): r for r in rows}
    assert set(by) == {(op, impl, 70) for op in ("info_nce", "clip_loss") for impl in ("ours", "eager", "compile")} \
        | {("info_nce", "ours", 300)}
    for op in ("info_nce", "clip_loss"):
        for impl in ("ours", "compile"):  # the compiled eager code is the same loss
            r = by[(op, impl, 70)]
            # fp32 against the float64 reference: loss and every gradient
            assert r["max_rel_err"] is not None and r["max_rel_err"] < 1e-4, (op, impl, r["max_rel_err"])
            assert r["median_ms"] > 0 and r["speedup"] > 0 and r["speedup_vs_compile"] > 0
            # 3 N x N x D multiply-adds over the median, of the FMA peak measured in the run (None: no C compiler)
            assert r["fma_share"] is None or 0 < r["fma_share"] < 1, (op, impl, r["fma_share"])
        comp = by[(op, "compile", 70)]
        # its compile is timed apart (the first call minus a median), never in the median
        assert comp["compile_s"] is not None and comp["compile_s"] >= 0 and comp["speedup_vs_compile"] == 1.0
    assert by[("info_nce", "eager", 70)]["speedup"] == 1.0
    assert by[("info_nce", "ours", 300)]["speedup_vs_compile"] is None  # no compile row at the large N
    # times and peak memory come from two workers (default / pinned allocator), merged per row
    for r in rows:
        assert r["median_ms"] is not None and r["median_ms"] > 0, (r["op"], r["impl"], r["N"])
        assert r["peak_mb"] is not None and r["peak_mb"] >= 0, (r["op"], r["impl"], r["N"])
    with open(tmp_path / "results.csv") as f:
        recorded = list(csv.DictReader(f))
    assert len(recorded) == len(rows)
    assert all(r["device"].startswith("cpu") and r["version"] for r in recorded)
    assert "| info_nce | ours | 70 |" in out.getvalue() and "| info_nce | compile | 70 |" in out.getvalue()
    assert "compile: the baseline under torch.compile" in out.getvalue()  # the column's legend
    assert "of FMA peak: 3 N x N x D multiply-adds" in out.getvalue()
    assert (tmp_path / "latest.md").read_text().startswith("contrastive losses")


def test_cli_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "metassl_fast.cli", "info"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "backends:" in proc.stdout


def test_gpu_table_renders_missing_values():
    """The GPU report's formatting (its measurements need a GPU: bench/gpu_check.sh)."""
    from metassl_fast.benchmarks import contrastive_gpu

    row = {"op": "clip_loss", "impl": "eager", "N": 65536, "D": 512, "dtype": "bfloat16", "median_ms": None,
           "speedup": None, "peak_mb": None, "mem_ratio": None, "tflops": None, "of_peak": None,
           "max_rel_err": 3e-3, "note": "OOM"}
    meta = {"device": "cuda: test", "torch": "x", "version": "y", "date": "z"}
    table = contrastive_gpu.format_table([row], meta, 700.0)
    assert "| clip_loss | eager | 65536 | 512 | bfloat16 | OOM |" in table
    assert "OOM" in contrastive_gpu._line(row)


def test_family_bench_small_run(tmp_path):
    """The drop-in benchmark measures ours and the original on the same inputs and
    records their agreement (a missing original is reported, not faked)."""
    from metassl_fast.benchmarks import family

    out = io.StringIO()
    plan = [("open_clip.SigLipLoss", 48, False), ("pml.SupConLoss", 40, False), ("pml.NTXentLoss", 64, True)]
    # the torch.compile column for the first case only: each compiled case costs ~30 s here
    rows = family.run(str(tmp_path), repeats=2, stream=out, plan=plan[:1])
    rows += family.run(str(tmp_path), repeats=2, stream=io.StringIO(), plan=plan[1:], compile=False)
    by = {(r["op"], r["impl"], r["N"]): r for r in rows}
    for case, n, _ in plan[:2]:
        if (case, "original", n) in by and "median_ms" not in by[(case, "original", n)]:
            continue  # the original package is not installed: reported as missing
        ours = by[(case, "ours", n)]
        assert ours["max_rel_diff"] < 1e-5, (case, ours["max_rel_diff"])
        assert ours["speedup"] > 0 and by[(case, "original", n)]["speedup"] == 1.0
        comp = by.get((case, "compile", n))  # the original under torch.compile: a time, or the error
        assert (comp is None) == (case != plan[0][0])
        if comp is None:
            pass
        elif comp.get("median_ms"):
            assert comp["max_rel_diff"] < 1e-5 and comp["compile_s"] >= 0, (case, comp)
            assert ours["speedup_vs_compile"] > 0
            assert "| open_clip.SigLipLoss | compile | 48 |" in out.getvalue()
        else:
            assert comp["note"].startswith("compile failed: "), (case, comp)
    assert ("pml.NTXentLoss", "original", 64) not in by and ("pml.NTXentLoss", "compile", 64) not in by
    assert by[("pml.NTXentLoss", "ours", 64)]["median_ms"] > 0
    assert (tmp_path / "family.md").read_text().startswith("drop-ins vs the original packages")
    with open(tmp_path / "family.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_gpu_bench_eager_baselines_compute_the_same_losses():
    """The GPU table's eager contenders for the family ops are the same losses (checked on
    the CPU: their timing needs a GPU)."""
    import torch

    import metassl_fast as msf
    from metassl_fast.benchmarks import _common as g

    a, b = torch.randn(12, 8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    torch.testing.assert_close(g.eager_nt_xent(a, b, None), msf.nt_xent(a, b, temperature=0.5))
    torch.testing.assert_close(g.eager_siglip(a, b, 3.0), msf.siglip_loss(a, b, 3.0, -10.0))
