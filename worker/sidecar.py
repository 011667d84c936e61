"""`python -m worker.sidecar --engine-url URL`: another engine (vLLM, SGLang, llama.cpp) reported as a prefixroute
worker reports itself, so `/admin/stats`, worker discovery and every dashboard work unchanged in front of it.

Once per `stats_interval_s` the sidecar reads the engine's Prometheus `/metrics` (protocol.engines) and
- writes its totals to Redis (protocol.statskeys): one script adds what each counter grew by since the totals it
  last stored there, to the worker's hash and the cluster's, and stores the new ones, atomically. Counts are
  therefore exactly-once whatever fails or restarts: a failed write is caught up by the next, a restarted
  sidecar goes on from the stored totals, a second sidecar on the same engine adds nothing, and an engine whose
  counters went down restarted (all of its new value counts). The first reading counts the engine's whole past.
- writes its gauges (running, waiting, KV usage) and a heartbeat naming the engine's URL: routers discover the
  engine as a worker and send requests there directly (the sidecar is not in the request path);
- serves `/metrics` in prefixroute_worker_* names (its counters are the engine's totals, its latency histograms
  the engine's, with the engine's buckets) and `/health` (200 while the engine's metrics read).

Per-tenant and per-prefix-version counters need each request's cached tokens, which an engine's metrics do
not carry: they stay empty for engine workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from protocol.cli import configure_logging, settings_or_exit
from protocol.engines import COUNTER_FIELDS, EngineReading, parse
from protocol.http import metrics_response
from protocol.redis import redis_client
from protocol.statskeys import COUNTERS, Keys
from worker.settings import SidecarSettings, parse_sidecar_args

log = logging.getLogger("prefixroute.worker.sidecar")

ENGINE_TOTAL = "engine_"  # prefix of the fields holding the engine's totals as last counted, in the worker's hash

# KEYS: the worker's hash, the cluster's hash. ARGV: field, total, field, total, ...; a field named in
# protocol.statskeys.COUNTERS also goes to the cluster. Returns the deltas added, in ARGV's order.
_ADD_TOTALS = """
local added = {}
for i = 1, #ARGV, 3 do
  local field, now, cluster = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2] == '1'
  local before = tonumber(redis.call('HGET', KEYS[1], '""" + ENGINE_TOTAL + """' .. field) or '0')
  local d = now
  if now >= before then d = now - before end
  if d > 0 then
    redis.call('HINCRBY', KEYS[1], field, d)
    if cluster then redis.call('HINCRBY', KEYS[2], field, d) end
  end
  redis.call('HSET', KEYS[1], '""" + ENGINE_TOTAL + """' .. field, now)
  added[#added + 1] = d
end
return added
"""


class _Collector(Collector):
    def __init__(self, sidecar: Sidecar):
        self.sidecar = sidecar

    def collect(self) -> Iterator:
        r = self.sidecar.reading
        yield GaugeMetricFamily("prefixroute_worker_engine_up", "1 while the engine's /metrics read",
                                value=1 if self.sidecar.up else 0)
        if r is None:
            return
        c = r.counters
        if "requests" in c:
            fam = CounterMetricFamily("prefixroute_worker_requests", "Requests by endpoint and HTTP status (the "
                                      "engine's finished requests)", labels=["endpoint", "status"])
            fam.add_metric(["engine", "200"], c["requests"])
            yield fam
        for field, name, doc in (("prompt_tokens", "prompt_tokens", "Prompt tokens of finished requests"),
                                 ("cached_tokens", "cached_tokens", "Prompt tokens served from the prefix cache"),
                                 ("generated_tokens", "generation_tokens", "Completion tokens")):
            if field in c:
                yield CounterMetricFamily(f"prefixroute_worker_{name}", doc, value=c[field])
        if r.running is not None:
            yield GaugeMetricFamily("prefixroute_worker_running", "Sequences in the running batch", value=r.running)
        if r.waiting is not None:
            yield GaugeMetricFamily("prefixroute_worker_waiting", "Sequences queued for admission", value=r.waiting)
        if r.kv_usage is not None:
            yield GaugeMetricFamily("prefixroute_worker_kv_usage_ratio", "Share of the engine's KV blocks running "
                                    "requests hold", value=r.kv_usage)
        for key, name, doc in (("ttft", "ttft_seconds", "Time to first token (the engine's)"),
                               ("itl", "itl_seconds", "Inter-token latency (the engine's)")):
            h = r.histograms.get(key)
            if h is None or not h.buckets:
                continue
            bounds = sorted(h.buckets)
            buckets = [("+Inf" if b == float("inf") else repr(b), h.buckets[b]) for b in bounds]
            if bounds[-1] != float("inf"):
                buckets.append(("+Inf", h.count))
            yield HistogramMetricFamily(f"prefixroute_worker_{name}", doc, buckets=buckets, sum_value=h.sum)


class Sidecar:
    def __init__(self, settings: SidecarSettings, client: Any | None = None):
        self.s = settings
        self.redis = client  # redis.asyncio.Redis, or None: /metrics only
        self.keys = Keys(settings.stats_namespace)
        self.kind = None if settings.engine == "auto" else settings.engine
        self.reading: EngineReading | None = None
        self.model: str | None = None
        self.up = False
        self.writes = 0
        self.write_failures = 0
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))

    # ---- reading the engine -------------------------------------------------------------------------------

    async def scrape(self, http: aiohttp.ClientSession) -> bool:
        t = aiohttp.ClientTimeout(total=self.s.scrape_timeout_s)
        base = self.s.engine_base
        try:
            async with http.get(base + "/metrics", timeout=t) as r:
                text = await r.text() if r.status == 200 else ""
            reading = parse(text, self.kind) if text else None
            if reading is not None and self.model is None:
                self.model = await self._model(http, t)
        except Exception as exc:  # unreachable, or metrics it cannot read (an +Inf sample): down until it answers
            # readably; the loop goes on either way.
            reading = None
            if self.up:
                log.warning("engine %s unreachable (%s)", base, type(exc).__name__)
        if reading is None:
            self.up = False
            return False
        if not self.up:
            log.info("engine %s is up: %s, model %s", base, reading.kind, self.model)
        self.kind = self.kind or reading.kind
        self.reading, self.up = reading, True
        return True

    async def _model(self, http: aiohttp.ClientSession, t: aiohttp.ClientTimeout) -> str | None:
        """The served model's name from /v1/models; None (asked again next time) if it is not read there."""
        try:
            async with http.get(self.s.engine_base + "/v1/models", timeout=t) as m:
                data = (await m.json()).get("data") if m.status == 200 else None
            return str(data[0]["id"]) if isinstance(data, list) and data else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError, KeyError, TypeError):
            return None

    # ---- writing to Redis ---------------------------------------------------------------------------------

    async def publish(self) -> dict[str, int] | None:
        """The reading's totals, gauges and the heartbeat, in one transaction; the counts added, or None."""
        r = self.reading
        if self.redis is None or r is None or not self.up:
            return None
        k, wid = self.keys, self.s.name
        wkey = k.worker(wid)
        fields = [f for f in COUNTER_FIELDS if f in r.counters]
        argv: list[Any] = []
        for f in fields:
            argv += [f, r.counters[f], "1" if f in COUNTERS else "0"]
        gauges: dict[str, Any] = {"url": self.s.url, "model": self.model or "", "engine": r.kind,
                                  "updated": time.time()}
        for name, value in (("running", r.running), ("waiting", r.waiting), ("kv_usage", r.kv_usage),
                            ("cache_capacity_tokens", r.capacity_tokens)):
            if value is not None:
                gauges[name] = value
        info = {"id": wid, "url": self.s.url, "model": self.model, "engine": r.kind,
                "capacity_tokens": r.capacity_tokens, "block_size": r.block_size}
        try:
            pipe = self.redis.pipeline(transaction=True)
            if argv:
                pipe.eval(_ADD_TOTALS, 2, wkey, k.cluster, *argv)
            pipe.hset(wkey, mapping=gauges)
            pipe.sadd(k.workers, wid)
            pipe.set(k.heartbeat(wid), json.dumps(info), px=int(self.s.heartbeat_ttl_s * 1000))
            res = await asyncio.wait_for(pipe.execute(), self.s.scrape_timeout_s)
        except Exception as exc:  # any Redis failure: the stored totals are unchanged, the next write catches up
            if self.write_failures == 0 or self.writes:
                log.warning("stats to Redis failed (%s)", type(exc).__name__)
            self.write_failures += 1
            self.writes = 0
            return None
        self.writes += 1
        return dict(zip(fields, (int(d) for d in res[0]))) if argv else {}

    async def run(self, http: aiohttp.ClientSession) -> None:
        while True:
            t0 = time.monotonic()
            if await self.scrape(http):
                await self.publish()
            await asyncio.sleep(max(0.0, self.s.stats_interval_s - (time.monotonic() - t0)))

    async def close(self) -> None:
        """The heartbeat goes: routers drop the engine from discovery at once (a configured worker stays)."""
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.redis.delete(self.keys.heartbeat(self.s.name)), 2.0)

    # ---- HTTP ---------------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/health", self.health)
        return app

    async def prometheus(self, request: web.Request) -> web.Response:
        return metrics_response(self.registry)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok" if self.up else "engine unreachable", "engine": self.kind,
                                  "engine_url": self.s.engine_base}, status=200 if self.up else 503)


async def serve(settings: SidecarSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    client = redis_client(settings.redis_url) if settings.redis_url else None
    sidecar = Sidecar(settings, client)
    runner = web.AppRunner(sidecar.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port).start()
    log.info("sidecar for %s on %s:%d (%s)", settings.engine_base, settings.host, settings.port,
             "Redis " + settings.redis_url.split("@")[-1] if settings.redis_url else "no Redis")
    async with aiohttp.ClientSession() as http:
        task = asyncio.create_task(sidecar.run(http))
        try:
            await stop.wait()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await sidecar.close()
            await runner.cleanup()
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()


def main(argv: list[str] | None = None) -> int:
    settings = settings_or_exit(parse_sidecar_args, argv)
    configure_logging(settings.log_level)
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
