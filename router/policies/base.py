"""The policy interface: given a request's keys and a view of the pool, name a worker and why."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson

from router.prefix import RouteKeys
from router.ring import Ring
from router.workers import Worker


@dataclass(slots=True)
class Decision:
    worker: str
    reason: str  # affinity | spill | cache | load | session | consistent_hash | round_robin | least_loaded | random
    order: Sequence[str] = ()  # failover candidates, in order from `start`, wrapping around; `worker` skipped
    start: int = 0
    fanout: int = 1  # workers the key is spread over (cache_aware)
    prefill: int = 0  # prompt tokens the worker is expected to compute (not cached there)
    context: int = 0  # prompt tokens (estimated)
    candidates: Sequence[str] = ()  # the workers the policy weighed (cache_aware), for /admin/route
    hold: bool = False  # wait for room on `worker` (full now), then decide again; nothing was counted

    def fallbacks(self, limit: int) -> list[str]:
        """The first `limit` failover candidates: O(limit), whatever the size of the fleet."""
        out: list[str] = []
        n = len(self.order)
        for i in range(n):
            if len(out) >= limit:
                break
            name = self.order[(self.start + i) % n]
            if name != self.worker:
                out.append(name)
        return out


@dataclass(frozen=True)
class DecisionRecord:
    """What one cache_aware decision changed in the router's state, so another replica can change its own alike."""

    t: float  # wall-clock time of the decision
    worker: str
    group: bytes  # the key whose rate decides fan-out
    blocks: Sequence[int]
    block_tokens: Sequence[int]
    session: bytes | None

    def to_json(self) -> bytes:
        return orjson.dumps([self.t, self.worker, self.group.hex(), list(self.blocks), list(self.block_tokens),
                             self.session.hex() if self.session else None])

    @classmethod
    def from_json(cls, data: bytes | str) -> DecisionRecord:
        """Raises ValueError (or TypeError) on anything another replica of this version would not write."""
        t, worker, group, blocks, tokens, session = orjson.loads(data)
        t = float(t)
        blocks, tokens = [int(b) for b in blocks], [int(n) for n in tokens]
        if not math.isfinite(t) or len(blocks) != len(tokens) or not isinstance(worker, str):
            raise ValueError("not a decision record")
        return cls(t, worker, bytes.fromhex(group), blocks, tokens, bytes.fromhex(session) if session else None)


class PoolView(Protocol):
    """What a policy may read of the worker pool: the ring of usable workers, each one's in-flight requests and
    work (router.workers.Worker), and the sums over the ring's workers."""

    ring: Ring
    workers: dict[str, Worker]  # every worker, by name (those off the ring too)
    active: list[str]
    active_inflight: int
    max_inflight: int | None  # a worker at this many requests in flight is full (admission control)
    max_prefill: int | None  # a worker with this many prompt tokens queued for prefill is full (admission control)

    def admits(self, w: Worker, prefill: int) -> bool: ...

    def inflight(self, name: str) -> int: ...

    def worker(self, name: str) -> Worker | None: ...

    def on_ring(self, name: str) -> bool: ...


class Policy(Protocol):
    name: str

    def choose(self, keys: RouteKeys, pool: PoolView, dry_run: bool = False, hold: bool = False) -> Decision:
        """The worker for this request. `dry_run`: the same decision, counted nowhere (rates, index, sessions
        and rotation stay as they were), for /admin/route. `hold`: the caller may wait for a full worker (a
        policy that can tell it is worth it returns a Decision with `hold` set; others ignore it)."""
        ...

