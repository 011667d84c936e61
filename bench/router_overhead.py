"""Router overhead: added latency through the router versus straight to the upstream, and one router process's
maximum requests/s, against fast upstream servers on 127.0.0.1 that answer at once.

Per prompt size (200 to 20,000 tokens), at concurrency 1: pairs of the same request sent back to back, once
straight to the upstream and once through the router (which goes first alternates from pair to pair), so noise
hits both alike. Added latency = percentiles (p50, p90, p99) of the per-pair differences routed_i - direct_i,
not differences of percentiles (p99(routed) - p99(direct) mixes unrelated requests and can come out below the
p50); direct and routed p50 are reported alongside. The same for streamed requests (time to [DONE]);
the router's in-process key computation (render + tokenize P tokens + hash) with a cold and a warm
tokenization cache; then a closed-loop load (wrk when installed, else Python) for requests/s and router CPU
per request. Side by side in one run: prefixroute (with `--processes 1` and more, throughput only past 1) and
SGLang's router from PyPI (`sglang-router`), in front of the same `--upstreams` fast servers, and
`aiohttp-floor`: a pass-through proxy of a dozen lines on aiohttp's server and client and uvloop, forwarding
bytes round robin and doing nothing else, the floor any router on aiohttp's client stands on; `upstream-floor`:
the same proxy with prefixroute's own upstream client (router.upstream) in place of aiohttp's, the parts
prefixroute is built from: what prefixroute costs beyond it is its own work (keys, policy, accounting).
Prints JSON, then markdown tables; `--out DIR` writes router_overhead.{json,md}.

  python bench/router_overhead.py [--samples 300] [--routers prefixroute sglang] [--processes 1 2] [--out DIR]
  python bench/router_overhead.py --serve-upstream PORT    (the fast upstream itself)
  python bench/router_overhead.py --serve-floor PORT URL... (the aiohttp pass-through floor)
  python bench/router_overhead.py --serve-upstream-floor PORT URL... (the same on router.upstream)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from loadgen.report import percentile  # noqa: E402
from router.upstream import UpstreamPool  # noqa: E402

STREAM_CHUNKS = 16


# ---- the fast upstream -------------------------------------------------------------------------------------

def upstream_app() -> web.Application:
    usage = {"prompt_tokens": 10, "completion_tokens": STREAM_CHUNKS, "total_tokens": 10 + STREAM_CHUNKS,
             "prompt_tokens_details": {"cached_tokens": 0}}
    body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "fast",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                    "finish_reason": "stop"}], "usage": usage}).encode()
    chunk = (b'data: {"id":"x","object":"chat.completion.chunk","created":0,"model":"fast",'
             b'"choices":[{"index":0,"delta":{"content":"tok"},"finish_reason":null}]}\n\n')
    final = b"data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "fast",
                                    "choices": [], "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n"

    async def chat(request: web.Request) -> web.StreamResponse:
        req = await request.json()
        if not req.get("stream"):
            return web.Response(body=body, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(STREAM_CHUNKS):
            await resp.write(chunk)
        await resp.write(final)
        await resp.write_eof()
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fast", "object": "model", "created": 0}]})

    async def sglang_info(request: web.Request) -> web.Response:  # what SGLang's router asks a worker
        return web.json_response({"model_path": "fast", "tokenizer_path": "fast", "is_generation": True})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/get_server_info", sglang_info)
    app.router.add_get("/get_model_info", sglang_info)
    return app


def floor_app(upstreams: list[str], lean: bool = False) -> web.Application:
    """Forward the body round robin and return the answer: no parsing, keys, policy, metrics or failover. `lean`:
    through router.upstream instead of aiohttp's client."""
    turn = [0]

    async def start(app: web.Application) -> None:
        app["client"] = UpstreamPool() if lean else \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def stop(app: web.Application) -> None:
        if not lean:
            await app["client"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        turn[0] += 1
        if lean:
            return await forward_lean(request, body, upstreams[turn[0] % len(upstreams)])
        url = upstreams[turn[0] % len(upstreams)] + request.path
        async with request.app["client"].post(url, data=body, headers={"Content-Type": "application/json"}) as up:
            if not up.content_type.startswith("text/event-stream"):
                return web.Response(body=await up.read(), status=up.status, content_type=up.content_type)
            out = web.StreamResponse(status=up.status, headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def forward_lean(request: web.Request, body: bytes, upstream: str) -> web.StreamResponse:
        up = await request.app["client"].post(upstream, request.path, body, {"Content-Type": "application/json"})
        try:
            ctype = up.headers.get("content-type", "application/json")
            if not ctype.startswith("text/event-stream"):
                return web.Response(body=await up.read(), status=up.status, headers={"Content-Type": ctype})
            out = web.StreamResponse(status=up.status, headers={"Content-Type": ctype})
            await out.prepare(request)
            while chunk := await up.readany():
                await out.write(chunk)
            await out.write_eof()
            return out
        finally:
            up.release()

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application(client_max_size=64 << 20)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_post("/v1/chat/completions", forward)
    app.router.add_get("/health", health)
    return app


# ---- helpers -----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def wait_ok(session: aiohttp.ClientSession, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.25)
    raise TimeoutError(url)


def prompt_of(tokens: int) -> list[dict[str, str]]:
    words = " ".join(f"w{i % 97}" for i in range(tokens // 2))  # about two tokens per word
    return [{"role": "system", "content": words}, {"role": "user", "content": "hi"}]


def paired_added(direct: list[float], routed: list[float]) -> dict[str, Any]:
    """Added latency from paired samples: direct[i] and routed[i] are the same request sent back to back.
    Returns, in ms, p50 of each path and p50/p90/p99 (nearest rank) of the per-pair differences
    routed[i] - direct[i]."""
    if len(direct) != len(routed) or not direct:
        raise ValueError(f"need equally many direct and routed samples, got {len(direct)} and {len(routed)}")
    added = [b - a for a, b in zip(direct, routed)]
    out: dict[str, Any] = {"pairs": len(added), "direct_p50_ms": percentile(direct, 50) * 1e3,
                           "routed_p50_ms": percentile(routed, 50) * 1e3}
    for p in (50, 90, 99):
        out[f"added_p{p}_ms"] = percentile(added, p) * 1e3
    return out


async def one(session: aiohttp.ClientSession, url: str, payload: bytes) -> float:
    t0 = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", data=payload,
                            headers={"Content-Type": "application/json"}) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}")
    return time.perf_counter() - t0


async def latency(session, direct: str, routed: str, payload: bytes, samples: int) -> dict[str, Any]:
    """`samples` pairs of the same request, direct and routed back to back; the first of each pair alternates."""
    d, r = [], []
    for _ in range(10):  # warm both paths (connections, tokenization cache)
        await one(session, direct, payload)
        await one(session, routed, payload)
    for i in range(samples):
        if i % 2 == 0:
            d.append(await one(session, direct, payload))
            r.append(await one(session, routed, payload))
        else:
            r.append(await one(session, routed, payload))
            d.append(await one(session, direct, payload))
    return paired_added(d, r)


def keyer_timing(sizes: list[int], reps: int = 200) -> dict[int, dict[str, float]]:
    from protocol.modelfiles import default_model_path, load_tokenizer
    from protocol.openai import ChatCompletionRequest
    from router.prefix import PrefixKeyer
    from router.tenants import Tenant, derive_key

    tok = load_tokenizer(default_model_path())
    tenant = Tenant("bench", derive_key("bench"))
    out = {}
    for n in sizes:
        reqs = [ChatCompletionRequest.model_validate({"messages": [
            {"role": "system", "content": f"[{i}] " + prompt_of(n)[0]["content"]},
            {"role": "user", "content": "hi"}]}) for i in range(reps)]
        cold = PrefixKeyer(tok, 256)
        t0 = time.perf_counter()
        for r in reqs:  # every prompt distinct: the tokenization cache never hits
            cold.keys(tenant, r, None)
        t_cold = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for _ in range(reps):  # one prompt again and again
            cold.keys(tenant, reqs[0], None)
        t_warm = (time.perf_counter() - t0) / reps
        out[n] = {"key_cold_us": t_cold * 1e6, "key_warm_us": t_warm * 1e6}
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children (a router's --processes), live ones included."""
    import psutil

    total = 0.0
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def wrk_rps(url: str, payload: bytes, seconds: int, connections: int) -> float:
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(payload.decode())}\n'
                 'wrk.headers["Content-Type"] = "application/json"\n')
    script.close()
    out = subprocess.run(["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "-s", script.name,
                          url + "/v1/chat/completions"], capture_output=True, text=True, timeout=seconds + 60).stdout
    os.unlink(script.name)
    non2xx = [ln for ln in out.splitlines() if "Non-2xx" in ln]
    if non2xx:
        raise RuntimeError(f"wrk saw errors: {non2xx}")
    return float(next(ln for ln in out.splitlines() if ln.startswith("Requests/sec")).split()[1])


async def python_rps(url: str, payload: bytes, seconds: float, connections: int) -> float:
    done = 0
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as s:
        async def loop():
            nonlocal done
            while time.perf_counter() < stop:
                await one(s, url, payload)
                done += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(connections)))
        return done / (time.perf_counter() - t0)


def router_command(kind: str, port: int, upstreams: list[str], processes: int) -> list[str]:
    if kind == "aiohttp-floor":
        return [__file__, "--serve-floor", str(port), *upstreams]
    if kind == "upstream-floor":
        return [__file__, "--serve-upstream-floor", str(port), *upstreams]
    if kind == "sglang":  # SGLang's router from PyPI, its default policy (cache_aware)
        return ["-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port), "--worker-urls",
                *upstreams, "--log-level", "warn"]
    return ["-m", "router", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            "--processes", str(processes), *sum((["--worker", u] for u in upstreams), [])]


async def measure(s: aiohttp.ClientSession, args: argparse.Namespace, kind: str, processes: int,
                  upstreams: list[str]) -> dict[str, Any]:
    port = free_port()
    router = f"http://127.0.0.1:{port}"
    proc = spawn(router_command(kind, port, upstreams, processes))
    try:
        await wait_ok(s, router + ("/health" if kind != "sglang" else "/v1/models"))
        if processes > 1:
            await asyncio.sleep(20)  # the other processes bind once they have loaded the tokenizer
        out: dict[str, Any] = {"latency": {}, "streaming": {}}
        if processes == 1:
            for n in args.sizes:
                body = {"model": "fast", "messages": prompt_of(n), "max_tokens": 16}
                payload = json.dumps(body).encode()
                out["latency"][n] = await latency(s, upstreams[0], router, payload, args.samples)
                spayload = json.dumps({**body, "stream": True}).encode()
                out["streaming"][n] = await latency(s, upstreams[0], router, spayload, args.samples)
        small = json.dumps({"model": "fast", "messages": prompt_of(200), "max_tokens": 16}).encode()
        c0, t0 = cpu_seconds(proc.pid), time.perf_counter()
        tool = "wrk" if shutil.which("wrk") else "python"
        if tool == "wrk":
            rps = wrk_rps(router, small, args.seconds, args.connections)
        else:
            rps = await python_rps(router, small, args.seconds, args.connections)
        cpu = cpu_seconds(proc.pid) - c0
        wall = time.perf_counter() - t0
        out["throughput"] = {"tool": tool, "connections": args.connections, "rps": rps,
                             "router_cpu_ms_per_request": cpu / (rps * wall) * 1e3 if rps else None,
                             "router_cpu_util": cpu / wall}
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@contextlib.asynccontextmanager
async def fast_upstreams(n: int) -> AsyncIterator[list[str]]:
    """`n` fast upstream servers on 127.0.0.1, answering: their URLs."""
    ports = [free_port() for _ in range(n)]
    procs = [spawn([__file__, "--serve-upstream", str(p)]) for p in ports]
    upstreams = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        async with aiohttp.ClientSession() as s:
            for u in upstreams:
                await wait_ok(s, u + "/health")
        yield upstreams
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with fast_upstreams(args.upstreams) as upstreams, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as s:
        for kind in args.routers:
            for processes in (args.processes if kind == "prefixroute" else [1]):
                name = kind if processes == 1 else f"{kind} x{processes}"
                results[name] = await measure(s, args, kind, processes, upstreams)
    results["key_computation"] = keyer_timing(args.sizes)
    return results


def markdown(r: dict[str, Any]) -> str:
    routers = [k for k in r if k != "key_computation"]
    lines = ["| router | prompt tokens | direct p50 ms | routed p50 ms | added p50 ms | added p90 ms | added p99 ms "
             "| streamed: added p50 ms | streamed: added p90 ms | streamed: added p99 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    pairs = 0
    for name in routers:
        for n, lat in r[name]["latency"].items():
            st = r[name]["streaming"][n]
            pairs = lat["pairs"]
            lines.append(f"| {name} | {n} | {lat['direct_p50_ms']:.3f} | {lat['routed_p50_ms']:.3f} | "
                         f"{lat['added_p50_ms']:.3f} | {lat['added_p90_ms']:.3f} | {lat['added_p99_ms']:.3f} | "
                         f"{st['added_p50_ms']:.3f} | {st['added_p90_ms']:.3f} | {st['added_p99_ms']:.3f} |")
    lines += ["", f"Added latency: percentiles of routed_i - direct_i over {pairs} pairs per row, each pair the same "
              "request sent straight to the upstream and through the router back to back at concurrency 1 "
              "(nearest-rank percentiles; direct and routed p50 are each path's own). Streamed: time to [DONE].", "",
              "| router | requests/s | router CPU ms per request | cores busy |", "|---|---:|---:|---:|"]
    for name in routers:
        t = r[name]["throughput"]
        lines.append(f"| {name} | {t['rps']:.0f} | {t['router_cpu_ms_per_request']:.3f} | "
                     f"{t['router_cpu_util']:.2f} |")
    t = r[routers[0]]["throughput"] if routers else {"tool": "-", "connections": 0}
    lines += ["", f"Throughput: {t['tool']}, {t['connections']} connections, 200-token prompts, closed loop; the load "
              "generator, the upstreams and the router share the machine's cores.", "",
              "| prompt tokens | prefixroute key cold us | key warm us |", "|---:|---:|---:|"]
    for n, k in r["key_computation"].items():
        lines.append(f"| {n} | {k['key_cold_us']:.0f} | {k['key_warm_us']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    p.add_argument("--serve-floor", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--sizes", type=int, nargs="+", default=[200, 2000, 20000])
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--upstreams", type=int, default=4)
    p.add_argument("--serve-upstream-floor", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--routers", nargs="+", default=["prefixroute", "sglang", "aiohttp-floor", "upstream-floor"],
                   choices=["prefixroute", "sglang", "aiohttp-floor", "upstream-floor"])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="prefixroute --processes to measure")
    p.add_argument("--out")
    args = p.parse_args()
    if args.serve_floor or args.serve_upstream_floor:
        import uvloop

        lean = bool(args.serve_upstream_floor)
        port, *ups = args.serve_upstream_floor or args.serve_floor
        web.run_app(floor_app(ups, lean), host="127.0.0.1", port=int(port), print=None, access_log=None,
                    loop=uvloop.new_event_loop())
        return 0
    if args.serve_upstream:
        web.run_app(upstream_app(), host="127.0.0.1", port=args.serve_upstream, print=None, access_log=None,
                    shutdown_timeout=0.5)
        return 0
    results = asyncio.run(run(args))
    try:
        sglang = importlib.metadata.version("sglang-router")
    except importlib.metadata.PackageNotFoundError:
        sglang = None
    report = {"versions": {"sglang-router": sglang},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "loadavg_at_end": os.getloadavg()},  # 1, 5, 15 min: other work sharing the CPUs
              "config": {k: v for k, v in vars(args).items() if not k.startswith("serve_")},
              "results": results}
    md = markdown(results)
    print(json.dumps(report, indent=2))
    print(md)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "router_overhead.json").write_text(json.dumps(report, indent=2))
        Path(args.out, "router_overhead.md").write_text(
            f"Command: `python bench/router_overhead.py {' '.join(sys.argv[1:])}` (load average "
            f"{report['machine']['loadavg_at_end'][1]:.1f} over the last 5 min of the run)\n\n{md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
