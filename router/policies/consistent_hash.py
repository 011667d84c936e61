"""consistent_hash: the key's home worker on the ring, always (no spill, no load bound)."""

from __future__ import annotations

from router.policies.base import Decision, PoolView
from router.prefix import RouteKeys


class ConsistentHash:
    name = "consistent_hash"

    def choose(self, keys: RouteKeys, pool: PoolView, dry_run: bool = False, hold: bool = False) -> Decision:
        order = pool.ring.order(keys.key)
        return Decision(order[0], self.name, order, 1)
