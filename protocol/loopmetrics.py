"""Counters and histograms for an event loop's hot path: no locks (every update and every scrape run on the loop's
thread), one child per label set found by a dict lookup, a histogram's bucket found by bisection. Each registers
in a prometheus_client registry as a Collector exposing the series that prometheus_client's Counter and Histogram
of the same name and labels expose (less their `_created` samples), so dashboards and alerts see no difference.

prometheus_client takes a lock per update and walks a histogram's buckets in Python; a router request updates
about ten series, which cost it ~8% of its instructions (bench/router_instructions.py)."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _Observations:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # bounds are upper bounds, inclusive ("le")
        self.sum += amount


class _Family(Collector):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None):
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._children: dict[tuple[str, ...], _Count | _Observations] = {}
        if not self.labelnames:
            self._own = self._children[()] = self._new()
        if registry is not None:
            registry.register(self)

    def _new(self) -> _Count | _Observations:
        raise NotImplementedError

    def labels(self, *values: object):
        child = self._children.get(values)  # type: ignore[arg-type]  # the usual case: string labels
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            key = tuple(str(v) for v in values)  # other types name the series of their string form
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new()
        return child

    def remove_by_labels(self, labels: dict[str, str]) -> None:
        at = [(self.labelnames.index(k), v) for k, v in labels.items()]
        for key in [k for k in self._children if all(k[i] == v for i, v in at)]:
            del self._children[key]

    def _series(self) -> Iterator[tuple[list[str], _Count | _Observations]]:
        for key, child in list(self._children.items()):
            yield list(key), child


class LoopCounter(_Family):
    """prometheus_client.Counter's update API (`inc`, `labels(...).inc`, `remove_by_labels`)."""

    def _new(self) -> _Count:
        return _Count()

    def inc(self, amount: float = 1.0) -> None:
        self._own.value += amount  # type: ignore[union-attr]

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self._series():
            family.add_metric(values, child.value)  # type: ignore[union-attr]
        yield family


class LoopHistogram(_Family):
    """prometheus_client.Histogram's update API (`observe`, `labels(...).observe`, `remove_by_labels`)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 buckets: Sequence[float], registry: CollectorRegistry | None = None):
        bounds = tuple(float(b) for b in buckets)
        self.bounds = bounds if bounds and bounds[-1] == math.inf else (*bounds, math.inf)
        super().__init__(name, documentation, labelnames, registry)

    def _new(self) -> _Observations:
        return _Observations(self.bounds)

    def observe(self, amount: float) -> None:
        self._own.observe(amount)  # type: ignore[union-attr]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self._series():
            total, buckets = 0, []
            for bound, n in zip(self.bounds, child.counts):  # type: ignore[union-attr]
                total += n
                buckets.append((floatToGoString(bound), total))
            family.add_metric(values, buckets, child.sum)  # type: ignore[union-attr]
        yield family
