"""Benchmarks: each module measures one cost in one run and prints it; run from the repository root as
``python -m benchmarks.NAME``."""
