"""The cluster's hit stats as every router replica reads them from Redis (what workers write, worker.stats):
`/admin/stats`. Also the router's view of Redis itself (ok, down or off) for /health."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from protocol.statskeys import ACCURACY, COUNTERS, GAUGES, Keys, ratio

log = logging.getLogger("prefixroute.router.stats")


def _number(v: Any, kind: type = int) -> Any:
    """A stored count or gauge; 0 where the field holds no number (another version's, or a damaged write), so one
    bad field does not fail the whole read."""
    try:
        return kind(float(v or 0))
    except (TypeError, ValueError, OverflowError):
        return kind(0)


def _counts(h: dict[str, str], fields: tuple[str, ...] = COUNTERS) -> dict[str, int]:
    return {f: _number(h.get(f)) for f in fields}


def _with_ratio(d: dict[str, Any]) -> dict[str, Any]:
    d["hit_ratio"] = ratio(d.get("cached_tokens", 0), d.get("prompt_tokens", 0))
    return d


class RedisState:
    """Pings Redis in the background; `status` is "off" without a URL, else "ok" or "down"."""

    def __init__(self, client: Any | None, interval_s: float = 1.0):
        self.client = client
        self.interval_s = interval_s
        self.status = "off" if client is None else "down"

    async def check(self) -> str:
        if self.client is None:
            return self.status
        try:
            await asyncio.wait_for(self.client.ping(), 1.0)
            new = "ok"
        except Exception:
            new = "down"
        if new != self.status:
            log.log(logging.INFO if new == "ok" else logging.WARNING, "redis is %s", new)
        self.status = new
        return new

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()


async def read_stats(client: Any, keys: Keys, top: int = 20) -> dict[str, Any]:
    """The `/admin/stats` body (less the "redis" field) from Redis."""
    workers = sorted(await client.smembers(keys.workers))
    tenants = sorted(await client.smembers(keys.tenants))
    versions = sorted(await client.smembers(keys.versions))
    hot = await client.zrevrange(keys.keys, 0, top - 1, withscores=True)
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.cluster)
    for w in workers:
        pipe.hgetall(keys.worker(w))
    for t in tenants:
        pipe.hgetall(keys.tenant(t))
    for v in versions:
        pipe.hgetall(keys.version(v))
    for k, _ in hot:
        pipe.hgetall(keys.key(k))
    res = await pipe.execute()
    cluster, res = res[0], res[1:]
    out_workers = []
    for w, h in zip(workers, res[: len(workers)]):
        d = _with_ratio({"id": w, "url": h.get("url"), "model": h.get("model"), **_counts(h), **_counts(h, GAUGES)})
        d["engine"] = h.get("engine", "prefixroute")
        if "engine_cache_queries" in h:  # an engine's own hit ratio: hits / the prompt tokens it looked up
            d["cache_queries"] = _counts(h, ("cache_queries",))["cache_queries"]
            d["engine_hit_ratio"] = ratio(d["cached_tokens"], d["cache_queries"])
        if "kv_usage" in h:
            d["kv_usage"] = _number(h["kv_usage"], float)
        out_workers.append(d)
    res = res[len(workers):]
    out_tenants = []
    for t, h in zip(tenants, res[: len(tenants)]):
        d = _with_ratio({"tenant": t, **_counts(h), **_counts(h, ACCURACY)})
        d["routing_accuracy"] = ratio(d["expected_hit"], d["expected"])
        out_tenants.append(d)
    res = res[len(tenants):]
    out_versions = [_with_ratio({"version": v, **_counts(h)}) for v, h in zip(versions, res[: len(versions)])]
    res = res[len(versions):]
    out_keys = []
    for (k, score), h in zip(hot, res):
        per_worker = {f[2:]: _number(n) for f, n in h.items() if f.startswith("w:")}
        out_keys.append(_with_ratio({"key": k, "tenant": h.get("tenant"), **_counts(h),
                                     "fanout": len(per_worker), "workers": per_worker}))
    return {"cluster": _with_ratio(_counts(cluster)), "workers": out_workers, "tenants": out_tenants,
            "prefix_versions": out_versions, "top_prefixes": out_keys}
