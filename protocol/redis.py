"""The one way the router and the worker connect to Redis: redis-py's asyncio client with short timeouts, so a
slow or dead Redis costs a background task a second, never a request."""

from __future__ import annotations

from typing import Any


def redis_client(url: str, timeout_s: float = 1.0) -> Any:
    import redis.asyncio as aioredis

    return aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                             health_check_interval=30, decode_responses=True)
