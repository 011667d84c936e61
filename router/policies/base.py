"""The policy interface: given a request's keys and a view of the pool, name a worker and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from router.prefix import RouteKeys
from router.ring import Ring


@dataclass
class Decision:
    worker: str
    reason: str  # affinity | spill | session | bounded | consistent_hash | round_robin | least_loaded | random
    fallbacks: list[str] = field(default_factory=list)  # failover order if `worker` fails before streaming
    fanout: int = 1  # workers the key is spread over (cache_aware)


class PoolView(Protocol):
    """What a policy may read of the worker pool: the ring of usable workers and their in-flight counts."""

    ring: Ring
    active: list[str]
    total_inflight: int

    def inflight(self, name: str) -> int: ...


class Policy(Protocol):
    name: str

    def choose(self, keys: RouteKeys, pool: PoolView) -> Decision: ...


def rotate_after(names: list[str], chosen: str) -> list[str]:
    i = names.index(chosen)
    return names[i + 1:] + names[:i]
