"""Benchmark drivers behind `metassl-fast bench` (also run by bench/bench_<op>.py)."""
