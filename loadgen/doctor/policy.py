"""What a routing policy would make of the traffic: its requests through harness.fleet_sim at the worker's
block size, beside one pooled cache of the fleet's size and an infinite cache."""

from __future__ import annotations

from typing import Any

from harness import fleet_sim
from loadgen.doctor.traffic import Req
from router.settings import RouterSettings
from worker.engine.blocks import block_hashes
from worker.sim import GpuProfile

_PARTIAL = 1 << 40  # partial blocks' ids start here, past any count of full ones
LOAD = 0.5  # of the fleet's estimated saturation, when no speed is given


def to_sim_requests(reqs: list[Req], block_tokens: int, chains: list[list[bytes]] | None = None
                    ) -> list[dict[str, Any]]:
    """Mooncake-like dicts: one dense int per distinct salted block chain hash (equal chain, equal int), and a
    fresh int for a trailing partial block. Mooncake requests keep their own hash ids (512-token blocks).
    `chains`: the requests' block chains when already hashed (the doctor's analysis holds them)."""
    ids: dict[bytes, int] = {}
    fresh = 0
    out = []
    for k, r in enumerate(reqs):
        if r.tokens is None:
            hash_ids, n = list(r.hash_ids or []), r.input_length
        else:
            n = len(r.tokens)
            chain = chains[k] if chains is not None else block_hashes(r.tokens, block_tokens, r.salt)
            hash_ids = [ids.setdefault(h, len(ids)) for h in chain]
            if n % block_tokens:
                fresh += 1
                hash_ids.append(_PARTIAL + fresh)  # never the id of a full block
        out.append({"timestamp": r.timestamp_ms, "input_length": n, "output_length": r.output_tokens,
                    "hash_ids": hash_ids})
    return out


def policy_ratio(reqs: list[Req], workers: int, block_tokens: int, policy: str = "cache_aware",
                 speed: float | None = None, settings: RouterSettings | None = None,
                 profile: GpuProfile = GpuProfile(), sim: list[dict[str, Any]] | None = None,
                 infinite: float | None = None) -> dict[str, Any]:
    """Cached / prompt tokens of `policy` on `workers` simulated workers at `speed` x log time (default: LOAD of
    the fleet's saturation, as bench/policy_sim.py scales loads), with the offline references. `sim`
    (to_sim_requests) and `infinite` (the ideal ceiling) when already computed, for several runs on one log."""
    if any(r.tokens is None for r in reqs):
        if not all(r.tokens is None for r in reqs):
            raise ValueError("Mooncake and token requests cannot be simulated together")
        block_tokens = fleet_sim.TRACE_BLOCK
    sim = sim if sim is not None else to_sim_requests(reqs, block_tokens)
    if infinite is None:
        infinite = fleet_sim.offline_hit_ratio(sim, None, block_tokens)
    capacity = workers * fleet_sim.per_worker_blocks(profile, block_tokens)
    distinct = len({h for r in sim for h in r["hash_ids"]})
    # an LRU that holds every block the log has never evicts: it is the infinite cache
    pooled = infinite if capacity >= distinct else fleet_sim.offline_hit_ratio(sim, capacity, block_tokens)
    if speed is None:
        speed = LOAD * fleet_sim.saturation_speed(sim, workers, pooled, profile)
    s = settings.model_copy(update={"policy": policy}) if settings else RouterSettings(workers=[], policy=policy)
    out = fleet_sim.simulate(sim, workers, s, speed, profile, block_tokens=block_tokens)
    return {"workers": workers, "policy": policy, "ratio": out.hit_ratio, "pooled": pooled,
            "infinite": infinite, "speed": speed,
            "block_tokens": block_tokens}
