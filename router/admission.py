"""Admission control. A request gets in while its tenant is within its limits (requests in flight, requests and
prompt tokens per minute: token buckets) and some worker is below the per-worker bound on requests in flight
(`max_queue_per_worker`, running + waiting as this router counts them). Past a tenant limit it is refused at
once; when every worker is full it waits in a bounded router queue (`max_queued_requests`, at most
`queue_wait_s`) for a slot and is refused after that. A refusal is a 429 with `Retry-After` and OpenAI's
`rate_limit_exceeded` body, so clients back off instead of piling on queues that only grow (SGLang's gateway
answers 429 without Retry-After, Dynamo 529)."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.errors import APIError
from router.settings import RouterSettings, TenantConfig
from router.workers import Worker, WorkerPool

REASONS = ("queue_full", "worker_full", "tenant_concurrency", "tenant_requests", "tenant_tokens")


class TokenBucket:
    """`per_minute` units a minute, refilled continuously, holding at most a minute's worth."""

    __slots__ = ("rate", "capacity", "level", "t")

    def __init__(self, per_minute: float, now: float):
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.level = float(per_minute)
        self.t = now

    def wait_for(self, n: float, now: float) -> float:
        """Seconds until `n` units are there (0: now). A request larger than a minute's worth waits for a full
        bucket, so it is slow but never refused for ever."""
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now
        n = min(n, self.capacity)
        return 0.0 if self.level >= n else (n - self.level) / self.rate

    def take(self, n: float) -> None:
        self.level -= min(n, self.capacity)


@dataclass
class TenantGate:
    max_concurrency: int | None
    requests: TokenBucket | None
    tokens: TokenBucket | None
    inflight: int = 0

    @classmethod
    def of(cls, c: TenantConfig, now: float) -> TenantGate | None:
        if c.max_concurrency is None and c.requests_per_minute is None and c.tokens_per_minute is None:
            return None
        return cls(c.max_concurrency,
                   TokenBucket(c.requests_per_minute, now) if c.requests_per_minute else None,
                   TokenBucket(c.tokens_per_minute, now) if c.tokens_per_minute else None)


def too_many(message: str, retry_after_s: float, reason: str) -> APIError:
    return APIError(429, message, code="rate_limit_exceeded",
                    headers={"Retry-After": str(max(1, math.ceil(retry_after_s))), "x-prefixroute-refused": reason})


@dataclass
class Admission:
    pool: WorkerPool
    max_queue: int | None  # requests in flight per worker; None: no bound
    wait_s: float
    max_waiting: int
    gates: dict[str, TenantGate] = field(default_factory=dict)
    on_reject: Callable[[str], None] = lambda reason: None
    clock: Callable[[], float] = time.monotonic
    max_tokens: int | None = None  # prompt tokens queued for prefill per worker; None: no bound
    _waiters: deque[asyncio.Future] = field(default_factory=deque)  # for any worker with room
    _held: dict[str, deque[asyncio.Future]] = field(default_factory=dict)  # for one worker (a held decision)
    _n_held: int = 0

    @classmethod
    def from_settings(cls, s: RouterSettings, pool: WorkerPool, on_reject: Callable[[str], None]) -> Admission:
        now = time.monotonic()
        gates = {t.id: g for t in s.tenants if (g := TenantGate.of(t, now)) is not None}
        pool.max_inflight = s.max_queue_per_worker
        pool.max_prefill = s.max_queued_tokens_per_worker
        return cls(pool, s.max_queue_per_worker, s.queue_wait_s, s.max_queued_requests, gates, on_reject,
                   max_tokens=s.max_queued_tokens_per_worker)

    @property
    def enabled(self) -> bool:
        """Some per-worker bound is set (requests in flight or queued prefill tokens)."""
        return self.max_queue is not None or self.max_tokens is not None

    @property
    def waiting(self) -> int:
        return len(self._waiters) + self._n_held

    # ---- tenants ------------------------------------------------------------------------------------------

    def enter(self, tenant: str, prompt_tokens: int) -> TenantGate | None:
        """Count a request against its tenant's limits, or raise 429. The caller calls `leave` when it ends."""
        g = self.gates.get(tenant)
        if g is None:
            return None
        if g.max_concurrency is not None and g.inflight >= g.max_concurrency:
            self._refuse("tenant_concurrency")
            raise too_many(f"Too many concurrent requests: this API key is limited to {g.max_concurrency} at once.",
                           1, "tenant_concurrency")
        now = self.clock()
        wait_r = g.requests.wait_for(1, now) if g.requests else 0.0
        if wait_r:
            self._refuse("tenant_requests")
            raise too_many(f"Rate limit reached: {g.requests.capacity:.0f} requests per minute for this API key.",
                           wait_r, "tenant_requests")
        wait_t = g.tokens.wait_for(prompt_tokens, now) if g.tokens else 0.0
        if wait_t:
            self._refuse("tenant_tokens")
            raise too_many(f"Rate limit reached: {g.tokens.capacity:.0f} prompt tokens per minute for this API key.",
                           wait_t, "tenant_tokens")
        if g.requests:
            g.requests.take(1)
        if g.tokens:
            g.tokens.take(prompt_tokens)
        g.inflight += 1
        return g

    @staticmethod
    def leave(gate: TenantGate | None) -> None:
        if gate is not None:
            gate.inflight -= 1

    # ---- workers ------------------------------------------------------------------------------------------

    def has_room(self) -> bool:
        if not self.enabled:
            return True
        pool = self.pool
        return any(pool.admits(pool.workers[n], 1) for n in pool.active)  # stops at the first worker with room

    async def wait_for_room(self) -> float | None:
        """Returns when some worker is below the bound; waits in the router's queue (FIFO) up to `wait_s`;
        raises 429 when the queue is full or the wait runs out. Returns the deadline of this request's wait
        (None: no bound), which a held decision (`wait_for_worker`) may still use."""
        if not self.enabled:
            return None
        deadline = self.clock() + self.wait_s
        if self.has_room() and not self._waiters:
            return deadline
        loop = asyncio.get_running_loop()
        woken = False
        while True:
            remaining = deadline - self.clock()
            if len(self._waiters) >= self.max_waiting or remaining <= 0:
                self._refuse("queue_full")
                raise too_many("Every worker is at its queue limit; retry shortly.", 1, "queue_full")
            fut = loop.create_future()
            if woken:  # woken first and found no room (another took it): it stays first
                self._waiters.appendleft(fut)
            else:
                self._waiters.append(fut)
            try:
                async with asyncio.timeout(remaining):  # not wait_for: on 3.11 it swallows a cancel once fut is done
                    await fut
            except TimeoutError:
                pass
            except BaseException:
                self._pass_on(fut)
                raise
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
            self._take(fut)  # from here to the request's placement nothing awaits: the slot is this request's
            if self.has_room():
                return deadline
            woken = fut.done() and not fut.cancelled()

    async def wait_for_worker(self, name: str, deadline: float, prefill: int = 0) -> bool:
        """A held decision: wait (FIFO among those waiting for this worker) until `name` has room for a request
        that prefills `prefill` tokens there, or `deadline` passes. True when it has room; False past the
        deadline, when the router's queue is full or the worker left the ring (the caller then decides without
        holding)."""
        loop = asyncio.get_running_loop()
        while True:
            w = self.pool.workers.get(name)
            if w is None or not w.usable:
                return False
            if self.pool.admits(w, prefill):
                return True
            remaining = deadline - self.clock()
            if remaining <= 0 or self.waiting >= self.max_waiting:
                return False
            fut = loop.create_future()
            queue = self._held.setdefault(name, deque())
            queue.append(fut)
            self._n_held += 1
            try:
                async with asyncio.timeout(remaining):  # not wait_for: on 3.11 it swallows a cancel once fut is done
                    await fut
            except TimeoutError:
                pass
            except BaseException:
                self._pass_on(fut)
                raise
            finally:
                self._n_held -= 1
                if fut in queue:
                    queue.remove(fut)
                if not queue and self._held.get(name) is queue:
                    self._held.pop(name, None)
            self._take(fut)

    def saturated(self) -> bool:
        """The fleet is at least half full: half its request slots are in use, or half the prefill tokens its
        workers may queue are queued (the bound that is set). Past that, a request held for its full worker is
        refused rather than recomputed elsewhere: that recompute would take GPU time the fleet is short of, and
        offline a stricter test (at most one free slot per worker) placed enough of them elsewhere to cost 6-17
        points of hit ratio under 2x overload at 32 workers (docs/reliability.md). Below it, the fleet has room
        to spare and the request goes to its best worker with room."""
        pool, cap, tokens = self.pool, self.max_queue, self.max_tokens
        n = len(pool.active)
        if cap is not None and 2 * pool.active_inflight >= n * cap:
            return True
        return tokens is not None and 2 * sum(pool.workers[w].prefill for w in pool.active) >= n * tokens

    def refuses_after_hold(self, held_prefill: int, elsewhere_prefill: Callable[[], int]) -> bool:
        """A held request's wait ran out with its worker still full: refuse it when no worker has room, or when
        the fleet is saturated and the best worker with room would prefill more of it (`elsewhere_prefill()`
        tokens, against `held_prefill` on the held worker)."""
        return not self.has_room() or (self.saturated() and elsewhere_prefill() > held_prefill)

    def refuse_held(self) -> APIError:
        """A held request whose worker stayed full for the whole wait, on a saturated fleet: placing it elsewhere
        would spend GPU time recomputing its prefix that the fleet does not have, so it is refused like a
        request that found no room (and retried by its client after Retry-After); its reason, `worker_full`,
        tells the two apart in the metrics."""
        self._refuse("worker_full")
        return too_many("The worker that caches this prompt's prefix stayed at its queue limit; retry shortly.", 1,
                        "worker_full")

    def released(self, worker: str | None = None) -> None:
        """A request ended (on `worker`, when known): the first request held for that worker, else the first
        waiter for any worker, looks for room again. The slot it freed is reserved for that waiter until it
        resumes (`_take`): a woken task runs a few loop turns later, and without the reservation a request
        arriving meanwhile took the slot, sent the waiter to the back of its queue and, for a held request,
        most often to a refusal (live over 8,000 requests at 32 workers, against the offline simulation,
        which hands the slot over at once)."""
        if worker is None and not self.has_room():
            # Nothing was freed (a request refused, or failed, before it reached a worker): waking the first
            # waiter would find no room and, before, sent it to the back of the queue, behind newer requests.
            return
        w = self.pool.workers.get(worker) if worker is not None else None
        for queue in ((self._held.get(worker), self._waiters) if worker is not None else (self._waiters,)):
            while queue:
                fut = queue.popleft()
                if not fut.done():
                    if w is not None:
                        w.reserved += 1
                    fut.set_result(w)
                    return

    @staticmethod
    def _take(fut: asyncio.Future) -> Worker | None:
        """The waiter has resumed: the slot reserved for it (if any) is free again, for it to take at once."""
        if not fut.done() or fut.cancelled() or fut.result() is None:
            return None
        w: Worker = fut.result()
        w.reserved -= 1
        return w

    def _pass_on(self, fut: asyncio.Future) -> None:
        """A woken waiter that will not place its request (cancelled: its client left, or shutdown) hands the
        slot reserved for it to the next waiter."""
        w = self._take(fut)
        if w is not None:
            self.released(w.name)

    def _refuse(self, reason: str) -> None:
        self.on_reject(reason)
