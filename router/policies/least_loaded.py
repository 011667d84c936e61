"""least_loaded: the worker with the fewest requests in flight (ties: first in pool order)."""

from __future__ import annotations

from router.policies.base import Decision, PoolView, rotate_after
from router.prefix import RouteKeys


class LeastLoaded:
    name = "least_loaded"

    def choose(self, keys: RouteKeys, pool: PoolView) -> Decision:
        names = pool.active
        chosen = min(names, key=pool.inflight)
        return Decision(chosen, self.name, rotate_after(names, chosen))
