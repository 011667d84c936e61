"""Other engines behind the router (vLLM, SGLang, llama.cpp): which one a worker URL is, and its Prometheus
`/metrics` read into the fields prefixroute's own worker reports (protocol.statskeys): counters of prompt, cached
and generated tokens and requests, and the load gauges placement weighs (running, waiting, KV in use).

One reading per scrape, sums over label sets (an engine with several data-parallel ranks reports one series per
rank). Only the lines of wanted names are parsed: a vLLM scrape is ~100 KB of histograms, read about once a
second per engine by every router replica.

What each engine reports (names from their docs and /metrics; vLLM's read from a real vLLM 0.32 CPU server):

    field            vllm                              sglang                        llamacpp
    requests         vllm:request_success_total        sglang:num_requests_total     -
    prompt_tokens    vllm:prompt_tokens_total          sglang:prompt_tokens_total    -
    cached_tokens    vllm:prefix_cache_hits_total      sglang:cached_tokens_total    -
    cache_queries    vllm:prefix_cache_queries_total   -                             -
    generated_tokens vllm:generation_tokens_total      sglang:generation_tokens_total llamacpp:tokens_predicted_total
    running          vllm:num_requests_running         sglang:num_running_reqs       llamacpp:requests_processing
    waiting          vllm:num_requests_waiting         sglang:num_queue_reqs         llamacpp:requests_deferred
    kv_usage (0..1)  vllm:kv_cache_usage_perc          sglang:token_usage            llamacpp:kv_cache_usage_ratio
    capacity_tokens  vllm:cache_config_info{num_gpu_blocks} x {block_size}; sglang:max_total_num_tokens

llama.cpp counts only the prompt tokens it evaluated (`prompt_tokens_total` excludes reused ones) and no
requests, so its hit stats stay empty; its load gauges are used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PREFIXROUTE = "prefixroute"
VLLM = "vllm"
SGLANG = "sglang"
LLAMACPP = "llamacpp"
OPENAI = "openai"  # another OpenAI-compatible server whose /metrics names no engine known here: load not read
KINDS = (PREFIXROUTE, VLLM, SGLANG, LLAMACPP, OPENAI)
ENGINES = (VLLM, SGLANG, LLAMACPP)  # the kinds read from Prometheus metrics
# Engines that mix the request's `cache_salt` into their block hashes, so tenants (each with its own salt from the
# router) never share cache blocks. Others ignore the field: there, identical prefixes of different tenants share.
SALTED = (PREFIXROUTE, VLLM)

# The fields of an engine's counters that map onto protocol.statskeys.COUNTERS, plus cache_queries (vLLM's own
# hit ratio is hits / queries).
COUNTER_FIELDS = ("requests", "prompt_tokens", "cached_tokens", "generated_tokens", "cache_queries")

_METRICS: dict[str, dict[str, str]] = {
    VLLM: {
        "vllm:request_success_total": "requests",
        "vllm:prompt_tokens_total": "prompt_tokens",
        "vllm:prefix_cache_hits_total": "cached_tokens",
        "vllm:prefix_cache_queries_total": "cache_queries",
        "vllm:generation_tokens_total": "generated_tokens",
        "vllm:num_requests_running": "running",
        "vllm:num_requests_waiting": "waiting",
        "vllm:kv_cache_usage_perc": "kv_usage",
        "vllm:gpu_cache_usage_perc": "kv_usage",  # its name before vLLM 0.10
    },
    SGLANG: {
        "sglang:num_requests_total": "requests",
        "sglang:prompt_tokens_total": "prompt_tokens",
        "sglang:cached_tokens_total": "cached_tokens",
        "sglang:generation_tokens_total": "generated_tokens",
        "sglang:num_running_reqs": "running",
        "sglang:num_queue_reqs": "waiting",
        "sglang:token_usage": "kv_usage",
        "sglang:max_total_num_tokens": "capacity_tokens",
    },
    LLAMACPP: {
        "llamacpp:tokens_predicted_total": "generated_tokens",
        "llamacpp:requests_processing": "running",
        "llamacpp:requests_deferred": "waiting",
        "llamacpp:kv_cache_usage_ratio": "kv_usage",
    },
}
# Latency histograms passed through to prefixroute's names (their buckets are the engine's own).
_HISTOGRAMS: dict[str, dict[str, str]] = {
    VLLM: {"vllm:time_to_first_token_seconds": "ttft", "vllm:inter_token_latency_seconds": "itl",
           "vllm:time_per_output_token_seconds": "tpot"},  # its name before vLLM 0.10: read when no itl
    SGLANG: {"sglang:time_to_first_token_seconds": "ttft", "sglang:inter_token_latency_seconds": "itl"},
    LLAMACPP: {},
}
_MEAN = {"kv_usage"}  # gauges averaged over label sets (ranks), not summed
_CACHE_INFO = "vllm:cache_config_info"
_LE = re.compile(r'le="([^"]+)"')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class EngineReading:
    """One scrape of an engine's metrics. Counters are the engine's running totals (they reset when it restarts);
    None where the engine does not report a field."""

    kind: str
    counters: dict[str, int] = field(default_factory=dict)
    running: int | None = None
    waiting: int | None = None
    kv_usage: float | None = None  # the share of its KV blocks running requests hold (a free cached block is free)
    capacity_tokens: int | None = None
    block_size: int | None = None
    # "ttft"/"itl" -> (cumulative bucket counts by upper bound, sum, count), summed over label sets
    histograms: dict[str, Histogram] = field(default_factory=dict)


@dataclass
class Histogram:
    buckets: dict[float, float] = field(default_factory=dict)
    sum: float = 0.0
    count: float = 0.0


def detect(text: str) -> str | None:
    """The engine whose metrics these are, or None."""
    for kind in ENGINES:
        if f"\n{kind}:" in text or text.startswith(f"{kind}:") or f"# TYPE {kind}:" in text:
            return kind
    return None


def parse(text: str, kind: str | None = None) -> EngineReading | None:
    """The reading of `kind` (detected when None) from a Prometheus text exposition; None: no known engine."""
    kind = kind or detect(text)
    if kind not in _METRICS:
        return None
    wanted = _METRICS[kind]
    hists = _HISTOGRAMS[kind]
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    out = EngineReading(kind)
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        cut, space = line.find("{"), line.find(" ")
        name = line[:cut] if cut != -1 and (space == -1 or cut < space) else line[:space]
        if name == _CACHE_INFO:
            labels = dict(_LABEL.findall(line[cut:line.rfind("}")]))
            blocks, size = _int(labels.get("num_gpu_blocks")), _int(labels.get("block_size"))
            if blocks and size:
                out.capacity_tokens, out.block_size = blocks * size, size
            continue
        key = wanted.get(name)
        hist = None
        if key is None:
            base, _, part = name.rpartition("_")
            hist = hists.get(base)
            if hist is None or part not in ("bucket", "sum", "count"):
                continue
        value = _value(line)
        if value is None:
            continue
        if hist is not None:
            h = out.histograms.setdefault(hist, Histogram())
            if part == "sum":
                h.sum += value
            elif part == "count":
                h.count += value
            else:
                le = _LE.search(line)
                if le:
                    bound = float(le.group(1))
                    h.buckets[bound] = h.buckets.get(bound, 0.0) + value
            continue
        sums[key] = sums.get(key, 0.0) + value
        counts[key] = counts.get(key, 0) + 1
    if "tpot" in out.histograms:
        tpot = out.histograms.pop("tpot")
        out.histograms.setdefault("itl", tpot)
    for key, total in sums.items():
        if key in COUNTER_FIELDS:
            out.counters[key] = int(total)
        elif key in _MEAN:
            out.kv_usage = total / counts[key]
        elif key == "capacity_tokens":
            out.capacity_tokens = int(total)
        else:
            setattr(out, key, int(total))
    return out


def _value(line: str) -> float | None:
    end = line.rfind("}")
    parts = line[end + 1:].split() if end >= 0 else line.split()[1:]
    try:
        value = float(parts[0])
    except (IndexError, ValueError):
        return None
    return None if value != value else value  # NaN: no value


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value not in (None, "", "None") else None
    except ValueError:
        return None


def deltas(before: dict[str, int] | None, now: dict[str, int]) -> dict[str, int]:
    """What the counters grew by since `before`; a counter that went down restarted with the engine, so all
    of its value is new."""
    out = {}
    for key, value in now.items():
        prev = (before or {}).get(key, 0)
        out[key] = value - prev if value >= prev else value
    return out
