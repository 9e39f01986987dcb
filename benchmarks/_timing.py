"""Side-by-side timing on a shared, noisy machine.

Slow drift (other tenants, frequency changes) moves absolute times by ±10% over seconds, more
than the effects measured here. So each round times the baseline and the candidate back to back,
in alternating order, and the figure is the median of the per-round ratios: both halves of a
pair see the same machine. An A/A pair (the baseline against itself) shows the noise floor.
"""

from __future__ import annotations

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
