"""The doctor's policy estimate: token requests as fleet_sim requests at the worker's block size (salted chains,
fresh partial blocks), fleet_sim's counts at block 16 against a brute-force count, and policies on traffic whose
answers are known."""

from __future__ import annotations

import random

import numpy as np
import pytest

from harness.fleet_sim import offline_hit_ratio, simulate
from loadgen.doctor.policy import policy_ratio, to_sim_requests
from loadgen.doctor.traffic import Req
from router.settings import RouterSettings


def req(i: int, tokens: list[int], salt: str | None = None, t: float | None = None) -> Req:
    return Req(i, 100.0 * i if t is None else t, salt or "", None, np.asarray(tokens, dtype=np.int64), None, 8, salt,
               len(tokens))


def shared_prompt_traffic(n: int, prompts: int = 1, seed: int = 0) -> list[Req]:
    rng = random.Random(seed)
    systems = [[rng.randrange(1, 40_000) for _ in range(2000)] for _ in range(prompts)]
    return [req(i, systems[rng.randrange(prompts)] + [rng.randrange(1, 40_000) for _ in range(20)])
            for i in range(n)]


def test_sim_requests_number_each_salted_chain_once_and_partial_blocks_afresh():
    a = list(range(40))
    rs = [req(0, a), req(1, a[:32]), req(2, a, salt="t1"), req(3, a)]
    sim = to_sim_requests(rs, 16)
    assert [s["input_length"] for s in sim] == [40, 32, 40, 40] and sim[0]["output_length"] == 8
    assert sim[1]["hash_ids"] == sim[0]["hash_ids"][:2]  # same chain, same ints; 32 tokens: no partial block
    assert sim[3]["hash_ids"][:2] == sim[0]["hash_ids"][:2]
    assert sim[3]["hash_ids"][2] != sim[0]["hash_ids"][2]  # each trailing partial block is new
    assert not set(sim[2]["hash_ids"]) & set(sim[0]["hash_ids"])  # another salt shares no block
    moon = Req(0, 0.0, "", None, None, [7, 8], 3, None, 600)
    assert to_sim_requests([moon], 16) == [{"timestamp": 0.0, "input_length": 600, "output_length": 3,
                                            "hash_ids": [7, 8]}]


def brute_force_cached(reqs: list[Req], block: int) -> float:
    """One infinite cache, counted like the worker: the longest run of whole blocks some earlier prompt began
    with, never the prompt's last token."""
    seen: set[tuple[int, ...]] = set()
    hit = total = 0
    for r in reqs:
        toks = tuple(r.tokens.tolist())
        k = 0
        while (k + 1) * block <= len(toks) - 1 and toks[: (k + 1) * block] in seen:
            k += 1
        hit += k * block
        total += len(toks)
        seen.update(toks[: j * block] for j in range(1, len(toks) // block + 1))
    return hit / total


def test_fleet_sim_at_block_16_agrees_with_a_brute_force_count():
    rng = random.Random(5)
    stems = [[rng.randrange(100) for _ in range(rng.randrange(1, 90))] for _ in range(6)]
    reqs = []
    for i in range(120):
        base = rng.choice(stems + [t.tokens.tolist()[: rng.randrange(1, 120)] for t in reqs[-5:]])
        reqs.append(req(i, base + [rng.randrange(100) for _ in range(rng.randrange(1, 40))]))
    want = brute_force_cached(reqs, 16)
    sim = to_sim_requests(reqs, 16)
    assert 0.2 < want < 0.9
    assert offline_hit_ratio(sim, None, 16) == pytest.approx(want)
    # one worker, requests far apart: every prompt finds all earlier ones cached, as the infinite cache does
    slow = simulate(sim, 1, RouterSettings(workers=[], policy="round_robin"), 1e-3, block_tokens=16)
    assert slow.hit_ratio == pytest.approx(want)


def test_one_shared_system_prompt_gives_the_hand_computed_ceiling():
    n = 40
    r = policy_ratio(shared_prompt_traffic(n), 4, 16)
    # every request after the first reuses the 2000-token prompt (125 whole blocks); questions never repeat
    assert r["infinite"] == pytest.approx((n - 1) * 2000 / (n * 2020))
    assert r["pooled"] == pytest.approx(r["infinite"])  # a fleet's memory holds it all
    assert r["workers"] == 4 and r["policy"] == "cache_aware" and r["block_tokens"] == 16
    assert r["infinite"] * 0.9 <= r["ratio"] <= r["infinite"]


def test_cache_aware_keeps_prompts_together_and_round_robin_does_not():
    reqs = shared_prompt_traffic(200, prompts=12, seed=1)
    ca = policy_ratio(reqs, 4, 16)
    rr = policy_ratio(reqs, 4, 16, policy="round_robin")
    assert ca["ratio"] >= 0.9 * ca["infinite"]
    assert rr["ratio"] < ca["ratio"] - 0.05 and rr["policy"] == "round_robin"
    assert policy_ratio(reqs, 4, 16, speed=ca["speed"])["ratio"] == ca["ratio"]  # deterministic
