"""Side-by-side timing on a shared, noisy machine.

Slow drift (other tenants, frequency changes) moves absolute times by ±10% over seconds, more
than the effects measured here. So each round times the baseline and the candidate back to back,
in alternating order, and the figure is the median of the per-round ratios: both halves of a
pair see the same machine. An A/A pair (the baseline against itself) shows the noise floor.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable


def _timed(fn: Callable[[], object], reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def paired_ratio(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    *,
    rounds: int = 500,
    reps: int = 1,
    warmup: int = 10,
) -> float:
    """Median over rounds of time(candidate) / time(baseline), measured back to back."""
    for _ in range(warmup):
        baseline()
        candidate()
    ratios = []
    for r in range(rounds):
        if r % 2 == 0:
            base = _timed(baseline, reps)
            cand = _timed(candidate, reps)
        else:
            cand = _timed(candidate, reps)
            base = _timed(baseline, reps)
        ratios.append(cand / base)
    return statistics.median(ratios)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def interleaved_times(
    variants: dict[str, Callable[[], object]],
    *,
    rounds: int,
    reps: int = 1,
    warmup: int = 10,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Per-round seconds per call of every variant, all timed in each round in a shuffled order.

    Every variant sees the same machine within a round (drift cancels in a per-round ratio), and
    no variant is always first or last (cache, allocator and frequency effects of a position
    cancel over the rounds instead of biasing one side, as a fixed or alternating order can).
    """
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    order = list(variants)
    shuffler = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        shuffler.shuffle(order)
        for name in order:
            times[name].append(_timed(variants[name], reps))
    return times


def median_ci(values: list[float], z: float = 1.96) -> tuple[float, float, float]:
    """(median, low, high): the median and its distribution-free confidence interval (order
    statistics; z = 1.96 for 95 %), which assumes nothing about the shape of the noise."""
    ordered = sorted(values)
    n = len(ordered)
    half = z * math.sqrt(n) / 2
    low = ordered[max(0, math.floor(n / 2 - half))]
    high = ordered[min(n - 1, math.ceil(n / 2 + half))]
    return statistics.median(ordered), low, high
