"""Builds grafana/dashboards/prefixroute.json, the dashboard Grafana loads (provisioned from grafana/provisioning):
`python grafana/build.py`. Each panel answers one operator question; its PromQL reads the router's and workers'
/metrics through the provisioned Prometheus datasource (uid "prometheus").

Template variables: `worker` (a worker's scrape address, Prometheus' `instance`) and `tenant`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
OUT = Path(__file__).resolve().parent / "dashboards" / "prefixroute.json"
K8S_COPY = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "dashboards" / "prefixroute.json"  # kustomize
# reads files below its own folder only
RI = "$__rate_interval"
W = 'instance=~"$worker"'
T = 'tenant=~"$tenant"'
HIT = T + ',outcome="hit"'
LE32 = T + ',le="32.0"'  # the bucket label as prometheus_client writes it (Prometheus 2 keeps it verbatim)


def rate(metric: str, sel: str = "") -> str:
    return f"rate({metric}{{{sel}}}[{RI}])"


def quantile(q: float, metric: str, sel: str = "") -> str:
    return f"histogram_quantile({q}, sum by (le) ({rate(metric + '_bucket', sel)}))"


# (title, question it answers, panel type, unit, [(legend, expr)])
PANELS: list[tuple[str, str, str, str, list[tuple[str, str]]]] = [
    ("Cluster hit ratio", "Are prefix-cache hits happening? Cached prompt tokens / prompt tokens, all workers.",
     "stat", "percentunit",
     [("hit ratio", f"sum({rate('prefixroute_worker_cached_tokens_total', W)}) / "
                    f"sum({rate('prefixroute_worker_prompt_tokens_total', W)})")]),
    ("Prefill tokens saved", "How much prefill the cache saves: cached vs computed prompt tokens per second.",
     "timeseries", "short",
     [("cached (saved)", f"sum({rate('prefixroute_worker_cached_tokens_total', W)})"),
      ("prompt", f"sum({rate('prefixroute_worker_prompt_tokens_total', W)})")]),
    ("Hit ratio per worker", "Is one worker missing where others hit?", "timeseries", "percentunit",
     [("{{instance}}", f"sum by (instance) ({rate('prefixroute_worker_cached_tokens_total', W)}) / "
                       f"sum by (instance) ({rate('prefixroute_worker_prompt_tokens_total', W)})")]),
    ("Hit ratio per tenant", "Which tenant's prompts miss?", "timeseries", "percentunit",
     [("{{tenant}}", f"sum by (tenant) ({rate('prefixroute_worker_tenant_cached_tokens_total', T)}) / "
                     f"sum by (tenant) ({rate('prefixroute_worker_tenant_prompt_tokens_total', T)})")]),
    ("Hit ratio per prefix version", "Did a prompt rollout explain a miss spike? (metadata.prefix_version)",
     "timeseries", "percentunit",
     [("{{prefix_version}}",
       f"sum by (prefix_version) ({rate('prefixroute_worker_tenant_cached_tokens_total', T)}) / "
       f"sum by (prefix_version) ({rate('prefixroute_worker_tenant_prompt_tokens_total', T)})")]),
    ("Routing accuracy per tenant", "Of the requests the router sent where it expected a cached prefix, the share "
     "that hit.", "timeseries", "percentunit",
     [("{{tenant}}", f"sum by (tenant) ({rate('prefixroute_worker_expected_hits_total', HIT)}) / "
                     f"sum by (tenant) ({rate('prefixroute_worker_expected_hits_total', T)})")]),
    ("TTFT p50 / p99", "How long until the first token, at the workers?", "timeseries", "s",
     [("p50", quantile(0.5, "prefixroute_worker_ttft_seconds", W)),
      ("p99", quantile(0.99, "prefixroute_worker_ttft_seconds", W))]),
    ("ITL p50 / p99", "How fast do tokens stream once started?", "timeseries", "s",
     [("p50", quantile(0.5, "prefixroute_worker_itl_seconds", W)),
      ("p99", quantile(0.99, "prefixroute_worker_itl_seconds", W))]),
    ("Requests per worker", "Is one worker running hot?", "timeseries", "reqps",
     [("{{instance}}", f"sum by (instance) ({rate('prefixroute_worker_requests_total', W)})")]),
    ("Request balance (max / mean)", "How uneven is the load? 1 is perfectly even.", "timeseries", "short",
     [("max/mean", f"max(sum by (instance) ({rate('prefixroute_worker_requests_total', W)})) / "
                   f"avg(sum by (instance) ({rate('prefixroute_worker_requests_total', W)}))")]),
    ("In flight per worker (router's view)", "Requests each worker has in flight through the router.",
     "timeseries", "short", [("{{worker}}", "sum by (worker) (prefixroute_router_inflight)")]),
    ("Queued and running at the workers", "Engine queue depth and batch size.", "timeseries", "short",
     [("waiting {{instance}}", f"prefixroute_worker_waiting{{{W}}}"),
      ("running {{instance}}", f"prefixroute_worker_running{{{W}}}")]),
    ("Routing decisions", "Why requests went where they went (affinity, spill, cache, load, session, failover).",
     "timeseries", "reqps", [("{{route}}", f"sum by (route) ({rate('prefixroute_router_requests_total')})")]),
    ("Spill rate and fan-out", "How many requests belong to keys hot enough to spread, and over how many workers.",
     "timeseries", "short",
     [("spilled share", f"sum({rate('prefixroute_router_spills_total')}) / "
                        f"sum({rate('prefixroute_router_requests_total')})"),
      ("fan-out p90", quantile(0.9, "prefixroute_router_spill_fanout"))]),
    ("Cache bytes per worker", "How full each worker's prefix cache is.", "timeseries", "bytes",
     [("used {{instance}}", f"prefixroute_worker_cache_used_bytes{{{W}}}"),
      ("capacity {{instance}}", f"prefixroute_worker_cache_capacity_bytes{{{W}}}")]),
    ("Evictions", "Blocks evicted per second: a cache too small for its traffic.", "timeseries", "short",
     [("{{instance}}", f"sum by (instance) ({rate('prefixroute_worker_cache_evicted_blocks_total', W)})")]),
    ("Upstream errors and rejections", "Failed upstream attempts by kind; requests the router answered itself.",
     "timeseries", "reqps",
     # "or vector(0)": a healthy cluster shows a flat 0, not "no data"
     [("upstream errors", f"sum({rate('prefixroute_router_upstream_errors_total')}) or vector(0)"),
      ("rejected {{status}}", f"sum by (status) ({rate('prefixroute_router_rejected_total')})")]),
    ("Admission: refusals and the router queue", "Requests refused with 429 (Retry-After) by reason: every worker "
     "at its queue limit, or a tenant over its limits; requests waiting in the router for a worker with room.",
     "timeseries", "short",
     [("429 {{reason}}", f"sum by (reason) ({rate('prefixroute_router_admission_rejected_total')})"),
      ("waiting in the router", "sum(prefixroute_router_admission_waiting)"),
      ("held for a full worker holding the prefix", f"sum({rate('prefixroute_router_admission_held_total')})")]),
    ("Workers up and Redis", "Workers on the ring; circuit breakers open or half-open (a worker failing requests "
     "while its health checks pass); 1 when the router reaches Redis.", "timeseries", "short",
     [("workers on the ring", "max(prefixroute_router_workers_active)"),
      ("breakers not closed", "max(count(prefixroute_router_breaker_state > 0) or vector(0))"),
      ("redis up", "min(prefixroute_router_redis_up)")]),
    ("Early divergence", "Did a rollout put something variable near the top of the prompt? Share of requests "
     "whose stable prefix diverges from every recent request of their tenant within 32 tokens, and the median "
     "shared depth.", "timeseries", "short",
     [("share within 32 tokens {{tenant}}",
       f"sum by (tenant) ({rate('prefixroute_router_prefix_shared_tokens_bucket', LE32)}) / "
       f"sum by (tenant) ({rate('prefixroute_router_prefix_shared_tokens_count', T)})"),
      ("median shared tokens {{tenant}}", "histogram_quantile(0.5, sum by (le, tenant) "
                                          f"({rate('prefixroute_router_prefix_shared_tokens_bucket', T)}))")]),
]


def panel(i: int, title: str, question: str, kind: str, unit: str, targets: list[tuple[str, str]]) -> dict:
    return {
        "id": i + 1, "type": kind, "title": title, "description": question, "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {},
        "targets": [{"refId": chr(ord("A") + j), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                    for j, (legend, expr) in enumerate(targets)],
    }


def variable(name: str, label: str, query: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE, "query": query,
            "definition": query, "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"text": "All", "value": "$__all"}}


def dashboard() -> dict[str, Any]:
    return {
        "uid": "prefixroute-main", "title": "prefixroute: cache hits, latency and balance", "schemaVersion": 39,
        "version": 1, "editable": True, "tags": ["prefixroute"], "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "templating": {"list": [
            variable("worker", "worker", "label_values(prefixroute_worker_requests_total, instance)"),
            variable("tenant", "tenant", "label_values(prefixroute_worker_tenant_prompt_tokens_total, tenant)"),
        ]},
        "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
    }


def main() -> None:
    for out in (OUT, K8S_COPY):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dashboard(), indent=2) + "\n")
        print(out)


if __name__ == "__main__":
    main()
