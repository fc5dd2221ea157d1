"""Benchmarks: speed goals live here, not in tests. Each prints a table and writes JSON."""
