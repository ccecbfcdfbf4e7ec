"""Pieces of the benchmark harness driven by benchmarks/run.py."""
