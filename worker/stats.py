"""Hit stats to Redis: the serving path only adds to in-memory deltas (O(1), never awaits); a background task
writes them in one pipeline per interval, with the engine's gauges and a heartbeat that expires.

A slow or dead Redis never slows or fails a request: a failed write keeps its deltas, and they go out with the
next write that succeeds, so totals catch up instead of losing counts. A write whose reply never came may have
been applied all the same: each batch is numbered, applied in one MULTI/EXEC with its number (watched), and a
retry of a batch already applied is dropped, so nothing is counted twice. What is kept meanwhile is bounded: the
worker's, tenants' and prefix versions' counters (at most `max_labels` names each; more are counted as
"other"), and per-key counters for at most `max_keys` routing keys (requests of further keys still count in
every total). The schema is protocol.statskeys.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from protocol.statskeys import COUNTERS, KEY_TTL_S, OTHER, TOP_KEYS, Keys

log = logging.getLogger("prefixroute.worker.stats")

# Trims the hottest-keys set to its size and deletes the per-key hashes of the keys it drops, in one step: with
# unique prompts every request has a key of its own, and hashes kept for a day after the set forgot them grew Redis
# by one hash per request (bench/memory_bound.py).
_TRIM_KEYS = """
local gone = redis.call('ZRANGE', KEYS[1], 0, -(tonumber(ARGV[1]) + 1))
for _, m in ipairs(gone) do redis.call('UNLINK', ARGV[2] .. m) end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[1]) + 1))
return #gone
"""


class _Pending:
    """Deltas not yet written."""

    def __init__(self) -> None:
        self.worker: Counter[str] = Counter()
        self.tenants: dict[str, Counter[str]] = {}
        self.versions: dict[str, Counter[str]] = {}
        self.keys: dict[str, tuple[str | None, Counter[str]]] = {}
        self.id = 0  # its number among the writer's batches, from its first try

    def empty(self) -> bool:
        return not (self.worker or self.tenants or self.versions or self.keys)


class StatsPublisher:
    def __init__(self, client: Any, keys: Keys, worker_id: str, info: dict[str, Any],
                 gauges: Callable[[], dict[str, int]], interval_s: float = 1.0, heartbeat_ttl_s: float = 10.0,
                 max_keys: int = 10_000, max_labels: int = 256, timeout_s: float = 2.0, worker_counters: bool = True):
        self.client = client  # redis.asyncio.Redis
        self.k = keys
        self.wid = worker_id
        self.info = info  # url, model, capacity_tokens, block_size: the heartbeat
        self.gauges = gauges
        self.interval_s = interval_s
        self.ttl_ms = int(heartbeat_ttl_s * 1000)
        self.max_keys = max_keys
        self.max_labels = max_labels
        self.timeout_s = timeout_s
        # False: the router's publisher for other engines' requests (tenants, versions, keys only; the engine's
        # sidecar, worker.sidecar, writes its worker and cluster counters, gauges and heartbeat)
        self.worker_counters = worker_counters
        self.pending = _Pending()
        self.unsure: _Pending | None = None  # a batch tried and not known to be applied: written again first
        self.writer = uuid.uuid4().hex[:12]  # this publisher, among the processes writing for `worker_id`
        self._batches = 0
        self.up: bool | None = None  # None until the first write
        self.flushes = 0
        self.failures = 0

    # ---- the serving path ---------------------------------------------------------------------------------

    def record(self, prompt: int, cached: int, generated: int, tenant: str | None = None,
               version: str | None = None, key: str | None = None, expected: int | None = None) -> None:
        """One finished request. `expected`: the prompt tokens the router expected this worker to hold."""
        c = {"requests": 1, "prompt_tokens": prompt, "cached_tokens": cached, "generated_tokens": generated}
        p = self.pending
        if self.worker_counters:
            p.worker.update(c)
        if tenant is not None:
            t = self._slot(p.tenants, tenant)
            t.update(c)
            if expected:
                t["expected"] += 1
                t["expected_hit"] += 1 if cached > 0 else 0
        if version is not None:
            self._slot(p.versions, version).update(c)
        if key is not None:
            entry = p.keys.get(key)
            if entry is None and len(p.keys) < self.max_keys:
                entry = p.keys[key] = (tenant, Counter())
            if entry is not None:
                entry[1].update(c)

    def _slot(self, table: dict[str, Counter[str]], name: str) -> Counter[str]:
        c = table.get(name)
        if c is None:
            if len(table) >= self.max_labels:
                name = OTHER
            c = table.setdefault(name, Counter())
        return c

    # ---- the background writer ----------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self.flush()
            await asyncio.sleep(self.interval_s)

    async def flush(self) -> bool:
        """Write the deltas, gauges and heartbeat: first a batch tried before and not known to be applied, then
        what was recorded since. On failure (or a cancel) the batch is kept, as it is, for the next try."""
        for _ in range(2):
            batch = self.unsure
            fresh = batch is None
            if batch is None:
                batch, self.pending = self.pending, _Pending()
                self._batches += 1
                batch.id = self._batches
                self.unsure = batch
            try:
                await asyncio.wait_for(self._write(batch), self.timeout_s)
            except Exception as exc:  # any Redis or network failure: keep the counts, try again later
                self.failures += 1
                if self.up is not False:
                    log.warning("stats to Redis failed (%s); keeping deltas until it is back", type(exc).__name__)
                self.up = False
                return False
            self.unsure = None
            if fresh or self.pending.empty():
                break
        if self.up is False:
            log.info("stats to Redis resumed")
        self.up = True
        self.flushes += 1
        return True

    async def _write(self, b: _Pending) -> None:
        k, wid = self.k, self.wid
        marker = k.flushed(wid, self.writer)
        async with self.client.pipeline(transaction=True) as pipe:
            # A batch whose reply was lost may have been applied: its number is then the marker's, and it is not
            # applied again. WATCH: a first try that lands while this one is on its way fails this one.
            await pipe.watch(marker)
            if await pipe.get(marker) == str(b.id):
                return
            pipe.multi()
            self._commands(pipe, b)
            pipe.set(marker, b.id, ex=KEY_TTL_S)
            await pipe.execute()

    def _commands(self, pipe: Any, b: _Pending) -> None:
        k, wid = self.k, self.wid
        wkey = k.worker(wid)
        for field in COUNTERS:
            if b.worker[field]:
                pipe.hincrby(wkey, field, b.worker[field])
                pipe.hincrby(k.cluster, field, b.worker[field])
        if self.worker_counters:
            gauges = {**self.gauges(), "url": self.info["url"], "model": self.info["model"], "updated": time.time()}
            pipe.hset(wkey, mapping=gauges)
            pipe.sadd(k.workers, wid)
            pipe.set(k.heartbeat(wid), json.dumps({"id": wid, **self.info}), px=self.ttl_ms)
        for names, key_of, table in ((k.tenants, k.tenant, b.tenants), (k.versions, k.version, b.versions)):
            if table:
                pipe.sadd(names, *table)
            for name, c in table.items():
                for field, n in c.items():
                    if n:
                        pipe.hincrby(key_of(name), field, n)
        if b.keys:
            for key, (tenant, c) in b.keys.items():
                h = k.key(key)
                pipe.zincrby(k.keys, c["requests"], key)
                for field, n in c.items():
                    if n:
                        pipe.hincrby(h, field, n)
                pipe.hincrby(h, f"w:{wid}", c["requests"])
                if tenant is not None:
                    pipe.hset(h, "tenant", tenant)
                pipe.expire(h, KEY_TTL_S)
            pipe.eval(_TRIM_KEYS, 1, k.keys, TOP_KEYS, k.key(""))  # keep the hottest keys only, and their hashes

    async def close(self) -> None:
        """A last flush, then the heartbeat goes: the worker leaves discovery at once, not after its TTL."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), self.timeout_s)
            if self.worker_counters:
                await asyncio.wait_for(self.client.delete(self.k.heartbeat(self.wid)), self.timeout_s)
