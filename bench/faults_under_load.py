"""Faults under steady load (issue 13), with real processes on 127.0.0.1: sim workers (one process each, so each
can be killed alone), redis-server, routers on Redis, and an open-loop load (loadgen's `replay` for streamed
requests, a small aiohttp loop here for non-streamed ones and for load spread over several routers).

- kill: N workers; the routing decision of K distinct never-sent keys is read through the router's dry run
  (`POST /admin/route`); mid-run the worker with the most requests in flight is SIGKILLed. Reported: failures of
  requests that had not received a byte (target 0), streams cut mid-way and whether they ended with an error
  event, the share of the key set that moved (target <= 1/N + 5%, all from the killed worker), then, after the
  worker is restarted on its port, the share of its old keys that came back to it.
- redis: redis-server (append-only file) is stopped (SIGTERM) after `--redis-down-at` s, kept down for
  `--redis-down-s`, started again on its port and data dir; the load runs `--redis-after-s` more. Reported:
  routing errors (target 0) and whether `/admin/stats` totals (requests, prompt and cached tokens) caught up with
  what the load saw, and how many seconds after Redis came back.
- rolling: two routers on one Redis, load spread over both by a client that, like a load balancer, retries on
  the other router when a connection is refused (never accepted, so never served twice); every worker is
  restarted in turn (SIGTERM, wait for exit, start on its port, wait for health and for both routers to see it),
  then each router. Reported: lost requests (errors or incomplete answers, target 0), connect-retries, phases.

Each run prints its JSON and a markdown table; `--out DIR` merges the scenario into DIR/faults_under_load.json
and rewrites DIR/faults_under_load.md from all scenarios there.

  python bench/faults_under_load.py kill|redis|rolling [--workers 4] [--rate-per-worker 2] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness.procs import start_redis, start_router, start_sim_processes, stop_process  # noqa: E402
from loadgen.replay import Job, Result, replay  # noqa: E402

NAME = "faults_under_load"
ADMIN_KEY = "faults-bench-admin"
_WORDS = ("parcel route invoice refund policy warranty delivery store price stock label customer address return "
          "window carrier express region tax discount member support ticket status order account").split()
# loadgen writes a transport failure as "TypeName: message" and an SSE error event as its bare message.
_EXC = re.compile(r"^[A-Za-z_][\w.]*: ")


# ---- the workload --------------------------------------------------------------------------------------------

def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def workload(n: int, rate: float, max_tokens: int, seed: int, docs: int = 16) -> list[tuple[float, dict]]:
    """`n` completion requests, Poisson at `rate`/s: a Zipf-popular document (shared prefixes, as cache_aware
    sees them) and a question. Completions, not chat: every data chunk then carries text, so "received a byte"
    and "received a token" are the same thing."""
    rng = random.Random(seed)
    texts = [f"Document {i}. " + _text(random.Random(seed * 1000 + i), 150) for i in range(docs)]
    weights = [1 / (k + 1) ** 1.1 for k in range(docs)]
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        doc = rng.choices(texts, weights)[0]
        out.append((t, {"prompt": f"{doc}\nQuestion: {_text(rng, 8)}?", "max_tokens": max_tokens,
                        "temperature": 0}))
    return out


def probe_bodies(k: int) -> list[dict]:
    """K distinct routing keys never sent as requests: their decision is the ring's, not the prefix index's."""
    rng = random.Random(7)
    return [{"prompt": f"probe {i:05d} " + _text(rng, 30), "max_tokens": 1} for i in range(k)]


# ---- a client: one request, streamed or not, over one or several router URLs ---------------------------------

@dataclass
class Call:
    index: int
    stream: bool
    sent_s: float
    status: int = 0
    router: str = ""
    worker: str = ""
    route: str = ""  # the router's x-prefixroute-route: its reason, or "failover"
    got_bytes: bool = False  # a data chunk (streamed) or the whole body (not streamed) arrived
    complete: bool = False  # [DONE] after max_tokens tokens, or a JSON answer with them
    error_event: bool = False
    error: str | None = None
    connect_retries: int = 0
    completion_tokens: int = 0
    end_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.complete and self.error is None


def _refused(exc: BaseException) -> bool:
    return isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, ConnectionRefusedError)


async def send(session: aiohttp.ClientSession, urls: list[str], first: int, body: dict, stream: bool, index: int,
               t0: float, max_tries: int = 8) -> Call:
    """POST /v1/completions to urls[first], moving on to the next URL when the connection is refused (the request
    was never accepted); any other failure is the answer."""
    c = Call(index, stream, time.perf_counter() - t0)
    payload = {**body, "stream": stream}
    if stream:
        payload["stream_options"] = {"include_usage": True}
    for attempt in range(max_tries):
        url = urls[(first + attempt) % len(urls)]
        c.router = url
        try:
            async with session.post(url + "/v1/completions", json=payload) as r:
                c.status = r.status
                c.worker = r.headers.get("x-prefixroute-worker", "")
                c.route = r.headers.get("x-prefixroute-route", "")
                if r.status != 200:
                    c.error = (await r.text())[:200]
                    break
                if not stream:
                    obj = await r.json(content_type=None)
                    c.got_bytes = True
                    c.completion_tokens = int((obj.get("usage") or {}).get("completion_tokens") or 0)
                    c.complete = bool(obj.get("choices")) and c.completion_tokens == body["max_tokens"]
                    break
                async for raw in r.content:
                    line = raw.strip()
                    if not line.startswith(b"data: "):
                        continue
                    c.got_bytes = True
                    data = line[6:]
                    if data == b"[DONE]":
                        c.complete = c.error is None and c.completion_tokens == body["max_tokens"]
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        c.error_event = True
                        c.error = str(obj["error"].get("message"))[:200]
                    elif obj.get("usage"):
                        c.completion_tokens = int(obj["usage"].get("completion_tokens") or 0)
                if not c.complete and c.error is None:
                    c.error = "the stream ended without [DONE]"
                break
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            if _refused(exc) and attempt + 1 < max_tries:
                c.connect_retries += 1
                if (attempt + 1) % len(urls) == 0:
                    await asyncio.sleep(0.1)  # every URL refused: a short pause before the next round
                continue
            c.error = f"{type(exc).__name__}: {exc}"[:200]
            break
    c.end_s = time.perf_counter() - t0
    return c


async def drive(urls: list[str], schedule: list[tuple[float, dict]], streamed: list[bool], duration_s: float,
                timeout_s: float = 120.0, stop: asyncio.Event | None = None) -> list[Call]:
    """Open loop: each request at its time (bounded by `duration_s`, and by `stop` once set), alternating over
    `urls`. A new connection per request, so a router that stopped listening refuses it at connect time."""
    calls: list[Call] = []
    t0 = time.perf_counter()
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async def one(i: int, body: dict) -> None:
            calls.append(await send(session, urls, i % len(urls), body, streamed[i], i, t0))

        tasks = []
        for i, (at, body) in enumerate(schedule):
            if at > duration_s or (stop is not None and stop.is_set()):
                break
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if stop is not None and stop.is_set():
                break
            tasks.append(asyncio.create_task(one(i, body)))
        await asyncio.gather(*tasks)
    return sorted(calls, key=lambda c: c.index)


# ---- the router's admin API ----------------------------------------------------------------------------------

async def route_map(router: str, bodies: list[dict], concurrency: int = 8) -> list[str]:
    """The worker the router's dry run names for each body."""
    out: list[str] = [""] * len(bodies)
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        async def one(i: int) -> None:
            async with sem, s.post(router + "/admin/route?path=/v1/completions", json=bodies[i],
                                   headers={"X-Admin-Key": ADMIN_KEY}) as r:
                r.raise_for_status()
                out[i] = (await r.json())["worker"]

        await asyncio.gather(*(one(i) for i in range(len(bodies))))
    return out


async def admin_get(router: str, path: str, timeout: float = 8.0) -> tuple[int, dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.get(router + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
            return r.status, await r.json(content_type=None)


async def wait_router_sees(routers: list[str], want: dict[str, bool], timeout: float = 60.0) -> float:
    """Seconds until every router lists each worker of `want` with that health."""
    t0 = time.monotonic()
    while True:
        seen = True
        for r in routers:
            try:
                _, body = await admin_get(r, "/admin/workers")
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                seen = False
                break
            health = {w["url"]: w["healthy"] and not w["draining"] for w in body["workers"]}
            seen = seen and all(health.get(u, False) == h for u, h in want.items())
        if seen:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"routers did not see {want} within {timeout} s")
        await asyncio.sleep(0.1)


async def wait_exit(proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.monotonic()
    while proc.poll() is None:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"process {proc.pid} still running after {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


class Fleet:
    """redis-server, one sim process per worker and routers, all on Redis; `close` stops whatever still runs."""

    def __init__(self, args: argparse.Namespace, routers: int = 1, redis_dir: Path | None = None):
        self.args = args
        self.procs: list[subprocess.Popen] = []
        self.redis_port: int | None = None
        self.redis_dir = redis_dir
        self.redis_url, self.redis_proc = start_redis(data_dir=redis_dir)
        self.redis_port = int(self.redis_url.rsplit(":", 1)[1].split("/")[0])
        self.workers: list[str] = []
        self.wprocs: dict[str, subprocess.Popen] = {}
        self.routers: list[str] = []
        self.rprocs: dict[str, subprocess.Popen] = {}
        try:
            for url, proc in start_sim_processes(args.workers, *self.worker_args()):
                self.workers.append(url)
                self.wprocs[url] = proc
            for _ in range(routers):
                url, proc = start_router(self.workers, *self.router_args(), env=self.router_env())
                self.routers.append(url)
                self.rprocs[url] = proc
        except BaseException:
            self.close()
            raise

    def worker_args(self) -> list[str]:
        return ["--sim-speedup", str(self.args.sim_speedup), "--redis-url", self.redis_url]

    def router_env(self) -> dict[str, str] | None:
        return {"PREFIXROUTE_ROUTER_VNODES": str(self.args.vnodes)} if self.args.vnodes else None

    def router_args(self) -> list[str]:
        return ["--redis-url", self.redis_url, "--admin-key", ADMIN_KEY, "--log-level", "warning"]

    def restart_worker(self, url: str) -> None:
        port = int(url.rsplit(":", 1)[1])
        (_, proc), = start_sim_processes(1, *self.worker_args(), ports=[port])
        self.wprocs[url] = proc

    def restart_router(self, url: str) -> None:
        port = int(url.rsplit(":", 1)[1])
        _, proc = start_router(self.workers, *self.router_args(), env=self.router_env(), port=port)
        self.rprocs[url] = proc

    def stop_redis(self) -> None:
        stop_process(self.redis_proc)  # SIGTERM: redis-server flushes its append-only file and exits

    def start_redis_again(self) -> None:
        _, self.redis_proc = start_redis(self.redis_port, self.redis_dir)

    def close(self) -> None:
        procs = [*self.rprocs.values(), *self.wprocs.values(), self.redis_proc]
        for proc in procs:  # all told at once, so their drains overlap
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            stop_process(proc)


def loadgen_jobs(schedule: list[tuple[float, dict]], mask: list[bool]) -> list[Job]:
    return [Job(at, "/v1/completions", dict(body)) for (at, body), m in zip(schedule, mask) if m]


def classify_streams(results: list[Result], victim: str | None = None) -> dict[str, Any]:
    """loadgen's streamed results: ok; failed before any text (ttft unset); cut after text, with or without an
    error event (loadgen writes a transport failure as "TypeName: ..." and an error event as its message)."""
    before = [r for r in results if not r.ok and r.ttft_s is None]
    cut = [r for r in results if not r.ok and r.ttft_s is not None]
    return {
        "requests": len(results),
        "ok": sum(r.ok for r in results),
        "failed_before_first_byte": len(before),
        "failed_before_first_byte_errors": dict(Counter((r.error or "")[:80] for r in before)),
        "cut_mid_stream": len(cut),
        "cut_mid_stream_with_error_event": sum(1 for r in cut if r.error and not _EXC.match(r.error)),
        "cut_mid_stream_on_killed_worker": sum(1 for r in cut if victim and r.worker == victim),
        "routes": dict(Counter(r.route for r in results if r.ok and r.route)),
    }


# ---- kill -----------------------------------------------------------------------------------------------------

async def run_kill(args: argparse.Namespace) -> dict[str, Any]:
    fleet = Fleet(args)
    try:
        return await _kill(args, fleet)
    finally:
        fleet.close()


async def _kill(args: argparse.Namespace, fleet: Fleet) -> dict[str, Any]:
    n = args.workers
    router = fleet.routers[0]
    await wait_router_sees([router], {w: True for w in fleet.workers})
    probes = probe_bodies(args.keys)
    before = await route_map(router, probes)
    rate = args.rate_per_worker * n
    schedule = workload(int(rate * args.duration * 1.5) + 10, rate, args.max_tokens, args.seed)
    rng = random.Random(args.seed + 1)
    streamed = [rng.random() < 0.5 for _ in schedule]
    state: dict[str, Any] = {}

    async def killer() -> None:
        await asyncio.sleep(args.kill_at)
        _, listing = await admin_get(router, "/admin/workers")
        inflight = {w["url"]: w["inflight"] for w in listing["workers"]}
        victim = max(fleet.workers, key=lambda u: inflight.get(u, 0))  # mid-way streams are cut, not just idle
        fleet.wprocs[victim].send_signal(signal.SIGKILL)
        fleet.wprocs[victim].wait(10)
        state.update(victim=victim, inflight_at_kill=inflight.get(victim, 0), killed_at_s=time.perf_counter())

    t_load = time.perf_counter()
    res_stream, calls, _ = await asyncio.gather(
        replay(router, loadgen_jobs(schedule, streamed), duration_s=args.duration, timeout_s=120),
        drive_subset([router], schedule, [not s for s in streamed], args.duration),
        killer())
    load_s = time.perf_counter() - t_load
    victim = state["victim"]
    await wait_router_sees([router], {victim: False})
    after = await route_map(router, probes)
    restart_s = seen_s = None
    back = None
    if not args.no_restart:
        t_restart = time.monotonic()
        await asyncio.to_thread(fleet.restart_worker, victim)
        seen_s = round(await wait_router_sees([router], {victim: True}), 1)
        restart_s = round(time.monotonic() - t_restart, 1)
        back = await route_map(router, probes)

    moved = [i for i in range(len(probes)) if before[i] != after[i]]
    owned = [i for i in range(len(probes)) if before[i] == victim]
    non_stream_failed = [c for c in calls if not c.ok]
    s = classify_streams(res_stream, victim)
    result = {
        "workers": n,
        "requests": len(res_stream) + len(calls),
        "ok": s["ok"] + sum(c.ok for c in calls),
        "load_s": round(load_s, 1),
        "killed_at_s": round(state["killed_at_s"] - t_load, 1),
        "killed_worker_inflight": state["inflight_at_kill"],
        "streamed": s,
        "non_streamed": {"requests": len(calls), "ok": sum(c.ok for c in calls),
                         "failed": len(non_stream_failed),
                         "errors": dict(Counter((c.error or str(c.status))[:80] for c in non_stream_failed)),
                         "routes": dict(Counter(c.route for c in calls if c.ok and c.route))},
        "failed_before_first_byte": s["failed_before_first_byte"] + len(non_stream_failed),
        "cut_mid_stream": s["cut_mid_stream"],
        "cut_mid_stream_with_error_event": s["cut_mid_stream_with_error_event"],
        "keys": len(probes),
        "killed_worker_key_share": len(owned) / len(probes),
        "moved_key_share": len(moved) / len(probes),
        "moved_key_bound": 1 / n + 0.05,
        "moved_keys_not_from_killed_worker": sum(1 for i in moved if before[i] != victim),
        "killed_worker_keys_moved_share": sum(1 for i in owned if after[i] != victim) / len(owned) if owned else None,
        "restart_s": restart_s,
        "restart_router_saw_s": seen_s,
        "returned_key_share": sum(1 for i in owned if back[i] == victim) / len(owned) if owned and back else None,
        "changed_after_restart_share":
            None if back is None else sum(1 for i in range(len(probes)) if back[i] != before[i]) / len(probes),
    }
    return result


async def drive_subset(urls: list[str], schedule: list[tuple[float, dict]], mask: list[bool], duration_s: float,
                       stream: bool = False) -> list[Call]:
    """`drive` over the requests of `mask` only (same times), all streamed or all not."""
    sub = [item for item, m in zip(schedule, mask) if m]
    return await drive(urls, sub, [stream] * len(sub), duration_s)


def kill_table(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        ("requests (streamed / not)", f"{r['requests']} ({r['streamed']['requests']} / "
                                      f"{r['non_streamed']['requests']})", ""),
        ("ok", str(r["ok"]), ""),
        ("killed worker: requests in flight at the kill", str(r["killed_worker_inflight"]), ""),
        ("failed before their first byte", str(r["failed_before_first_byte"]), "0"),
        ("streams cut mid-way", str(r["cut_mid_stream"]), ""),
        ("... of which ended with an error event", str(r["cut_mid_stream_with_error_event"]), "all"),
        ("answered after a failover (streamed / not)",
         f"{r['streamed']['routes'].get('failover', 0)} / {r['non_streamed'].get('routes', {}).get('failover', '-')}",
         ""),
        ("key set owned by the killed worker", f"{r['killed_worker_key_share']:.1%}", ""),
        ("key set that moved", f"{r['moved_key_share']:.1%}", f"<= {r['moved_key_bound']:.1%}"),
        ("moved keys not the killed worker's", str(r["moved_keys_not_from_killed_worker"]), "0"),
        ("restart: start to health and the router seeing it, s", str(r["restart_s"]), ""),
        ("its old keys back on it after the restart", "-" if r["returned_key_share"] is None
         else f"{r['returned_key_share']:.1%}", "100%"),
    ]


# ---- redis ----------------------------------------------------------------------------------------------------

async def run_redis(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="faults-redis-") as d:
        fleet = Fleet(args, redis_dir=Path(d))
        try:
            return await _redis(args, fleet)
        finally:
            fleet.close()


def _totals(body: dict) -> tuple[int, int, int]:
    c = body.get("cluster") or {}
    return int(c.get("requests", 0)), int(c.get("prompt_tokens", 0)), int(c.get("cached_tokens", 0))


async def _redis(args: argparse.Namespace, fleet: Fleet) -> dict[str, Any]:
    router = fleet.routers[0]
    await wait_router_sees([router], {w: True for w in fleet.workers})
    rate = args.rate_per_worker * args.workers
    total_s = args.redis_down_at + args.redis_down_s + args.redis_after_s
    schedule = workload(int(rate * total_s * 1.5) + 10, rate, args.max_tokens, args.seed)
    t0 = time.perf_counter()
    done: list[tuple[float, Result]] = []  # (end time since t0, result)
    samples: list[dict[str, Any]] = []  # /admin/stats and /health over time
    marks: dict[str, float] = {}
    stop = asyncio.Event()

    async def poller() -> None:
        while not stop.is_set():
            t = time.perf_counter() - t0
            row: dict[str, Any] = {"t": round(t, 2)}
            try:
                status, body = await admin_get(router, "/admin/stats", timeout=7)
                row["status"] = status
                if status == 200:
                    row["totals"] = _totals(body)
                _, health = await admin_get(router, "/health", timeout=3)
                row["health_redis"] = health.get("redis")
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                row["status"] = type(exc).__name__
            samples.append(row)
            await asyncio.sleep(0.5)

    async def outage() -> None:
        await asyncio.sleep(args.redis_down_at)
        marks["down_s"] = time.perf_counter() - t0
        await asyncio.to_thread(fleet.stop_redis)
        await asyncio.sleep(max(0.0, args.redis_down_at + args.redis_down_s - (time.perf_counter() - t0)))
        await asyncio.to_thread(fleet.start_redis_again)
        marks["up_s"] = time.perf_counter() - t0

    poll = asyncio.create_task(poller())
    results, _ = await asyncio.gather(
        replay(router, loadgen_jobs(schedule, [True] * len(schedule)), duration_s=total_s, timeout_s=120,
               on_done=lambda r: done.append((time.perf_counter() - t0, r))),
        outage())
    marks["load_end_s"] = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    want = (len(ok), sum(r.prompt_tokens for r in ok), sum(r.cached_tokens for r in ok))
    # Every request ended; wait (bounded) until the stats say exactly what the load saw.
    deadline = time.perf_counter() + args.catchup_s + 10
    while time.perf_counter() < deadline and not (samples and samples[-1].get("totals") == want):
        await asyncio.sleep(0.25)
    stop.set()
    await poll

    up = marks["up_s"]
    # Requests ended before Redis came back: what the workers had to hold through the outage and flush.
    backlog = [r for t, r in done if t < up and r.ok]
    backlog_want = (len(backlog), sum(r.prompt_tokens for r in backlog), sum(r.cached_tokens for r in backlog))
    after_up = [s for s in samples if s["t"] >= up and "totals" in s]
    flushed = next((s["t"] - up for s in after_up if all(a >= b for a, b in zip(s["totals"], backlog_want))), None)
    exact = next((s["t"] - up for s in after_up if s["t"] >= marks["load_end_s"] and s["totals"] == want), None)
    final = after_up[-1]["totals"] if after_up else None
    down_rows = [s for s in samples if marks["down_s"] <= s["t"] < up]
    s = classify_streams(results)
    errors = [r for r in results if not r.ok]
    return {
        "workers": args.workers,
        "requests": len(results),
        "ok": len(ok),
        "routing_errors": len(errors),
        "routing_errors_by_kind": dict(Counter((r.error or str(r.status))[:80] for r in errors)),
        "routes": s["routes"],
        "redis_down_at_s": round(marks["down_s"], 1),
        "redis_up_at_s": round(up, 1),
        "load_end_s": round(marks["load_end_s"], 1),
        "requests_during_outage": sum(1 for r in results if marks["down_s"] <= r.sent_s < up),
        "stats_503_while_down": sum(1 for r in down_rows if r.get("status") == 503),
        "stats_polls_while_down": len(down_rows),
        "health_said_down": any(r.get("health_redis") == "down" for r in down_rows),
        "loadgen_totals": dict(zip(("requests", "prompt_tokens", "cached_tokens"), want)),
        "stats_totals_final": dict(zip(("requests", "prompt_tokens", "cached_tokens"), final)) if final else None,
        "backlog_at_restart": dict(zip(("requests", "prompt_tokens", "cached_tokens"), backlog_want)),
        "backlog_flushed_after_s": None if flushed is None else round(flushed, 1),
        "exact_match_after_s": None if exact is None else round(exact, 1),
        "exact_match_after_load_end_s": None if exact is None else round(exact - (marks["load_end_s"] - up), 1),
        "catchup_bound_s": args.catchup_s,
        "caught_up": flushed is not None and flushed <= args.catchup_s and exact is not None,
    }


def redis_table(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    lt, st = r["loadgen_totals"], r["stats_totals_final"] or {}
    return [
        ("requests (during the outage)", f"{r['requests']} ({r['requests_during_outage']})", ""),
        ("routing errors", str(r["routing_errors"]), "0"),
        ("Redis down / up at, s", f"{r['redis_down_at_s']} / {r['redis_up_at_s']}", ""),
        ("/admin/stats 503 while down (polls)", f"{r['stats_503_while_down']} ({r['stats_polls_while_down']})", ""),
        ("/health said redis down", str(r["health_said_down"]), "True"),
        ("loadgen: requests / prompt / cached tokens",
         f"{lt['requests']} / {lt['prompt_tokens']} / {lt['cached_tokens']}", ""),
        ("/admin/stats at the end", "-" if not st else
         f"{st['requests']} / {st['prompt_tokens']} / {st['cached_tokens']}", "equal"),
        ("outage backlog in the stats, s after Redis came back", str(r["backlog_flushed_after_s"]),
         f"<= {r['catchup_bound_s']}"),
        ("stats equal to loadgen's, s after Redis came back (after the load ended)",
         f"{r['exact_match_after_s']} ({r.get('exact_match_after_load_end_s')})", ""),
        ("caught up", str(r["caught_up"]), "True"),
    ]


# ---- rolling --------------------------------------------------------------------------------------------------

async def run_rolling(args: argparse.Namespace) -> dict[str, Any]:
    fleet = Fleet(args, routers=2)
    try:
        return await _rolling(args, fleet)
    finally:
        fleet.close()


async def _rolling(args: argparse.Namespace, fleet: Fleet) -> dict[str, Any]:
    routers = fleet.routers
    await wait_router_sees(routers, {w: True for w in fleet.workers})
    rate = args.rate_per_worker * args.workers
    schedule = workload(int(rate * args.max_duration) + 10, rate, args.max_tokens, args.seed)
    rng = random.Random(args.seed + 1)
    streamed = [rng.random() < 0.5 for _ in schedule]
    phases: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    end = asyncio.Event()
    roll_s: list[float] = []

    async def roll() -> None:
        try:
            await asyncio.sleep(args.settle_s)
            for url in fleet.workers:
                p: dict[str, Any] = {"phase": f"worker {url.rsplit(':', 1)[1]}", "at_s": time.perf_counter() - t0}
                fleet.wprocs[url].send_signal(signal.SIGTERM)
                p["drain_exit_s"] = await wait_exit(fleet.wprocs[url], 90)
                await wait_router_sees(routers, {url: False})
                t = time.monotonic()
                await asyncio.to_thread(fleet.restart_worker, url)
                p["start_s"] = time.monotonic() - t
                p["routers_saw_s"] = await wait_router_sees(routers, {url: True})
                phases.append(p)
            for url in routers:
                p = {"phase": f"router {url.rsplit(':', 1)[1]}", "at_s": time.perf_counter() - t0}
                fleet.rprocs[url].send_signal(signal.SIGTERM)
                p["drain_exit_s"] = await wait_exit(fleet.rprocs[url], 90)
                t = time.monotonic()
                await asyncio.to_thread(fleet.restart_router, url)
                p["start_s"] = time.monotonic() - t
                p["routers_saw_s"] = await wait_router_sees([url], {w: True for w in fleet.workers})
                phases.append(p)
            await asyncio.sleep(args.settle_s)
        finally:
            roll_s.append(time.perf_counter() - t0)
            end.set()

    # The load runs until the roll is over (bounded by --max-duration and the schedule's length).
    calls, _ = await asyncio.gather(drive(routers, schedule, streamed, args.max_duration, stop=end), roll())
    lost = [c for c in calls if not c.ok]
    for k, p in enumerate(phases):  # a request belongs to the phase under way when it was sent
        until = phases[k + 1]["at_s"] if k + 1 < len(phases) else float("inf")
        mine = [c for c in calls if p["at_s"] <= c.sent_s < until]
        p["requests"] = len(mine)
        p["connect_retries"] = sum(c.connect_retries for c in mine)
        p["lost"] = sum(not c.ok for c in mine)
    for p in phases:
        for k in ("at_s", "drain_exit_s", "start_s", "routers_saw_s"):
            p[k] = round(p[k], 2)
    return {
        "workers": args.workers,
        "routers": len(routers),
        "requests": len(calls),
        "streamed": sum(c.stream for c in calls),
        "ok": len(calls) - len(lost),
        "lost": len(lost),
        "lost_by_kind": dict(Counter((c.error or str(c.status))[:80] for c in lost)),
        "lost_with_error_event": sum(c.error_event for c in lost),
        "connect_retries": sum(c.connect_retries for c in calls),
        "requests_retried": sum(1 for c in calls if c.connect_retries),
        "roll_s": round(roll_s[0], 1),
        "phases": phases,
    }


def rolling_table(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = [
        ("requests (streamed)", f"{r['requests']} ({r['streamed']})", ""),
        ("lost (errors or incomplete answers)", str(r["lost"]), "0"),
        ("connect-retries (requests retried)", f"{r['connect_retries']} ({r['requests_retried']})", ""),
        ("whole roll under load, s", str(r["roll_s"]), ""),
    ]
    for p in r["phases"]:
        rows.append((f"{p['phase']}: SIGTERM to exit / start / routers see it, s; requests, connect-retries, "
                     "lost", f"{p['drain_exit_s']} / {p['start_s']} / {p['routers_saw_s']}; {p.get('requests')}, "
                     f"{p.get('connect_retries')}, {p.get('lost')}", ""))
    return rows


# ---- output ---------------------------------------------------------------------------------------------------

COMMON = ("workers", "rate_per_worker", "max_tokens", "sim_speedup", "seed", "vnodes")
CONFIG = {"kill": COMMON + ("duration", "kill_at", "keys", "no_restart"),
          "redis": COMMON + ("redis_down_at", "redis_down_s", "redis_after_s", "catchup_s"),
          "rolling": COMMON + ("settle_s", "max_duration")}
SCENARIOS = {"kill": (run_kill, kill_table), "redis": (run_redis, redis_table), "rolling": (run_rolling, rolling_table)}


def table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| measure | value | target |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def markdown(doc: dict[str, Any]) -> str:
    out = [f"# {NAME}\n", "Fault benchmarks under steady load: `bench/faults_under_load.py` (its docstring says "
           "what each scenario does). Sim workers stand in for GPUs (the engine, scheduler and HTTP surface are the "
           "real ones; the forward pass is a timed sleep). Load: open loop, Poisson, completions of `max_tokens` "
           "tokens on 16 Zipf-popular documents; kill and rolling send half of them streamed, redis all streamed.\n"]
    for name in SCENARIOS:
        run = doc.get("scenarios", {}).get(name)
        if run is None:
            continue
        out.append(f"## {name}\n\n`{run['command']}`  \n{run['machine']['platform']}, {run['machine']['cpus']} "
                   f"CPUs (load average {run['machine'].get('load_avg_at_start')} at the start: the machine is "
                   f"shared), {run['date']}; config: "
                   f"{json.dumps({k: v for k, v in run['config'].items() if k in CONFIG[name]})}\n")
        out.append(table(SCENARIOS[name][1](run["results"])))
    return "\n".join(out)


def write(out: Path, name: str, run: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{NAME}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault("scenarios", {})[name] = run
    path.write_text(json.dumps(doc, indent=2) + "\n")
    (out / f"{NAME}.md").write_text(markdown(doc))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=list(SCENARIOS))
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--rate-per-worker", type=float, default=2.0, help="requests/s per worker (Poisson)")
    p.add_argument("--max-tokens", type=int, default=100, help="tokens per answer")
    p.add_argument("--sim-speedup", type=float, default=0.25, help="sim time runs this much faster (0.25: 25 ms a "
                   "decode step, so a 100-token answer streams for about 2.5 s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vnodes", type=int, help="the routers' ring points per worker (default: the router's, 160)")
    p.add_argument("--duration", type=float, default=40.0, help="kill: seconds of load")
    p.add_argument("--kill-at", type=float, default=15.0, help="kill: SIGKILL this many seconds into the load")
    p.add_argument("--keys", type=int, default=500, help="kill: routing keys whose decision is compared")
    p.add_argument("--no-restart", action="store_true", help="kill: do not restart the killed worker")
    p.add_argument("--redis-down-at", type=float, default=10.0)
    p.add_argument("--redis-down-s", type=float, default=60.0)
    p.add_argument("--redis-after-s", type=float, default=20.0)
    p.add_argument("--catchup-s", type=float, default=10.0, help="redis: the stats must hold the outage's "
                   "requests this many seconds after Redis is back")
    p.add_argument("--settle-s", type=float, default=5.0, help="rolling: load before the first and after the "
                   "last restart")
    p.add_argument("--max-duration", type=float, default=400.0, help="rolling: the load stops by then regardless")
    p.add_argument("--out", type=Path, help="merge the results into DIR/faults_under_load.{json,md}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for k in ("workers", "rate_per_worker", "max_tokens", "sim_speedup", "duration", "keys"):
        if getattr(args, k) <= 0:
            parser().error(f"--{k.replace('_', '-')} must be positive")
    if args.scenario == "rolling" and args.workers < 2:
        parser().error("rolling needs at least 2 workers")
    runner, rows = SCENARIOS[args.scenario]
    results = asyncio.run(runner(args))
    load_avg = [round(x, 1) for x in os.getloadavg()]
    config = {k: v for k, v in vars(args).items() if k in CONFIG[args.scenario]}
    run = {"command": "python bench/faults_under_load.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": {"platform": platform.platform(), "python": platform.python_version(),
                       "cpus": os.cpu_count(), "load_avg_at_start": load_avg},
           "config": config, "results": results}
    print(json.dumps(run, indent=2))
    print(table(rows(results)))
    if args.out:
        write(args.out, args.scenario, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
