"""Hit stats to a real Redis: batched deltas, bounded memory, and no count lost while Redis is away."""

from __future__ import annotations

import asyncio
import json

from harness.procs import start_redis, stop_process
from protocol.redis import redis_client
from protocol.statskeys import Keys, label
from worker.stats import OTHER, StatsPublisher

INFO = {"url": "http://127.0.0.1:9", "model": "m", "block_size": 16, "capacity_tokens": 1000}


def gauges():
    return {"evictions": 3, "cache_bytes": 100, "cache_capacity_bytes": 1000, "running": 1, "waiting": 2}


def publisher(url: str, **kw) -> StatsPublisher:
    return StatsPublisher(redis_client(url, timeout_s=0.5), Keys("t"), "w1", INFO, gauges, timeout_s=1.0, **kw)


async def test_deltas_gauges_heartbeat_and_accuracy_reach_redis(redis_url):
    p = publisher(redis_url)
    p.record(100, 64, 5, tenant="acme", version="v1", key="abc", expected=64)
    p.record(50, 0, 5, tenant="acme", version="v2", key="abc", expected=32)  # expected a hit that missed
    p.record(10, 0, 1)
    assert await p.flush()
    r, k = p.client, Keys("t")
    w = await r.hgetall(k.worker("w1"))
    assert (int(w["requests"]), int(w["prompt_tokens"]), int(w["cached_tokens"]), int(w["generated_tokens"])) \
        == (3, 160, 64, 11)
    assert int(w["running"]) == 1 and int(w["cache_capacity_bytes"]) == 1000 and w["url"] == INFO["url"]
    assert await r.hgetall(k.cluster) == {"requests": "3", "prompt_tokens": "160", "cached_tokens": "64",
                                          "generated_tokens": "11"}
    t = await r.hgetall(k.tenant("acme"))
    assert (t["requests"], t["expected"], t["expected_hit"]) == ("2", "2", "1")
    assert await r.smembers(k.versions) == {"v1", "v2"}
    assert (await r.hgetall(k.version("v1")))["cached_tokens"] == "64"
    assert await r.zscore(k.keys, "abc") == 2 and (await r.hgetall(k.key("abc")))["w:w1"] == "2"
    hb = json.loads(await r.get(k.heartbeat("w1")))
    assert hb["capacity_tokens"] == 1000 and 0 < await r.pttl(k.heartbeat("w1")) <= 10_000
    assert p.pending.empty()
    assert await p.flush() and (await r.hgetall(k.worker("w1")))["requests"] == "3"  # nothing counted twice
    await p.close()
    assert await r.get(k.heartbeat("w1")) is None  # a stopped worker leaves discovery at once
    await r.aclose()


async def test_counts_made_while_redis_is_down_arrive_when_it_is_back():
    url, proc = start_redis()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    p = publisher(url)
    try:
        p.record(10, 5, 1, tenant="a", key="k1")
        assert await p.flush()
        stop_process(proc)
        for i in range(20):
            p.record(10, 5, 1, tenant="a", key=f"k{i % 3}")
            assert not await p.flush()  # fails fast, keeps the deltas
        # the first failed batch is kept as it was tried (it may yet turn out applied), the rest pending
        assert p.up is False and p.unsure.worker["requests"] == 1 and p.pending.worker["requests"] == 19
        url, proc = start_redis(port)
        assert await p.flush() and p.up
        w = await p.client.hgetall(Keys("t").worker("w1"))
        # Redis restarted empty (no persistence): it holds exactly what was counted while it was away
        assert w["requests"] == "20" and w["prompt_tokens"] == "200" and w["cached_tokens"] == "100"
        assert await p.client.zscore(Keys("t").keys, "k0") == 7
    finally:
        stop_process(proc)
        await p.client.aclose()


async def test_memory_is_bounded_while_redis_is_away():
    p = StatsPublisher(redis_client("redis://127.0.0.1:1/0", timeout_s=0.2), Keys("t"), "w1", INFO, gauges,
                       max_keys=10, max_labels=4, timeout_s=0.5)
    for i in range(1000):
        p.record(1, 0, 1, tenant=f"t{i}", version=f"v{i}", key=f"k{i}")
        if i % 100 == 0:
            assert not await p.flush()
    assert len(p.pending.keys) == 10 and len(p.pending.tenants) == 5 and len(p.pending.versions) == 5
    assert p.pending.tenants[OTHER]["requests"] == 995 and p.pending.worker["requests"] == 999
    assert p.unsure.worker["requests"] == 1 and len(p.unsure.keys) == 1  # the one batch tried: request 0
    await p.client.aclose()


async def test_only_the_hottest_keys_are_kept(redis_url, monkeypatch):
    import worker.stats as ws

    monkeypatch.setattr(ws, "TOP_KEYS", 5)
    p = publisher(redis_url)
    for i in range(20):
        for _ in range(i + 1):
            p.record(1, 0, 1, key=f"k{i}")
    assert await p.flush()
    assert await p.client.zrange(Keys("t").keys, 0, -1) == [f"k{i}" for i in range(15, 20)]
    # the dropped keys' hashes go with them: Redis holds TOP_KEYS hashes, not one per key ever seen
    hashes = sorted([k async for k in p.client.scan_iter(match=Keys("t").key("*"))])
    assert hashes == sorted(Keys("t").key(f"k{i}") for i in range(15, 20))
    await p.client.aclose()


def test_a_label_is_the_whole_value_or_nothing():
    """Labels become Redis keys, metric labels and upstream headers: a trailing newline ("$" matches before it)
    or any other character outside the set makes the value no label."""
    assert label("v1") == "v1" and label("acme.prod:2") == "acme.prod:2"
    assert label("v1\n") is None and label("v 1") is None and label("") is None and label("x" * 65) is None


async def test_a_write_applied_after_its_reply_timed_out_is_not_counted_again():
    """Redis stalls past the publisher's timeout with the MULTI/EXEC already received: it applies the write after
    the publisher gave up on it. The retry finds the batch's number applied and drops it; later counts still
    arrive. (DEBUG SLEEP stands for a slow fork, an AOF fsync or a network stall.)"""
    url, proc = start_redis(extra=("--enable-debug-command", "yes"))
    staller = redis_client(url, timeout_s=5.0)
    p = StatsPublisher(redis_client(url, timeout_s=5.0), Keys("t"), "w1", INFO, gauges, timeout_s=0.3)
    try:
        await p.client.ping()
        for _ in range(10):
            p.record(100, 50, 5, tenant="a")
        stall = asyncio.create_task(staller.execute_command("DEBUG", "SLEEP", "1.0"))
        await asyncio.sleep(0.1)
        assert not await p.flush()  # timed out; Redis applies it when the sleep ends
        await stall
        p.record(100, 50, 5, tenant="a")
        assert await p.flush()
        w = await p.client.hgetall(Keys("t").worker("w1"))
        assert w["requests"] == "11" and (await p.client.hgetall(Keys("t").tenant("a")))["requests"] == "11"
        assert await p.flush() and (await p.client.hgetall(Keys("t").worker("w1")))["requests"] == "11"
    finally:
        await staller.aclose()
        await p.client.aclose()
        stop_process(proc)
