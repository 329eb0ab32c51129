"""Benchmark scripts, and the helpers they share with the tests (``benchmarks.facts_setup``)."""
