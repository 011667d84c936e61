"""Other engines' metrics (protocol.engines), the sidecar that publishes them to a real Redis (worker.sidecar), and
the load a probe reads from them (router.workers). The engine here is a real aiohttp server on 127.0.0.1 serving
metrics text: vLLM's as a real vLLM 0.32 CPU server printed it (tests/fixtures), SGLang's and llama.cpp's as
their documentation shows them (neither runs on this machine). The real vLLM is in
tests/integration/test_vllm_engines.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from protocol.engines import LLAMACPP, OPENAI, PREFIXROUTE, SGLANG, VLLM, deltas, detect, parse
from protocol.redis import redis_client
from protocol.statskeys import Keys
from router.stats import read_stats
from router.workers import WorkerPool
from worker.settings import SidecarSettings
from worker.sidecar import Sidecar

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
VLLM_TEXT = (FIXTURES / "vllm_metrics.txt").read_text()

SGLANG_TEXT = """\
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="m",tp_rank="0"} 8.128902e+06
sglang:prompt_tokens_total{model_name="m",tp_rank="1"} 1000
sglang:generation_tokens_total{model_name="m"} 7.557572e+06
sglang:cached_tokens_total{model_name="m",cache_source="device"} 4000000
sglang:num_requests_total{model_name="m"} 9000
sglang:num_running_reqs{model_name="m"} 12.0
sglang:num_queue_reqs{model_name="m"} 3.0
sglang:token_usage{model_name="m",tp_rank="0"} 0.2
sglang:token_usage{model_name="m",tp_rank="1"} 0.4
sglang:cache_hit_rate{model_name="m"} 0.0075
"""

LLAMACPP_TEXT = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 6886
llamacpp:tokens_predicted_total 3469
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
llamacpp:requests_deferred 5
"""


def test_each_engine_is_detected_and_read():
    assert detect(VLLM_TEXT) == VLLM and detect(SGLANG_TEXT) == SGLANG and detect(LLAMACPP_TEXT) == LLAMACPP
    assert detect("# nothing\nprocess_cpu_seconds_total 3\n") is None and parse("up 1\n") is None
    # the fixture: two chat requests sharing a 352-token system prompt (11 blocks of 32), 8 tokens each
    v = parse(VLLM_TEXT)
    assert (v.kind, v.block_size, v.capacity_tokens) == (VLLM, 32, 1456 * 32)
    assert v.counters == {"requests": 2, "prompt_tokens": 761, "cached_tokens": 352, "cache_queries": 761,
                          "generated_tokens": 16}  # by_reason and *_created series are not counted
    assert (v.running, v.waiting, v.kv_usage) == (0, 0, 0.0)
    assert v.histograms["ttft"].count == 2 and v.histograms["ttft"].buckets[float("inf")] == 2
    assert v.histograms["itl"].count == 14  # 7 gaps between 8 tokens, twice
    s = parse(SGLANG_TEXT)
    # summed over ranks (counters, queue) and averaged (KV usage); the hit-rate gauge is not a counter
    assert s.counters == {"prompt_tokens": 8_129_902, "generated_tokens": 7_557_572, "cached_tokens": 4_000_000,
                          "requests": 9000}
    assert (s.running, s.waiting) == (12, 3) and s.kv_usage == pytest.approx(0.3)
    lc = parse(LLAMACPP_TEXT)
    # llama.cpp's prompt counter leaves out reused tokens: no hit stats from it, only load
    assert lc.counters == {"generated_tokens": 3469} and (lc.running, lc.waiting) == (2, 5)


def test_deltas_survive_an_engine_restart():
    assert deltas(None, {"requests": 5}) == {"requests": 5}
    assert deltas({"requests": 5, "cached_tokens": 10}, {"requests": 7, "cached_tokens": 10}) == \
        {"requests": 2, "cached_tokens": 0}
    assert deltas({"requests": 50}, {"requests": 3}) == {"requests": 3}  # went down: restarted, all of it is new


class Engine:
    """A real HTTP server with an engine's /metrics and /v1/models; `text` may change between scrapes."""

    def __init__(self, text: str, model: str = "smol"):
        self.text, self.model = text, model
        self.models: object = None  # /v1/models' body when set, instead of the model's listing

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/metrics", lambda r: web.Response(text=self.text))
        app.router.add_get("/v1/models", lambda r: web.json_response(
            self.models if self.models is not None else {"data": [{"id": self.model}]}))
        app.router.add_get("/health", lambda r: web.Response(status=200))
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        await self.runner.cleanup()


def _sglang(prompt: int, cached: int, requests: int) -> str:
    return (f'sglang:prompt_tokens_total{{model_name="m"}} {prompt}\n'
            f'sglang:cached_tokens_total{{model_name="m"}} {cached}\n'
            f'sglang:num_requests_total{{model_name="m"}} {requests}\n'
            'sglang:num_running_reqs{model_name="m"} 1\nsglang:num_queue_reqs{model_name="m"} 0\n')


async def test_sidecar_counts_exactly_once_through_restarts_and_a_second_sidecar(redis_url):
    engine = Engine(_sglang(1000, 400, 10))
    url = await engine.start()
    client = redis_client(redis_url, timeout_s=1.0)
    settings = SidecarSettings(engine_url=url, redis_url=redis_url, stats_namespace="t", port=0)
    k = Keys("t")
    try:
        async with aiohttp.ClientSession() as http:
            a = Sidecar(settings, client)
            assert await a.scrape(http) and a.kind == SGLANG and a.model == "smol"
            assert await a.publish() == {"requests": 10, "prompt_tokens": 1000, "cached_tokens": 400}
            assert await a.publish() == {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0}  # nothing new
            b = Sidecar(settings, client)  # a restarted (or second) sidecar goes on from the stored totals
            engine.text = _sglang(1500, 700, 15)
            assert await b.scrape(http) and await b.publish() == {"requests": 5, "prompt_tokens": 500,
                                                                   "cached_tokens": 300}
            assert await a.scrape(http) and await a.publish() == {"requests": 0, "prompt_tokens": 0,
                                                                   "cached_tokens": 0}
            engine.text = _sglang(200, 50, 2)  # the engine restarted: its counters start again
            assert await a.scrape(http) and await a.publish() == {"requests": 2, "prompt_tokens": 200,
                                                                   "cached_tokens": 50}
            w = await client.hgetall(k.worker(settings.name))
            assert (w["requests"], w["prompt_tokens"], w["cached_tokens"]) == ("17", "1700", "750")
            assert w["engine"] == SGLANG and w["url"] == url and w["running"] == "1"
            assert (await client.hgetall(k.cluster))["cached_tokens"] == "750"
            stats = await read_stats(client, k)
            (row,) = stats["workers"]
            assert row["engine"] == SGLANG and row["hit_ratio"] == pytest.approx(750 / 1700)
            assert await client.get(k.heartbeat(settings.name)) is not None
            await a.close()
            assert await client.get(k.heartbeat(settings.name)) is None
            # the sidecar's own /metrics speak prefixroute's worker names, with the engine's totals
            body = (await a.prometheus(None)).body.decode()
            assert 'prefixroute_worker_cached_tokens_total 50.0' in body
            assert 'prefixroute_worker_requests_total{endpoint="engine",status="200"} 2.0' in body
    finally:
        await client.aclose()
        await engine.stop()


async def test_sidecar_keeps_its_counts_while_redis_is_away(redis_url):
    engine = Engine(_sglang(100, 10, 1))
    url = await engine.start()
    dead = redis_client("redis://127.0.0.1:9/0", timeout_s=0.3)
    live = redis_client(redis_url, timeout_s=1.0)
    settings = SidecarSettings(engine_url=url, redis_url=redis_url, stats_namespace="t", port=0)
    try:
        async with aiohttp.ClientSession() as http:
            s = Sidecar(settings, dead)
            assert await s.scrape(http) and await s.publish() is None and s.write_failures == 1
            engine.text = _sglang(300, 60, 3)
            s.redis = live  # Redis is back: the first write that succeeds carries everything since
            assert await s.scrape(http) and await s.publish() == {"requests": 3, "prompt_tokens": 300,
                                                                   "cached_tokens": 60}
    finally:
        await dead.aclose()
        await live.aclose()
        await engine.stop()


async def test_the_sidecar_reads_on_past_answers_it_cannot_read():
    """An engine that answers what the sidecar cannot read (a +Inf sample, a list for /v1/models) is down for that
    scrape, or has no model name yet; the sidecar's one loop goes on and reads it again once it can."""
    good = _sglang(100, 10, 1)
    engine = Engine(good.replace('num_running_reqs{model_name="m"} 1', 'num_running_reqs{model_name="m"} +Inf'))
    engine.models = ["smol"]
    url = await engine.start()
    s = Sidecar(SidecarSettings(engine_url=url, port=0, stats_interval_s=0.05))
    try:
        async with aiohttp.ClientSession() as http:
            task = asyncio.create_task(s.run(http))
            await asyncio.sleep(0.3)
            assert not s.up and not task.done()
            engine.text = good
            await asyncio.sleep(0.3)
            assert s.up and s.model is None and not task.done()
            engine.models = None
            await asyncio.sleep(0.3)
            assert s.model == "smol" and not task.done()
            task.cancel()
    finally:
        await engine.stop()


async def test_probe_reads_engine_load_beyond_the_routers_own_requests():
    vllm = Engine(VLLM_TEXT.replace("vllm:num_requests_waiting{", "vllm:num_requests_waiting_x{")
                  + 'vllm:num_requests_waiting{engine="0",model_name="m"} 4.0\n')
    plain = Engine("process_cpu_seconds_total 1\n")
    urls = [await vllm.start(), await plain.start()]
    pool = WorkerPool(vnodes=8)
    sizes = {}
    pool.on_cache_size.append(lambda name, tokens: sizes.setdefault(name, tokens))
    try:
        for u in urls:
            pool.add(u)
        pool.mean_prompt = 100.0
        async with aiohttp.ClientSession() as http:
            await pool.probe_all(http, 2.0)
            w, p = pool.workers[urls[0]], pool.workers[urls[1]]
            assert w.healthy and w.engine == VLLM and p.healthy and p.engine == OPENAI
            running = parse(VLLM_TEXT).running
            assert w.reported == (running, 4)
            assert w.external_prefill == pytest.approx(400.0)  # 4 waiting, none of them this router's
            assert sizes[urls[0]] == parse(VLLM_TEXT).capacity_tokens  # the index is sized by vLLM's KV blocks
            pool.acquire(urls[0], prefill=50, context=50)  # this router now has one request there
            await pool.probe_all(http, 2.0)
            assert w.external_prefill == pytest.approx(min(4, running + 4 - 1) * pool.mean_prompt)
            assert p.reported is None and p.work(0.01) == 0.0
            pool.engine_load = False
            pool.add(urls[0], engine=PREFIXROUTE)  # configured: a prefixroute worker's /metrics is never read
            assert w.engine == PREFIXROUTE
    finally:
        for e in (vllm, plain):
            await e.stop()


async def test_stats_read_past_fields_that_hold_no_number(redis_url):
    """Another version's or a damaged write: that field reads 0, the rest as stored, and /admin/stats answers."""
    client = redis_client(redis_url, timeout_s=1.0)
    k = Keys("t")
    try:
        await client.sadd(k.workers, "w1")
        await client.hset(k.worker("w1"), mapping={"requests": "7", "prompt_tokens": "abc", "running": "None",
                                                   "kv_usage": "x", "cached_tokens": "1e400"})
        await client.zadd(k.keys, {"key1": 3})
        await client.hset(k.key("key1"), mapping={"requests": "3", "w:w1": "y"})
        stats = await read_stats(client, k)
        (row,) = stats["workers"]
        assert (row["requests"], row["prompt_tokens"], row["running"], row["kv_usage"]) == (7, 0, 0, 0.0)
        assert row["cached_tokens"] == 0 and stats["top_prefixes"][0]["workers"] == {"w1": 0}
    finally:
        await client.aclose()
