"""Faults a router must ride out, with real processes on 127.0.0.1: a client that disconnects stops its work on the
worker (streamed or not, through the router or directly); SIGTERM drains a router or a worker within its grace
period and ends what still runs with an error the client sees; a worker that dies before its first token is
retried on another without the client noticing. Sim workers stand in for GPUs: the engine, scheduler and HTTP
surface are the real ones, only the forward pass is a timed sleep, so generation is long and deterministic."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
import redis as redis_lib

from harness.procs import start_redis, start_router, start_sim_processes, start_sim_workers, stop_process
from protocol.statskeys import Keys

LONG = 5000  # tokens: about 30 s of sim decoding, far past every wait here
PROMPT = "Tell me everything about bread."


def busy(urls: list[str]) -> int:
    return sum(h["running"] + h["waiting"] for h in (httpx.get(u + "/health", timeout=2).json() for u in urls))


def wait_for(cond, timeout: float, every: float = 0.05) -> float:
    """Seconds until `cond()` held; fails past `timeout`."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        time.sleep(every)
    return time.monotonic() - t0


def body(max_tokens: int, stream: bool, prompt: str = PROMPT) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "stream": stream, "temperature": 0}


class Call(threading.Thread):
    """One request in the background, keeping what the client saw: status, JSON body or SSE events."""

    def __init__(self, url: str, max_tokens: int, stream: bool, prompt: str = PROMPT):
        super().__init__(daemon=True)
        self.url, self.max_tokens, self.stream, self.prompt = url, max_tokens, stream, prompt
        self.status: int | None = None
        self.json: dict | None = None
        self.events: list[str] = []
        self.error: Exception | None = None
        self.start()

    def run(self) -> None:
        try:
            payload = body(self.max_tokens, self.stream, self.prompt)
            with httpx.Client(timeout=60) as c, c.stream("POST", self.url + "/v1/completions", json=payload) as r:
                self.status = r.status_code
                if self.stream and r.status_code == 200:
                    self.events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
                else:
                    self.json = json.loads(r.read())
        except Exception as exc:  # noqa: BLE001 - kept for the test to report
            self.error = exc

    def result(self) -> Call:
        self.join(30)
        assert not self.is_alive(), "the request never ended"
        return self


@pytest.fixture(scope="module")
def fleet():
    workers, wproc = start_sim_workers(2)
    router, rproc = start_router(workers, "--policy", "round_robin")
    yield router, workers
    stop_process(rproc)
    stop_process(wproc)


@pytest.mark.parametrize("via_router", [False, True], ids=["direct", "router"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_client_that_disconnects_stops_its_work_on_the_worker(fleet, via_router, stream):
    router, workers = fleet
    url = router if via_router else workers[0]
    wait_for(lambda: busy(workers) == 0, 10)
    with httpx.Client(timeout=httpx.Timeout(60, read=2.0)) as c:
        if stream:
            with c.stream("POST", url + "/v1/completions", json=body(LONG, True)) as r:
                assert r.status_code == 200
                t0 = time.monotonic()
                for _ in r.iter_lines():
                    if time.monotonic() - t0 > 2:
                        assert busy(workers) == 1  # generating, 2 s in
                        break  # leaving the line iterator closes the response: the client is gone
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up after 2 s and closes the connection
                c.post(url + "/v1/completions", json=body(LONG, False))
    stopped = wait_for(lambda: busy(workers) == 0, 1.0)
    print(f"measured: client gone -> worker idle {stopped:.3f} s ({'router' if via_router else 'direct'}, "
          f"{'stream' if stream else 'plain'})")


def test_sigterm_drains_the_router_within_its_grace_period(tmp_path):
    workers, wproc = start_sim_workers(1)
    router, rproc = start_router(workers, "--shutdown-grace-s", "3")
    try:
        short = Call(router, 300, stream=True)  # about 2 s: finishes within the grace period
        long_plain, long_stream = Call(router, LONG, False), Call(router, LONG, True)
        wait_for(lambda: busy(workers) == 3, 10)
        t0 = time.monotonic()
        rproc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.post(router + "/v1/completions", json=body(4, False), timeout=5)
        assert rproc.wait(timeout=20) == 0
        took = time.monotonic() - t0
        print(f"measured: router SIGTERM -> exit 0 in {took:.2f} s (grace 3 s)")
        assert took <= 3 + 3
        assert short.result().status == 200 and short.events[-1] == "[DONE]"
        assert "error" not in json.loads(short.events[-2])
        plain = long_plain.result()
        assert plain.status == 503 and plain.json["error"]["code"] == "server_shutting_down", plain.__dict__
        streamed = long_stream.result()
        assert streamed.status == 200 and streamed.events[-1] == "[DONE]", streamed.__dict__
        assert json.loads(streamed.events[-2])["error"]["code"] == "server_shutting_down"
        assert wait_for(lambda: busy(workers) == 0, 1.0) <= 1.0  # the router's cut reached the worker
    finally:
        stop_process(rproc)
        stop_process(wproc)


def test_sigterm_drains_a_worker_and_it_leaves_redis():
    redis_url, redis = start_redis()
    workers, wproc = start_sim_workers(1, "--shutdown-grace-s", "3", "--redis-url", redis_url, "--worker-id", "w")
    r = redis_lib.Redis.from_url(redis_url)
    try:
        wait_for(lambda: r.exists(Keys("prefixroute").heartbeat("w")) == 1, 10)
        short = Call(workers[0], 300, stream=False)
        long_plain, long_stream = Call(workers[0], LONG, False), Call(workers[0], LONG, True)
        wait_for(lambda: busy(workers) == 3, 10)
        t0 = time.monotonic()
        wproc.send_signal(signal.SIGTERM)
        wait_for(lambda: r.exists(Keys("prefixroute").heartbeat("w")) == 0, 2)  # routers stop discovering it at once
        assert wproc.wait(timeout=20) == 0
        took = time.monotonic() - t0
        print(f"measured: worker SIGTERM -> exit 0 in {took:.2f} s (grace 3 s)")
        assert took <= 3 + 3
        done = short.result()
        assert done.status == 200 and done.json["usage"]["completion_tokens"] == 300
        plain = long_plain.result()
        assert plain.status == 503 and plain.json["error"]["code"] == "server_shutting_down", plain.__dict__
        streamed = long_stream.result()
        assert json.loads(streamed.events[-2])["error"]["code"] == "server_shutting_down", streamed.__dict__
    finally:
        stop_process(wproc)
        stop_process(redis)


def test_a_worker_that_dies_before_its_first_token_is_retried_unseen():
    # Three workers with a slow prefill (a GPU 50x slower than the model's): the one given a request is killed
    # in the middle of its prefill, once for a plain request and once for a streamed one.
    started = start_sim_processes(3, "--sim-speedup", "0.02")
    urls = [u for u, _ in started]
    router, rproc = start_router(urls, "--policy", "round_robin")
    try:
        for stream in (False, True):
            live = [i for i, (_, p) in enumerate(started) if p.poll() is None]
            call = Call(router, 4, stream, prompt="bread " * 3000)
            wait_for(lambda: busy([urls[i] for i in live]) == 1, 10)
            victim = next(i for i in live if busy([urls[i]]) == 1)
            time.sleep(0.3)
            started[victim][1].kill()
            c = call.result()
            assert c.error is None and c.status == 200, c.__dict__
            if stream:
                assert c.events[-1] == "[DONE]" and not any('"error"' in e for e in c.events), c.events
            else:
                assert c.json["usage"]["completion_tokens"] == 4
    finally:
        stop_process(rproc)
        for _, p in started:
            stop_process(p)


def test_admission_answers_429_with_retry_after_when_every_worker_is_full(tmp_path):
    workers, wproc = start_sim_workers(2)
    config = tmp_path / "router.yaml"
    config.write_text("tenants:\n"
                      "  - {id: acme, api_key: sk-acme, secret: s1, max_concurrency: 1}\n"
                      "  - {id: globex, api_key: sk-globex, secret: s2}\n")
    router, rproc = start_router(workers, "--config", str(config), "--max-queue-per-worker", "1",
                                 "--queue-wait-s", "0.5")
    auth = {"Authorization": "Bearer sk-globex"}
    try:
        with httpx.Client(timeout=30) as c:
            # acme may have one request in flight: its second is refused whatever the workers' room
            with c.stream("POST", router + "/v1/completions", json=body(300, True),
                          headers={"Authorization": "Bearer sk-acme"}) as held:
                held_lines = held.iter_lines()  # kept: a dropped line iterator closes the response
                next(held_lines)
                r = c.post(router + "/v1/completions", json=body(4, False),
                           headers={"Authorization": "Bearer sk-acme"})
                assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
                assert r.headers["x-prefixroute-refused"] == "tenant_concurrency"
                # acme's request fills one worker; globex fills the other; the next waits 0.5 s, then 429
                with c.stream("POST", router + "/v1/completions", json=body(300, True), headers=auth) as other:
                    other_lines = other.iter_lines()
                    next(other_lines)
                    assert busy(workers) == 2
                    t0 = time.monotonic()
                    r = c.post(router + "/v1/completions", json=body(4, False), headers=auth)
                    waited = time.monotonic() - t0
                    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1, r.text
                    assert r.headers["x-prefixroute-refused"] == "queue_full" and 0.4 < waited < 3
            metrics = c.get(router + "/metrics").text
        assert 'prefixroute_router_admission_rejected_total{reason="queue_full"} 1.0' in metrics
        assert 'prefixroute_router_admission_rejected_total{reason="tenant_concurrency"} 1.0' in metrics
    finally:
        stop_process(rproc)
        stop_process(wproc)


def test_a_request_waits_for_the_full_worker_that_holds_its_prefix_then_is_refused_past_the_wait():
    workers, wproc = start_sim_workers(2)
    router, rproc = start_router(workers, "--max-queue-per-worker", "1", "--queue-wait-s", "1.5")
    doc = " ".join(f"clause{i} of the bakery's contract says bread is baked daily." for i in range(60))
    try:
        with httpx.Client(timeout=30) as c:
            first = c.post(router + "/v1/completions", json=body(1, False, doc + " Q0?"))
            home = first.headers["x-prefixroute-worker"]
            for hold_s, max_tokens in ((0.4, 60), (3.0, 600)):  # the home worker frees within the wait, or not
                with c.stream("POST", router + "/v1/completions", json=body(max_tokens, True, doc + " Q1?")) as s:
                    lines = s.iter_lines()
                    next(lines)
                    assert s.headers["x-prefixroute-worker"] == home and busy(workers) == 1
                    t0 = time.monotonic()
                    r = c.post(router + "/v1/completions", json=body(2, False, doc + " Q2?"))
                    waited = time.monotonic() - t0
                    for _ in lines:
                        pass
                if hold_s < 1:  # held until the stream ended, then served where the document is cached
                    assert r.status_code == 200 and r.headers["x-prefixroute-worker"] == home, r.text
                    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
                else:  # the worker stayed full for the whole wait: refused rather than recomputed elsewhere
                    assert r.status_code == 429 and r.headers["x-prefixroute-refused"] == "worker_full", r.text
                    assert r.json()["error"]["code"] == "rate_limit_exceeded" and "Retry-After" in r.headers
                    assert 1.3 < waited < 2.8
            metrics = c.get(router + "/metrics").text
        assert "prefixroute_router_admission_held_total 2.0" in metrics
        assert 'prefixroute_router_admission_rejected_total{reason="worker_full"} 1.0' in metrics
    finally:
        stop_process(rproc)
        stop_process(wproc)
