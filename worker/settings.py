"""Worker configuration: pydantic-settings (env prefix PREFIXROUTE_WORKER_) overridden by CLI flags; and the
engine sidecar's (PREFIXROUTE_SIDECAR_, worker.sidecar). Both publish hit stats to Redis with StatsSettings."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.limits import LimitSettings, add_limit_flags


class StatsSettings(BaseModel):
    """Hit stats and the heartbeat in Redis (protocol.statskeys)."""

    redis_url: str | None = Field(None, description="publish hit stats and a heartbeat to this Redis")
    stats_namespace: str = Field("prefixroute", pattern=r"^[A-Za-z0-9_.\-]{1,64}$",
                                 description="prefix of every Redis key: several clusters on one Redis")
    stats_interval_s: float = Field(1.0, gt=0, le=60, description="seconds between writes of hit stats to Redis")
    heartbeat_ttl_s: float = Field(10.0, gt=0, description="a heartbeat older than this: gone, for the routers")

    @field_validator("redis_url", mode="before")
    @classmethod
    def _empty_redis_is_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v  # compose's `${VAR:-}`


def add_stats_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", help="publish hit stats and a heartbeat to this Redis (redis://host:port/db)")
    p.add_argument("--stats-namespace")
    p.add_argument("--stats-interval-s", type=float)
    p.add_argument("--heartbeat-ttl-s", type=float)


class WorkerSettings(BaseSettings, LimitSettings, StatsSettings):
    model_config = SettingsConfigDict(env_prefix="PREFIXROUTE_WORKER_")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8001, ge=0, le=65535, description="port to listen on")
    model: str | None = Field(None, description="local HF model directory or .gguf file; default: SmolLM2-135M GGUF")
    served_model_name: str | None = Field(None, description="the model's name in the API; default: from its file")
    worker_id: str | None = Field(None, description="name in metrics and stats; default host:port")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="of weights and KV; auto "
                                                                     "picks by device")
    block_size: int = Field(16, ge=1, le=4096, description="tokens per cached KV block: the unit of a prefix hit")
    cache_bytes: int | None = Field(
        None, ge=0, description="KV pool: running requests and prefix cache; default: default_cache_bytes")
    cache_tokens: int | None = Field(None, ge=0, description="the budget in tokens of KV instead (wins over bytes)")
    max_num_seqs: int = Field(16, ge=1, description="requests decoded together")
    max_batch_tokens: int = Field(512, ge=16, description="tokens per engine step (decode + prefill chunks); "
                                  "the sim backend's default: its GPU profile's 8192 real tokens")
    max_waiting: int = Field(1024, ge=0, description="queued requests beyond which new ones get 503")
    cache_generated: bool = Field(True, description="also cache blocks of generated tokens (multi-turn hits)")
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM: stop accepting, leave Redis, give requests "
                                    "in flight this long, then end them with an error the client sees")
    log_level: str = Field("info", description="debug, info, warning or error")
    backend: Literal["model", "sim"] = Field("model", description="the real model, or the GPU cost model (sim)")
    sim_profile: str = Field("h100-llama3-8b", description="sim: GPU and model whose service times are modelled")
    sim_speedup: float = Field(1.0, gt=0, description="sim: simulated time runs this many times faster")
    sim_token_scale: float = Field(1.0, gt=0, description="sim: each prompt token costs and weighs this many")
    replicas: int = Field(1, ge=1, le=128, description="sim: workers served by this process, on port, port+1, ...")
    advertise_url: str | None = Field(None, description="the URL routers reach this worker at; default http://host:port")
    fault_delay_s: float = Field(0.0, ge=0, description="testing: extra seconds each completion request waits "
                                 "before it is scheduled (a slow worker)")
    fault_error_rate: float = Field(0.0, ge=0, le=1, description="testing: this share of completion requests is "
                                    "answered at once with a 500 error (code injected_fault; a flaky worker)")

    @field_validator("model", "advertise_url", "worker_id", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v  # compose's `${VAR:-}`

    @property
    def name(self) -> str:
        return self.worker_id or f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return self.advertise_url or f"http://{self.host}:{self.port}"


def default_cache_bytes(device_type: str, free_device_bytes: int | None, total_ram: int) -> int:
    """Half the free GPU memory after the model loaded (what a serving engine leaves for KV on a busy GPU);
    on the CPU a quarter of RAM, at most 4 GiB, so several workers fit on one host."""
    if device_type == "cuda" and free_device_bytes:
        return free_device_bytes // 2
    return min(total_ram // 4, 4 << 30)


def parser() -> argparse.ArgumentParser:
    """The command line; each option's dest is the setting it sets (docs: deploy/settings_doc.py)."""
    p = argparse.ArgumentParser(prog="python -m worker", description="prefixroute worker (OpenAI-compatible)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--model", help="local Hugging Face model directory or .gguf file")
    p.add_argument("--served-model-name")
    p.add_argument("--worker-id")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--block-size", type=int)
    p.add_argument("--cache-bytes", type=int)
    p.add_argument("--cache-tokens", type=int, help="KV pool in tokens (instead of bytes)")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-batch-tokens", type=int)
    p.add_argument("--max-waiting", type=int)
    add_limit_flags(p)
    p.add_argument("--no-cache-generated", dest="cache_generated", action="store_const", const=False)
    p.add_argument("--log-level")
    p.add_argument("--backend", choices=["model", "sim"])
    p.add_argument("--sim-profile")
    p.add_argument("--sim-speedup", type=float)
    p.add_argument("--sim-token-scale", type=float, help="e.g. 32 when a trace's 512-token blocks were cut to 16")
    p.add_argument("--replicas", type=int, help="sim only: serve N workers on consecutive ports")
    add_stats_flags(p)
    p.add_argument("--advertise-url", help="the URL routers reach this worker at (default http://host:port)")
    p.add_argument("--shutdown-grace-s", type=float, help="seconds requests in flight get after SIGTERM")
    p.add_argument("--fault-delay-s", type=float, help="testing: extra seconds before each request is scheduled")
    p.add_argument("--fault-error-rate", type=float, help="testing: share of requests answered with a 500 at once")
    return p


def parse_args(argv: Sequence[str] | None = None) -> WorkerSettings:
    args = {k: v for k, v in vars(parser().parse_args(argv)).items() if v is not None}
    return WorkerSettings(**args)


class SidecarSettings(BaseSettings, StatsSettings):
    """`python -m worker.sidecar`: another engine's stats (protocol.engines) as a prefixroute worker reports them."""

    model_config = SettingsConfigDict(env_prefix="PREFIXROUTE_SIDECAR_")

    engine_url: str = Field(description="the engine's OpenAI server (its /metrics and /v1/models)")
    engine: Literal["auto", "vllm", "sglang", "llamacpp"] = Field("auto", description="the engine's kind; auto: "
                                                                  "from its /metrics")
    host: str = Field("127.0.0.1", description="address of the sidecar's own /metrics and /health")
    port: int = Field(8011, ge=0, le=65535, description="port of the sidecar's own /metrics and /health")
    worker_id: str | None = Field(None, description="name in stats; default the engine's host:port")
    advertise_url: str | None = Field(None, description="the URL routers reach the engine at; default engine_url")
    scrape_timeout_s: float = Field(2.0, gt=0, description="a slower /metrics read of the engine fails")
    log_level: str = Field("info", description="debug, info, warning or error")

    @field_validator("advertise_url", "worker_id", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @property
    def engine_base(self) -> str:
        return self.engine_url.rstrip("/")

    @property
    def name(self) -> str:
        return self.worker_id or self.engine_base.split("://", 1)[-1]

    @property
    def url(self) -> str:
        return (self.advertise_url or self.engine_base).rstrip("/")


def sidecar_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m worker.sidecar",
                                description="publish another engine's (vLLM, SGLang, llama.cpp) hit stats and load "
                                "to Redis and /metrics as a prefixroute worker does")
    p.add_argument("--engine-url", help="the engine's OpenAI server, e.g. http://127.0.0.1:8000")
    p.add_argument("--engine", choices=["auto", "vllm", "sglang", "llamacpp"])
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--worker-id")
    p.add_argument("--advertise-url", help="the URL routers reach the engine at (default: --engine-url)")
    p.add_argument("--scrape-timeout-s", type=float)
    p.add_argument("--log-level")
    add_stats_flags(p)
    return p


def parse_sidecar_args(argv: Sequence[str] | None = None) -> SidecarSettings:
    args = {k: v for k, v in vars(sidecar_parser().parse_args(argv)).items() if v is not None}
    return SidecarSettings(**args)
