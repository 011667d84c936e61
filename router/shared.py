"""Router state shared through Redis, so replicas (and the processes of `--processes N`) decide alike and a new
or restarted router starts warm.

cache_aware's state (per-key rate windows behind spill, the prefix index, the session table) is a function of
the decisions made, so the replicas share the decisions: each router appends its decisions' records
(policies.base.DecisionRecord) to one Redis stream, capped at `max_log` entries, and applies every other
replica's records to its own state, about once a second. A router that starts reads the whole stream before it
serves. Nothing on the request path touches Redis: decisions are made on local state and queued; when Redis is
down the queue (bounded) waits and routing goes on locally.

Workers are also discovered from their heartbeats (worker.stats): a worker whose heartbeat appears joins the
pool (and the ring once a health probe passes); a discovered worker whose heartbeat expired leaves it. Workers
given in the configuration stay whatever their heartbeats do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections import OrderedDict, deque
from typing import Any

from protocol.engines import KINDS
from protocol.statskeys import Keys
from router.policies.base import DecisionRecord
from router.policies.cache_aware import CacheAware
from router.workers import WorkerPool, normalize_url

log = logging.getLogger("prefixroute.router.shared")


class SharedState:
    def __init__(self, client: Any, keys: Keys, policy: Any, pool: WorkerPool, interval_s: float = 1.0,
                 max_log: int = 200_000, max_pending: int = 100_000, discover: bool = True,
                 heartbeat_ttl_s: float = 10.0):
        self.client = client
        self.stream = f"{keys.ns}:router:decisions"
        self.keys = keys
        self.policy = policy if isinstance(policy, CacheAware) else None  # only cache_aware has state to share
        self.pool = pool
        self.interval_s = interval_s
        self.max_log = max_log
        self.discover = discover
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # (sequence number, record): a resent batch keeps its numbers, so readers skip what they already applied
        self.pending: deque[tuple[int, bytes]] = deque(maxlen=max_pending)
        self._seq = 0
        self._seen: OrderedDict[str, int] = OrderedDict()  # replica -> the highest number applied from it
        self.last_id = "0-0"
        self.static = set(pool.workers)
        self.discovered: set[str] = set()
        self.applied = 0  # other replicas' decisions applied
        self.invalid = 0  # records skipped as unreadable
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self._grace_until = 0.0  # monotonic time until which discovered workers do not leave (0: none)
        self.dropped = 0  # own decisions lost because the queue was full while Redis was away
        if self.policy is not None:
            self.policy.on_decision = self._queue

    def _queue(self, rec: DecisionRecord) -> None:
        if len(self.pending) == self.pending.maxlen:
            self.dropped += 1
        self._seq += 1
        self.pending.append((self._seq, rec.to_json()))

    async def load(self, chunk: int = 5000) -> int:
        """Apply the whole stream (a starting router); returns the records applied. Workers are discovered first:
        records naming a worker not in the pool are skipped."""
        if self.discover:
            await self.discover_workers()
        n = 0
        start = "-"
        while True:
            entries = await self.client.xrange(self.stream, min=start, max="+", count=chunk)
            if start != "-" and entries and entries[0][0] == start:
                entries = entries[1:]  # xrange's min is inclusive
            if not entries:
                break
            n += self._apply(entries, own_too=True)
            start = entries[-1][0]
            self.last_id = start
        if self.discover:
            await self.discover_workers()
        return n

    async def sync(self) -> None:
        """Send queued decisions, refresh discovered workers, apply the other replicas' new decisions (after the
        discovery, which may add the workers they name)."""
        if self.pending:
            # Decisions made while the batch is in flight queue behind it; a failed send puts the batch back
            # ahead of them (the queue keeps the newest when full).
            batch = list(self.pending)
            self.pending.clear()
            try:
                pipe = self.client.pipeline(transaction=False)
                for seq, data in batch:
                    pipe.xadd(self.stream, {"r": self.id, "s": seq, "d": data}, maxlen=self.max_log,
                              approximate=True)
                await pipe.execute()
            except BaseException:
                newer = list(self.pending)
                self.pending.clear()
                self.pending.extend(batch)
                self.dropped += max(0, len(batch) + len(newer) - (self.pending.maxlen or 0))
                self.pending.extend(newer)
                raise
        if self.discover:
            await self.discover_workers()
        while True:
            got = await self.client.xread({self.stream: self.last_id}, count=10_000)
            if not got:
                break
            entries = got[0][1]
            self._apply(entries)
            self.last_id = entries[-1][0]
            if len(entries) < 10_000:
                break

    def _apply(self, entries: list, own_too: bool = False) -> int:
        n = 0
        if self.policy is None:
            return n
        for _, fields in entries:
            replica = fields.get("r")
            if not own_too and replica == self.id:
                continue
            try:
                seq = int(fields.get("s") or 0)
                if seq:  # a batch resent after a lost reply: its entries come again, with the numbers they had
                    if seq <= self._seen.get(replica, 0):
                        continue
                    self._seen[replica] = seq
                    self._seen.move_to_end(replica)
                    if len(self._seen) > 4096:  # replicas ever seen (each restart is a new one)
                        self._seen.popitem(last=False)
                rec = DecisionRecord.from_json(fields["d"])
            except (KeyError, ValueError, TypeError, OverflowError):
                self.invalid += 1  # another version's or a damaged record: skipped, the rest still apply
                continue
            if rec.worker in self.pool.workers:
                self.policy.apply(rec)
                n += 1
        self.applied += n
        return n

    async def discover_workers(self) -> None:
        names = [k async for k in self.client.scan_iter(match=self.keys.heartbeat_pattern(), count=1000)]
        beats = await self.client.mget(names) if names else []
        alive = set()
        for raw in beats:
            try:
                beat = json.loads(raw)
                url = normalize_url(beat["url"]) if isinstance(beat, dict) and isinstance(beat.get("url"), str) \
                    else None
            except (TypeError, ValueError):
                continue
            if url is None:
                continue
            alive.add(url)
            if url not in self.pool.workers:
                engine = beat.get("engine")  # a sidecar's heartbeat (worker.sidecar) names its engine
                log.info("worker %s discovered (heartbeat%s)", url, f", {engine}" if engine else "")
                self.pool.add(url, engine=engine if engine in KINDS else None)
                self.discovered.add(url)
        now = time.monotonic()
        if not alive and self.discovered and not self._grace_until:
            # No heartbeat at all: Redis restarted empty or was flushed, rather than every worker stopping in
            # one second. For a heartbeat's lifetime no worker leaves (their beats come back one by one).
            self._grace_until = now + self.heartbeat_ttl_s
        if self._grace_until:
            if now < self._grace_until:
                return
            self._grace_until = 0.0
        for url in list(self.discovered - alive):
            if url not in self.static:
                log.info("worker %s left (heartbeat expired)", url)
                self.pool.remove(url)
            self.discovered.discard(url)

    async def run(self) -> None:
        down = False
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await asyncio.wait_for(self.sync(), 10.0)
                if down:
                    log.info("shared state in sync again")
                down = False
            except Exception as exc:  # Redis away: keep routing on local state, queue decisions, retry
                if not down:
                    log.warning("shared state sync failed (%s); routing on local state", type(exc).__name__)
                down = True
