"""A histogram that takes weighted observations, exported as a Prometheus histogram.

Step time is measured between two telemetry reports of a job: `Δt` seconds for `Δsteps` steps.
Observing the mean once would count a 100-step interval like a 1-step one; observing it `Δsteps`
times (`count += Δsteps`, `sum += Δt`) keeps `rate(sum) / rate(count)` the true mean step time.
prometheus_client's Histogram has no weight, hence this small class.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from prometheus_client.core import HistogramMetricFamily


class WeightedHistogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = sorted(buckets)
        self.counts: dict[tuple[str, ...], list[int]] = {}
        self.sums: dict[tuple[str, ...], float] = {}

    def observe(self, value: float, weight: int = 1, labels: tuple[str, ...] = ()) -> None:
        if weight <= 0 or value < 0:
            return
        counts = self.counts.get(labels)
        if counts is None:
            counts = self.counts[labels] = [0] * (len(self.bounds) + 1)  # last: +Inf only
            self.sums[labels] = 0.0
        counts[bisect.bisect_left(self.bounds, value)] += weight
        self.sums[labels] += value * weight

    def family(self, name: str, doc: str, label_names: Sequence[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=list(label_names))
        for labels, counts in self.counts.items():
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip([*self.bounds, float("inf")], counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric(list(labels), buckets, self.sums[labels])
        return family
