"""protocol.loopmetrics exposes exactly the series prometheus_client's Counter and Histogram do (bar `_created`)."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from protocol.loopmetrics import LoopCounter, LoopHistogram

BUCKETS = (0.001, 0.01, 0.1, 1, 10)


def _exposition(registry: CollectorRegistry) -> list[str]:
    return sorted(ln for ln in generate_latest(registry).decode().splitlines() if "_created" not in ln)


def _updates(counter, labelled, hist, hist_labelled, seed: int = 7) -> None:
    rng = random.Random(seed)
    for _ in range(500):
        counter.inc()
        labelled.labels(rng.choice(["a", "b"]), str(rng.choice([200, 502]))).inc(rng.choice([1, 2.5]))
        v = rng.choice([0.0005, 0.001, 0.01, 0.05, 1, 10, 11, rng.random() * 20])  # bounds themselves included
        hist.observe(v)
        hist_labelled.labels(rng.choice(["w1", "w2"])).observe(v)


def test_same_exposition_as_prometheus_client():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    _updates(LoopCounter("x_requests", "requests", registry=ours),
             LoopCounter("x_by", "by route and status", ["route", "status"], registry=ours),
             LoopHistogram("x_seconds", "latency", buckets=BUCKETS, registry=ours),
             LoopHistogram("x_worker_seconds", "latency per worker", ["worker"], buckets=BUCKETS, registry=ours))
    _updates(Counter("x_requests", "requests", registry=theirs),
             Counter("x_by", "by route and status", ["route", "status"], registry=theirs),
             Histogram("x_seconds", "latency", buckets=BUCKETS, registry=theirs),
             Histogram("x_worker_seconds", "latency per worker", ["worker"], buckets=BUCKETS, registry=theirs))
    assert _exposition(ours) == _exposition(theirs)


def test_labels_of_other_types_and_removal():
    r = CollectorRegistry()
    c = LoopCounter("x_errors", "errors", ["worker", "status"], registry=r)
    c.labels("w1", "500").inc()
    c.labels("w1", 500).inc()  # the same series as its string form, as prometheus_client does
    c.labels("w2", "500").inc(3)
    text = generate_latest(r).decode()
    assert 'x_errors_total{status="500",worker="w1"} 2.0' in text
    c.remove_by_labels({"worker": "w1"})
    text = generate_latest(r).decode()
    assert 'worker="w1"' not in text and 'x_errors_total{status="500",worker="w2"} 3.0' in text
    c.labels("w1", "500").inc()  # a removed series starts again from 0
    assert 'x_errors_total{status="500",worker="w1"} 1.0' in generate_latest(r).decode()
