"""The statistics of the benchmark scripts: the router's added latency from paired samples (percentiles of the
per-pair differences, not differences of percentiles) and the worker's decode speed, measured alike for one
stream and for several at once (TTFT and cache hits excluded)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def overhead():
    return load("router_overhead")


@pytest.fixture(scope="module")
def worker_prefix():
    return load("worker_prefix")


# ---- router_overhead ----------------------------------------------------------------------------------------

def test_added_latency_is_percentiles_of_paired_differences(overhead):
    # 100 pairs, the router adds 1 ms to every request; five direct requests hit an upstream hiccup (5 ms) that
    # their routed twins missed. p99(routed) - p99(direct) = 2 - 5 = -3 ms, below the p50: the old defect.
    direct = [0.001] * 95 + [0.005] * 5
    routed = [0.002] * 100
    r = overhead.paired_added(direct, routed)
    assert r["pairs"] == 100 and r["direct_p50_ms"] == pytest.approx(1.0) and r["routed_p50_ms"] == pytest.approx(2.0)
    for p in (50, 90, 99):
        assert r[f"added_p{p}_ms"] == pytest.approx(1.0)
    # a tail that is the router's own: one pair in ten pays 5 ms more
    direct = [0.001] * 100
    routed = [0.0065 if i % 10 == 0 else 0.0015 for i in range(100)]
    r = overhead.paired_added(direct, routed)
    assert r["added_p50_ms"] == pytest.approx(0.5) and r["added_p90_ms"] == pytest.approx(0.5)
    assert r["added_p99_ms"] == pytest.approx(5.5)
    with pytest.raises(ValueError):
        overhead.paired_added([0.001, 0.002], [0.001])


def test_latency_pairs_each_routed_request_with_a_direct_one(overhead, monkeypatch):
    calls: list[tuple[str, bytes]] = []
    clock = {"direct": iter([0.001 * (i + 1) for i in range(40)]), "routed": iter([0.001 * (i + 1) + 0.0005
                                                                                  for i in range(40)])}

    async def fake_one(session, url, payload):
        calls.append((url, payload))
        return next(clock[url])

    monkeypatch.setattr(overhead, "one", fake_one)
    r = asyncio.run(overhead.latency(None, "direct", "routed", b"p", 20))
    timed = calls[20:]  # after 10 warm-up pairs
    assert len(timed) == 40 and {p for _, p in calls} == {b"p"}
    pairs = [tuple(u for u, _ in timed[i:i + 2]) for i in range(0, 40, 2)]
    assert all(set(p) == {"direct", "routed"} for p in pairs)  # back to back, one of each
    assert {p[0] for p in pairs} == {"direct", "routed"}  # which goes first alternates
    # every routed sample is its twin + 0.5 ms: each percentile of the pair differences is 0.5 ms
    assert r["pairs"] == 20
    for p in (50, 90, 99):
        assert r[f"added_p{p}_ms"] == pytest.approx(0.5)


# ---- worker_prefix -------------------------------------------------------------------------------------------

def stream(start: float, ttft: float, tokens: int, gap: float) -> dict[str, Any]:
    times = [ttft + k * gap for k in range(tokens)]
    return {"start": start, "times": times, "ttft": ttft, "usage": {"completion_tokens": tokens}, "cached": 0}


def test_decode_rate_excludes_time_to_first_token(worker_prefix):
    one = worker_prefix.decode_rate([stream(0.0, 2.0, 11, 0.1)])  # 2 s of prefill, then 10 tokens in 1 s
    assert one["tok_per_s"] == pytest.approx(10.0) and one["decode_tokens"] == 10
    # 8 streams sent together: first tokens at 1.0 .. 1.7 s, then 10 more tokens each, one per 0.2 s
    group = [stream(0.0, 1.0 + 0.1 * i, 11, 0.2) for i in range(8)]
    r = worker_prefix.decode_rate(group)
    assert r["decode_tokens"] == 80
    assert r["window_s"] == pytest.approx(1.7 + 2.0 - 1.0)
    assert r["tok_per_s"] == pytest.approx(80 / 2.7)
    assert r["per_stream_tok_per_s_median"] == pytest.approx(5.0) and r["ttft_s_max"] == pytest.approx(1.7)
    # streams sent at different moments are placed on one clock by their start
    r = worker_prefix.decode_rate([stream(0.0, 1.0, 11, 0.1), stream(5.0, 1.0, 11, 0.1)])
    assert r["window_s"] == pytest.approx(7.0 - 1.0)
    assert worker_prefix.decode_rate([stream(0.0, 1.0, 1, 0.1)])["tok_per_s"] is None  # nothing decoded


def test_single_and_batched_decode_are_measured_alike(worker_prefix, monkeypatch):
    """run() with a fake worker: every stream takes 1 s to its first token, then 0.1 s per token alone or
    0.2 s per token in the batch. Both figures must come from first to last token (10 and 8 x 5 tok/s), and
    every decode stream must have its own cache salt (the batch used to share one and hit the cache)."""
    bodies: list[dict[str, Any]] = []
    seen_salts: set[str] = set()

    def fake_stream(client, url, body):
        bodies.append(body)
        salt = body.get("cache_salt", "")
        cached = 16 if salt in seen_salts else 0
        seen_salts.add(salt)
        if body["max_tokens"] == 1:
            return {**stream(0.0, 0.5, 1, 0.0), "cached": 0 if salt.startswith(("cold", "prime")) else 2000}
        if salt.startswith("warm"):  # the streams on the cached prefix (memory phase)
            return {**stream(0.0, 0.5, body["max_tokens"], 0.1), "cached": 2000, "text": "x"}
        gap = 0.1 if "single" in body["prompt"] else 0.2
        return {**stream(0.0, 1.0, body["max_tokens"], gap), "cached": cached, "text": "1, 2",
                "usage": {"completion_tokens": body["max_tokens"], "prompt_tokens": 20}}

    class Client:
        def get(self, url, timeout):
            class R:
                text = "prefixroute_worker_kv_used_bytes 1000\n" if url.endswith("/metrics") else ""

                def json(self):
                    return {"data": [{"id": "m"}]}
            return R()

    monkeypatch.setattr(worker_prefix, "stream", fake_stream)
    args = argparse.Namespace(repeats=2, prefix_tokens=2000, suffix_tokens=16, decode_tokens=21, concurrency=8,
                              block_size=16)
    r = worker_prefix.run(Client(), "http://x", args)
    d = r["decode"]
    assert d["tok_per_s"] == pytest.approx(10.0)
    assert d["group_tok_per_s"] == pytest.approx(8 * 20 / 4.0)  # 160 decode tokens over 1.0 .. 5.0 s
    assert d["group_speedup"] == pytest.approx(4.0)
    decode_salts = [b["cache_salt"] for b in bodies if b["cache_salt"].startswith("decode")]
    assert len(decode_salts) == 18 and len(set(decode_salts)) == 18  # 2 rounds of 1 + 8 streams
    assert not r["problems"]
    mem = r["shared_prefix_memory"]
    assert mem["streams"] == 8 and mem["cached_tokens"] == [2000] * 8 and mem["kv_used_peak_bytes"] == 1000
    assert set(r["decode_texts"].values()) == {"1, 2"} and len(r["decode_texts"]) == 18
    md = worker_prefix.markdown({"results": r, "config": vars(args),
                                 "machine": {"device": "cpu", "cpu_count": 2, "torch": "x"}})
    assert "| 10.0 |" in md and "40.0 (4.0x one stream" in md and "TTFT excluded" in md


def test_side_by_side_comparison_pools_passes_and_checks_texts(worker_prefix):
    def run(cold, decode, texts, kv):
        return {"cold_ttft_s": {"samples": cold}, "warm_ttft_s": {"samples": [c / 20 for c in cold]},
                "decode": {"tok_per_s_samples": decode, "group_tok_per_s_samples": [4 * d for d in decode]},
                "shared_prefix_memory": {"rss_peak_increase_bytes": 100, "kv_used_peak_bytes": kv,
                                         "kv_used_before_bytes": 0 if kv is not None else None},
                "decode_texts": texts}

    passes = {"current": [run([1.0, 3.0], [10.0], {"a": "x"}, 50), run([2.0], [12.0], {"a": "y"}, 70)],
              "baseline": [run([2.0, 6.0], [10.0], {"a": "x"}, None), run([4.0], [10.0], {"a": "y"}, None)]}
    c = worker_prefix.compare(passes)
    assert c["current"]["cold_ttft_s"] == 2.0 and c["baseline"]["cold_ttft_s"] == 4.0
    assert c["current_over_baseline"]["cold_ttft_s"] == 0.5
    assert c["current_over_baseline"]["decode_tok_per_s"] == pytest.approx(1.1)
    assert c["current"]["shared_prefix_kv_increase_bytes"] == 60
    assert c["baseline"]["shared_prefix_kv_increase_bytes"] is None
    assert c["decode_texts_identical"]
    passes["current"][1]["decode_texts"] = {"a": "z"}
    assert not worker_prefix.compare(passes)["decode_texts_identical"]
    assert "| greedy decode texts identical | | NO | |" in worker_prefix.comparison_markdown(
        worker_prefix.compare(passes), 2)
