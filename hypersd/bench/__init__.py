"""Benchmarks (scripts that print and write tables, not timed tests)."""
