"""Prompt and cached tokens by tenant and prefix version, and routing accuracy (the router's expected hits by
outcome), as Prometheus counters: a prefixroute worker counts its own requests; the router counts the requests
other engines served (from their answers' usage), under the same names so the dashboards' tenant panels cover
both. Labels are configured tenant ids and bounded prefix versions ("none" when absent), never prompt text."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class TenantCounters:
    def __init__(self, registry: CollectorRegistry, counter: type = Counter):
        """`counter`: prometheus_client's Counter, or protocol.loopmetrics.LoopCounter where one event loop
        does every update."""
        labels = ["tenant", "prefix_version"]
        self.prompt_tokens = counter("prefixroute_worker_tenant_prompt_tokens",
                                     "Prompt tokens by tenant and prefix version", labels, registry=registry)
        self.cached_tokens = counter("prefixroute_worker_tenant_cached_tokens",
                                     "Cached prompt tokens by tenant and prefix version", labels, registry=registry)
        self.expected = counter("prefixroute_worker_expected_hits",
                                "Requests the router expected to hit here, by tenant and outcome (hit or miss)",
                                ["tenant", "outcome"], registry=registry)

    def count(self, prompt: int, cached: int, tenant: str | None, version: str | None, expected: int | None) -> None:
        t, v = tenant or "none", version or "none"
        self.prompt_tokens.labels(t, v).inc(prompt)
        self.cached_tokens.labels(t, v).inc(cached)
        if expected:
            self.expected.labels(t, "hit" if cached > 0 else "miss").inc()
