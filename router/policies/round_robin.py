"""round_robin: each usable worker in turn, ignoring the prompt (the baseline that scatters prefixes)."""

from __future__ import annotations

from router.policies.base import Decision, PoolView
from router.prefix import RouteKeys


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, keys: RouteKeys, pool: PoolView, dry_run: bool = False, hold: bool = False) -> Decision:
        names = pool.active
        i = self._next % len(names)
        if not dry_run:
            self._next += 1
        return Decision(names[i], self.name, names, i + 1)
