"""Counters and histograms kept in plain numbers, handed to prometheus-client when Prometheus scrapes.

prometheus-client's own ``Counter`` and ``Histogram`` take a lock and check for exemplars on every update,
which made the router's metrics about 7 % of its work per request. Every update here comes from the
router's one event-loop thread, as does the scrape, so no lock is needed; what is scraped is built with
prometheus-client's metric families (``CounterMetricFamily``, ``HistogramMetricFamily``) and written by its
``generate_latest``, so the exposition is prometheus-client's."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class CounterFamily:
    """A counter per label values (one event-loop thread only)."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]):
        self.name, self.documentation, self.labels = name, documentation, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, value in self.values.items():
            family.add_metric(labels, value)
        return family


class HistogramFamily:
    """A histogram per label values: a count per bucket (upper bound inclusive, as Prometheus's ``le``) and
    the sum of what was observed (one event-loop thread only)."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]):
        self.name, self.documentation, self.labels = name, documentation, labels
        self.bounds = [float(b) for b in buckets] + [math.inf]
        self.data: dict[tuple[str, ...], list[float]] = {}  # per bucket counts, then the sum

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        data = self.data.get(labels)
        if data is None:
            data = self.data[labels] = [0.0] * (len(self.bounds) + 1)
        data[bisect.bisect_left(self.bounds, value)] += 1
        data[-1] += value

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        names = [floatToGoString(b) for b in self.bounds]
        for labels, data in self.data.items():
            cumulative, buckets = 0.0, []
            for name, count in zip(names, data, strict=False):  # data ends with the sum
                cumulative += count
                buckets.append((name, cumulative))
            family.add_metric(labels, buckets, sum_value=data[-1])
        return family


class FamiliesCollector(Collector):
    """Registers a set of families with a prometheus-client registry."""

    def __init__(self, families: list[CounterFamily | HistogramFamily]):
        self.families = families

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        for f in self.families:
            yield f.family()
