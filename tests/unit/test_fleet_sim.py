"""The in-process fleet simulation: known answers for the offline references, and the real trace through the
router's own policies (cache_aware near the pooled cache, round_robin far below it)."""

from __future__ import annotations

import pytest

from harness.fleet_sim import TRACE, load_trace, offline_hit_ratio, per_worker_blocks, saturation_speed, simulate
from router.settings import RouterSettings
from worker.sim import GpuProfile

needs_trace = pytest.mark.skipif(not TRACE.exists(), reason="the Mooncake trace is not beside the repo (../shared)")


def test_offline_references_on_a_constructed_trace():
    reqs = [{"timestamp": 0, "input_length": 1024, "output_length": 1, "hash_ids": [0, 1]},
            {"timestamp": 1, "input_length": 1536, "output_length": 1, "hash_ids": [0, 1, 2]},
            {"timestamp": 2, "input_length": 1024, "output_length": 1, "hash_ids": [0, 5]}]
    total = 1024 + 1536 + 1024
    # infinite: the second request reuses blocks 0-1, the third block 0
    assert offline_hit_ratio(reqs, None) == pytest.approx((1024 + 512) / total)
    # one block of room: only block 0 is ever cached (block 1 finds it pinned), so each later request gets 512
    assert offline_hit_ratio(reqs, 1) == pytest.approx((512 + 512) / total)


def test_a_request_never_counts_its_last_token_as_cached():
    reqs = [{"timestamp": 0, "input_length": 1024, "output_length": 1, "hash_ids": [0, 1]}] * 2
    assert offline_hit_ratio(reqs, None) == pytest.approx(512 / 2048)  # block 1 holds the last token


def test_a_repeat_queued_behind_its_document_hits_the_chunks_computed_before_it_is_admitted():
    """One worker, the engine's step budget of 8,192 tokens: C (10 blocks) runs; A (40 blocks) and B (A plus one
    block) arrive during C's step. A's prefill takes two full steps' budget, so B is admitted with A's last chunk
    and finds the 31 blocks of A's first 16,382 tokens. With a budget that admits both at once (a step of 1M
    tokens, the sim worker's before it counted its budget in real tokens), B finds nothing."""
    reqs = [{"timestamp": 0, "input_length": 10 * 512, "output_length": 4, "hash_ids": list(range(10))},
            {"timestamp": 10, "input_length": 40 * 512, "output_length": 4, "hash_ids": list(range(100, 140))},
            {"timestamp": 20, "input_length": 41 * 512, "output_length": 4, "hash_ids": list(range(100, 141))}]
    total = sum(r["input_length"] for r in reqs)
    s = RouterSettings(workers=[], policy="round_robin")
    assert GpuProfile().max_batch_tokens == 8192
    assert simulate(reqs, 1, s, 1.0).hit_ratio == pytest.approx(31 * 512 / total)
    assert simulate(reqs, 1, s, 1.0, step_tokens=1 << 20).hit_ratio == 0


@needs_trace
def test_cache_aware_reaches_the_pooled_cache_and_round_robin_does_not():
    reqs = load_trace(TRACE, 1500)
    profile = GpuProfile()
    n = 8
    pooled = offline_hit_ratio(reqs, n * per_worker_blocks(profile))
    speed = saturation_speed(reqs, n, pooled, profile)
    ca = simulate(reqs, n, RouterSettings(workers=[], policy="cache_aware"), speed, profile)
    rr = simulate(reqs, n, RouterSettings(workers=[], policy="round_robin"), speed, profile)
    assert 0 < pooled <= offline_hit_ratio(reqs, None)
    assert ca.hit_ratio >= 0.9 * pooled and ca.max_mean <= 1.25
    assert rr.hit_ratio <= 0.5 * pooled and rr.max_mean <= 1.01
    assert ca.ttft_p50_s < rr.ttft_p50_s  # hits shorten prefill, and so the queues behind it
    assert ca.reasons.get("cache", 0) > 0 and set(rr.reasons) == {"round_robin"}  # turns follow their cache


@needs_trace
def test_admission_in_the_simulation_bounds_ttft_under_overload_and_holding_keeps_the_hits():
    reqs = load_trace(TRACE, 1500)
    profile = GpuProfile()
    n = 8
    pooled = offline_hit_ratio(reqs, n * per_worker_blocks(profile))
    speed = 2 * saturation_speed(reqs, n, pooled, profile)
    off = simulate(reqs, n, RouterSettings(workers=[]), speed, profile)
    runs = {hold: simulate(reqs, n, RouterSettings(workers=[], max_queued_tokens_per_worker=100_000, queue_wait_s=3,
                                                   hold_for_cache=hold), speed, profile) for hold in (True, False)}
    on = runs[True]
    assert off.refused == 0 and len(off.admitted) == len(reqs)
    assert on.refused > 0 and len(on.admitted) + on.refused == len(reqs)
    assert on.ttft_p99_s < off.ttft_p99_s / 2
    # refusing a held request beats recomputing its prefix elsewhere
    assert on.hit_ratio > 1.2 * runs[False].hit_ratio
