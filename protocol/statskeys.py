"""The Redis schema of hit stats: one definition of every key and field, for the workers that write them and the
routers that read them. Every key starts with a namespace (default "prefixroute") so several clusters can share
one Redis.

    {ns}:workers                   set of worker ids that ever reported
    {ns}:worker:{id}               hash: counters (requests, prompt_tokens, cached_tokens, generated_tokens) and
                                   gauges (evictions, cache_bytes, cache_capacity_bytes, running, waiting, url,
                                   model, updated); an engine's (worker.sidecar) also: engine, kv_usage,
                                   cache_capacity_tokens, cache_queries and its totals as last counted
                                   (engine_{field})
    {ns}:heartbeat:{id}            JSON {url, model, capacity_tokens, block_size[, engine]}, expires after the TTL
    {ns}:cluster                   hash: the counters summed over all workers
    {ns}:tenants / {ns}:tenant:{t} set of tenant ids / hash: counters + routing accuracy (expected, expected_hit)
    {ns}:versions / {ns}:version:{v}  the same per prefix version
    {ns}:keys                      sorted set: routing key -> requests (trimmed to the hottest TOP_KEYS)
    {ns}:key:{k}                   hash: tenant, counters and "w:{worker id}" requests (expires after a day idle;
                                   deleted when its key drops out of {ns}:keys)

Tenant ids and prefix versions are names from configuration or bounded label sets, never secrets or prompt
text; routing keys are short keyed hashes (the first 12 hex digits the router sends upstream).
"""

from __future__ import annotations

import re

COUNTERS = ("requests", "prompt_tokens", "cached_tokens", "generated_tokens")
ACCURACY = ("expected", "expected_hit")  # requests the router expected to hit, and those that did
GAUGES = ("evictions", "cache_bytes", "cache_capacity_bytes", "running", "waiting")
TOP_KEYS = 1000
KEY_TTL_S = 86_400

# What the router sends upstream and the worker reads (all optional).
H_KEY = "x-prefixroute-key"
H_TENANT = "x-prefixroute-tenant"
H_EXPECTED = "x-prefixroute-expected-tokens"
H_VERSION = "x-prefix-version"

_LABEL = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")


def label(value: str | None) -> str | None:
    """A tenant id, prefix version or key fit for a Redis key and a metric label, or None."""
    return value if value is not None and _LABEL.fullmatch(value) else None  # ("$" matches before a "\n")


OTHER = "other"


class BoundedLabels:
    """The first `limit` distinct names pass; later ones become "other": a label set that cannot grow without
    bound whatever clients send."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str | None) -> str | None:
        if value in self.seen:  # seen holds only valid labels: no pattern match for a known one
            return value
        value = label(value)
        if value is None or value in self.seen:
            return value
        if len(self.seen) >= self.limit:
            return OTHER
        self.seen.add(value)
        return value


class Keys:
    def __init__(self, namespace: str = "prefixroute"):
        self.ns = namespace
        self.workers = f"{namespace}:workers"
        self.cluster = f"{namespace}:cluster"
        self.tenants = f"{namespace}:tenants"
        self.versions = f"{namespace}:versions"
        self.keys = f"{namespace}:keys"

    def worker(self, wid: str) -> str:
        return f"{self.ns}:worker:{wid}"

    def heartbeat(self, wid: str) -> str:
        return f"{self.ns}:heartbeat:{wid}"

    def flushed(self, wid: str, writer: str) -> str:
        """The last batch of deltas one stats writer applied (worker.stats): a retry of it is not applied twice."""
        return f"{self.ns}:flushed:{wid}:{writer}"

    def heartbeat_pattern(self) -> str:
        return f"{self.ns}:heartbeat:*"

    def tenant(self, tenant: str) -> str:
        return f"{self.ns}:tenant:{tenant}"

    def version(self, version: str) -> str:
        return f"{self.ns}:version:{version}"

    def key(self, key: str) -> str:
        return f"{self.ns}:key:{key}"


def ratio(hit: float, total: float) -> float | None:
    return hit / total if total else None
