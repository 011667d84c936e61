"""Serving one router process: load the tokenizer, build the app, run it (on a shared port when there are
several processes). A module of its own so that `--processes` can start it in spawned processes."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys

from aiohttp import web

from protocol.cli import configure_logging, raise_open_files_limit, settings_or_exit
from protocol.limits import JSONErrorRunner, header_limits
from protocol.modelfiles import ModelNotFound, load_tokenizer, resolve_model_path
from router.app import Router
from router.settings import RouterSettings, parse_args


def serve(argv: list[str] | None) -> int:
    settings = settings_or_exit(parse_args, argv)
    configure_logging(settings.log_level)
    try:
        tokenizer = load_tokenizer(resolve_model_path(settings.model))
        router = Router(settings, tokenizer)
    except (ModelNotFound, ValueError) as exc:
        print(f"cannot start the router: {exc}", file=sys.stderr)
        return 2
    log = logging.getLogger("prefixroute.router")
    log.info("policy %s, %d worker(s), %s mode", settings.policy, len(settings.workers),
             "open" if settings.open_mode else f"{len(settings.tenants)} tenant(s)")
    files = raise_open_files_limit()
    if files < 2 * settings.max_connections + 64:
        log.warning("open files limit %d is below 2 x max_connections (%d): raise `ulimit -n`", files,
                    settings.max_connections)
    # uvloop roughly halves the event loop's share of each proxied request; plain asyncio where it is missing.
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    # The tokenizer's import brings hundreds of thousands of long-lived objects; without freezing them every
    # full collection walks them all (about 15% of the router's CPU under load).
    gc.collect()
    gc.freeze()
    # handler_cancellation: a client that disconnects cancels its handler, which closes the upstream connection,
    # which makes the worker abort the request (a non-streamed one would otherwise generate to max_tokens).
    # On SIGTERM aiohttp stops listening and waits for handlers; Router.app ends them after the grace period.
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_run(router.app(), settings))
    return 0


async def _run(app: web.Application, settings: RouterSettings) -> None:
    """web.run_app's job, with JSONErrorRunner: a malformed or oversized request head gets a JSON error."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = JSONErrorRunner(app, access_log=None, handler_cancellation=True, head_timeout_s=settings.body_timeout_s,
                             shutdown_timeout=settings.shutdown_grace_s + 5, **header_limits(settings.max_header_bytes))
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port, reuse_port=settings.processes > 1).start()
        await stop.wait()
    finally:
        await runner.cleanup()
