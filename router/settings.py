"""Router configuration: CLI flags > env (PREFIXROUTE_ROUTER_*) > an optional YAML/TOML file > defaults."""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from protocol.limits import LimitSettings, add_limit_flags

PolicyName = Literal["cache_aware", "consistent_hash", "round_robin", "least_loaded", "random"]
POLICIES: tuple[str, ...] = PolicyName.__args__  # type: ignore[attr-defined]


class TenantConfig(BaseModel):
    id: str
    api_key: SecretStr
    # Keys routing and the upstream cache salt. Tenants sharing a secret share cache blocks: that is the
    # explicit opt-in; by default every tenant's secret differs.
    secret: SecretStr
    # Admission limits (router.admission); past one the tenant's requests get 429 with Retry-After.
    max_concurrency: int | None = Field(None, ge=1, description="requests in flight at once")
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1, description="prompt tokens per minute")


class WorkerConfig(BaseModel):
    url: str
    weight: int = Field(1, ge=1, le=100)
    engine: Literal["auto", "prefixroute", "vllm", "sglang", "llamacpp", "openai"] = "auto"  # protocol.engines


def load_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    text = p.read_text()
    data = tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: the top level must be a mapping")
    return data


class _FileSource(PydanticBaseSettingsSource):
    path: str | None = None

    def get_field_value(self, field, field_name):  # not used: __call__ returns everything at once
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return load_config_file(self.path) if self.path else {}


class RouterSettings(BaseSettings, LimitSettings):
    model_config = SettingsConfigDict(env_prefix="PREFIXROUTE_ROUTER_", env_nested_delimiter="__")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    processes: int = Field(1, ge=1, le=256, description="router processes sharing the port (SO_REUSEPORT)")
    workers: list[WorkerConfig] = Field(default_factory=list, description="upstream workers ({url, weight}); with "
                                        "Redis, workers found by their heartbeats join them")
    policy: PolicyName = Field("cache_aware", description=", ".join(POLICIES))
    model: str | None = Field(None, description="tokenizer/chat template source; default: the worker's default")
    # routing key
    prefix_tokens: int = Field(256, ge=1, le=32768, description="P: tokens of the stable prefix that are hashed")
    index_block_bytes: int = Field(256, ge=16, description="C: prompt bytes per index block (steps grow past 8 C)")
    index_tokens_per_worker: int = Field(400_000, ge=1, description="prompt tokens a worker's cache is expected to "
                                         "hold, where the worker does not say (its /health cache_capacity_tokens)")
    # cache_aware
    vnodes: int = Field(160, ge=1, le=4096, description="virtual nodes per unit of weight")
    spill_rpm: float = Field(15.0, gt=0, description="R: requests/minute per key before it spills")
    rate_window_s: float = Field(60.0, gt=0, description="window of the per-key rates behind spill (seconds)")
    max_tracked_keys: int = Field(100_000, ge=16, description="keys whose rate, and sessions whose worker, are kept")
    session_ttl_s: float = Field(3600.0, gt=0, description="a session idle this long no longer pins its worker")
    load_factor: float = Field(1.25, ge=1.0, description="c: a worker above c x mean + s in-flight is passed over "
                               "(while its load is at or above the mean and some worker has no prefill queued)")
    load_slack: float = Field(4.0, ge=0.0, description="s")
    prefill_weight: float = Field(32.0, ge=0.0, description="weight of the tokens a worker would have to prefill")
    decode_weight: float = Field(0.01, ge=0.0, description="weight of the context tokens a worker's in-flight "
                                 "requests hold, against its queued prefill tokens")
    # admission (router.admission)
    max_queue_per_worker: int | None = Field(None, ge=1, description="requests in flight (running + waiting) a "
                                             "worker may have; past it on every worker, 429 with Retry-After. "
                                             "Unset: no bound")
    max_queued_tokens_per_worker: int | None = Field(None, ge=1, description="prompt tokens a worker may have "
                                                     "queued for prefill (its in-flight requests' uncached tokens "
                                                     "not yet prefilled, as the router counts them); a request that "
                                                     "would pass it goes elsewhere or waits, then 429. It bounds the "
                                                     "prefill ahead of a request, so TTFT, while cache hits, which "
                                                     "add little, still fit. Unset: no bound")
    queue_wait_s: float = Field(1.0, ge=0, description="how long a request may wait in the router for a worker "
                                "below max_queue_per_worker before its 429")
    max_queued_requests: int = Field(1024, ge=0, description="requests waiting in the router at most; more: 429")
    hold_for_cache: bool = Field(True, description="with max_queue_per_worker: a request whose best worker (by "
                                 "cache_aware's cost) is full waits up to queue_wait_s for a slot there rather "
                                 "than go where its prefix must be computed again")
    # tenants
    tenants: list[TenantConfig] = Field(default_factory=list, description="{id, api_key, secret} each; none: open "
                                        "mode, one tenant, no API key")
    open_tenant_secret: SecretStr = Field(SecretStr("prefixroute-open"), description="the one tenant of open mode")
    admin_key: SecretStr | None = Field(None, description="enables /admin/* (Authorization: Bearer KEY); unset: off")
    # upstream
    health_interval_s: float = Field(2.0, gt=0, description="seconds between health probes of each worker")
    health_timeout_s: float = Field(2.0, gt=0, description="a slower probe fails")
    engine_load: bool = Field(True, description="placement adds the load workers report (running, waiting, KV in "
                              "use; other engines' from their /metrics) beyond this router's own requests")
    fail_threshold: int = Field(2, ge=1, description="consecutive failures (probes, broken connections, 502/503 "
                                "answers) before a worker leaves the ring; a refused connection takes it off at once")
    connect_timeout_s: float = Field(3.0, gt=0, description="upstream connect timeout (then failover)")
    request_timeout_s: float = Field(600.0, gt=0, description="upstream read timeout: the longest wait for the "
                                                             "next byte of a worker's answer, its first included")
    max_failover: int = Field(2, ge=0, description="other workers tried when one fails before streaming")
    # per-worker circuit breaker (router.breaker): failures are those before the first byte (refused or broken
    # connections, 5xx answers, timeouts); a passing health probe never closes an open breaker
    breaker: bool = Field(True, description="a circuit breaker per worker: open, it keeps the worker off the ring")
    breaker_failures: int = Field(5, ge=0, description="consecutive failures that open a worker's breaker (0: off)")
    breaker_error_rate: float = Field(0.5, gt=0, le=1, description="a failure share over the last breaker_window "
                                      "outcomes at or above this opens the breaker")
    breaker_window: int = Field(20, ge=1, description="outcomes (requests) the error share is taken over")
    breaker_min_requests: int = Field(10, ge=1, description="outcomes in the window before the share counts")
    breaker_open_s: float = Field(5.0, gt=0, description="seconds an opened breaker stays open before one trial "
                                  "request (half-open); doubled on each re-open")
    breaker_max_open_s: float = Field(60.0, gt=0, description="cap of the doubled open time")
    breaker_slow_s: float | None = Field(None, gt=0, description="a streamed answer's first byte slower than this "
                                         "counts as a breaker failure (the answer is still relayed); unset: never")
    max_connections: int = Field(4096, ge=1, description="upstream connections open at once; more requests queue")
    request_time_limit_s: float | None = Field(None, gt=0, description="a request still running this long after it "
                                               "arrived is ended: 408 request_timeout, or that error as a stream's "
                                               "last event; the upstream request is closed. Unset: no limit")
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM: stop accepting, give requests in flight this "
                                    "long, then end them with an error the client sees (503 or an error event)")
    # Redis: the hit stats workers publish (/admin/stats)
    redis_url: str | None = Field(None, description="the Redis the workers publish hit stats to")
    stats_namespace: str = Field("prefixroute", pattern=r"^[A-Za-z0-9_.\-]{1,64}$",
                                 description="prefix of every Redis key: several clusters on one Redis")
    share_state: bool = Field(True, description="with Redis: share routing state with the other router replicas")
    discover_workers: bool = Field(True, description="with Redis: add workers from their heartbeats")
    share_interval_s: float = Field(1.0, gt=0, le=60, description="seconds between exchanges of routing state")
    share_log_entries: int = Field(200_000, ge=1000, description="decisions kept in Redis for a new router to load")
    log_level: str = Field("info", description="debug, info, warning or error")

    @field_validator("admin_key", "redis_url", "model", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        # An empty environment variable (compose's `${VAR:-}`) means "not set": an empty admin key must never
        # enable the admin API with an empty password.
        return None if isinstance(v, str) and not v.strip() else v

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return init_settings, env_settings, _FileSource(settings_cls)

    @property
    def open_mode(self) -> bool:
        return not self.tenants


def load_settings(cli: dict[str, Any], config_file: str | None) -> RouterSettings:
    _FileSource.path = config_file
    try:
        return RouterSettings(**cli)
    finally:
        _FileSource.path = None


def parser() -> argparse.ArgumentParser:
    """The command line; each option's dest is the setting it sets (docs: deploy/settings_doc.py)."""
    p = argparse.ArgumentParser(prog="python -m router", description="prefixroute cache-aware router")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--processes", type=int, help="processes sharing the port (each with its own routing state)")
    p.add_argument("--worker", action="append", dest="workers", metavar="URL", help="repeat for each worker")
    p.add_argument("--policy", choices=POLICIES)
    p.add_argument("--config", help="YAML or TOML file with any of the settings (tenants, workers, ...)")
    p.add_argument("--model", help="tokenizer source: local HF model directory or .gguf (default: the worker's)")
    p.add_argument("--prefix-tokens", type=int)
    p.add_argument("--spill-rpm", type=float)
    p.add_argument("--rate-window-s", type=float, help="window of the per-key rates behind spill (seconds)")
    p.add_argument("--load-factor", type=float)
    p.add_argument("--load-slack", type=float)
    p.add_argument("--prefill-weight", type=float)
    p.add_argument("--decode-weight", type=float)
    p.add_argument("--index-tokens-per-worker", type=int)
    p.add_argument("--index-block-bytes", type=int)
    p.add_argument("--admin-key")
    p.add_argument("--max-queue-per-worker", type=int, help="requests in flight per worker before 429 (unset: none)")
    p.add_argument("--max-queued-tokens-per-worker", type=int,
                   help="prompt tokens queued for prefill per worker before a request goes elsewhere or waits")
    p.add_argument("--queue-wait-s", type=float, help="seconds a request may wait for a worker with room")
    p.add_argument("--max-queued-requests", type=int, help="requests waiting in the router at most")
    p.add_argument("--no-engine-load", dest="engine_load", action="store_const", const=False,
                   help="place by this router's own requests only, not by the load workers report")
    p.add_argument("--no-hold-for-cache", dest="hold_for_cache", action="store_const", const=False,
                   help="with a queue bound: never wait for a full worker that holds the prefix")
    add_limit_flags(p)
    p.add_argument("--request-time-limit-s", type=float, help="seconds a whole request may run (then 408)")
    p.add_argument("--redis-url", help="the Redis the workers publish hit stats to (redis://host:port/db)")
    p.add_argument("--stats-namespace")
    p.add_argument("--no-share-state", dest="share_state", action="store_const", const=False,
                   help="with Redis: keep routing state local (no sharing with other replicas)")
    p.add_argument("--no-discover-workers", dest="discover_workers", action="store_const", const=False)
    p.add_argument("--shutdown-grace-s", type=float, help="seconds requests in flight get after SIGTERM")
    p.add_argument("--no-breaker", dest="breaker", action="store_const", const=False,
                   help="no per-worker circuit breaker")
    p.add_argument("--breaker-failures", type=int, help="consecutive failures that open a worker's breaker")
    p.add_argument("--breaker-error-rate", type=float, help="failure share over the window that opens it")
    p.add_argument("--breaker-window", type=int, help="outcomes the failure share is taken over")
    p.add_argument("--breaker-min-requests", type=int, help="outcomes in the window before the share counts")
    p.add_argument("--breaker-open-s", type=float, help="seconds open before one trial request (doubles)")
    p.add_argument("--breaker-max-open-s", type=float, help="cap of the doubled open time")
    p.add_argument("--breaker-slow-s", type=float, help="a streamed first byte slower than this is a failure")
    p.add_argument("--log-level")
    return p


def parse_args(argv: Sequence[str] | None = None) -> RouterSettings:
    ns = vars(parser().parse_args(argv))
    config = ns.pop("config")
    cli = {k: v for k, v in ns.items() if v is not None}
    if "workers" in cli:
        cli["workers"] = [{"url": u} for u in cli["workers"]]
    return load_settings(cli, config)
