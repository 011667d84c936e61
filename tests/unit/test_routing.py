"""Routing properties (hypothesis): stability, minimal remapping, spill growth and shrink, conversations
following their cache, work-aware placement, bounded load (by count, for workers at or above the mean load),
fleet-wide spread of a dominant group."""

from __future__ import annotations

import hashlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.policies.cache_aware import CacheAware
from router.policies.consistent_hash import ConsistentHash
from router.prefix import RouteKeys
from router.rate import RateTable
from router.ring import jump_hash
from router.workers import WorkerPool


def pool_of(n: int) -> WorkerPool:
    pool = WorkerPool(vnodes=160)
    for i in range(n):
        pool.add(f"http://127.0.0.1:{9000 + i}")
        pool.mark_ok(f"http://127.0.0.1:{9000 + i}")
    return pool


def keys(i: int, session: int = 0) -> RouteKeys:
    k = hashlib.blake2b(f"key{i}".encode(), digest_size=16).digest()
    s = hashlib.blake2b(f"session{session}".encode(), digest_size=16).digest()
    return RouteKeys(k, s, 256, 0.0)


def req(blocks: list[int], key: int = 0, session: int | None = None, block_tokens: int = 512) -> RouteKeys:
    """A request whose prompt is these blocks (equal leading blocks: equal prefixes)."""
    k = hashlib.blake2b(f"key{key}".encode(), digest_size=16).digest()
    s = None if session is None else hashlib.blake2b(f"session{session}".encode(), digest_size=16).digest()
    tokens = [block_tokens * (i + 1) for i in range(len(blocks))]
    return RouteKeys(k, s, 256, 0.0, blocks, tokens, tokens[-1] if tokens else 0)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 40), st.integers(0, 10**6))
def test_a_prompt_first_seen_on_an_idle_fleet_goes_home_and_stays(n, key):
    pool = pool_of(n)
    ch, ca = ConsistentHash(), CacheAware()
    first = ch.choose(keys(key), pool).worker
    blocks = [key, key + 1]
    d = ca.choose(req(blocks, key=key), pool)  # cached nowhere, every worker idle: its ring home
    assert (d.worker, d.reason) == (first, "affinity")
    for j in range(5):
        assert ch.choose(keys(key), pool).worker == first
        d = ca.choose(req(blocks + [10**7 + j], key=key, session=j), pool)  # its repeats follow the cache
        assert d.worker == first and d.fanout == 1


@settings(max_examples=10, deadline=None)
@given(st.integers(3, 32), st.data())
def test_removing_one_worker_moves_few_keys(n, data):
    pool = pool_of(n)
    ch = ConsistentHash()
    before = [ch.choose(keys(i), pool).worker for i in range(10_000)]
    gone = data.draw(st.sampled_from(pool.active))
    pool.remove(gone)
    after = [ch.choose(keys(i), pool).worker for i in range(10_000)]
    moved = sum(a != b for a, b in zip(before, after))
    assert moved <= (1 / n + 0.05) * 10_000
    assert all(b == a for a, b in zip(before, after) if a != gone)  # only the removed worker's keys move


def test_spill_fanout_is_the_keys_fair_share_and_shrinks_back():
    """Past R requests/minute a key spills over its fair share of the fleet, max(2, ceil(N x share)) workers,
    whatever its rate: each worker it spreads to computes its prefix once."""
    n = 16
    pool = pool_of(n)
    seen = []
    for background, want in ((0, 1), (15, 2), (3, 4), (1, 8), (0, 16)):
        clock = Clock()
        policy = CacheAware(spill_rpm=15, rates=RateTable(window_s=60, clock=clock))
        rpm = 10 if want == 1 else 120  # at or below R: home; above it, the share decides how far
        other = 0
        for j in range(rpm):  # one minute at this rate; `background` other keys' requests per request of the key
            clock.t += 60 / rpm
            for _ in range(background):
                other += 1
                policy.choose(keys(10_000 + other), pool)
            d = policy.choose(keys(1, session=j), pool)
        share = rpm / (rpm * (1 + background))
        assert d.fanout == want == (1 if rpm <= 15 else max(2, math.ceil(n * share)))
        seen.append(d.fanout)
    assert seen == sorted(seen)
    clock.t += 120  # the key goes quiet: its window empties and it is home again
    d = policy.choose(keys(1), pool)
    assert d.fanout == 1 and d.worker == pool.ring.order(keys(1).key)[0]


def test_a_document_with_half_the_traffic_is_computed_on_half_the_fleet():
    """A hot document with half the requests at 32 workers: its group spills over 16 workers, not 32, so 16
    workers compute it, and each of its requests after that is a hit on its worker."""
    clock = Clock()
    policy = CacheAware(rates=RateTable(clock=clock))
    pool = pool_of(32)
    hot_workers = set()
    for i in range(1200):  # 1,200 requests/minute: every other one on the document (blocks 7, 8)
        clock.t += 0.05
        if i % 2:
            d = policy.choose(req([7, 8, 10_000 + i]), pool)
            hot_workers.add(d.worker)
        else:
            policy.choose(req([20_000 + i, 30_000 + i]), pool)
    assert len(hot_workers) <= 17  # its 16 fan-out workers, and the first request's home
    hot = policy.choose(req([7, 8, 99_999]), pool, dry_run=True)
    assert hot.fanout == 16 and hot.prefill == 512  # only its own question is computed


@settings(max_examples=15, deadline=None)
@given(st.integers(4, 32), st.integers(50, 400), st.floats(1.1, 2.0), st.floats(0, 8))
def test_bounded_load_caps_in_flight(n, burst, c, s):
    pool = pool_of(n)
    policy = CacheAware(load_factor=c, load_slack=s, rates=RateTable(clock=Clock()))
    for i in range(burst):  # a burst on few keys; nothing finishes
        d = policy.choose(keys(i % 3, session=i), pool)
        pool.acquire(d.worker)
        assert pool.inflight(d.worker) <= math.ceil(c * pool.active_inflight / n) + s
    assert max(pool.inflight(w) for w in pool.active) <= math.ceil(c * burst / n) + s


def test_new_sessions_of_a_spilled_key_go_to_the_least_loaded_workers():
    clock = Clock()
    policy = CacheAware(rates=RateTable(clock=clock))
    pool = pool_of(8)
    for i in range(400):  # 400 requests/minute on one key: it spills over all 8 workers
        clock.t += 0.15
        policy.choose(keys(5, session=10_000 + i), pool)
    busy = pool.active[:4]
    for w in busy:
        for _ in range(3):
            pool.acquire(w)
    picks = []
    for i in range(4):
        d = policy.choose(keys(5, session=i), pool)
        assert d.fanout == 8 and d.worker not in busy
        pool.acquire(d.worker)
        picks.append(d.worker)
    assert len(set(picks)) == 4  # each time the emptiest, so the four idle workers get one each


def test_the_session_table_is_bounded():
    policy = CacheAware(rates=RateTable(clock=Clock()), max_sessions=100)
    pool = pool_of(4)
    for i in range(1000):
        policy.choose(keys(1, session=i), pool)
    assert len(policy.sessions) == 100


@given(st.integers(0, 2**64 - 1), st.integers(1, 64))
def test_jump_hash_moves_only_into_the_new_bucket(key, n):
    a, b = jump_hash(key, n), jump_hash(key, n + 1)
    assert 0 <= a < n and (b == a or b == n)


def test_the_bound_averages_only_over_the_rings_workers():
    # 40 requests still run on a drained worker. The old mean counted them (bound ceil(41/3) + 0 = 14), so a
    # burst on one key piled onto its home; over the ring's 3 workers the bound is 1 each, then 2.
    pool = pool_of(4)
    drained = pool.active[0]
    for _ in range(40):
        pool.acquire(drained)
    pool.drain(drained)
    assert pool.total_inflight == 40 and pool.active_inflight == 0
    policy = CacheAware(load_factor=1.0, load_slack=0, rates=RateTable(clock=Clock()))
    for i in range(6):
        d = policy.choose(keys(9, session=i), pool)
        pool.acquire(d.worker)
    assert sorted(pool.inflight(w) for w in pool.active) == [2, 2, 2]


class CountingOrder(list):
    """A ring order that counts the entries a decision reads; whole-list scans are refused."""

    reads = 0

    def __getitem__(self, i):
        assert isinstance(i, int), "slicing copies the whole order"
        CountingOrder.reads += 1
        return super().__getitem__(i)

    def __contains__(self, x):
        raise AssertionError("a membership scan is O(workers)")

    def index(self, *a):
        raise AssertionError("index() is O(workers)")

    def __iter__(self):
        raise AssertionError("iterating is O(workers)")


def test_a_decision_reads_a_few_entries_of_the_ring_order_whatever_the_fleet_size():
    pool = pool_of(64)
    real_order = pool.ring.order
    pool.ring.order = lambda key: CountingOrder(real_order(key))
    policy = CacheAware(rates=RateTable(clock=Clock()))
    for session in range(200):  # a new session, then the same session again (the session path)
        for _ in range(2):
            CountingOrder.reads = 0
            d = policy.choose(keys(session, session=session), pool)
            assert CountingOrder.reads <= 4
            assert len(d.fallbacks(2)) == 2 and d.worker not in d.fallbacks(2)
            assert CountingOrder.reads <= 10


def test_fallbacks_go_on_round_the_order_skipping_the_chosen_worker():
    from router.policies import Decision

    d = Decision("c", "x", ["a", "b", "c", "d"], start=3)
    assert d.fallbacks(2) == ["d", "a"] and d.fallbacks(10) == ["d", "a", "b"]
    assert Decision("a", "session", ["a", "b", "c"], start=0).fallbacks(5) == ["b", "c"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["acquire", "release", "drain", "fail", "ok", "add", "remove"]),
                          st.integers(0, 5)), max_size=80))
def test_active_inflight_is_the_sum_over_the_rings_workers(ops):
    pool = pool_of(4)
    for op, i in ops:
        name = f"http://127.0.0.1:{9000 + i}"
        if op == "acquire":
            pool.acquire(name)
        elif op == "release":
            pool.release(name)
        elif op == "drain":
            pool.drain(name)
        elif op == "fail":
            pool.mark_failed(name, immediate=True)
        elif op == "ok":
            pool.mark_ok(name)
        elif op == "add":
            pool.add(name)
        else:
            pool.remove(name)
        assert pool.active_inflight == sum(pool.inflight(n) for n in pool.active)
        assert pool.total_inflight == sum(w.inflight for w in pool.workers.values())


def test_every_turn_of_a_conversation_returns_to_its_worker_and_conversations_spread():
    clock = Clock()
    policy = CacheAware(rates=RateTable(clock=clock))
    pool = pool_of(8)
    placements: dict[int, set[str]] = {}
    for turn in range(6):
        for c in range(40):  # 240 requests/minute share a two-block system prompt: its group spills over all 8
            clock.t += 0.25
            d = policy.choose(req([1, 2] + [1000 * (c + 1) + j for j in range(turn + 1)]), pool)
            placements.setdefault(c, set()).add(d.worker)
    assert all(len(ws) == 1 for ws in placements.values())  # each conversation on the worker of its first turn
    assert len({w for ws in placements.values() for w in ws}) == 8  # and the conversations use the fleet


def test_a_group_with_all_the_traffic_spreads_over_all_workers():
    clock = Clock()
    policy = CacheAware(rates=RateTable(clock=clock))
    pool = pool_of(32)
    used = set()
    for i in range(2000):  # 2000 requests in 100 s on one shared prefix, each with its own question
        clock.t += 0.05
        d = policy.choose(req([7, 8, 10_000 + i]), pool)
        used.add(d.worker)
    assert d.fanout == 32 and len(used) == 32


def test_a_conversation_moved_off_a_hot_worker_stays_on_its_new_worker():
    policy = CacheAware(load_factor=1.0, load_slack=0, rates=RateTable(clock=Clock()))
    pool = pool_of(8)
    home = policy.choose(req([3, 4]), pool).worker
    for _ in range(4):  # the conversation's worker gets busy: the next turn is passed over to another worker
        pool.acquire(home)
    moved = policy.choose(req([3, 4, 5]), pool)
    assert moved.worker != home
    for _ in range(4):
        pool.release(home)
    again = policy.choose(req([3, 4, 5, 6]), pool)  # home is idle again, but the new worker holds more of it
    assert again.worker == moved.worker and again.reason in ("cache", "affinity")


@pytest.mark.parametrize("home_prefill, others_prefill, stays", [
    (0, (0, 20_000, 20_000), True),  # past the count, below the mean load: many cheap requests, it keeps the prompt
    (100, (0, 0, 0), False),  # past the count, above the mean load, a worker is idle: passed over
    (100, (50, 50, 50), True),  # the same, but every worker has prefill queued (overload): the cost decides
])
def test_the_count_bound_passes_over_a_worker_only_above_the_mean_load_while_a_worker_has_room(
        home_prefill, others_prefill, stays):
    # Under overload moving a prompt off its cached worker recomputes its prefix on a fleet with no room for it.
    policy = CacheAware(load_factor=1.0, load_slack=0, rates=RateTable(clock=Clock()))
    pool = pool_of(4)
    home = policy.choose(req([1, 2, 3, 4]), pool).worker
    for _ in range(6):
        pool.acquire(home, prefill=home_prefill, context=100)
    for other, prefill in zip([w for w in pool.active if w != home], others_prefill):
        pool.acquire(other, prefill=prefill, context=max(prefill, 100))
    assert pool.inflight(home) + 1 > math.ceil((pool.active_inflight + 1) / 4)  # past the count bound
    d = policy.choose(req([1, 2, 3, 4, 5]), pool)
    assert (d.worker == home) is stays, d


def test_a_prompt_cached_nowhere_goes_to_the_worker_with_the_least_work_not_the_fewest_requests():
    policy = CacheAware(rates=RateTable(clock=Clock()))
    pool = pool_of(4)
    a, b, c, d = pool.active
    pool.acquire(a, prefill=40_000, context=40_000)  # one long prompt still prefilling
    for _ in range(3):
        pool.acquire(b, prefill=1_000, context=1_000)  # the most requests, the least work
    for _ in range(2):
        pool.acquire(c, prefill=5_000, context=5_000)
    pool.acquire(d, prefill=20_000, context=20_000)
    first = policy.choose(req([50, 51, 52]), pool)
    assert first.worker == b and first.prefill == 3 * 512 and first.context == 3 * 512
    pool.acquire(first.worker, first.prefill, first.context)
    second = policy.choose(req([50, 51, 52, 53]), pool)  # its next turn: the index says b holds 3 of 4 blocks
    assert second.worker == b and second.prefill == 512


def test_affinity_yields_only_when_the_queue_ahead_costs_more_than_the_hit():
    for queued, stays in ((100_000, True), (200_000, False)):
        policy = CacheAware(prefill_weight=32, rates=RateTable(clock=Clock()))
        pool = pool_of(4)
        holder = policy.choose(req(list(range(100, 108))), pool).worker  # an 8-block (4,096-token) document
        pool.acquire(holder, prefill=queued)
        # the same document with a new question: it saves 4,096 tokens x 32 = 131,072 of weighted work there
        d = policy.choose(req(list(range(100, 108)) + [999]), pool)
        assert (d.worker == holder) is stays, queued


def test_new_conversations_even_out_the_requests_long_conversations_leave():
    clock = Clock()
    policy = CacheAware(rates=RateTable(clock=clock))
    pool = pool_of(8)
    counts: dict[str, int] = {}
    for i in range(1600):  # one conversation of 100 turns among 1500 one-turn ones, nothing in flight
        clock.t += 0.05
        blocks = [2, 3] + ([10**6 + j for j in range(i // 16 + 1)] if i % 16 == 0 else [10**7 + i])
        d = policy.choose(req(blocks), pool)
        counts[d.worker] = counts.get(d.worker, 0) + 1
    # by affinity alone its worker would get 100 + 1500 / 8 = 287 requests (1.44 x the mean); it gets fewer new ones
    assert max(counts.values()) / (1600 / 8) <= 1.05


def test_a_workers_queued_work_follows_its_requests_first_byte_and_end():
    pool = pool_of(2)
    w = pool.active[0]
    pool.acquire(w, prefill=1000, context=4000)
    pool.acquire(w, prefill=300, context=300)
    assert (pool.worker(w).prefill, pool.worker(w).context) == (1300, 4300)
    pool.prefilled(w, 1000)  # the first request streams its first token
    assert (pool.worker(w).prefill, pool.worker(w).context) == (300, 4300)
    pool.release(w, 0, 4000)
    pool.release(w, 300, 300)  # a non-streamed answer: its prefill counted until the end
    assert (pool.worker(w).inflight, pool.worker(w).prefill, pool.worker(w).context) == (0, 0, 0)
    pool.release(w, 300, 300)  # a stray release never goes below zero
    assert (pool.worker(w).inflight, pool.worker(w).prefill, pool.worker(w).context) == (0, 0, 0)
