"""Prometheus metrics of the router, those a request updates lock-free on the event loop (protocol.loopmetrics).
Labels carry route decisions, statuses, worker URLs and configured tenant ids
only: never prompt text, routing keys, tenants' secrets or API keys. A removed worker's series are dropped."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from protocol.loopmetrics import LoopCounter, LoopHistogram
from protocol.tenantmetrics import TenantCounters
from router.admission import REASONS as ADMISSION_REASONS
from router.workers import WorkerPool

_FAST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05)
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _PoolCollector(Collector):
    def __init__(self, pool: WorkerPool):
        self.pool = pool

    def collect(self) -> Iterator:
        inflight = GaugeMetricFamily("prefixroute_router_inflight", "Requests in flight per worker", labels=["worker"])
        healthy = GaugeMetricFamily("prefixroute_router_worker_up", "1 if the worker is on the ring",
                                    labels=["worker"])
        prefill = GaugeMetricFamily("prefixroute_router_queued_prefill_tokens",
                                    "Prompt tokens the router expects each worker still to prefill", labels=["worker"])
        breaker = GaugeMetricFamily("prefixroute_router_breaker_state",
                                    "Each worker's circuit breaker: 0 closed, 1 half-open, 2 open", labels=["worker"])
        opens = CounterMetricFamily("prefixroute_router_breaker_opens",
                                    "Times each worker's circuit breaker opened (re-opens included)", labels=["worker"])
        for w in list(self.pool.workers.values()):
            inflight.add_metric([w.name], w.inflight)
            healthy.add_metric([w.name], 1 if w.usable else 0)
            prefill.add_metric([w.name], w.prefill)
            if w.breaker is not None:
                breaker.add_metric([w.name], w.breaker_state)
                opens.add_metric([w.name], w.breaker.opens)
        yield inflight
        yield healthy
        yield prefill
        yield breaker
        yield opens
        yield GaugeMetricFamily("prefixroute_router_workers_active", "Workers on the ring", value=len(self.pool.active))


class _SharingCollector(Collector):
    """Redis as this router sees it, and the routing state it shares (router.stats, router.shared)."""

    def __init__(self, router):
        self.router = router

    def collect(self) -> Iterator:
        r = self.router
        yield GaugeMetricFamily("prefixroute_router_redis_up", "1 if Redis answers, 0 if not, -1 if none is set",
                                value={"ok": 1, "down": 0}.get(r.redis.status, -1))
        if r.shared is not None:
            yield CounterMetricFamily("prefixroute_router_shared_decisions_applied",
                                      "Other router replicas' decisions applied to this one's state",
                                      value=r.shared.applied)
            yield GaugeMetricFamily("prefixroute_router_shared_decisions_queued",
                                    "Decisions waiting to be sent to Redis", value=len(r.shared.pending))


_SHARED_BUCKETS = (0, 8, 16, 32, 64, 128, 256, 512, 1024)


class RouterMetrics:

    def __init__(self, pool: WorkerPool, prefix_tokens: int = 256):
        r = self.registry = CollectorRegistry()
        self.requests = LoopCounter("prefixroute_router_requests", "Requests by route decision, worker and status",
                                    ["route", "worker", "status"], registry=r)
        self.rejected = LoopCounter("prefixroute_router_rejected", "Requests answered by the router itself",
                                    ["status"], registry=r)
        self.spills = LoopCounter("prefixroute_router_spills", "Requests of keys spread over more than one worker",
                                  registry=r)
        self.fanout = LoopHistogram("prefixroute_router_spill_fanout", "Workers a request's key was spread over",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64), registry=r)
        self.upstream_latency = LoopHistogram("prefixroute_router_upstream_latency_seconds",
                                              "Time from forwarding to the worker's response headers", ["worker"],
                                              buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_errors = LoopCounter("prefixroute_router_upstream_errors", "Failed upstream attempts",
                                           ["worker", "kind"], registry=r)
        self.tokenize = LoopHistogram("prefixroute_router_tokenize_seconds", "Prefix render + tokenize + hash time",
                                      buckets=_FAST_BUCKETS, registry=r)
        self.prefix_tokens = LoopHistogram("prefixroute_router_prefix_tokens", "Tokens hashed into the routing key",
                                           buckets=(16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.shared_tokens = LoopHistogram(
            "prefixroute_router_prefix_shared_tokens",
            "Leading tokens of a request's stable prefix that a recent request of the same tenant shared (early "
            "divergence when low)", ["tenant"],
            buckets=(*(b for b in _SHARED_BUCKETS if b < prefix_tokens), prefix_tokens), registry=r)
        self.admission_rejected = LoopCounter("prefixroute_router_admission_rejected",
                                              "Requests refused with 429 by admission control, by reason", ["reason"],
                                              registry=r)
        for reason in ADMISSION_REASONS:
            self.admission_rejected.labels(reason)  # every series exists from the start, at 0
        self.admission_waiting = Gauge("prefixroute_router_admission_waiting",
                                       "Requests waiting in the router for a worker with room", registry=r)
        self.admission_held = LoopCounter("prefixroute_router_admission_held",
                                          "Waits for a full worker that holds a request's prefix (admission control)",
                                          registry=r)
        # Requests other engines served (router.proxy reads their usage), under the workers' own names
        self.engine_usage = TenantCounters(r, LoopCounter)
        r.register(_PoolCollector(pool))
        pool.on_remove.append(self.forget_worker)

    def observe_shared(self, tenant: str, tokens: int) -> None:
        """`tenant`: a label (configured tenant ids only, so the series are bounded)."""
        self.shared_tokens.labels(tenant).observe(tokens)

    def watch_sharing(self, router) -> None:
        self.registry.register(_SharingCollector(router))

    def forget_worker(self, worker: str) -> None:
        for m in (self.requests, self.upstream_latency, self.upstream_errors):
            m.remove_by_labels({"worker": worker})
