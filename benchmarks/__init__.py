"""Benchmark scripts: run as modules from the repo root, e.g. python3 -m benchmarks.masked_step."""
