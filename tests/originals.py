"""The original packages' losses for the parity tests: metassl_fast.benchmarks.originals,
with a missing package turned into a skip that names the pip command (see
tests/ORIGINALS_NOTES.md for what each original computes)."""
import functools

import pytest

from metassl_fast.benchmarks import originals as _o


def _skipping(fn):
    @functools.wraps(fn)
    def wrapper():
        try:
            return fn()
        except _o.OriginalMissing as exc:
            pytest.skip(str(exc))
    return wrapper


pml = _skipping(_o.pml)
info_nce_pkg = _skipping(_o.info_nce_pkg)
lightly_ntxent = _skipping(_o.lightly_ntxent)
open_clip_losses = _skipping(_o.open_clip_losses)
