"""Timing shared by the benchmark scripts: medians of isolated calls and interleaved rounds with paired ratios.

Device work is asynchronous: on CUDA a host clock read right after a call measures the launches, not the work. Every
timer here therefore takes the device being measured; on CUDA it waits for earlier work before starting (so none of
it is charged to this call), records CUDA events around the call and waits for the end event, and reports the
events' elapsed time. On the CPU it reads ``time.perf_counter``, or the ``clock`` given: ``time.thread_time`` counts
only the CPU time of the calling thread, which is all of the work with one torch thread, so a process that is
descheduled on a loaded machine is not charged for the wait (cache and memory contention still are).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any


def _is_cuda(device: Any) -> bool:
    return device is not None and getattr(device, "type", str(device).split(":")[0]) == "cuda"


def synchronize(device: Any = None) -> None:
    """Wait for all queued work on ``device`` (a no-op on the CPU)."""
    if _is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def timed(work: Callable[[], object], device: Any = None,
          clock: Callable[[], float] | None = None) -> tuple[float, object]:
    """(seconds, result) of one call of ``work``, device work included (CUDA events on CUDA); ``clock``: the CPU
    clock to read instead of ``time.perf_counter``."""
    if not _is_cuda(device):
        clock = clock or time.perf_counter
        start = clock()
        result = work()
        return clock() - start, result
    import torch

    torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    result = work()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000.0, result


def median_seconds(work: Callable[[], object], repeats: int, device: Any = None) -> float:
    """Median seconds of one call of ``work`` alone."""
    return statistics.median(timed(work, device)[0] for _ in range(repeats))


def interleaved(steps: Mapping[str, Callable[[], object]], rounds: int, warmup: int, device: Any = None,
                clock: Callable[[], float] | None = None) -> tuple[dict[str, list[float]], dict[str, list[object]]]:
    """Run every step once per round, the order rotating each round, so drift in machine load hits all alike.

    Returns each step's seconds per measured round, and what each call returned (e.g. a phase's own time).
    """
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, list[object]] = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed, result = timed(steps[name], device, clock)
            if round_index >= warmup:
                times[name].append(elapsed)
                results[name].append(result)
    return times, results


def ratio_stats(reference: list[float], times: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of per-round ratios reference / time (above 1: faster than the reference)."""
    ratios = [r / t for r, t in zip(reference, times)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    low, _, high = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), low, high
