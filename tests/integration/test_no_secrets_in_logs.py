"""No prompt text, API key or tenant secret leaves the router or the worker where an operator or another client
could read it: not in their logs (both at --log-level debug, stdout and stderr captured), not in either /metrics,
not in Redis (hit stats, heartbeats, the shared decision log), not in any response body or header.

Real processes: redis-server, two sim workers and a router with two tenants and an admin key. Requests carry a
recognisable prompt in every field that takes text (prompt, messages, user, prompt_cache_key, x-session-id), with
good keys, wrong keys and no key; invalid bodies that contain the prompt; requests that fail upstream (a
context-length error from the worker, a worker SIGKILLed so the router fails over); admin calls; bad requests sent
to a worker directly. Then every byte collected is searched for each needle."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import httpx
import pytest
import redis as redis_lib
import yaml

from harness.procs import start_redis, start_router, start_worker, stop_process

MARK = f"walrus{secrets.token_hex(6)}"
PROMPT = f"{MARK} recites the confidential launch plan for project heliotrope"


def redis_dump(url: str) -> bytes:
    """Every key and value in the Redis database, as bytes."""
    r = redis_lib.Redis.from_url(url)
    out = []
    try:
        for k in r.scan_iter(count=1000):
            t = r.type(k).decode()
            v = {"string": lambda: r.get(k), "hash": lambda: r.hgetall(k), "list": lambda: r.lrange(k, 0, -1),
                 "set": lambda: r.smembers(k), "zset": lambda: r.zrange(k, 0, -1, withscores=True),
                 "stream": lambda: r.xrange(k)}.get(t, lambda: b"")()
            out.append(k + b" " + repr(v).encode())
    finally:
        r.close()
    return b"\n".join(out)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    d: Path = tmp_path_factory.mktemp("no_secrets")
    keys = {t: f"sk-{t}-{secrets.token_hex(12)}" for t in ("a", "b")}
    secs = {t: f"secret-{t}-{secrets.token_hex(16)}" for t in ("a", "b")}
    admin = f"admin-{secrets.token_hex(12)}"
    cfg = d / "router.yaml"
    cfg.write_text(yaml.safe_dump({"admin_key": admin, "tenants": [
        {"id": f"tenant-{t}", "api_key": keys[t], "secret": secs[t]} for t in ("a", "b")]}))
    procs, logs = [], {}
    try:
        redis_url, rproc = start_redis()
        procs.append(rproc)
        workers = []
        for i in range(2):
            logs[f"worker{i}"] = d / f"worker{i}.log"
            url, p = start_worker("--backend", "sim", "--sim-speedup", "20", "--log-level", "debug",
                                  "--redis-url", redis_url, "--stats-interval-s", "0.2",
                                  log=open(logs[f"worker{i}"], "wb"), timeout=120)  # noqa: SIM115
            workers.append(url)
            procs.append(p)
        logs["router"] = d / "router.log"
        router, p = start_router(workers, "--config", str(cfg), "--log-level", "debug", "--redis-url", redis_url,
                                 log=open(logs["router"], "wb"))  # noqa: SIM115
        procs.append(p)
    except Exception:
        for p in reversed(procs):
            stop_process(p)
        raise
    wrong = f"sk-wrong-{secrets.token_hex(12)}"
    needles = {"prompt": PROMPT, "prompt marker": MARK, "wrong key": wrong, "admin key": admin,
               **{f"api key {t}": keys[t] for t in keys}, **{f"api key {t} (hex)": keys[t][5:] for t in keys},
               **{f"secret {t}": secs[t] for t in secs}, **{f"secret {t} (hex)": secs[t][9:] for t in secs}}
    yield {"router": router, "workers": workers, "procs": procs, "logs": logs, "redis": redis_url, "keys": keys,
           "secrets": secs, "admin": admin, "wrong": wrong, "needles": needles}
    for p in reversed(procs):
        stop_process(p)


def test_no_prompt_key_or_secret_in_logs_metrics_redis_or_answers(stack):
    router, workers, keys = stack["router"], stack["workers"], stack["keys"]
    seen: list[tuple[str, int, bytes]] = []  # (what, status, headers + body) of every answer

    def auth(t: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {keys[t]}"}

    def call(what: str, url: str, path: str, *, body=None, raw: bytes | None = None, headers=None,
             method: str = "POST") -> httpx.Response:
        r = c.request(method, url + path, json=body if raw is None else None, content=raw,
                      headers={"Content-Type": "application/json", **(headers or {})})
        seen.append((what, r.status_code, repr(dict(r.headers)).encode() + b"\n" + r.content))
        return r

    chat = {"messages": [{"role": "system", "content": PROMPT}, {"role": "user", "content": PROMPT}],
            "max_tokens": 3}
    with httpx.Client(trust_env=False, timeout=30) as c:
        # good requests, every text field carrying the prompt
        assert call("completion A", router, "/v1/completions", body={"prompt": PROMPT, "max_tokens": 3},
                    headers=auth("a")).status_code == 200
        assert call("chat B streamed", router, "/v1/chat/completions", headers={**auth("b"), "x-session-id": PROMPT},
                    body={**chat, "stream": True, "stream_options": {"include_usage": True}, "user": PROMPT,
                          "prompt_cache_key": PROMPT}).status_code == 200
        r = call("chat A", router, "/v1/chat/completions", body={**chat, "cache_salt": PROMPT}, headers=auth("a"))
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 20
        # keys that are wrong, missing, or not a bearer token
        bad_auth = [{"Authorization": f"Bearer {stack['wrong']}"}, {"Authorization": f"Bearer {keys['a']}x"},
                    {"Authorization": keys["b"]}, {"Authorization": stack["secrets"]["a"]}, {}]
        for h in bad_auth:
            assert call("bad key", router, "/v1/completions", body={"prompt": PROMPT}, headers=h).status_code == 401
        # invalid bodies that contain the prompt
        invalid = [{"prompt": PROMPT, "max_tokens": "lots"}, {"prompt": PROMPT, "temperature": PROMPT},
                   {"prompt": [PROMPT, PROMPT]}, {"prompt": PROMPT, "n": 2}, {"prompt": PROMPT, "stop": ""},
                   {"prompt": {"text": PROMPT}}, {"prompt": PROMPT, "echo": True},
                   {"messages": [{"role": PROMPT, "content": PROMPT}]},
                   {"messages": [{"role": "user", "content": [{"type": PROMPT, "text": PROMPT}]}]},
                   {"messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT, "x": 1}, 5]}]},
                   {"messages": [{"role": "user", "content": [{"type": "text", "txt": PROMPT}]}]},
                   {"messages": [{"role": "user", "content": [{"type": "text", "text": [PROMPT]}]}]},
                   {"messages": PROMPT}, {"prompt": PROMPT, "metadata": {"k": PROMPT * 20}}]
        raws = [b'{"prompt": "' + PROMPT.encode(), b'{"prompt": "' + PROMPT.encode() + b'" "x"}',
                b'["' + PROMPT.encode() + b'"]', PROMPT.encode(), b'{"prompt": "' + PROMPT.encode() + b'\xff"}']
        for path in ("/v1/completions", "/v1/chat/completions"):
            for b in invalid:
                assert call("invalid body", router, path, body=b, headers=auth("a")).status_code in (400, 404, 422)
            for b in raws:
                assert call("invalid JSON", router, path, raw=b, headers=auth("b")).status_code == 400
        assert call("unknown model", router, "/v1/completions", body={"prompt": PROMPT, "model": "nope"},
                    headers=auth("a")).status_code == 404
        # failures upstream: the worker refuses the length; a worker dies and the router fails over
        r = call("context too long", router, "/v1/completions", body={"prompt": PROMPT, "max_tokens": 10**8},
                 headers=auth("a"))
        assert r.status_code == 400 and r.headers.get("x-prefixroute-worker"), r.text  # the worker's own answer
        stack["procs"][2].kill()  # worker 1, SIGKILLed under the router's feet
        stack["procs"][2].wait(10)
        for i in range(6):
            call("after a worker died", router, "/v1/completions", body={"prompt": f"{i} {PROMPT}", "max_tokens": 2},
                 headers=auth("b" if i % 2 else "a"))
        # admin: the decision for a tenant's request, a wrong admin key, the listing
        call("admin route", router, "/admin/route?path=/v1/completions", body={"prompt": PROMPT},
             headers={**auth("a"), "x-admin-key": stack["admin"]})
        call("admin wrong key", router, "/admin/stats", method="GET", headers={"Authorization": f"Bearer {keys['a']}"})
        assert call("admin stats", router, "/admin/stats", method="GET",
                    headers={"Authorization": f"Bearer {stack['admin']}"}).status_code == 200
        # bad requests straight to the worker
        for b in invalid[:3] + invalid[7:12]:
            call("worker invalid body", workers[0], "/v1/chat/completions" if "messages" in b else "/v1/completions",
                 body=b)
        for b in raws:
            call("worker invalid JSON", workers[0], "/v1/completions", raw=b)
        call("worker too long", workers[0], "/v1/completions", body={"prompt": PROMPT, "max_tokens": 10**8})
        time.sleep(1.5)  # stats deltas and the shared state reach Redis
        metrics = {"router /metrics": c.get(router + "/metrics").content,
                   "worker /metrics": c.get(workers[0] + "/metrics").content}
    assert sum(s >= 400 for _, s, _ in seen) >= 40 and b"prefixroute_router" in metrics["router /metrics"]
    sources = {f"answer {i} ({what}, {status})": data for i, (what, status, data) in enumerate(seen)}
    sources |= metrics
    sources["redis"] = redis_dump(stack["redis"])
    assert b"tenant-a" in sources["redis"]  # the stats did reach Redis
    for p in reversed(stack["procs"][1:]):  # shutdown's lines too
        stop_process(p)
    for name, path in stack["logs"].items():
        sources[f"{name} log"] = path.read_bytes()
    # the logs did capture debug output and the failures above
    assert b" DEBUG " in sources["router log"] and b" DEBUG " in sources["worker0 log"]
    assert b"leaves the ring" in sources["router log"], sources["router log"][-2000:]
    leaks = [f"{needle} in {where}" for where, data in sources.items() for needle, s in stack["needles"].items()
             if s.encode() in data]
    assert not leaks, leaks
