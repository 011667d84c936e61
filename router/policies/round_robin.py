"""round_robin: each usable worker in turn, ignoring the prompt (the baseline that scatters prefixes)."""

from __future__ import annotations

import itertools

from router.policies.base import Decision, PoolView
from router.prefix import RouteKeys


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._next = itertools.count()

    def choose(self, keys: RouteKeys, pool: PoolView) -> Decision:
        names = pool.active
        i = next(self._next) % len(names)
        return Decision(names[i], self.name, names, i + 1)
