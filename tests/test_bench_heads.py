"""The convex-heads benchmark (metassl_fast.benchmarks.heads): its baselines solve the problem
ours solves, and a --quick run reports every row with the correctness properties the full
run's table relies on (never a time: benchmarks are scripts, not timed tests)."""
from __future__ import annotations

import csv
import importlib.util
import io

import pytest
import torch

from metassl_fast import meta
from metassl_fast.benchmarks import heads

HAS_QPTH = importlib.util.find_spec("qpth") is not None


def _f64(*tensors):
    return [t.double() if t.is_floating_point() else t for t in tensors]


def test_r2d2_baseline_is_ridge_loss():
    xs, ys, xq, yq = _f64(*heads.episodes(3, 2, 17, q=3))
    want = meta.ridge_loss(xs, ys, xq, yq, lam=heads.RIDGE_LAM, n_way=heads.N_WAY, backend="torch")
    assert torch.allclose(heads.r2d2_loss(xs, ys, xq, yq), want, rtol=1e-10, atol=0)


@pytest.mark.skipif(not HAS_QPTH, reason="qpth not installed (pip install --no-deps qpth==0.0.18)")
def test_metaoptnet_qp_is_our_svm_dual():
    """MetaOptNet's QP (K kron I + I, box C Y, per-example sum zero), run by qpth to convergence
    in float64, has the dual our svm_loss solves: the baseline times the same problem."""
    from metassl_fast.reference.convex import svm_dual

    xs, ys, _, _ = _f64(*heads.episodes(2, 3, 10, q=1))
    A = heads.metaoptnet_svm_dual(xs, ys, heads.N_WAY, max_iter=60)
    Y = torch.nn.functional.one_hot(ys, heads.N_WAY).double()
    want = svm_dual(xs, Y, torch.tensor(heads.SVM_C, dtype=torch.float64), 1.0)
    assert (A - want).abs().max() < 1e-5 * heads.SVM_C


def test_quick_run_rows_and_properties(tmp_path):
    out = io.StringIO()
    rows = heads.run(out_dir=str(tmp_path), quick=True, stream=out)
    cfg = heads.QUICK
    by = {(r["op"], r["impl"], r["D"], r["shot"]): r for r in rows}
    D, shot = cfg["Ds"][0], cfg["shots"][0]
    assert set(by) == {("svm_loss", "ours", D, shot), ("svm_loss", "qpth-3", D, shot), ("svm_loss", "compile", D, shot),
                       ("ridge_loss", "ours", D, shot), ("ridge_loss", "torch", D, shot),
                       ("ridge_loss", "compile", D, shot),
                       ("fit_logreg", "ours", cfg["logreg_D"], shot), ("fit_logreg", "sklearn", cfg["logreg_D"], shot),
                       ("fit_logreg", "compile", cfg["logreg_D"], shot)}
    # the compile column says why it holds no time: skipped in --quick, or nothing to compile
    assert by[("svm_loss", "compile", D, shot)]["note"] == "skipped in --quick"
    assert by[("fit_logreg", "compile", cfg["logreg_D"], shot)]["note"].startswith("not applicable")
    for key, r in by.items():
        if key[1] == "compile" or (key[1].startswith("qpth") and not HAS_QPTH):
            assert r["median_ms"] is None and r["note"], key  # said why, not left blank
        else:
            assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], key
            assert "peak_mb" in r, key
    svm = by[("svm_loss", "ours", D, shot)]
    # the dual our solver returned satisfies the KKT conditions to its tolerance's order
    assert svm["kkt_residual"] is not None and 0 <= svm["kkt_solver"] <= 1e-6, svm
    assert svm["max_rel_err"] < 1e-3  # float32 gradient against the converged float64 one
    if HAS_QPTH:
        assert by[("svm_loss", "qpth-3", D, shot)]["max_rel_err"] > svm["max_rel_err"]
    assert by[("ridge_loss", "ours", D, shot)]["max_rel_err"] < 1e-4
    ours, sk = by[("fit_logreg", "ours", cfg["logreg_D"], shot)], by[("fit_logreg", "sklearn", cfg["logreg_D"], shot)]
    assert abs(ours["accuracy"] - sk["accuracy"]) <= 0.5  # the same problem, solved by both
    assert ours["max_rel_err"] < 5e-2  # W against sklearn's coef_ (its lbfgs stops at tol 1e-4)
    assert ours["episodes"] == sk["episodes"] == cfg["episodes"]
    with open(tmp_path / "results_heads.csv") as f:
        recorded = list(csv.DictReader(f))
    assert len(recorded) == len(rows)
    assert all(r["device"].startswith("cpu") and r["version"] and r["threads"] for r in recorded)
    text = out.getvalue()
    assert f"| svm_loss | {cfg['T']} | {D} | {shot} | ours |" in text and "targets:" in text
    assert (tmp_path / "latest_heads.md").read_text().startswith("convex few-shot heads")
