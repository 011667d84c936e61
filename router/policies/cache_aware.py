"""cache_aware: home worker by consistent hashing; a hot key spills over the next ring workers; sessions stay
put inside the spill set; bounded load passes over a hot worker to the next ring worker, never fleet-wide.

k = 1 at or below R requests/minute; above, k = max(ceil(rate / R), ceil(N x share)) workers in ring order
from the home. Within them, a session goes to bucket jump_hash(session, k), so growing k moves few sessions.
A worker whose in-flight count would exceed ceil(c x mean) + s (mean counting this request) is passed over.
"""

from __future__ import annotations

import math

from router.policies.base import Decision, PoolView
from router.prefix import RouteKeys
from router.rate import RateTable
from router.ring import jump_hash


class CacheAware:
    name = "cache_aware"

    def __init__(self, spill_rpm: float = 15.0, load_factor: float = 1.25, load_slack: float = 4.0,
                 window_s: float = 60.0, max_keys: int = 100_000, rates: RateTable | None = None):
        self.R = spill_rpm
        self.c = load_factor
        self.s = load_slack
        self.rates = rates if rates is not None else RateTable(window_s=window_s, max_keys=max_keys)

    def fanout(self, rate: float, share: float, n: int) -> int:
        if rate <= self.R or n <= 1:
            return 1
        return min(n, max(math.ceil(rate / self.R), math.ceil(n * share)))

    def choose(self, keys: RouteKeys, pool: PoolView) -> Decision:
        order = pool.ring.order(keys.key)
        n = len(order)
        rate, share = self.rates.hit(keys.key)
        k = self.fanout(rate, share, n)
        start = jump_hash(int.from_bytes(keys.session[:8], "little"), k) if k > 1 else 0
        # Mirrokni et al.: capacity ceil(c x mean), the mean counting this request; plus the slack s.
        bound = math.ceil(self.c * (pool.total_inflight + 1) / n) + self.s
        pick = start
        for step in range(n):
            i = (start + step) % n
            if pool.inflight(order[i]) + 1 <= bound:
                pick = i
                break
        reason = "bounded" if pick != start else ("spill" if k > 1 else "affinity")
        return Decision(order[pick], reason, order[pick + 1:] + order[:pick], k)
