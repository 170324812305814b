"""Runnable benchmarks: ``python -m benchmarks <command>``; results under benchmarks/results/."""
