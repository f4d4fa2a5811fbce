"""The examples run, and what they print is right in kind (not a timing)."""
from __future__ import annotations

import csv
import importlib.util
import math
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed")


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_sklearn
def test_fewshot_digits_adaptation_beats_no_adaptation():
    results = load_example("fewshot_digits").main(["--iters", "40", "--eval-tasks", "100"])
    for k_shot, (adapted, frozen) in results.items():
        assert 0.1 < frozen < 0.3, (k_shot, frozen)  # unseen classes without adaptation: chance
        assert adapted > frozen + 0.3, (k_shot, adapted, frozen)


@needs_sklearn
@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_ssl_meta_quick_runs_end_to_end_and_every_method_beats_chance(tmp_path):
    mod = load_example("ssl_meta")
    out = mod.main(["--quick", "--out", str(tmp_path)])
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["1 raw pixels", "2 contrastive", "3 UMTRA", "4 supervised ANIL",
                                           "5 contrastive+meta", "5+joint"]
    chance = 1 / mod.EVAL_WAYS
    for r in rows:
        for head in mod.HEADS:
            episodes = int(r["logreg_episodes"] if head == "logreg" else r["episodes"])
            # Guessing gets chance with this standard error over episodes x queries; the
            # measured one (from the interval) covers queries that err together.
            guess_se = math.sqrt(chance * (1 - chance) / (episodes * out["queries"]))
            for k in (1, 5):
                acc, ci = float(r[f"{head}_{k}shot"]), float(r[f"{head}_{k}shot_ci95"])
                assert acc - chance > 6 * max(guess_se, ci / 1.96), (r["method"], head, k, acc, ci, episodes)
        if r["method"] != "1 raw pixels":  # trained: timed ours and eager on the same first batch
            assert float(r["ms_per_iter_ours"]) > 0 and float(r["ms_per_iter_eager"]) > 0
            assert float(r["first_iter_loss_rel_diff"]) < 1e-4, r  # the two implementations agree
