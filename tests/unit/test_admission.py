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
