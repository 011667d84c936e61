"""A worker that answers 502 or 503 before streaming: the request fails over to another worker, the failures take
the worker off the ring, and a health probe brings it back once it answers again.

The failing worker is a small aiohttp app in this test, since a real worker cannot be made to answer 502/503 and
then recover on cue; the healthy worker is a real sim worker, the router the real one, served in this event loop
so that the test decides when its health probes run."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from aiohttp import web

from harness.procs import free_port, start_sim_workers, stop_process
from protocol.modelfiles import default_model_path, load_tokenizer
from router.app import Router
from router.settings import RouterSettings


@pytest.fixture(scope="module")
def sim_worker():
    urls, proc = start_sim_workers(1)
    yield urls[0]
    stop_process(proc)


class Flaky:
    """Answers `status` to completions and `health` to /health; counts the completions it is sent."""

    def __init__(self, model: str):
        self.model, self.status, self.health, self.hits = model, 200, 200, 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", lambda r: web.json_response({}, status=self.health))
        app.router.add_get("/v1/models", lambda r: web.json_response({"data": [{"id": self.model}]}))
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.status != 200:
            return web.json_response({"error": {"message": "down", "type": "x", "param": None, "code": None}},
                                     status=self.status)
        return web.json_response({
            "id": "c1", "object": "chat.completion", "created": 0, "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


async def serve(app: web.Application) -> tuple[str, web.AppRunner]:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return f"http://127.0.0.1:{port}", runner


@pytest.mark.parametrize("status", [502, 503])
async def test_a_worker_answering_5xx_fails_over_leaves_the_ring_and_rejoins_through_health_probes(
        sim_worker, status):
    model = httpx.get(sim_worker + "/v1/models").json()["data"][0]["id"]
    flaky = Flaky(model)
    flaky_url, flaky_runner = await serve(flaky.app())
    # round_robin: the flaky worker is asked on every other request while it is on the ring. No probe runs until
    # the test starts one, so only the 502/503 answers can take it off the ring.
    settings = RouterSettings(workers=[{"url": flaky_url}, {"url": sim_worker}], policy="round_robin",
                              fail_threshold=2, health_interval_s=3600)
    router = Router(settings, load_tokenizer(default_model_path()))
    url, runner = await serve(router.app())
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        assert flaky_url in router.pool.active
        flaky.status = flaky.health = status
        served = []
        for i in range(6):
            raw = await client.chat.completions.with_raw_response.create(
                model=model, max_tokens=2, messages=[{"role": "user", "content": f"question {i}"}])
            assert raw.parse().choices[0].message.content is not None
            served.append((raw.headers["x-prefixroute-worker"], raw.headers["x-prefixroute-route"]))
        assert all(w == sim_worker for w, _ in served)  # every request answered, by the healthy worker
        assert [r for _, r in served].count("failover") == 2 and flaky.hits == 2  # then it is off the ring
        assert flaky_url not in router.pool.active and not router.pool.workers[flaky_url].healthy
        async with httpx.AsyncClient() as h:
            text = (await h.get(url + "/metrics")).text
        assert f'prefixroute_router_worker_up{{worker="{flaky_url}"}} 0.0' in text
        assert f'kind="{status}",worker="{flaky_url}"' in text

        flaky.status = flaky.health = 200  # it recovers: the router's own health loop brings it back
        probes = asyncio.create_task(router.pool.health_loop(router.client, 0.05, 2.0))
        try:
            for _ in range(200):
                if flaky_url in router.pool.active:
                    break
                await asyncio.sleep(0.05)
            assert flaky_url in router.pool.active
        finally:
            probes.cancel()
        workers = set()
        for i in range(2):
            raw = await client.chat.completions.with_raw_response.create(
                model=model, max_tokens=2, messages=[{"role": "user", "content": f"again {i}"}])
            workers.add(raw.headers["x-prefixroute-worker"])
        assert workers == {flaky_url, sim_worker} and flaky.hits == 3
    finally:
        await client.close()
        await runner.cleanup()
        await flaky_runner.cleanup()
