"""Benchmark one worker's prefix cache: cold vs warm time to first token (TTFT) and decode speed.

Starts `python -m worker` on a free 127.0.0.1 port (or uses `--url`), then over streaming /v1/completions with
token-id prompts (a shared prefix of P pseudo-random ids plus a distinct suffix of S ids per request):

- cold TTFT: prefix+suffix under a fresh `cache_salt` each time (verified: cached_tokens == 0);
- warm TTFT: the prefix sent once under a fixed salt, then prefix+new suffix under it (verified: cached_tokens ==
  the largest multiple of the block size <= P);
- decode, measured the same way for one stream and for `--concurrency` (8) streams at once: greedy requests of
  `--decode-tokens` tokens, each under its own fresh `cache_salt` (verified: cached_tokens == 0), so neither
  figure includes TTFT or cache hits. A stream's decode tokens are its completion tokens after the first, its
  decode span runs from its first token to its last; decode tok/s = the streams' decode tokens summed /
  (the latest last-token time - the earliest first-token time). For one stream that is
  (completion_tokens - 1) / (t_last - t_first); for 8 it is the aggregate rate while any of them decodes
  (prefill of streams still waiting for their first token shares that window). `--repeats` rounds of one
  stream then 8 streams alternate; each figure is the median over rounds, and the median of each batched
  stream's own rate is reported too.

Cold and warm runs alternate so machine noise hits both alike. Prints one JSON object, then a markdown table;
`--out DIR` also writes worker_prefix.json and worker_prefix.md. Run: python bench/worker_prefix.py [--repeats N]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness.procs import start_worker, stop_process  # noqa: E402

HEALTH_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 600.0
DECODE_PROMPT = "Count from 1 to 1000, separated by commas: 1, 2, 3, 4, 5, 6, 7, 8,"


def stream(client: httpx.Client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streaming /v1/completions request: chunk arrival times (relative to send) and the usage."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.0}
    times: list[float] = []  # arrival of each chunk that carries a choice
    text: list[str] = []
    usage: dict[str, Any] | None = None
    t0 = time.perf_counter()  # on one clock for all streams: `start` places concurrent streams side by side
    with client.stream("POST", f"{url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read().decode(errors='replace')[:500]}")
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"stream error: {obj['error']}")
            if obj.get("choices"):
                times.append(time.perf_counter() - t0)
                text.append(obj["choices"][0].get("text") or "")
            if obj.get("usage"):
                usage = obj["usage"]
    if not times or usage is None:
        raise RuntimeError(f"incomplete stream: {len(times)} chunks, usage={usage}")
    return {"start": t0, "times": times, "ttft": times[0], "usage": usage, "text": "".join(text),
            "cached": int(usage.get("prompt_tokens_details", {}).get("cached_tokens", 0))}


def decode_rate(streams: list[dict[str, Any]]) -> dict[str, Any]:
    """Decode speed of streams that ran together, TTFT excluded (the definition in the module docstring).

    Each stream: `start` (perf_counter at send), `times` (chunk arrivals relative to `start`) and `usage`.
    Aggregate tok/s = sum of (completion_tokens - 1) / (latest last token - earliest first token); None when
    there is nothing to divide. Also each stream's own rate, (completion_tokens - 1) / (its last - its first)."""
    first = min(s["start"] + s["times"][0] for s in streams)
    last = max(s["start"] + s["times"][-1] for s in streams)
    tokens = sum(max(0, int(s["usage"]["completion_tokens"]) - 1) for s in streams)
    own = [(int(s["usage"]["completion_tokens"]) - 1) / (s["times"][-1] - s["times"][0]) for s in streams
           if int(s["usage"]["completion_tokens"]) > 1 and s["times"][-1] > s["times"][0]]
    return {"streams": len(streams), "decode_tokens": tokens, "window_s": last - first,
            "tok_per_s": tokens / (last - first) if tokens and last > first else None,
            "per_stream_tok_per_s_median": statistics.median(own) if own else None,
            "ttft_s_max": max(s["times"][0] for s in streams)}


def summary(xs: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "samples": xs}


def kv_used_bytes(client: httpx.Client, url: str) -> float | None:
    """The worker's `prefixroute_worker_kv_used_bytes` gauge (paged workers only), else None."""
    for line in client.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("prefixroute_worker_kv_used_bytes "):
            return float(line.split()[1])
    return None


def shared_prefix_memory(client: httpx.Client, url: str, pid: int | None, model: str, prefix: list[int],
                         salt: str, suffixes: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """`len(suffixes)` streams on the cached prefix at once: the worker's peak RSS above its RSS before, sampled
    every 10 ms while they run, and the peak of its KV-in-use gauge where it has one."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    proc = psutil.Process(pid) if pid else None
    probe = client  # httpx.Client is thread-safe: the sampler shares it
    before_rss = proc.memory_info().rss if proc else None
    before_kv = kv_used_bytes(probe, url)
    peak = {"rss": before_rss or 0, "kv": before_kv or 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            if proc:
                peak["rss"] = max(peak["rss"], proc.memory_info().rss)
            if before_kv is not None:
                peak["kv"] = max(peak["kv"], kv_used_bytes(probe, url) or 0.0)
            stop.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    body = {"model": model, "max_tokens": max_tokens, "cache_salt": salt}
    try:
        with ThreadPoolExecutor(len(suffixes)) as pool:
            runs = list(pool.map(lambda sfx: stream(client, url, {**body, "prompt": prefix + sfx}), suffixes))
    finally:
        stop.set()
        sampler.join()
    return {"streams": len(suffixes), "prefix_tokens": len(prefix), "suffix_tokens": len(suffixes[0]),
            "max_tokens": max_tokens, "cached_tokens": [r["cached"] for r in runs],
            "completion_tokens": [int(r["usage"]["completion_tokens"]) for r in runs],
            "rss_before_bytes": before_rss, "rss_peak_increase_bytes": peak["rss"] - before_rss if proc else None,
            "kv_used_before_bytes": before_kv, "kv_used_peak_bytes": peak["kv"] if before_kv is not None else None}


def run(client: httpx.Client, url: str, args: argparse.Namespace, pid: int | None = None) -> dict[str, Any]:
    rng = random.Random(1234)
    ids = lambda n: [rng.randrange(1000, 40000) for _ in range(n)]  # noqa: E731
    models = client.get(f"{url}/v1/models", timeout=30).json()
    model = models["data"][0]["id"]
    prefix = ids(args.prefix_tokens)
    base = {"model": model, "max_tokens": 1}
    expected = (args.prefix_tokens // args.block_size) * args.block_size
    run_tag = uuid.uuid4().hex[:8]

    # Untimed: one full-size cold request (allocator, threads), then the prefix alone under the warm salt.
    stream(client, url, {**base, "prompt": prefix + ids(args.suffix_tokens), "cache_salt": f"prime-{run_tag}"})
    warm_salt = f"warm-{run_tag}"
    stream(client, url, {**base, "prompt": prefix, "cache_salt": warm_salt})

    cold: list[float] = []
    warm: list[float] = []
    warm_cached: list[int] = []
    problems: list[str] = []
    for i in range(args.repeats):
        r = stream(client, url, {**base, "prompt": prefix + ids(args.suffix_tokens),
                                 "cache_salt": f"cold-{run_tag}-{i}"})
        cold.append(r["ttft"])
        if r["cached"] != 0:
            problems.append(f"cold run {i}: cached_tokens={r['cached']}, expected 0")
        r = stream(client, url, {**base, "prompt": prefix + ids(args.suffix_tokens), "cache_salt": warm_salt})
        warm.append(r["ttft"])
        warm_cached.append(r["cached"])
        if r["cached"] != expected:
            problems.append(f"warm run {i}: cached_tokens={r['cached']}, expected {expected}")

    texts: dict[str, str] = {}

    def decode_request(label: str) -> dict[str, Any]:
        r = stream(client, url, {"model": model, "prompt": f"{DECODE_PROMPT} (list {label})",
                                 "max_tokens": args.decode_tokens, "cache_salt": f"decode-{run_tag}-{label}"})
        texts[label] = r["text"]
        if r["cached"]:
            problems.append(f"decode stream {label}: cached_tokens={r['cached']}, expected 0")
        n_out = int(r["usage"]["completion_tokens"])
        if n_out < args.decode_tokens:
            problems.append(f"decode stream {label} stopped early: {n_out} of {args.decode_tokens} tokens")
        return r

    # One stream, then the same measurement over N streams sent at once; `--repeats` rounds, alternating.
    from concurrent.futures import ThreadPoolExecutor

    n = args.concurrency
    singles: list[dict[str, Any]] = []
    groups: list[dict[str, Any]] = []
    gaps: list[float] = []
    with ThreadPoolExecutor(n) as pool:
        for k in range(args.repeats):
            d = decode_request(f"single-{k}")
            singles.append({**decode_rate([d]), "prompt_tokens": int(d["usage"]["prompt_tokens"]),
                            "completion_tokens": int(d["usage"]["completion_tokens"]), "chunks": len(d["times"])})
            gaps += [b - a for a, b in zip(d["times"], d["times"][1:])]
            groups.append(decode_rate(list(pool.map(lambda i: decode_request(f"{k}-{i}"), range(n)))))
    med = lambda rows, key: (statistics.median([r[key] for r in rows])  # noqa: E731
                             if all(r[key] is not None for r in rows) else None)
    single_tps, group_tps = med(singles, "tok_per_s"), med(groups, "tok_per_s")
    decode = {
        "definition": "decode tok/s = completion tokens after each stream's first, summed / (latest last token - "
                      "earliest first token); TTFT excluded, every stream under its own fresh cache_salt; "
                      "median over rounds",
        "rounds": args.repeats,
        "prompt_tokens": singles[0]["prompt_tokens"],
        "completion_tokens": singles[0]["completion_tokens"],
        "ttft_s": med(singles, "ttft_s_max"),
        "tok_per_s": single_tps,
        "tok_per_s_samples": [r["tok_per_s"] for r in singles],
        "itl_p50_s": statistics.median(gaps) if gaps else None,
        "concurrency": n,
        "group_tok_per_s": group_tps,
        "group_tok_per_s_samples": [r["tok_per_s"] for r in groups],
        "group_per_stream_tok_per_s_median": med(groups, "per_stream_tok_per_s_median"),
        "group_decode_tokens": [r["decode_tokens"] for r in groups],
        "group_window_s": [r["window_s"] for r in groups],
        "group_ttft_s_max": [r["ttft_s_max"] for r in groups],
        "group_speedup": group_tps / single_tps if group_tps and single_tps else None,
    }
    memory = shared_prefix_memory(client, url, pid, model, prefix, warm_salt,
                                  [ids(args.suffix_tokens) for _ in range(n)], args.decode_tokens)
    if memory["cached_tokens"] != [expected] * n:
        problems.append(f"shared-prefix streams: cached_tokens={memory['cached_tokens']}, expected {expected}")
    ratio = statistics.median(warm) / statistics.median(cold)
    return {
        "model": model,
        "cold_ttft_s": summary(cold),
        "warm_ttft_s": summary(warm),
        "warm_cached_tokens": warm_cached,
        "expected_cached_tokens": expected,
        "warm_cold_ratio": ratio,
        "ratio_target": 0.05,
        "ratio_meets_target": ratio <= 0.05,
        "decode": decode,
        "decode_texts": texts,
        "shared_prefix_memory": memory,
        "problems": problems,
    }


def markdown(report: dict[str, Any]) -> str:
    r, c, m = report["results"], report["config"], report["machine"]
    ms = lambda x: f"{x * 1000:.1f}"  # noqa: E731
    rows = ["| metric | median | min | max |", "|---|---|---|---|"]
    for name in ("cold", "warm"):
        t = r[f"{name}_ttft_s"]
        rows.append(f"| {name} TTFT (ms) | {ms(t['median'])} | {ms(t['min'])} | {ms(t['max'])} |")
    rows += [
        f"| warm/cold TTFT | {r['warm_cold_ratio']:.4f} (target <= {r['ratio_target']}) | | |",
        f"| warm cached tokens | {r['warm_cached_tokens']} (expected {r['expected_cached_tokens']}) | | |",
    ]
    d = r["decode"]
    tps = "n/a" if d["tok_per_s"] is None else f"{d['tok_per_s']:.1f}"
    itl = "n/a" if d["itl_p50_s"] is None else ms(d["itl_p50_s"])
    f1 = lambda x: "n/a" if x is None else f"{x:.1f}"  # noqa: E731

    def lo_hi(xs: list[float | None]) -> str:
        xs = [x for x in xs if x is not None]
        return f"{f1(min(xs))} | {f1(max(xs))}" if xs else "n/a | n/a"

    speedup = "n/a" if d["group_speedup"] is None else f"{d['group_speedup']:.1f}x"
    rows.append(f"| decode tok/s, one stream ({d['completion_tokens']} tokens, {d['rounds']} rounds) | {tps} | "
                f"{lo_hi(d['tok_per_s_samples'])} |")
    rows.append(f"| decode ITL p50 (ms) | {itl} | | |")
    rows.append(f"| decode tok/s, {d['concurrency']} streams at once (aggregate) | {f1(d['group_tok_per_s'])} "
                f"({speedup} one stream; per stream median {f1(d['group_per_stream_tok_per_s_median'])}) | "
                f"{lo_hi(d['group_tok_per_s_samples'])} |")
    mem = r.get("shared_prefix_memory")
    if mem:
        mib = lambda x: "n/a" if x is None else f"{x / 2**20:.1f}"  # noqa: E731
        kv = (None if mem["kv_used_peak_bytes"] is None
              else mem["kv_used_peak_bytes"] - mem["kv_used_before_bytes"])
        rows.append(f"| {mem['streams']} streams on the cached {mem['prefix_tokens']}-token prefix: RSS increase (MiB) "
                    f"| {mib(mem['rss_peak_increase_bytes'])} | | |")
        rows.append(f"| ... KV pages they took (MiB; paged worker's gauge) | {mib(kv)} | | |")
    head = (f"Worker prefix cache: {r['model']} on {m['device']}, {m['cpu_count']} CPUs, torch {m['torch']}; "
            f"prefix {c['prefix_tokens']} + suffix {c['suffix_tokens']} tokens, {c['repeats']} repeats"
            + (f"; load average {m['loadavg_at_end'][1]:.1f} over the last 5 min" if m.get("loadavg_at_end") else "")
            + ".\n\n")
    tail = (f"\nDecode tok/s, one stream and {d['concurrency']} at once alike: completion tokens after each stream's "
            "first, summed, / (latest last-token time - earliest first-token time); TTFT excluded, each stream "
            "under its own fresh cache_salt (no cache hits); rounds of one stream and of "
            f"{d['concurrency']} alternate, median over rounds.\n")
    tail += "".join(f"\n- problem: {p}" for p in r["problems"])
    return head + "\n".join(rows) + "\n" + tail + ("\n" if r["problems"] else "")


def compare(passes: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per worker, medians over all passes' samples; current / baseline ratios; whether greedy texts agree."""
    def figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
        med = statistics.median
        mem = [r["shared_prefix_memory"] for r in runs]
        cold = med([x for r in runs for x in r["cold_ttft_s"]["samples"]])
        warm = med([x for r in runs for x in r["warm_ttft_s"]["samples"]])
        kv = [m["kv_used_peak_bytes"] - m["kv_used_before_bytes"] for m in mem if m["kv_used_peak_bytes"] is not None]
        return {"cold_ttft_s": cold, "warm_ttft_s": warm, "warm_cold_ratio": warm / cold,
                "decode_tok_per_s": med([x for r in runs for x in r["decode"]["tok_per_s_samples"]]),
                "group_tok_per_s": med([x for r in runs for x in r["decode"]["group_tok_per_s_samples"]]),
                "shared_prefix_rss_increase_bytes": med([m["rss_peak_increase_bytes"] for m in mem]),
                "shared_prefix_kv_increase_bytes": med(kv) if kv else None}

    cur, base = figures(passes["current"]), figures(passes["baseline"])
    ratio = {k: cur[k] / base[k] for k in cur if cur[k] is not None and base[k]}
    texts = [(r["decode_texts"], b["decode_texts"]) for r, b in zip(passes["current"], passes["baseline"])]
    same = all(a == b for a, b in texts)
    return {"current": cur, "baseline": base, "current_over_baseline": ratio, "decode_texts_identical": same}


def comparison_markdown(c: dict[str, Any], passes: int) -> str:
    rows = ["| metric | baseline | current | current / baseline |", "|---|---|---|---|"]
    fmt = {"cold_ttft_s": ("cold TTFT (ms)", 1000, ".1f"), "warm_ttft_s": ("warm TTFT (ms)", 1000, ".1f"),
           "warm_cold_ratio": ("warm/cold TTFT", 1, ".4f"),
           "decode_tok_per_s": ("decode tok/s, one stream", 1, ".1f"),
           "group_tok_per_s": ("decode tok/s, streams at once (aggregate)", 1, ".1f"),
           "shared_prefix_rss_increase_bytes": ("RSS increase, streams on the cached prefix (MiB)", 2**-20, ".1f"),
           "shared_prefix_kv_increase_bytes": ("KV pages taken by them (MiB)", 2**-20, ".1f")}
    for key, (name, scale, f) in fmt.items():
        b, cu = c["baseline"][key], c["current"][key]
        show = lambda x: "n/a" if x is None else format(x * scale, f)  # noqa: E731
        r = c["current_over_baseline"].get(key)
        rows.append(f"| {name} | {show(b)} | {show(cu)} | {'n/a' if r is None else f'{r:.3f}'} |")
    rows.append(f"| greedy decode texts identical | | {'yes' if c['decode_texts_identical'] else 'NO'} | |")
    return (f"\nSide by side ({passes} passes each, alternating; medians over every pass's samples):\n\n"
            + "\n".join(rows) + "\n")


def resolved_device(device: str, external: bool) -> str:
    if external:
        return f"unknown (external worker, --device {device} ignored)"
    if device != "auto":
        return device
    import torch  # only to tell what 'auto' picks, as the worker does

    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="benchmark an already running worker (http://127.0.0.1:PORT) instead of starting one")
    p.add_argument("--device", default="auto", help="passed to the started worker: auto, cpu, cuda, cuda:N")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prefix-tokens", type=int, default=2000)
    p.add_argument("--suffix-tokens", type=int, default=16)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8, help="streams decoding at once for the batched figure")
    p.add_argument("--block-size", type=int, default=16, help="the worker's block size (for the expected hit)")
    p.add_argument("--out", type=Path, help="directory for worker_prefix.json and worker_prefix.md")
    p.add_argument("--baseline-tree", type=Path,
                   help="another checkout (e.g. `git worktree add /tmp/prev REV`) whose worker runs side by side")
    p.add_argument("--passes", type=int, default=None,
                   help="rounds of the whole benchmark per worker, alternating (default 2 with a baseline, else 1)")
    args = p.parse_args(argv)
    if args.passes is None:
        args.passes = 2 if args.baseline_tree else 1
    if args.repeats < 1 or args.prefix_tokens < 1 or args.suffix_tokens < 1 or args.decode_tokens < 2:
        p.error("repeats, prefix-tokens and suffix-tokens must be >= 1, decode-tokens >= 2")
    url = args.url.rstrip("/") if args.url else None
    if url and not url.startswith(("http://127.0.0.1", "http://localhost")):
        p.error("--url must point at 127.0.0.1")

    labels = ["current"] + (["baseline"] if args.baseline_tree else [])
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    logs: dict[str, str] = {}
    passes: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    client = httpx.Client(trust_env=False)  # no proxies: only 127.0.0.1 is ever contacted
    try:
        if url is not None:
            urls["current"] = url
        for label in labels:
            if label in urls:
                continue
            log_path = Path(tempfile.mkdtemp(prefix=f"bench_wp_{label}_")) / "worker.log"
            logs[label] = str(log_path)
            tree = args.baseline_tree if label == "baseline" else None
            with open(log_path, "wb") as log:
                urls[label], procs[label] = start_worker("--device", args.device, log=log,
                                                         timeout=HEALTH_TIMEOUT_S, tree=tree)
        for k in range(args.passes):  # baseline first in even passes, current first in odd ones
            for label in (labels[::-1] if k % 2 == 0 else labels):
                proc = procs.get(label)
                passes[label].append(run(client, urls[label], args, proc.pid if proc else None))
    finally:
        client.close()
        for proc in procs.values():
            stop_process(proc)

    report = {
        "benchmark": "worker_prefix",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "torch": importlib.metadata.version("torch"),
                    "device": resolved_device(args.device, bool(args.url)),
                    "loadavg_at_end": os.getloadavg()},  # 1, 5, 15 min: other work sharing the CPUs
        "config": {k: getattr(args, k) for k in ("repeats", "prefix_tokens", "suffix_tokens", "decode_tokens",
                                                 "concurrency", "block_size", "passes")}
        | {"url": args.url, "baseline_tree": str(args.baseline_tree) if args.baseline_tree else None,
           "worker_logs": logs},
        "results": passes["current"][0],
    }
    if args.baseline_tree:
        report["passes"] = passes
        report["comparison"] = compare(passes)
    results = {"problems": [p for runs in passes.values() for r in runs for p in r["problems"]]}
    text = json.dumps(report, indent=2)
    md = markdown(report)
    if "comparison" in report:
        md += comparison_markdown(report["comparison"], args.passes)
        if not report["comparison"]["decode_texts_identical"]:
            results["problems"].append("greedy decode texts differ between baseline and current")
        md += "".join(f"\n- problem: {p}" for p in results["problems"])
    print(text + "\n\n" + md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "worker_prefix.json").write_text(text + "\n")
        (args.out / "worker_prefix.md").write_text(md)
    return 1 if results["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
