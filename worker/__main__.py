"""`python -m worker`: load the model (or, with --backend sim, the GPU cost model), start the engine thread(s)
and serve the OpenAI API; the sim backend can serve several workers from one process (--replicas)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import psutil
import torch
from aiohttp import web

from protocol.cli import configure_logging, settings_or_exit
from protocol.limits import JSONErrorRunner, header_limits
from protocol.redis import redis_client
from protocol.statskeys import Keys
from worker.engine.engine import Engine, EngineConfig
from worker.engine.loader import ModelNotFound, load_model
from worker.engine.runner import ModelRunner, Runner
from worker.server import WorkerServer
from worker.settings import WorkerSettings, default_cache_bytes, parse_args
from worker.sim import PROFILES, SimRunner, load_sim
from worker.stats import StatsPublisher

log = logging.getLogger("prefixroute.worker")


def _engine(settings: WorkerSettings, runner: Runner, cache_bytes: int, max_num_seqs: int,
            max_batch_tokens: int, max_kv_tokens: int | None = None, output_weight: float = 1.0) -> Engine:
    return Engine(runner, EngineConfig(
        block_size=settings.block_size,
        cache_bytes=cache_bytes,
        max_num_seqs=max_num_seqs,
        max_batch_tokens=max_batch_tokens,
        cache_generated=settings.cache_generated,
        max_kv_tokens=max_kv_tokens,
        output_weight=output_weight,
    ))


def build(settings: WorkerSettings) -> list[WorkerServer]:
    if settings.backend == "sim":
        return build_sim(settings)
    if settings.replicas != 1:
        raise ValueError("--replicas is for the sim backend; run one model worker per GPU")
    loaded = load_model(settings.model, settings.device, settings.dtype, settings.served_model_name)
    runner = ModelRunner(loaded)
    cache_bytes = settings.cache_bytes
    if settings.cache_tokens is not None:
        cache_bytes = settings.cache_tokens * runner.kv_bytes_per_token
    if cache_bytes is None:
        free = torch.cuda.mem_get_info(loaded.device)[0] if loaded.device.type == "cuda" else None
        cache_bytes = default_cache_bytes(loaded.device.type, free, psutil.virtual_memory().total)
    engine = _engine(settings, runner, cache_bytes, settings.max_num_seqs, settings.max_batch_tokens)
    log.info("model %s on %s (%s), context %d, cache %.0f MiB (%d tokens), block %d", loaded.name, loaded.device,
             loaded.dtype, loaded.max_model_len, cache_bytes / 2**20, cache_bytes // runner.kv_bytes_per_token,
             settings.block_size)
    return [WorkerServer(settings, loaded, engine)]


def build_sim(settings: WorkerSettings) -> list[WorkerServer]:
    profile = PROFILES.get(settings.sim_profile)
    if profile is None:
        raise ValueError(f"unknown sim profile {settings.sim_profile!r}; known: {', '.join(PROFILES)}")
    loaded = load_sim(settings.model, settings.served_model_name, profile)
    explicit = settings.model_fields_set
    # A GPU engine's defaults, unless given: its batch limits and the KV memory the GPU leaves.
    max_num_seqs = settings.max_num_seqs if "max_num_seqs" in explicit else profile.max_num_seqs
    # The step budget is the GPU's in real tokens: with a token scale, each sim token stands for that many.
    max_batch_tokens = settings.max_batch_tokens if "max_batch_tokens" in explicit else \
        max(16, round(profile.max_batch_tokens / settings.sim_token_scale))
    cache_bytes = settings.cache_bytes if settings.cache_bytes is not None else profile.kv_capacity_bytes
    if settings.cache_tokens is not None:
        cache_bytes = int(settings.cache_tokens * profile.kv_bytes_per_token * settings.sim_token_scale)
    servers = []
    for i in range(settings.replicas):
        port = settings.port + i if settings.port else 0
        wid = f"{settings.worker_id}-{i}" if settings.worker_id and settings.replicas > 1 else settings.worker_id
        s = settings.model_copy(update={"port": port, "worker_id": wid})
        runner = SimRunner(loaded, profile, settings.sim_speedup, settings.sim_token_scale)
        # On the GPU, running requests' KV and the prefix cache share one pool: admission waits for room in it.
        # A generated token is one real token: 1 / token_scale of a sim token in the step budget and KV pool.
        engine = _engine(s, runner, cache_bytes, max_num_seqs, max_batch_tokens,
                         cache_bytes // runner.kv_bytes_per_token, 1.0 / settings.sim_token_scale)
        servers.append(WorkerServer(s, loaded, engine))
    log.info("sim %s x%d: %s, cache %d tokens each, speedup %.1f, token scale %.1f", profile.name,
             settings.replicas, loaded.name, cache_bytes // servers[0].engine.runner.kv_bytes_per_token,
             settings.sim_speedup, settings.sim_token_scale)
    return servers


def _publisher(srv: WorkerServer, client, port: int) -> StatsPublisher:
    s = srv.settings
    wid = s.worker_id or f"{s.host}:{port}"
    url = s.advertise_url if s.advertise_url and s.replicas == 1 else f"http://{s.host}:{port}"
    e = srv.engine
    info = {"url": url, "model": srv.loaded.name, "block_size": e.config.block_size,
            "capacity_tokens": e.cache.capacity_bytes // e.runner.kv_bytes_per_token}
    return StatsPublisher(client, Keys(s.stats_namespace), wid, info, srv.gauges, s.stats_interval_s,
                          s.heartbeat_ttl_s)


async def serve(servers: list[WorkerServer]) -> None:
    """Serve every app until SIGINT or SIGTERM, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runners, tasks = [], []
    settings = servers[0].settings
    client = redis_client(settings.redis_url) if settings.redis_url else None
    try:
        for srv in servers:
            # handler_cancellation: a client (or router) that disconnects cancels its handler, which aborts the
            # request in the engine, streamed or not. The shutdown timeout covers the grace period below.
            # JSONErrorRunner: a malformed or oversized request head gets a JSON error, not aiohttp's plain text.
            r = JSONErrorRunner(srv.app(), access_log=None, handler_cancellation=True,
                                shutdown_timeout=srv.settings.shutdown_grace_s + 10,
                                head_timeout_s=srv.settings.body_timeout_s,
                                **header_limits(srv.settings.max_header_bytes))
            await r.setup()
            await web.TCPSite(r, srv.settings.host, srv.settings.port).start()
            runners.append(r)
            if client is not None:
                srv.stats = _publisher(srv, client, r.addresses[0][1])
                tasks.append(asyncio.create_task(srv.stats.run()))
        await stop.wait()
    finally:
        # Graceful: refuse new requests (503, which a router retries elsewhere) and leave Redis first, so routers
        # stop sending here; then stop listening and give the requests in flight the grace period; past it the
        # engine stops and each ends with an error its client sees.
        for srv in servers:
            srv.draining = True
        for t in tasks:
            t.cancel()
        for srv in servers:
            if srv.stats is not None:
                await srv.stats.close()
        grace = settings.shutdown_grace_s
        n = sum(srv.engine.num_running + srv.engine.num_waiting for srv in servers)
        log.info("shutting down: %d request(s) in flight get %.0f s", n, grace)
        stoppers: list[asyncio.Future] = []
        timer = loop.call_later(grace, lambda: stoppers.extend(
            asyncio.ensure_future(asyncio.to_thread(srv.engine.stop)) for srv in servers))
        with contextlib.suppress(Exception):
            await asyncio.gather(*(r.cleanup() for r in runners))
        timer.cancel()
        if stoppers:
            await asyncio.gather(*stoppers)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()


def main(argv: list[str] | None = None) -> int:
    settings = settings_or_exit(parse_args, argv)
    configure_logging(settings.log_level)
    try:
        servers = build(settings)
    except (ModelNotFound, ValueError, RuntimeError) as exc:
        print(f"cannot start the worker: {exc}", file=sys.stderr)
        return 2
    for srv in servers:
        srv.engine.start()
    try:
        asyncio.run(serve(servers))
    finally:
        for srv in servers:
            srv.engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
