"""Tenant isolation timing audit, in the manner of Gu et al. 2025 ("Auditing Prompt Caching in Language Model
APIs"): can one tenant tell, from time to first token, that another tenant sent a prompt before?

A router with two tenants (A and B: distinct API keys and secrets, a YAML --config) in front of sim workers
(real engine, block cache and HTTP; the forward pass a timed sleep, so a prefix hit saves a known prefill
time). Per probe a fresh random prefix of --prefix-words pseudo-words (about 2 tokens each) and a short
random suffix. Arm "primed": tenant A sends the prefix alone first and waits for its answer; arm "control":
A sends a different fresh prefix of the same length instead (the same load on the cluster, nothing to hit).
Then the prober (A or B) sends prefix + suffix, streamed, max_tokens 1, and its TTFT (send to first data chunk)
and cached_tokens are kept. The four cells (prober A/B x primed/control) run in shuffled blocks of four, so
drift on the machine hits every cell alike.

AUC = P(control TTFT > primed TTFT) + P(equal)/2 (Mann-Whitney U / n1 n2): 0.5 when priming is invisible, 1 when
a primed probe is always faster. With a 95% bootstrap interval (2000 resamples) and DeLong's. Isolation holds
when B's AUC is near 0.5 (<= --max-b-auc) while A's own hit is plain (>= --min-a-auc: the audit can see a
hit), B's cached_tokens are always 0 and A's are > 0 after priming.

Run: python bench/tenant_audit.py --probes 200 --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness.procs import start_router, start_worker, stop_process  # noqa: E402

_C, _V = "bcdfghklmnprstvwz", "aeiou"
CELLS = (("A", "primed"), ("A", "control"), ("B", "primed"), ("B", "control"))


def words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(_C) + rng.choice(_V) for _ in range(rng.randint(1, 3))) for _ in range(n))


# ---- statistics ---------------------------------------------------------------------------------------------

def auc(primed: np.ndarray, control: np.ndarray) -> float:
    """P(control > primed) + P(equal) / 2, over all pairs (Mann-Whitney U / n1 n2)."""
    d = control[None, :] - primed[:, None]
    return float(((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size)


def bootstrap_ci(primed: np.ndarray, control: np.ndarray, rng: np.random.Generator, n: int = 2000,
                 level: float = 0.95) -> list[float]:
    stats = [auc(rng.choice(primed, primed.size), rng.choice(control, control.size)) for _ in range(n)]
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def delong_ci(primed: np.ndarray, control: np.ndarray, z: float = 1.959964) -> list[float]:
    """DeLong et al. 1988: the AUC's variance from its structural components."""
    d = control[None, :] - primed[:, None]
    psi = (d > 0) + 0.5 * (d == 0)
    a = psi.mean()
    v_primed, v_control = psi.mean(axis=1), psi.mean(axis=0)
    var = v_primed.var(ddof=1) / primed.size + v_control.var(ddof=1) / control.size
    se = float(np.sqrt(var))
    return [max(0.0, float(a) - z * se), min(1.0, float(a) + z * se)]


def compare(primed: list[float], control: list[float], seed: int) -> dict[str, Any]:
    p, c = np.asarray(primed), np.asarray(control)
    return {"n_primed": int(p.size), "n_control": int(c.size), "auc": round(auc(p, c), 4),
            "auc_ci95_bootstrap": [round(x, 4) for x in bootstrap_ci(p, c, np.random.default_rng(seed))],
            "auc_ci95_delong": [round(x, 4) for x in delong_ci(p, c)],
            "ttft_ms_median_primed": round(float(np.median(p)) * 1e3, 2),
            "ttft_ms_median_control": round(float(np.median(c)) * 1e3, 2),
            "ttft_ms_p10_p90_primed": [round(float(x) * 1e3, 2) for x in np.quantile(p, [0.1, 0.9])],
            "ttft_ms_p10_p90_control": [round(float(x) * 1e3, 2) for x in np.quantile(c, [0.1, 0.9])]}


# ---- the cluster and the probes -----------------------------------------------------------------------------

@dataclass
class Cluster:
    router: str
    keys: dict[str, str]  # tenant id -> API key
    secrets: list[str]  # every secret (for the leak checks of whoever uses this)
    procs: list
    workdir: Path

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop_process(p)


def write_config(workdir: Path, extra: dict[str, Any] | None = None) -> tuple[Path, dict[str, str], list[str]]:
    """A router config with tenants A and B, each with its own random API key and secret."""
    keys = {t: f"sk-{t.lower()}-{secrets.token_hex(12)}" for t in ("A", "B")}
    secs = {t: f"secret-{t.lower()}-{secrets.token_hex(16)}" for t in ("A", "B")}
    cfg = {"tenants": [{"id": t, "api_key": keys[t], "secret": secs[t]} for t in ("A", "B")], **(extra or {})}
    path = workdir / "router.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, keys, list(secs.values())


def start_cluster(n_workers: int, speedup: float, workdir: Path, *router_args: str,
                  log_level: str = "info") -> Cluster:
    cfg, keys, secs = write_config(workdir)
    procs = []
    try:
        urls = []
        for i in range(n_workers):
            log = open(workdir / f"worker{i}.log", "wb")  # noqa: SIM115 - kept open for the process' life
            url, proc = start_worker("--backend", "sim", "--sim-speedup", str(speedup), "--log-level", log_level,
                                     log=log, timeout=120)
            urls.append(url)
            procs.append(proc)
        rlog = open(workdir / "router.log", "wb")  # noqa: SIM115
        router, rproc = start_router(urls, "--config", str(cfg), "--log-level", log_level, *router_args, log=rlog)
        procs.append(rproc)
    except Exception:
        for p in procs:
            stop_process(p)
        raise
    return Cluster(router, keys, secs, procs, workdir)


def send(client: httpx.Client, cluster: Cluster, tenant: str, prompt: str) -> dict[str, Any]:
    """One streamed /v1/completions request, max_tokens 1: TTFT (send to first data chunk), usage, worker."""
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {cluster.keys[tenant]}"}
    usage = None
    ttft = None
    t0 = time.perf_counter()
    with client.stream("POST", cluster.router + "/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        worker = r.headers.get("x-prefixroute-worker")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
    assert ttft is not None and usage is not None, "no data chunk or no usage"
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"ttft": ttft, "cached": cached, "prompt_tokens": usage["prompt_tokens"], "worker": worker}


def audit(cluster: Cluster, probes: int, prefix_words: int, suffix_words: int, seed: int,
          warmup: int = 8) -> dict[str, Any]:
    """`probes` per cell, in shuffled blocks of the four cells; every prefix fresh."""
    rng = random.Random(seed)
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {c: [] for c in CELLS}
    with httpx.Client(trust_env=False, timeout=60) as client:
        for _ in range(warmup):  # connections, the workers' first steps, the router's first decisions
            for t in ("A", "B"):
                send(client, cluster, t, words(rng, prefix_words))
        t_start = time.monotonic()
        for _ in range(probes):
            block = list(CELLS)
            rng.shuffle(block)
            for prober, arm in block:
                prefix = words(rng, prefix_words)
                prime = send(client, cluster, "A", prefix if arm == "primed" else words(rng, prefix_words))
                probe = send(client, cluster, prober, prefix + " " + words(rng, suffix_words))
                probe["primer_worker"] = prime["worker"]
                cells[(prober, arm)].append(probe)
        elapsed = time.monotonic() - t_start

    def ttfts(c: tuple[str, str]) -> list[float]:
        return [p["ttft"] for p in cells[c]]

    out: dict[str, Any] = {"elapsed_s": round(elapsed, 1)}
    out["B_after_A_primed_vs_control"] = compare(ttfts(("B", "primed")), ttfts(("B", "control")), seed)
    out["A_after_A_primed_vs_control"] = compare(ttfts(("A", "primed")), ttfts(("A", "control")), seed + 1)
    out["cached_tokens"] = {f"{p}_{a}": {"min": min(x["cached"] for x in cells[(p, a)]),
                                         "max": max(x["cached"] for x in cells[(p, a)]),
                                         "nonzero": sum(x["cached"] > 0 for x in cells[(p, a)])}
                            for p, a in CELLS}
    out["same_worker_as_primer"] = {f"{p}_{a}": round(sum(x["worker"] == x["primer_worker"] for x in cells[(p, a)])
                                                      / len(cells[(p, a)]), 3) for p, a in CELLS}
    pt = [x["prompt_tokens"] for c in CELLS for x in cells[c]]
    out["probe_prompt_tokens"] = {"min": min(pt), "median": int(np.median(pt)), "max": max(pt)}
    out["raw_ttft_ms"] = {f"{p}_{a}": [round(x * 1e3, 3) for x in ttfts((p, a))] for p, a in CELLS}
    return out


def problems(res: dict[str, Any], max_b_auc: float, min_a_auc: float) -> list[str]:
    out = []
    b, a, ct = res["B_after_A_primed_vs_control"], res["A_after_A_primed_vs_control"], res["cached_tokens"]
    if b["auc"] > max_b_auc:
        out.append(f"B's AUC {b['auc']} > {max_b_auc}: B can tell that A sent the prefix")
    if a["auc"] < min_a_auc:
        out.append(f"A's AUC {a['auc']} < {min_a_auc}: the audit cannot see a hit, so it proves nothing")
    for cell in ("B_primed", "B_control"):
        if ct[cell]["max"] != 0:
            out.append(f"{cell}: cached_tokens up to {ct[cell]['max']} (must be 0)")
    if ct["A_primed"]["min"] <= 0:
        out.append("A_primed: some probe had cached_tokens 0")
    return out


def markdown(report: dict[str, Any]) -> str:
    r, c, m = report["results"], report["config"], report["machine"]
    b, a = r["B_after_A_primed_vs_control"], r["A_after_A_primed_vs_control"]
    lines = [f"Tenant timing audit: `{report['command']}`", "",
             f"{m['platform']}, {m['cpu_count']} CPUs, Python {m['python']}, load average at end "
             f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_end'])}; {c['workers']} sim workers (speedup "
             f"{c['sim_speedup']}), probe prompts {r['probe_prompt_tokens']['min']}-{r['probe_prompt_tokens']['max']}"
             f" tokens, {c['probes']} probes per cell, {r['elapsed_s']} s.", "",
             "| comparison | n per arm | AUC | 95% CI (bootstrap) | 95% CI (DeLong) | TTFT p50 primed / control (ms) "
             "| bound |", "|---|---|---|---|---|---|---|"]
    for name, x, bound in (("(a) prober B after A primed vs control", b, f"<= {c['max_b_auc']}"),
                           ("(b) prober A after A primed vs control", a, f">= {c['min_a_auc']}")):
        lines.append(f"| {name} | {x['n_primed']} | {x['auc']} | {x['auc_ci95_bootstrap']} | {x['auc_ci95_delong']} "
                     f"| {x['ttft_ms_median_primed']} / {x['ttft_ms_median_control']} | {bound} |")
    lines += ["", "| cell | cached_tokens min | max | probes with a hit | routed to the primer's worker |",
              "|---|---|---|---|---|"]
    for cell, ct in r["cached_tokens"].items():
        lines.append(f"| {cell} | {ct['min']} | {ct['max']} | {ct['nonzero']} | {r['same_worker_as_primer'][cell]} |")
    lines += ["", "AUC = P(control TTFT > primed TTFT) + ties/2 (Mann-Whitney U / n1 n2). Control arm: A sends a "
              "different fresh prefix of the same length instead of the probe's prefix.", "",
              "Problems: " + ("; ".join(report["problems"]) if report["problems"] else "none"), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--probes", type=int, default=200, help="probes per cell (prober A/B x primed/control)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--sim-speedup", type=float, default=2.0, help="sim: a miss on 1,600 tokens then takes ~45 ms")
    p.add_argument("--prefix-words", type=int, default=800, help="about 2 tokens each")
    p.add_argument("--suffix-words", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-b-auc", type=float, default=0.55)
    p.add_argument("--min-a-auc", type=float, default=0.9)
    p.add_argument("--out", type=Path, help="directory for tenant_audit.json and tenant_audit.md")
    args = p.parse_args(argv)
    if args.probes < 2 or args.workers < 1 or args.prefix_words < 1:
        p.error("probes >= 2, workers >= 1, prefix-words >= 1")
    workdir = Path(tempfile.mkdtemp(prefix="tenant_audit_"))
    cluster = start_cluster(args.workers, args.sim_speedup, workdir)
    try:
        res = audit(cluster, args.probes, args.prefix_words, args.suffix_words, args.seed)
    finally:
        cluster.stop()
    report = {"benchmark": "tenant_audit", "command": " ".join(["python", "bench/tenant_audit.py", *sys.argv[1:]]),
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpu_count": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
              "config": {k: getattr(args, k) for k in ("probes", "workers", "sim_speedup", "prefix_words",
                                                       "suffix_words", "seed", "max_b_auc", "min_a_auc")},
              "results": res}
    report["problems"] = problems(res, args.max_b_auc, args.min_a_auc)
    text = json.dumps(report, indent=1)
    md = markdown(report)
    print(json.dumps({k: v for k, v in report.items() if k != "results"} | {
        "results": {k: v for k, v in res.items() if k != "raw_ttft_ms"}}, indent=1) + "\n\n" + md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tenant_audit.json").write_text(text + "\n")
        (args.out / "tenant_audit.md").write_text(md)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
