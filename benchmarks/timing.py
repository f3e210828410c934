"""Interleaved timing shared by the benchmarks: every variant runs once per round, and the median is kept."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

Step = Callable[[], object]


def calls_per_run(step: Step, target_s: float, clock: Callable[[], float] = time.perf_counter) -> int:
    """Calls that make one timed run last about `target_s`: a call on a small tensor is too short to time alone."""
    start = clock()
    step()
    once = max(clock() - start, 1e-7)
    return max(1, min(2000, math.ceil(target_s / once)))


def measure(
    steps: dict[str, Step], rounds: int, target_s: float, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Median milliseconds per call of each step over `rounds` interleaved rounds (after one warm-up call each).

    `clock=time.process_time` counts the process's CPU time instead of the wall clock (steadier on a busy machine,
    meaningful with one thread)."""
    loops = {name: calls_per_run(step, target_s, clock) for name, step in steps.items()}
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = clock()
            for _ in range(loops[name]):
                step()
            samples[name].append((clock() - start) / loops[name] * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}
