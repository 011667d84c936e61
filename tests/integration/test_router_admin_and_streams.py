"""The real router process: no retry once bytes of an answer went out (in front of fake upstreams that break
mid-stream), and the admin API's drain, remove and weights over HTTP (in front of real sim workers)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from aiohttp import web

from harness.procs import start_router, start_sim_workers, stop_process

MODEL = "SmolLM2-135M-Instruct"


class BreaksMidStream:
    """A fake worker on 127.0.0.1 (aiohttp, in its own thread and event loop) that answers health and model
    probes, and answers every completion request with a 200 SSE stream of a few chunks and then drops the
    connection, the chunked body unfinished. A fake because a real worker cannot be made to fail mid-stream on
    cue; what it sends is what a worker sends until it dies."""

    def __init__(self) -> None:
        self.posts = 0  # completion requests received (probes not counted); read after the loop has run them
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)

    async def _start(self) -> str:
        app = web.Application()
        app.router.add_get("/health", lambda r: web.json_response({"status": "ok", "running": 0, "waiting": 0}))
        app.router.add_get("/v1/models", lambda r: web.json_response(
            {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "fake"}]}))
        app.router.add_post("/v1/chat/completions", self._break_mid_stream)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    async def _break_mid_stream(self, request: web.Request) -> web.StreamResponse:
        self.posts += 1
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for word in ("Hello", " there"):
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                     "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        request.transport.close()  # flushes what was written, never the chunked terminator: the body is cut
        return resp

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


def test_a_stream_broken_after_bytes_went_out_is_not_retried():
    # Both upstreams break the same way, so whichever the key picks, a retry would reach the other one and be
    # counted there: the total number of completion requests is exactly the number of client requests.
    fakes = [BreaksMidStream(), BreaksMidStream()]
    url, proc = start_router([f.url for f in fakes])
    try:
        for i in range(3):
            body = {"messages": [{"role": "user", "content": f"Say hello, number {i}."}], "max_tokens": 8,
                    "stream": True}
            lines = []
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as resp:
                assert resp.status_code == 200
                served = resp.headers["x-prefixroute-worker"]
                lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            events = [json.loads(line[6:]) for line in lines[:-1]]
            text = "".join(e["choices"][0]["delta"]["content"] for e in events if e.get("choices"))
            assert text == "Hello there"  # what the worker sent before it broke was passed through...
            assert events[-1]["error"]["code"] == "upstream_error"  # ...then an error event the client can see
            assert sum(f.posts for f in fakes) == i + 1  # ...and nothing was sent to another worker
            assert [f.posts for f in fakes if f.url == served][0] >= 1
    finally:
        stop_process(proc)
        for f in fakes:
            f.stop()


class HoldsAfterDone(BreaksMidStream):
    """Another engine (no prefixroute /health, no metrics: the router counts its usage itself) whose stream sends
    its usage event and [DONE], then keeps the connection open for 30 s before its end of stream, as a worker
    busy elsewhere may. A fake because no real engine can be made to delay its end of stream on cue."""

    async def _start(self) -> str:
        app = web.Application()
        app.router.add_get("/health", lambda r: web.Response(status=200))
        app.router.add_get("/v1/models", lambda r: web.json_response(
            {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "fake"}]}))
        app.router.add_post("/v1/chat/completions", self._hold_after_done)
        self.runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def _hold_after_done(self, request: web.Request) -> web.StreamResponse:
        self.posts += 1
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": MODEL}
        await resp.write(b"data: " + json.dumps({**base, "choices": [
            {"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]}).encode() + b"\n\n")
        await resp.write(b"data: " + json.dumps({**base, "choices": [], "usage": {
            "prompt_tokens": 77, "completion_tokens": 1, "total_tokens": 78,
            "prompt_tokens_details": {"cached_tokens": 64}}}).encode() + b"\n\ndata: [DONE]\n\n")
        await asyncio.sleep(30)
        return resp


def test_a_streams_usage_counts_when_the_client_leaves_on_done_before_the_end_of_stream():
    fake = HoldsAfterDone()
    url, proc = start_router([fake.url])
    try:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line == "data: [DONE]":
                    break  # the client is done and closes, as the openai SDK does
        metric = 'prefixroute_worker_tenant_prompt_tokens_total{prefix_version="none",tenant="open"}'  # no tenants
        deadline, counted = time.monotonic() + 5, None
        while counted is None and time.monotonic() < deadline:
            for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
                if line.startswith(metric):
                    counted = float(line.split()[-1])
            time.sleep(0.2)
        assert counted == 77  # counted once, seconds before the worker's stream would have ended
    finally:
        stop_process(proc)
        fake.stop()


ADMIN = {"Authorization": "Bearer adm"}


def chat(question: str) -> dict:
    # the question opens the prompt: prompts share nothing, so each is placed by its own key (a shared system
    # prompt would make them one group, placed together)
    return {"messages": [{"role": "system", "content": f"{question} You sort letters into boxes. " + "Rules. " * 20},
                         {"role": "user", "content": question}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def sims():
    urls, proc = start_sim_workers(3, "--sim-speedup", "20")
    yield urls
    stop_process(proc)


def test_a_prefix_version_that_is_no_label_is_ignored(sims):
    """metadata.prefix_version goes upstream as a header: one ending in a newline was taken for a label and the
    header refused (a 500); it is ignored, as any value that is no label."""
    url, proc = start_router(sims)
    try:
        for version in ("v1", "v1\n", "v1\r\nx-injected: 1"):
            body = {**chat("Which box?"), "metadata": {"prefix_version": version}}
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200, (version, r.text)
    finally:
        stop_process(proc)


def test_admin_drain_and_remove_over_http(sims, route_of):
    a, b, c = sims
    url, proc = start_router(sims, "--admin-key", "adm")
    try:
        def served(body: dict) -> str:
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return r.headers["x-prefixroute-worker"]

        def listing() -> dict[str, dict]:
            r = httpx.get(url + "/admin/workers", headers=ADMIN, timeout=10)
            assert r.status_code == 200
            return {w["url"]: w for w in r.json()["workers"]}

        # Two prompts homed on each worker, picked with the router's own keyer and ring (ports are random).
        picked: dict[str, list[dict]] = {a: [], b: [], c: []}
        for i in range(300):
            body = chat(f"Which box takes letter {i}?")
            home = route_of(body, {a: 1, b: 1, c: 1})
            if len(picked[home]) < 2:
                picked[home].append(body)
            if all(len(v) == 2 for v in picked.values()):
                break
        assert all(len(v) == 2 for v in picked.values()), {k: len(v) for k, v in picked.items()}
        bodies = [body for v in picked.values() for body in v]
        for home, group in picked.items():
            assert [served(body) for body in group] == [home, home]  # the router agrees with the computation
        assert all(w["healthy"] and not w["draining"] for w in listing().values())

        # Drain a: it stays listed but gets no new request, neither its sessions nor its keys' new ones.
        r = httpx.post(url + "/admin/workers/drain", json={"url": a}, headers=ADMIN, timeout=10)
        assert r.status_code == 200
        assert listing()[a]["draining"] is True and set(listing()) == {a, b, c}
        routes = [served(body) for body in bodies] + [served(chat(f"New question {i}?")) for i in range(6)]
        assert a not in routes
        assert [served(body) for body in picked[b] + picked[c]] == [b, b, c, c]  # the other keys did not move

        # Remove b: it leaves the listing; everything goes to c, the only worker left on the ring.
        r = httpx.request("DELETE", url + "/admin/workers", json={"url": b}, headers=ADMIN, timeout=10)
        assert r.status_code == 200 and b not in {w["url"] for w in r.json()["workers"]}
        assert set(listing()) == {a, c}
        assert {served(body) for body in bodies} == {c}
        for path, method in (("/admin/workers", "DELETE"), ("/admin/workers/drain", "POST")):
            r = httpx.request(method, url + path, json={"url": b}, headers=ADMIN, timeout=10)
            assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_worker"

        # Add b back with weight 3: the listing says so, and new keys follow the weighted ring. The prompts
        # checked are those the weight moves (their home differs between weights 3:1 and 1:1).
        r = httpx.post(url + "/admin/workers", json={"url": b, "weight": 3}, headers=ADMIN, timeout=30)
        assert r.status_code == 201 and listing()[b]["weight"] == 3 and listing()[b]["healthy"] is True
        moved = []
        for i in range(300):
            body = chat(f"Where does parcel {i} go?")
            weighted = route_of(body, {b: 3, c: 1})
            if weighted != route_of(body, {b: 1, c: 1}):
                moved.append((body, weighted))
            if len(moved) == 3:
                break
        assert len(moved) == 3 and all(w == b for _, w in moved)
        assert [served(body) for body, _ in moved] == [b, b, b]
    finally:
        stop_process(proc)


def test_admin_route_tells_the_decision_without_making_it(sims):
    url, proc = start_router(sims, "--admin-key", "adm", "--spill-rpm", "5")
    try:
        body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "system", "content": "Route me. " * 40},
                                                              {"role": "user", "content": "hi"}]}
        ask = lambda: httpx.post(url + "/admin/route", json=body, headers={"x-admin-key": "adm"}, timeout=10)  # noqa
        assert httpx.post(url + "/admin/route", json=body, timeout=10).status_code == 401  # admin key required
        assert httpx.post(url + "/admin/route", json={"messages": 3}, headers={"x-admin-key": "adm"},
                          timeout=10).status_code == 400
        first = ask().json()
        assert set(first) >= {"key", "session", "worker", "reason", "fanout", "candidates"}
        assert first["worker"] in sims and first["worker"] in first["candidates"] and first["fanout"] == 1
        for _ in range(20):  # far past 5 requests/minute, had they counted: no spill, the same answer
            again = ask().json()
            assert again["worker"] == first["worker"] and again["fanout"] == 1
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.headers["x-prefixroute-worker"] == first["worker"]
        assert r.headers["x-prefixroute-key"] == first["key"]
        with_session = httpx.post(url + "/admin/route", json={**body, "prompt_cache_key": "conv-1"},
                                  headers={"x-admin-key": "adm"}, timeout=10).json()
        assert with_session["session"] is not None and with_session["key"] != first["key"]
    finally:
        stop_process(proc)
