"""least_loaded: the worker with the fewest requests in flight (ties: first in pool order)."""

from __future__ import annotations

from router.policies.base import Decision, PoolView
from router.prefix import RouteKeys


class LeastLoaded:
    name = "least_loaded"

    def choose(self, keys: RouteKeys, pool: PoolView, dry_run: bool = False, hold: bool = False) -> Decision:
        names = pool.active
        i = min(range(len(names)), key=lambda j: pool.inflight(names[j]))
        return Decision(names[i], self.name, names, i + 1)
