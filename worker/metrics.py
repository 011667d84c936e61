"""Prometheus metrics of one worker: request counts, token counts (prompt, cached, generated), latencies,
and the engine's live state (queue, cache bytes, evictions) read at scrape time. No prompt text in labels."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from protocol.tenantmetrics import TenantCounters
from worker.engine.engine import Engine

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class _EngineCollector(Collector):
    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self) -> Iterator:
        e, c = self.engine, self.engine.cache
        yield GaugeMetricFamily("prefixroute_worker_running", "Sequences in the running batch", value=e.num_running)
        yield GaugeMetricFamily("prefixroute_worker_waiting", "Sequences queued for admission", value=e.num_waiting)
        yield GaugeMetricFamily("prefixroute_worker_cache_used_bytes", "Bytes of KV held in the prefix cache",
                                value=c.used_bytes)
        yield GaugeMetricFamily("prefixroute_worker_cache_capacity_bytes", "Prefix cache byte budget",
                                value=c.capacity_bytes)
        yield GaugeMetricFamily("prefixroute_worker_cache_blocks", "Blocks in the prefix cache", value=len(c))
        yield CounterMetricFamily("prefixroute_worker_cache_evicted_blocks", "Blocks evicted (LRU)",
                                  value=c.stats.evicted_blocks)
        yield CounterMetricFamily("prefixroute_worker_cache_inserted_blocks", "Blocks inserted",
                                  value=c.stats.inserted_blocks)
        if (kv := e.kv_used_bytes) is not None:
            yield GaugeMetricFamily("prefixroute_worker_kv_used_bytes",
                                    "Bytes of KV pages in use (running requests' and cached blocks')", value=kv)
        yield CounterMetricFamily("prefixroute_worker_preemptions",
                                  "Running requests preempted for KV room (recomputed later)", value=e.preemptions)
        yield CounterMetricFamily("prefixroute_worker_engine_steps", "Engine iterations", value=e.steps)
        yield CounterMetricFamily("prefixroute_worker_busy_seconds", "Wall seconds the engine spent in steps",
                                  value=e.busy_s)
        simulated = getattr(e.runner, "busy_s", None)  # the sim backend's GPU time, from its cost model
        if simulated is not None:
            yield CounterMetricFamily("prefixroute_worker_simulated_busy_seconds",
                                      "Sim backend: GPU seconds its cost model charged (busy seconds x speedup "
                                      "when the sim keeps pace)", value=simulated)


class WorkerMetrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("prefixroute_worker_requests", "Requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("prefixroute_worker_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=r)
        self.cached_tokens = Counter("prefixroute_worker_cached_tokens", "Prompt tokens served from the prefix cache",
                                     registry=r)
        self.generation_tokens = Counter("prefixroute_worker_generation_tokens", "Completion tokens", registry=r)
        self.ttft = Histogram("prefixroute_worker_ttft_seconds", "Time to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.e2e = Histogram("prefixroute_worker_e2e_seconds", "Request latency, arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("prefixroute_worker_itl_seconds", "Inter-token latency (decode step per token)",
                             buckets=_ITL_BUCKETS, registry=r)
        self.tenants = TenantCounters(r)  # by tenant and prefix version (bounded label sets: worker.server's)
        r.register(_EngineCollector(engine))

    def count_labelled(self, prompt: int, cached: int, tenant: str | None, version: str | None,
                       expected: int | None) -> None:
        self.tenants.count(prompt, cached, tenant, version, expected)
