"""User entry points (quickstart.py, train.py) and, in `scripts.bench`, the benchmarks and evaluations.

A package so that tests and the benchmark scripts can import `scripts.bench.harness` from the repository root.
"""
