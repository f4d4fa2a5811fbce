"""Benchmark drivers behind `metassl-fast bench` (also run by bench/bench_<op>.py).

Each benchmark module imports _common (what they share) and the public metassl_fast API,
never another benchmark; cli.py imports their main()/run() and cpu_name.
"""
from ._common import cpu_name

__all__ = ["cpu_name"]
