"""Memory under many unique prompts: does the router's or a worker's memory flatten at its configured bounds, or
grow with every request?

redis-server, --workers sim workers (fast --sim-speedup) and a router, Redis on for both (--redis-url: the shared
decision log, the workers' stats deltas and per-key tables are exercised). A closed loop of --concurrency aiohttp
clients sends --requests /v1/completions requests, each a unique random prompt (about 2 tokens per word) with a
unique `user` (so the router's session table fills too), max_tokens 1. Every --sample-s seconds, and when the
count crosses each checkpoint, the RSS of the router and of each worker (psutil) and Redis' used_memory are
sampled. The router's bounds (max_tracked_keys: rate and session tables; share_log_entries: the decision log;
the prefix index: tokens per worker, from the workers' cache_capacity_tokens) and the workers' cache are printed
beside the figures; max_tracked_keys and share_log_entries are set small (--max-tracked-keys,
--share-log-entries) so that they fill within the run and a flat line after that is visible.

Run: python bench/memory_bound.py --requests 100000 --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil
import redis as redis_lib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness.procs import start_redis, start_router, start_sim_processes, stop_process  # noqa: E402

_C, _V = "bcdfghklmnprstvwz", "aeiou"


def vocabulary(rng: random.Random, n: int = 20_000) -> list[str]:
    return ["".join(rng.choice(_C) + rng.choice(_V) for _ in range(rng.randint(1, 3))) for _ in range(n)]


class Sampler:
    def __init__(self, pids: dict[str, int], redis_url: str):
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.redis = redis_lib.Redis.from_url(redis_url)
        self.samples: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    def sample(self, done: int, errors: int) -> dict[str, Any]:
        s: dict[str, Any] = {"t_s": round(time.monotonic() - self.t0, 1), "requests": done, "errors": errors}
        for name, p in self.procs.items():
            s[f"{name}_rss_mib"] = round(p.memory_info().rss / 2**20, 1)
        info = self.redis.info("memory")
        s["redis_used_mib"] = round(info["used_memory"] / 2**20, 1)
        s["redis_keys"] = self.redis.dbsize()
        self.samples.append(s)
        return s


async def load(router: str, n: int, concurrency: int, words: int, sampler: Sampler, sample_s: float,
               checkpoints: list[int], seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    vocab = vocabulary(rng)
    state = {"next": 0, "done": 0, "errors": 0, "statuses": {}}
    marks = sorted(c for c in checkpoints if c <= n)
    at_mark: dict[int, dict[str, Any]] = {}
    loop = asyncio.get_running_loop()

    async def one(session: aiohttp.ClientSession) -> None:
        while state["next"] < n:
            i = state["next"]
            state["next"] += 1
            body = {"prompt": f"{i} " + " ".join(rng.choices(vocab, k=words)), "max_tokens": 1, "temperature": 0,
                    "user": f"user-{i}"}
            try:
                async with session.post(router + "/v1/completions", json=body) as r:
                    await r.read()
                    state["statuses"][r.status] = state["statuses"].get(r.status, 0) + 1
                    if r.status != 200:
                        state["errors"] += 1
            except aiohttp.ClientError:
                state["errors"] += 1
            state["done"] += 1
            if marks and state["done"] >= marks[0]:
                m = marks.pop(0)
                at_mark[m] = await loop.run_in_executor(None, sampler.sample, state["done"], state["errors"])
                print(f"  {m} requests: {json.dumps(at_mark[m])}", file=sys.stderr, flush=True)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(sample_s)
            await loop.run_in_executor(None, sampler.sample, state["done"], state["errors"])

    t0 = time.monotonic()
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
        tick = asyncio.create_task(ticker())
        try:
            await asyncio.gather(*(one(session) for _ in range(concurrency)))
        finally:
            tick.cancel()
    elapsed = time.monotonic() - t0
    return {"requests": state["done"], "errors": state["errors"], "statuses": state["statuses"],
            "elapsed_s": round(elapsed, 1), "requests_per_s": round(state["done"] / elapsed, 1),
            "at_checkpoints": {str(k): v for k, v in sorted(at_mark.items())}}


def worker_cache(url: str) -> dict[str, float]:
    """The worker's prefix cache gauges from its /metrics: bytes used, byte budget, blocks."""
    want = {"prefixroute_worker_cache_used_bytes": "used_bytes", "prefixroute_worker_cache_capacity_bytes":
            "capacity_bytes", "prefixroute_worker_cache_blocks": "blocks"}
    out = {}
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        name, _, value = line.partition(" ")
        if name in want:
            out[want[name]] = float(value)
    return out


def growth(samples: list[dict[str, Any]], name: str, lo: int, hi: int) -> float | None:
    """MiB gained between the first samples at or past `lo` and `hi` requests."""
    a = next((s for s in samples if s["requests"] >= lo), None)
    b = next((s for s in samples if s["requests"] >= hi), None)
    return None if a is None or b is None else round(b[name] - a[name], 1)


def markdown(report: dict[str, Any]) -> str:
    r, c, m = report["results"], report["config"], report["machine"]
    names = [k for k in r["start"] if k.endswith("_mib")]
    head = ["| sampled at | " + " | ".join(n.replace("_mib", " (MiB)").replace("_", " ") for n in names)
            + " | redis keys |", "|---" * (len(names) + 2) + "|"]
    rows = [("start", r["start"])] + [(f"{int(k):,} requests", v) for k, v in r["at_checkpoints"].items()]
    lines = [f"Memory bound: `{report['command']}`", "",
             f"{m['platform']}, {m['cpu_count']} CPUs, Python {m['python']}, load average at end "
             f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_end'])}; {r['requests']:,} requests "
             f"({r['errors']} errors, statuses {r['statuses']}) in {r['elapsed_s']} s, {r['requests_per_s']}/s, "
             f"concurrency {c['concurrency']}, {c['workers']} sim workers (speedup {c['sim_speedup']}), prompts "
             f"of {c['words']} random words (~{2 * c['words']} tokens), each unique, a unique `user` each.", ""]
    lines += head
    for label, s in rows:
        lines.append(f"| {label} | " + " | ".join(str(s[n]) for n in names) + f" | {s['redis_keys']:,} |")
    lines.append("| max | " + " | ".join(str(r["max"][n]) for n in names) + f" | {r['max']['redis_keys']:,} |")
    lines += ["", "Growth (MiB) between checkpoints:", "", "| | " + " | ".join(n.replace("_mib", "") for n in names)
              + " |", "|---" * (len(names) + 1) + "|"]
    for span, g in r["growth_mib"].items():
        lines.append(f"| {span} | " + " | ".join(str(g[n]) for n in names) + " |")
    lines += ["", f"At the end: worker caches {r['worker_caches_at_end']}; Redis {r['redis_tables_at_end']}."]
    lines += ["", "Configured bounds: " + ", ".join(f"{k} = {v}" for k, v in r["bounds"].items()) + ".", "",
              "Verdict: " + r["verdict"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--sim-speedup", type=float, default=1000.0)
    p.add_argument("--words", type=int, default=150, help="random words per prompt (about 2 tokens each)")
    p.add_argument("--max-tracked-keys", type=int, default=20_000, help="router: rate and session table bound")
    p.add_argument("--share-log-entries", type=int, default=20_000, help="router: decisions kept in Redis")
    p.add_argument("--sample-s", type=float, default=3.0)
    p.add_argument("--no-redis", action="store_true", help="workers and router without --redis-url (a diagnostic: "
                   "Redis itself still runs, for the sampler)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="directory for memory_bound.json and memory_bound.md")
    args = p.parse_args(argv)
    checkpoints = [c for c in (1_000, 10_000, 20_000, 50_000, 75_000, 100_000) if c < args.requests] + [args.requests]

    procs = []
    try:
        redis_url, rproc = start_redis()
        procs.append(rproc)
        use = [] if args.no_redis else ["--redis-url", redis_url]
        started = start_sim_processes(args.workers, "--sim-speedup", str(args.sim_speedup), *use, "--log-level",
                                      "warning")
        procs += [pr for _, pr in started]
        workers = [u for u, _ in started]
        env = {"PREFIXROUTE_ROUTER_MAX_TRACKED_KEYS": str(args.max_tracked_keys),
               "PREFIXROUTE_ROUTER_SHARE_LOG_ENTRIES": str(args.share_log_entries)}
        router, rtproc = start_router(workers, *use, "--log-level", "warning", env=env)
        procs.append(rtproc)
        health = [httpx.get(u + "/health", timeout=5).json() for u in workers]
        pids = {"router": rtproc.pid, **{f"worker{i}": pr.pid for i, (_, pr) in enumerate(started)}}
        sampler = Sampler(pids, redis_url)
        start = sampler.sample(0, 0)
        res = asyncio.run(load(router, args.requests, args.concurrency, args.words, sampler, args.sample_s,
                               checkpoints, args.seed))
        r = redis_lib.Redis.from_url(redis_url)
        ns = "prefixroute"
        tables = {"decision_log_entries": r.xlen(f"{ns}:router:decisions"), "top_keys": r.zcard(f"{ns}:keys"),
                  "per_key_hashes": sum(1 for _ in r.scan_iter(match=f"{ns}:key:*", count=10_000))}
        r.close()
        caches = [worker_cache(u) for u in workers]
    finally:
        for pr in reversed(procs):
            stop_process(pr)

    samples = sampler.samples
    names = [k for k in start if k.endswith("_mib")]
    res["start"] = start
    res["max"] = {n: max(s[n] for s in samples) for n in names} | {"redis_keys": max(s["redis_keys"] for s in samples)}
    n = args.requests
    spans = [(0, min(10_000, n)), (min(10_000, n), min(50_000, n)), (min(50_000, n), n)]
    res["growth_mib"] = {f"{a:,}-{b:,}": {nm: growth(samples, nm, a, b) for nm in names} for a, b in spans if b > a}
    res["redis_tables_at_end"] = tables
    res["worker_caches_at_end"] = caches
    res["bounds"] = {"max_tracked_keys": args.max_tracked_keys, "share_log_entries": args.share_log_entries,
                     "index_tokens_per_worker (worker cache_capacity_tokens)":
                         [h.get("cache_capacity_tokens") for h in health],
                     "worker_cache_capacity_bytes": [c.get("capacity_bytes") for c in caches],
                     "worker stats per-key table (per flush)": 10_000, "redis top keys": 1000}
    last = spans[-1]
    proc_names = [nm for nm in names if nm != "redis_used_mib"]
    tail = {nm: growth(samples, nm, *last) for nm in names}
    flat = all((tail[nm] or 0) <= 10 for nm in proc_names)
    res["verdict"] = (f"{'flat' if flat else 'GROWING'} over the last span ({last[0]:,}-{last[1]:,} requests): "
                      + ", ".join(f"{nm.replace('_mib', '')} {tail[nm]:+} MiB" for nm in names if tail[nm] is not None)
                      + " (flat: at most 10 MiB for router and workers)")
    res["samples"] = samples
    report = {"benchmark": "memory_bound", "command": " ".join(["python", "bench/memory_bound.py", *sys.argv[1:]]),
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpu_count": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
              "config": {k: getattr(args, k) for k in ("requests", "concurrency", "workers", "sim_speedup", "words",
                                                       "max_tracked_keys", "share_log_entries", "sample_s", "seed",
                                                       "no_redis")},
              "results": res}
    text = json.dumps(report, indent=1)
    md = markdown(report)
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=1) + "\n\n" + md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "memory_bound.json").write_text(text + "\n")
        (args.out / "memory_bound.md").write_text(md)
    return 0 if flat and res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
