"""Benchmarks and evaluations. Each script writes its tables (markdown), CSV and PNG into one folder, by default
docs/<script name>/ for a full run; `harness` holds what they share (timing, memory, the machine record, output).

Run from the repository root, either way:

    python -m scripts.bench.bench_attention
    python scripts/bench/bench_attention.py
"""
