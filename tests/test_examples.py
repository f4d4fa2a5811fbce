"""The examples run, and what they print is right in kind (not a timing)."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed")
def test_fewshot_digits_adaptation_beats_no_adaptation():
    spec = importlib.util.spec_from_file_location("fewshot_digits", EXAMPLES / "fewshot_digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = mod.main(["--iters", "40", "--eval-tasks", "100"])
    for k_shot, (adapted, frozen) in results.items():
        assert 0.1 < frozen < 0.3, (k_shot, frozen)  # unseen classes without adaptation: chance
        assert adapted > frozen + 0.3, (k_shot, adapted, frozen)
