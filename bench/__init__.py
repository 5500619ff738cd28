"""Benchmarks (not tests): figures printed and written to docs/benchmarks.md."""
