"""Benchmark scripts: each prints its table and writes its rows, with the run's metadata, to results/.

Not part of the installed package. Run from the repository root as ``python -m benchmarks.<name>`` (tuning
sweeps and profilers as ``python -m benchmarks.tune.<name>``, studies as ``python -m
benchmarks.studies.<name>``). The shared pieces live in ``harness`` (metadata, rows, files, timers,
ceilings), ``peers`` (transformers' Jamba) and ``kernel_inputs`` (the kernel benchmarks' shapes).
"""
