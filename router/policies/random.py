"""random: a uniformly random usable worker."""

from __future__ import annotations

import random

from router.policies.base import Decision, PoolView
from router.prefix import RouteKeys


class RandomPolicy:
    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose(self, keys: RouteKeys, pool: PoolView, dry_run: bool = False, hold: bool = False) -> Decision:
        names = pool.active
        rng = self._rng
        if dry_run:
            rng = random.Random()
            rng.setstate(self._rng.getstate())
        i = rng.randrange(len(names))
        return Decision(names[i], self.name, names, i + 1)
