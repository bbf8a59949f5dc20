"""Timing shared by the benchmark scripts: medians of isolated calls and interleaved rounds with paired ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    """Median seconds of one call of ``work`` alone."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def interleaved(steps: Mapping[str, Callable[[], object]], rounds: int,
                warmup: int) -> tuple[dict[str, list[float]], dict[str, list[object]]]:
    """Run every step once per round, the order rotating each round, so drift in machine load hits all alike.

    Returns each step's seconds per measured round, and what each call returned (e.g. a phase's own time).
    """
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, list[object]] = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            result = steps[name]()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
                results[name].append(result)
    return times, results


def ratio_stats(reference: list[float], times: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of per-round ratios reference / time (above 1: faster than the reference)."""
    ratios = [r / t for r, t in zip(reference, times)]
    low, _, high = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), low, high
