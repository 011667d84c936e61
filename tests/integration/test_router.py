"""The router in front of real SmolLM2 worker processes on 127.0.0.1: affinity vs round-robin, the openai SDK,
tenants and salts, failover when a worker dies, and OpenAI errors for bad input."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import uuid

import httpx
import openai
import pytest

from harness.procs import start_router, start_worker, stop_process

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def workers():
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        started = list(pool.map(lambda _: start_worker(), range(2)))
    yield [url for url, _ in started]
    for _, proc in started:
        stop_process(proc)


@pytest.fixture(scope="module")
def routers(workers):
    """One router per policy under test, all in front of the same two workers."""
    started = {p: start_router(workers, "--policy", p) for p in ("cache_aware", "round_robin")}
    yield {p: url for p, (url, _) in started.items()}
    for _, proc in started.values():
        stop_process(proc)


def system_prompt() -> str:
    nonce = uuid.uuid4().hex  # a prompt no earlier test has cached
    return f"[{nonce}] You answer questions about a library. " + " ".join(
        f"Shelf {i} holds books on topic {i * 3 % 17}." for i in range(50))


def chat_body(system: str, question: str, **extra) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": 4, "temperature": 0, **extra}


def ask(url: str, system: str, question: str, headers: dict | None = None, **extra) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=chat_body(system, question, **extra), timeout=120,
                      headers=headers)


def run_policy(url: str) -> tuple[list[str], list[int]]:
    system = system_prompt()
    out = [ask(url, system, f"Where are books on topic {i}?") for i in range(6)]
    assert all(r.status_code == 200 for r in out)
    return ([r.headers["x-prefixroute-worker"] for r in out],
            [r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] for r in out])


def test_shared_prefix_sticks_to_one_worker_and_hits(routers, workers):
    served, cached = run_policy(routers["cache_aware"])
    assert len(set(served)) == 1 and cached[0] == 0 and all(c > 400 for c in cached[1:])
    rr_served, rr_cached = run_policy(routers["round_robin"])
    assert set(rr_served) == set(workers)  # round robin scatters the prefix over both workers...
    assert rr_cached[0] == rr_cached[1] == 0  # ...so each prefills it once more
    assert sum(cached) > sum(rr_cached)


def test_route_headers(routers):
    system = system_prompt()
    r = ask(routers["cache_aware"], system, "hi")
    # cached nowhere: its ring home, or the worker sent the fewest requests lately when loads tie
    assert r.headers["x-prefixroute-route"] in ("affinity", "load")
    again = ask(routers["cache_aware"], system, "hello")  # the prefix is now expected there: it follows it
    assert again.headers["x-prefixroute-worker"] == r.headers["x-prefixroute-worker"]
    assert again.headers["x-prefixroute-route"] in ("affinity", "cache")
    r = ask(routers["round_robin"], system_prompt(), "hi")
    assert r.headers["x-prefixroute-route"] == "round_robin"


def test_openai_sdk_through_the_router(routers):
    client = openai.OpenAI(base_url=routers["cache_aware"] + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    msgs = [{"role": "system", "content": system_prompt()}, {"role": "user", "content": "Count to three."}]
    raw = client.chat.completions.with_raw_response.create(model=model, messages=msgs, max_tokens=8, temperature=0)
    first = raw.parse()
    assert raw.headers["x-prefixroute-worker"]
    chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    comp = client.completions.create(model=model, prompt="The alphabet: a, b, c,", max_tokens=5, temperature=0)
    assert comp.choices[0].text


BAD = [
    ({"messages": "x"}, None, 400),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, None, 400),
    ({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}, None, 404),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, None, 400),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, None, 400),
]


@pytest.mark.parametrize("body,_unused,status", BAD)
def test_bad_input_is_answered_by_the_router(routers, body, _unused, status):
    r = httpx.post(routers["cache_aware"] + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "x-prefixroute-worker" not in r.headers  # rejected before any worker was involved


def test_malformed_and_oversized_bodies(routers):
    url = routers["cache_aware"] + "/v1/chat/completions"
    r = httpx.post(url, content=b"{nope", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, content=b'{"messages": "' + b"x" * (33 << 20) + b'"}', timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(routers["cache_aware"] + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and r.json()["error"]


@pytest.fixture(scope="module")
def tenant_router(workers, tmp_path_factory):
    cfg = tmp_path_factory.mktemp("router") / "router.yaml"
    cfg.write_text(
        "admin_key: admin-secret\n"
        "tenants:\n"
        "  - {id: acme, api_key: key-acme, secret: s-acme}\n"
        "  - {id: globex, api_key: key-globex, secret: s-globex}\n")
    url, proc = start_router(workers[:1], "--config", str(cfg))  # one worker: both tenants share it
    yield url
    stop_process(proc)


def test_auth_and_tenant_cache_isolation(tenant_router):
    url = tenant_router
    system = system_prompt()
    assert ask(url, system, "q").status_code == 401
    bad = ask(url, system, "q", headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    acme = {"Authorization": "Bearer key-acme"}
    globex = {"Authorization": "Bearer key-globex"}

    def cached(headers, **kw):
        r = ask(url, system, "q", headers=headers, **kw)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(acme) == 0
    assert cached(acme) > 400
    assert cached(globex) == 0  # same worker, same prompt, other tenant: no shared blocks
    # A client-chosen salt is scoped under its own tenant: both tenants send the SAME cache_salt, and still
    # share no block (forwarded as is, globex's first request would hit the blocks acme cached under it).
    assert cached(acme, cache_salt="shared-salt") == 0  # a salt is its own namespace, apart from no salt
    assert cached(acme, cache_salt="shared-salt") > 400  # the same tenant repeating with it hits
    assert cached(globex, cache_salt="shared-salt") == 0
    assert cached(globex, cache_salt="shared-salt") > 400
    assert cached(acme) > 400


def test_admin_api_needs_the_admin_key(tenant_router, workers):
    url = tenant_router + "/admin/workers"
    assert httpx.get(url, timeout=10).status_code == 401
    ok = httpx.get(url, headers={"Authorization": "Bearer admin-secret"}, timeout=10)
    assert ok.status_code == 200 and ok.json()["workers"][0]["healthy"] is True
    bad = httpx.post(url, json={"url": "ftp://x"}, headers={"Authorization": "Bearer admin-secret"}, timeout=10)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_worker"


def test_no_healthy_worker_is_503():
    url, proc = start_router(["http://127.0.0.1:9"], wait_path="/metrics")
    try:
        r = ask(url, "s", "q")
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_worker"
        assert httpx.get(url + "/health", timeout=10).status_code == 503
    finally:
        stop_process(proc)


def test_requests_keep_succeeding_when_a_worker_dies(workers, route_of):
    """A third worker joins through the admin API, takes its share of keys, then is killed (SIGKILL)."""
    extra_url, extra = start_worker()
    url, proc = start_router(workers, "--admin-key", "adm")
    try:
        r = httpx.post(url + "/admin/workers", json={"url": extra_url}, headers={"Authorization": "Bearer adm"},
                       timeout=30)
        assert r.status_code == 201 and len(r.json()["workers"]) == 3
        # Prompts picked by where the router's own keyer and ring put them (the ports, so the ring, are random):
        # three homed on the new worker, six on the others.
        fleet = {w: 1 for w in [*workers, extra_url]}
        on_extra, elsewhere = [], []
        for _ in range(300):
            p = system_prompt()
            (on_extra if route_of(chat_body(p, "q"), fleet) == extra_url else elsewhere).append(p)
            if len(on_extra) >= 3 and len(elsewhere) >= 6:
                break
        prompts = on_extra[:3] + elsewhere[:6]
        assert len(prompts) == 9
        homes = {p: ask(url, p, "q").headers["x-prefixroute-worker"] for p in prompts}
        assert [homes[p] for p in on_extra[:3]] == [extra_url] * 3  # the new worker owns its share of keys
        assert extra_url not in [homes[p] for p in elsewhere[:6]]
        os.kill(extra.pid, signal.SIGKILL)
        extra.wait(timeout=10)
        routes = []
        for p in prompts:
            r = ask(url, p, "q")
            assert r.status_code == 200, r.text
            assert r.headers["x-prefixroute-worker"] != extra_url
            routes.append(r.headers["x-prefixroute-route"])
            if homes[p] != extra_url:  # keys of the surviving workers did not move
                assert r.headers["x-prefixroute-worker"] == homes[p]
        assert "failover" in routes
        listing = httpx.get(url + "/admin/workers", headers={"Authorization": "Bearer adm"}, timeout=10).json()
        assert [w["healthy"] for w in listing["workers"] if w["url"] == extra_url] == [False]
    finally:
        stop_process(proc)
        if extra.poll() is None:
            stop_process(extra)


def test_router_metrics_count_decisions_without_leaking_prompts(tenant_router):
    url = tenant_router
    secret_words = f"confidential-{uuid.uuid4().hex}"
    r = ask(url, secret_words + " " + system_prompt(), "q", headers={"Authorization": "Bearer key-acme"})
    assert r.status_code == 200
    text = httpx.get(url + "/metrics", timeout=10).text
    assert 'prefixroute_router_requests_total{route="affinity"' in text
    assert "prefixroute_router_tokenize_seconds_count" in text and "prefixroute_router_inflight{" in text
    assert "prefixroute_router_worker_up{" in text
    for secret in (secret_words, "key-acme", "s-acme", "admin-secret", r.headers["x-prefixroute-key"]):
        assert secret not in text
