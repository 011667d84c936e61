"""`python -m worker`: load the model, start the engine thread and serve the OpenAI API."""

from __future__ import annotations

import logging
import sys

import psutil
import torch
from aiohttp import web
from pydantic import ValidationError

from worker.engine.engine import Engine, EngineConfig
from worker.engine.loader import ModelNotFound, load_model
from worker.engine.runner import ModelRunner
from worker.server import WorkerServer
from worker.settings import WorkerSettings, default_cache_bytes, parse_args

log = logging.getLogger("prefixroute.worker")


def build(settings: WorkerSettings) -> WorkerServer:
    loaded = load_model(settings.model, settings.device, settings.dtype, settings.served_model_name)
    runner = ModelRunner(loaded)
    cache_bytes = settings.cache_bytes
    if cache_bytes is None:
        free = torch.cuda.mem_get_info(loaded.device)[0] if loaded.device.type == "cuda" else None
        cache_bytes = default_cache_bytes(loaded.device.type, free, psutil.virtual_memory().total)
    engine = Engine(runner, EngineConfig(
        block_size=settings.block_size,
        cache_bytes=cache_bytes,
        max_num_seqs=settings.max_num_seqs,
        max_batch_tokens=settings.max_batch_tokens,
        cache_generated=settings.cache_generated,
    ))
    log.info("model %s on %s (%s), context %d, cache %.0f MiB (%d tokens), block %d", loaded.name, loaded.device,
             loaded.dtype, loaded.max_model_len, cache_bytes / 2**20, cache_bytes // runner.kv_bytes_per_token,
             settings.block_size)
    return WorkerServer(settings, loaded, engine)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_args(argv)
    except ValidationError as exc:
        for err in exc.errors():
            print(f"invalid setting {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = build(settings)
    except (ModelNotFound, ValueError, RuntimeError) as exc:
        print(f"cannot start the worker: {exc}", file=sys.stderr)
        return 2
    server.engine.start()
    try:
        web.run_app(server.app(), host=settings.host, port=settings.port, print=None, access_log=None)
    finally:
        server.engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
