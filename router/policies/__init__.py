"""Routing policies: one interface (base.Policy), one module per policy, `make_policy` picks by name."""

from __future__ import annotations

import time
from collections.abc import Callable

from router.index import PrefixIndex
from router.policies.base import Decision, Policy, PoolView
from router.policies.cache_aware import CacheAware
from router.policies.consistent_hash import ConsistentHash
from router.policies.least_loaded import LeastLoaded
from router.policies.random import RandomPolicy
from router.policies.round_robin import RoundRobin
from router.rate import RateTable
from router.settings import RouterSettings

__all__ = ["Decision", "Policy", "PoolView", "make_policy"]


def make_policy(settings: RouterSettings, clock: Callable[[], float] = time.time) -> Policy:
    # Wall-clock time: router replicas count the same requests in the same rate windows.
    if settings.policy == "cache_aware":
        rates = RateTable(settings.rate_window_s, max_keys=settings.max_tracked_keys, clock=clock)
        return CacheAware(settings.spill_rpm, settings.rate_window_s, settings.max_tracked_keys, rates,
                          max_sessions=settings.max_tracked_keys, session_ttl_s=settings.session_ttl_s,
                          index=PrefixIndex(settings.index_tokens_per_worker),
                          prefill_weight=settings.prefill_weight, decode_weight=settings.decode_weight,
                          load_factor=settings.load_factor, load_slack=settings.load_slack)
    return {"consistent_hash": ConsistentHash, "round_robin": RoundRobin, "least_loaded": LeastLoaded,
            "random": RandomPolicy}[settings.policy]()
