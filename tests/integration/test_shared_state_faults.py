"""Router state sharing (router.shared) against a real Redis holding what it should not: damaged decision records,
heartbeats of the wrong shape, a Redis that restarted empty or is away. Sharing goes on with the rest."""

from __future__ import annotations

import asyncio
import json

import orjson
import pytest

from protocol.redis import redis_client
from protocol.statskeys import Keys
from router.policies.base import DecisionRecord
from router.policies.cache_aware import CacheAware
from router.rate import RateTable
from router.shared import SharedState
from router.workers import WorkerPool

pytestmark = pytest.mark.asyncio(loop_scope="function")

W1, W2, W3 = "http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003"


def state(client, workers=(W1, W2), discover: bool = False) -> SharedState:
    pool = WorkerPool()
    for w in workers:
        pool.add(w)
        pool.mark_ok(w)
    return SharedState(client, Keys("t"), CacheAware(rates=RateTable()), pool, discover=discover)


async def beat(client, wid: str, payload) -> None:
    await client.set(Keys("t").heartbeat(wid), payload if isinstance(payload, str) else json.dumps(payload), px=10_000)


async def test_damaged_records_are_skipped_and_the_rest_apply(redis_url):
    client = redis_client(redis_url)
    writer, reader = state(client), state(client)
    now = writer.policy.rates.clock()
    good = DecisionRecord(now, W1, b"g", [11, 12], [16, 32], None).to_json()
    damaged = [
        orjson.dumps([now, W1, "aa", [1, 2, 3], [16], None]),  # blocks without their token counts
        orjson.dumps(["nan", W1, "bb", [1], [16], None]),
        orjson.dumps([1e400, W1, "bb", [1], [16], None]),
        orjson.dumps([now, W1, "cc", [1e400], [16], None]),
        orjson.dumps([now, 5, "cc", [1], [16], None]),
        b"not json",
    ]
    later = DecisionRecord(now, W2, b"k", [21], [16], None).to_json()
    for data in (good, *damaged, later):
        await client.xadd(writer.stream, {"r": writer.id, "d": data})
    await reader.sync()
    assert reader.applied == 2 and reader.invalid == len(damaged)
    assert reader.policy.rates.rate(b"k") > 0 and reader.policy.index.match([21]) == {W2: 1}
    stream_end = (await client.xrevrange(reader.stream, count=1))[0][0]
    assert reader.last_id == stream_end
    await reader.sync()  # nothing applied twice
    assert reader.applied == 2 and reader.policy.rates.rate(b"g") == reader.policy.rates.rate(b"k")
    assert await reader.load() == 2  # a starting router skips them alike
    await client.aclose()


async def test_a_heartbeat_of_the_wrong_shape_does_not_stop_discovery(redis_url):
    client = redis_client(redis_url)
    s = state(client, workers=(), discover=True)
    for wid, payload in (("a", {"url": W1}), ("b", {"url": None}), ("c", {"url": 5}), ("d", [W2]),
                         ("e", "null"), ("f", "{broken")):
        await beat(client, wid, payload)
    await s.sync()
    assert set(s.pool.workers) == {W1}
    await beat(client, "g", {"url": W3})
    await client.delete(Keys("t").heartbeat("a"))
    await s.sync()
    assert set(s.pool.workers) == {W3}  # W1 left, W3 joined, beside the bad beats
    await client.aclose()


async def test_a_starting_router_applies_records_of_workers_it_discovers(redis_url):
    client = redis_client(redis_url)
    await beat(client, "a", {"url": W1})
    writer = state(client, workers=(W1,))
    now = writer.policy.rates.clock()
    for i in range(20):
        record = DecisionRecord(now, W1, b"g", [i], [16], None)
        await client.xadd(writer.stream, {"r": writer.id, "d": record.to_json()})
    fresh = state(client, workers=(), discover=True)  # only discovery names its workers
    assert await fresh.load() == 20 and fresh.policy.index.match([7]) == {W1: 1}
    await client.aclose()


async def test_a_redis_that_restarted_empty_keeps_the_discovered_workers_for_a_heartbeat_lifetime(redis_url):
    client = redis_client(redis_url)
    s = state(client, workers=(), discover=True)
    s.heartbeat_ttl_s = 0.5
    await beat(client, "a", {"url": W1})
    await beat(client, "b", {"url": W2})
    await s.sync()
    s.policy.index.insert(W1, [1, 2], [16, 32])
    await client.flushall()  # every heartbeat gone at once: Redis lost its data, the workers did not stop
    await s.sync()
    assert set(s.pool.workers) == {W1, W2} and s.policy.index.match([1, 2]) == {W1: 2}
    await beat(client, "a", {"url": W1})  # beats resume: nothing happened
    await s.sync()
    assert set(s.pool.workers) == {W1, W2}
    await client.delete(Keys("t").heartbeat("a"))  # one beat gone, others present: that worker left
    await client.flushall()
    await s.sync()
    await asyncio.sleep(0.6)  # none for longer than a heartbeat's lifetime: they are gone
    await s.sync()
    assert not s.pool.workers
    await client.aclose()


async def test_decisions_queued_while_redis_is_away_are_kept_in_order():
    client = redis_client("redis://127.0.0.1:9/0", timeout_s=0.2)  # nothing listens on the discard port
    s = state(client)
    s.pending = type(s.pending)(maxlen=5)
    now = s.policy.rates.clock()
    for i in range(3):
        s._queue(DecisionRecord(now, W1, b"g", [i], [16], None))
    with pytest.raises(Exception):
        await s.sync()
    for i in range(3, 7):
        s._queue(DecisionRecord(now, W1, b"g", [i], [16], None))
    assert [DecisionRecord.from_json(d).blocks[0] for _, d in s.pending] == [2, 3, 4, 5, 6]  # the newest five
    assert s.dropped == 2
    await client.aclose()


async def test_decisions_made_while_a_full_queue_is_being_sent_are_kept(redis_url):
    client, blocker = redis_client(redis_url), redis_client(redis_url)
    s = state(client)
    s.pending = type(s.pending)(maxlen=5)
    now = s.policy.rates.clock()
    for i in range(5):
        s._queue(DecisionRecord(now, W1, b"g", [i], [16], None))
    await blocker.execute_command("CLIENT", "PAUSE", "300", "WRITE")  # Redis answers writes late
    sending = asyncio.create_task(s.sync())
    await asyncio.sleep(0.05)
    for i in range(5, 8):  # decided while the batch is in flight
        s._queue(DecisionRecord(now, W1, b"g", [i], [16], None))
    await sending
    sent = [DecisionRecord.from_json(f["d"]).blocks[0] for _, f in await client.xrange(s.stream)]
    assert sent == [0, 1, 2, 3, 4] and [DecisionRecord.from_json(d).blocks[0] for _, d in s.pending] == [5, 6, 7]
    await s.sync()
    assert [DecisionRecord.from_json(f["d"]).blocks[0] for _, f in await client.xrange(s.stream)] == list(range(8))
    await client.aclose()
    await blocker.aclose()


async def test_a_batch_resent_after_its_reply_was_lost_is_applied_once(redis_url):
    """The send's reply is lost after Redis appended the batch (a timeout): the batch is sent again. Readers apply
    each decision once."""
    client = redis_client(redis_url)
    writer, reader = state(client), state(client)
    now = writer.policy.rates.clock()
    for i in range(4):
        writer._queue(DecisionRecord(now, W1, b"g", [i], [16], None))
    batch = list(writer.pending)
    await writer.sync()
    writer.pending.extend(batch)  # as a failed send leaves it: the same entries, the same numbers
    writer._queue(DecisionRecord(now, W1, b"g", [9], [16], None))
    await writer.sync()
    assert len(await client.xrange(writer.stream)) == 9
    await reader.sync()
    assert reader.applied == 5 and reader.policy.rates.rate(b"g") == 5
    fresh = state(client)
    assert await fresh.load() == 5
    await client.aclose()
