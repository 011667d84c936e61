"""cache_aware: a key's home worker by consistent hashing; a hot key spills over the next ring workers; a
conversation stays on the worker that served its last turn; bounded load passes over a hot worker.

- Fan-out: k = 1 at or below R requests/minute on the key; above, k = max(ceil(rate / R), ceil(N x share))
  workers in ring order from the home. All k come to hold the key's shared prefix.
- Sessions: a session seen before goes back to the worker that served its last turn (that worker holds the
  longest cached prefix of the conversation), unless that worker is over the bound. A new session, or one
  moved off a hot worker, goes to the k worker with the fewest requests in flight, ties going to the one sent
  the fewest requests lately (counts decaying over the rate window), then to scan order from the session's
  jump-hash bucket. Long conversations pin their turns to one worker; placing new sessions this way evens
  out the request counts they leave behind. The table is an LRU of `max_sessions` entries, local to this
  router.
- Bound (Mirrokni et al.): a worker whose in-flight count would exceed ceil(c x mean) + s, the mean over the
  ring's workers counting this request, is passed over for the next ring worker under the bound, never
  fleet-wide.

Cost per decision: one bisect on the ring (its orders are memoized per position), O(k) for the fan-out scan,
O(workers passed over) for the bound; the failover list is built lazily, O(failover limit).
"""

from __future__ import annotations

import math
from collections import OrderedDict

from router.policies.base import Decision, PoolView
from router.prefix import RouteKeys
from router.rate import DecayedCounts, RateTable
from router.ring import jump_hash


class CacheAware:
    name = "cache_aware"

    def __init__(self, spill_rpm: float = 15.0, load_factor: float = 1.25, load_slack: float = 4.0,
                 window_s: float = 60.0, max_keys: int = 100_000, rates: RateTable | None = None,
                 max_sessions: int = 100_000):
        self.R = spill_rpm
        self.c = load_factor
        self.s = load_slack
        self.rates = rates if rates is not None else RateTable(window_s=window_s, max_keys=max_keys)
        self.max_sessions = max_sessions
        self.recent = DecayedCounts(window_s)
        self.sessions: OrderedDict[bytes, str] = OrderedDict()  # session key -> worker of its last turn

    def fanout(self, rate: float, share: float, n: int) -> int:
        if rate <= self.R or n <= 1:
            return 1
        return min(n, max(math.ceil(rate / self.R), math.ceil(n * share)))

    def choose(self, keys: RouteKeys, pool: PoolView) -> Decision:
        order = pool.ring.order(keys.key)
        n = len(order)
        rate, share = self.rates.hit(keys.key)
        k = self.fanout(rate, share, n)
        bound = math.ceil(self.c * (pool.active_inflight + 1) / n) + self.s
        last = self.sessions.get(keys.session)
        now = self.rates.clock()
        if last is not None and pool.on_ring(last) and pool.inflight(last) + 1 <= bound:
            self._remember(keys.session, last, now)
            return Decision(last, "session", order, 0, k)  # failover: the key's home, then on round the ring
        start = jump_hash(int.from_bytes(keys.session[:8], "little"), k) if k > 1 else 0
        pick, best = start, (pool.inflight(order[start]), self.recent.get(order[start], now))
        for step in range(1, k):
            i = (start + step) % k
            score = (pool.inflight(order[i]), self.recent.get(order[i], now))
            if score < best:
                pick, best = i, score
        if best[0] + 1 > bound:
            for i in range(k, n):
                if pool.inflight(order[i]) + 1 <= bound:
                    pick = i
                    break
        reason = "bounded" if last is not None or pick >= k else ("spill" if k > 1 else "affinity")
        self._remember(keys.session, order[pick], now)
        return Decision(order[pick], reason, order, pick + 1, k)

    def _remember(self, session: bytes, worker: str, now: float) -> None:
        self.recent.add(worker, now)
        self.sessions[session] = worker
        self.sessions.move_to_end(session)
        if len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)
