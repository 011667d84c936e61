"""Admission control's logic: token buckets, tenant limits with Retry-After, the per-worker bound honoured by
cache_aware, and the bounded router queue (FIFO, woken by a finishing request, refused past its wait)."""

from __future__ import annotations

import asyncio

import pytest

from protocol.errors import APIError
from router.admission import Admission, TenantGate, TokenBucket
from router.settings import RouterSettings, TenantConfig
from router.workers import WorkerPool


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_refills_per_minute_and_says_how_long_to_wait():
    b = TokenBucket(60, now=0.0)  # one a second
    assert b.wait_for(60, 0.0) == 0
    b.take(60)
    assert b.wait_for(1, 0.0) == pytest.approx(1.0)
    assert b.wait_for(1, 0.5) == pytest.approx(0.5)
    assert b.wait_for(1, 1.0) == 0
    assert b.wait_for(500, 1.0) == pytest.approx(59.0)  # more than a minute's worth: waits for a full bucket


def admission(tenants=(), max_queue=None, wait_s=0.2, max_waiting=8, clock=None) -> tuple[Admission, WorkerPool]:
    pool = WorkerPool()
    for i in range(2):
        pool.mark_ok(pool.add(f"http://w{i}:1").name)
    s = RouterSettings(tenants=list(tenants), max_queue_per_worker=max_queue, queue_wait_s=wait_s,
                       max_queued_requests=max_waiting)
    refused: list[str] = []
    a = Admission.from_settings(s, pool, refused.append)
    if clock is not None:
        a.clock = clock
        for g in a.gates.values():
            for b in (g.requests, g.tokens):
                if b is not None:
                    b.t = clock()
    a.refused = refused  # type: ignore[attr-defined]
    return a, pool


def tenant(**limits) -> TenantConfig:
    return TenantConfig(id="acme", api_key="k", secret="s", **limits)


def test_tenant_concurrency_limit_refuses_with_429_and_retry_after():
    a, _ = admission([tenant(max_concurrency=2)])
    g1, g2 = a.enter("acme", 10), a.enter("acme", 10)
    with pytest.raises(APIError) as e:
        a.enter("acme", 10)
    assert e.value.status == 429 and e.value.code == "rate_limit_exceeded"
    assert e.value.headers["Retry-After"] == "1" and e.value.body()["error"]["type"] == "rate_limit_error"
    a.leave(g1)
    a.leave(a.enter("acme", 10))
    a.leave(g2)
    assert a.enter("other", 10) is None  # a tenant without limits is not counted
    assert a.refused == ["tenant_concurrency"]


def test_tenant_request_and_token_rates_refuse_until_the_bucket_refills():
    clock = Clock()
    a, _ = admission([tenant(requests_per_minute=2)], clock=clock)
    a.leave(a.enter("acme", 100))
    a.leave(a.enter("acme", 100))
    with pytest.raises(APIError) as e:
        a.enter("acme", 100)
    assert e.value.headers["Retry-After"] == "30"  # one request back every 30 s
    clock.t += 30
    a.leave(a.enter("acme", 100))
    clock = Clock()
    b, _ = admission([tenant(tokens_per_minute=600)], clock=clock)
    b.leave(b.enter("acme", 500))
    with pytest.raises(APIError) as e:
        b.enter("acme", 200)  # 100 there, 200 asked, 10 a second
    assert e.value.headers["Retry-After"] == "10"
    clock.t += 10
    b.leave(b.enter("acme", 200))
    assert a.refused == ["tenant_requests"] and b.refused == ["tenant_tokens"]
    assert TenantGate.of(tenant(), 0.0) is None


def test_cache_aware_never_picks_a_full_worker_while_another_has_room():
    from router.policies import make_policy
    from router.prefix import RouteKeys

    a, pool = admission(max_queue=2)
    policy = make_policy(RouterSettings(max_queue_per_worker=2))
    keys = RouteKeys(key=b"k" * 16, session=None, prefix_tokens=8, tokenize_s=0.0, blocks=[1, 2],
                     block_tokens=[100, 200], prompt_tokens=200)
    first = policy.choose(keys, pool).worker
    pool.acquire(first)
    pool.acquire(first)
    assert policy.choose(keys, pool).worker != first  # its prefix is there, but it is full
    assert a.has_room()
    other = next(n for n in pool.active if n != first)
    pool.acquire(other)
    pool.acquire(other)
    assert not a.has_room()


def test_router_queue_waits_for_a_slot_in_order_and_refuses_past_its_wait():
    async def run():
        a, pool = admission(max_queue=1, wait_s=0.5, max_waiting=2)
        for n in pool.active:
            pool.acquire(n)
        w1 = asyncio.create_task(a.wait_for_room())
        w2 = asyncio.create_task(a.wait_for_room())
        await asyncio.sleep(0.01)
        assert a.waiting == 2
        with pytest.raises(APIError) as e:  # the queue is full: refused at once
            await a.wait_for_room()
        assert e.value.status == 429 and e.value.headers["x-prefixroute-refused"] == "queue_full"
        pool.release(pool.active[0])
        a.released()
        await asyncio.sleep(0.01)
        assert w1.done() and not w2.done()  # first come, first served
        pool.acquire(pool.active[0])  # w1's request takes the slot
        with pytest.raises(APIError):  # no slot within the wait
            await w2
        assert a.waiting == 0 and a.refused == ["queue_full", "queue_full"]

    asyncio.run(run())


async def two_waiters() -> tuple[Admission, WorkerPool, asyncio.Task, asyncio.Task]:
    """Every worker full (one slot each); `first`, then `second`, waiting in the router's queue."""
    a, pool = admission(max_queue=1, wait_s=5, max_waiting=8)
    for n in pool.active:
        pool.acquire(n)
    first = asyncio.create_task(a.wait_for_room())
    await asyncio.sleep(0.01)
    second = asyncio.create_task(a.wait_for_room())
    await asyncio.sleep(0.01)
    return a, pool, first, second


async def next_slot_goes_to_first(a: Admission, pool: WorkerPool, first: asyncio.Task, second: asyncio.Task) -> None:
    worker = pool.active[0]
    pool.release(worker)
    a.released(worker)
    await asyncio.sleep(0.01)
    assert first.done() and not second.done()
    second.cancel()


def test_a_request_refused_before_any_worker_does_not_send_the_first_waiter_to_the_back():
    """The router calls `released` as every request leaves, refused ones included. One that never reached a
    worker freed nothing: the first waiter must stay first, and take the next slot that frees. Before, it was
    woken, found no room and queued again behind the newer waiter, which then took that slot."""
    async def run():
        a, pool, first, second = await two_waiters()
        a.released(None)  # a request refused (429) before it reached any worker
        await asyncio.sleep(0.01)
        assert not first.done() and not second.done() and a.waiting == 2
        await next_slot_goes_to_first(a, pool, first, second)

    asyncio.run(run())


def test_a_woken_waiter_that_finds_its_slot_taken_stays_first():
    """A waiter woken without a reserved slot (one passed on by a request refused after its wake) can find it
    taken by a request that arrived before it resumed: it waits again at the head of the queue, not behind the
    waiters that came after it."""
    async def run():
        a, pool, first, second = await two_waiters()
        worker = pool.active[0]
        pool.release(worker)
        a.released(None)  # wakes `first`, with no slot reserved
        pool.acquire(worker)  # a request arriving before `first` resumes takes the slot
        await asyncio.sleep(0.01)
        assert not first.done() and a.waiting == 2
        await next_slot_goes_to_first(a, pool, first, second)

    asyncio.run(run())


def test_cache_aware_holds_for_a_full_worker_that_holds_the_prefix_only_when_asked():
    from router.policies import make_policy
    from router.prefix import RouteKeys

    _, pool = admission(max_queue=1)
    policy = make_policy(RouterSettings(max_queue_per_worker=1))
    doc = RouteKeys(key=b"k" * 16, session=None, prefix_tokens=8, tokenize_s=0.0, blocks=[1, 2, 3],
                    block_tokens=[1000, 2000, 3000], prompt_tokens=3000)
    home = policy.choose(doc, pool).worker
    pool.acquire(home)  # full now
    index_before = dict(policy.index.match(doc.blocks))
    group = (3).to_bytes(8, "little")  # the deepest block seen before: the request's group
    rate_before = policy.rates.rate(group)
    held = policy.choose(doc, pool, hold=True)
    assert held.hold and held.worker == home and held.reason == "hold"
    # a held decision counts nothing: not in the index, nor in its group's rate (its request is asked about
    # again when a slot frees, and counted once, when placed)
    assert policy.index.match(doc.blocks) == index_before
    assert policy.rates.rate(group) == rate_before
    moved = policy.choose(doc, pool)  # may not wait: the worker with room, which must compute the prefix
    assert not moved.hold and moved.worker != home
    assert policy.rates.rate(group) == rate_before + 60.0 / policy.rates.window_s
    other = next(n for n in pool.active if n != home)
    pool.acquire(other)
    pool.release(home)
    # a prompt cached nowhere gains nothing by waiting: the worker with room at once
    fresh = RouteKeys(key=b"f" * 16, session=None, prefix_tokens=8, tokenize_s=0.0, blocks=[9], block_tokens=[500],
                      prompt_tokens=500)
    d = policy.choose(fresh, pool, hold=True)
    assert not d.hold and d.worker == home


def test_a_held_request_gets_its_workers_next_slot_before_requests_waiting_for_any():
    async def run():
        clock_start = asyncio.get_running_loop().time
        a, pool = admission(max_queue=1, wait_s=0.5, max_waiting=4)
        a.clock = clock_start
        w0, w1 = pool.active
        pool.acquire(w0)
        pool.acquire(w1)
        deadline = a.clock() + 0.5
        held = asyncio.create_task(a.wait_for_worker(w0, deadline))
        anyone = asyncio.create_task(a.wait_for_room())
        await asyncio.sleep(0.01)
        assert a.waiting == 2
        pool.release(w0)
        a.released(w0)
        assert await held is True and not anyone.done()  # w0's slot went to the request held for it
        pool.acquire(w0)
        pool.release(w1)
        a.released(w1)  # nobody holds for w1: the next waiter for any worker
        assert await anyone == pytest.approx(deadline, abs=0.05)
        pool.acquire(w1)
        assert await a.wait_for_worker(w0, a.clock() + 0.05) is False  # no slot within the wait
        assert a.waiting == 0

    asyncio.run(run())


def test_a_woken_waiter_keeps_its_slot_until_it_resumes_and_hands_it_on_when_cancelled():
    """A woken task resumes a few loop turns after `released`: a request arriving in between must not take the
    slot (it did, live: held requests went to the back of their queue and then to a 429)."""
    async def run():
        a, pool = admission(max_queue=1, wait_s=0.5, max_waiting=4)
        a.clock = asyncio.get_running_loop().time
        w0, w1 = pool.active
        pool.acquire(w0)
        pool.acquire(w1)
        first = asyncio.create_task(a.wait_for_worker(w0, a.clock() + 0.5))
        second = asyncio.create_task(a.wait_for_worker(w0, a.clock() + 0.5))
        anyone = asyncio.create_task(a.wait_for_room())
        await asyncio.sleep(0.01)
        pool.release(w0)
        a.released(w0)
        # before `first` runs again: a newcomer sees no room on w0, nor anywhere
        assert not pool.admits(pool.workers[w0], 1) and not a.has_room()
        assert await first is True
        assert pool.workers[w0].reserved == 0 and pool.admits(pool.workers[w0], 1)
        pool.acquire(w0)  # first's request takes it
        pool.release(w0)
        a.released(w0)  # reserved for `second`, which is cancelled (its client left) before it resumes
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        # the slot went on to the next waiter (for any worker), not lost
        assert await anyone == pytest.approx(a.clock(), abs=0.6)
        assert pool.workers[w0].reserved == 0 and a.waiting == 0

    asyncio.run(run())


def test_the_token_bound_keeps_cold_prompts_off_a_queued_worker_but_lets_a_cache_hit_in():
    from router.policies import make_policy
    from router.prefix import RouteKeys

    a, pool = admission()
    pool.max_prefill = 10_000
    a.max_tokens = 10_000
    policy = make_policy(RouterSettings(max_queued_tokens_per_worker=10_000))
    doc = RouteKeys(key=b"d" * 16, session=None, prefix_tokens=8, tokenize_s=0.0, blocks=[1, 2],
                    block_tokens=[4000, 8000], prompt_tokens=8000)
    home = policy.choose(doc, pool).worker
    other = next(n for n in pool.active if n != home)
    pool.acquire(home, prefill=9_000)
    assert not pool.admits(pool.worker(home), 8000) and pool.admits(pool.worker(home), 500)
    assert pool.admits(pool.worker(other), 50_000)  # an idle worker takes anything
    hit = RouteKeys(key=b"d" * 16, session=None, prefix_tokens=8, tokenize_s=0.0, blocks=[1, 2, 3],
                    block_tokens=[4000, 8000, 8200], prompt_tokens=8200)
    assert policy.choose(hit, pool).worker == home  # 200 new tokens fit beside the 9,000 queued
    cold = RouteKeys(key=b"c" * 16, session=None, prefix_tokens=8, tokenize_s=0.0, blocks=[7], block_tokens=[6000],
                     prompt_tokens=6000)
    pool.acquire(other, prefill=5_000)
    assert policy.choose(cold, pool).worker == other  # 6,000 would pass the bound on home, not on other
    assert a.has_room() and a.enabled
    pool.acquire(other, prefill=5_000)
    assert a.has_room()  # home has 9,000 of 10,000 queued: room for a short prompt
    pool.acquire(home, prefill=1_000)
    assert not a.has_room()


@pytest.mark.parametrize("bound", ["requests", "tokens"])
def test_a_held_request_is_refused_rather_than_recomputed_elsewhere_once_the_fleet_is_half_full(bound):
    pool = WorkerPool()
    for i in range(4):
        pool.mark_ok(pool.add(f"http://w{i}:1").name)
    s = (RouterSettings(max_queue_per_worker=4) if bound == "requests"
         else RouterSettings(max_queued_tokens_per_worker=1000))
    a = Admission.from_settings(s, pool, lambda reason: None)
    w0, w1, w2, w3 = pool.active

    def fill(name: str, n: int) -> None:  # n of 4 slots, or n x 250 of 1,000 prefill tokens
        for _ in range(n):
            pool.acquire(name, prefill=250 if bound == "tokens" else 0)

    fill(w0, 4)  # the held request's worker: full
    fill(w1, 3)  # 7 of 16 in use: under half
    elsewhere = {"prefill": 900}
    assert not a.saturated()
    assert not a.refuses_after_hold(100, lambda: elsewhere["prefill"])  # room to spare: placed elsewhere
    fill(w2, 1)  # 8 of 16: half full
    assert a.saturated()
    assert a.refuses_after_hold(100, lambda: elsewhere["prefill"])  # elsewhere would recompute 800 more tokens
    elsewhere["prefill"] = 100
    assert not a.refuses_after_hold(100, lambda: elsewhere["prefill"])  # it costs no more there: placed there
    fill(w1, 1)
    fill(w2, 3)
    fill(w3, 4)
    assert not a.has_room() and a.refuses_after_hold(100, lambda: elsewhere["prefill"])  # no room anywhere


def test_a_request_that_outlives_its_workers_removal_takes_nothing_back_from_its_return():
    """Request A runs on U; U is removed and comes back (admin remove and add, or an expired and renewed heartbeat)
    as a new worker, where request B starts. A's end must not count against B's worker: while B runs it is in
    flight there, and after both end nothing is left queued there (proxy.forward passes the worker it charged)."""
    pool = WorkerPool()
    u = "http://127.0.0.1:9001"
    pool.add(u)
    pool.mark_ok(u)
    a = pool.acquire(u, prefill=300, context=300)
    pool.remove(u)
    pool.add(u)
    pool.mark_ok(u)
    b = pool.acquire(u, prefill=1000, context=1000)
    assert a is not b
    pool.prefilled(u, 300, a)
    pool.release(u, 0, 300, a)
    w = pool.workers[u]
    assert (w.inflight, w.prefill, w.context) == (1, 1000, 1000)
    pool.prefilled(u, 1000, b)
    pool.release(u, 0, 1000, b)
    assert (w.inflight, w.prefill, w.context, pool.total_inflight) == (0, 0, 0, 0)
