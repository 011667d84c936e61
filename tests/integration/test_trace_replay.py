"""loadgen against real processes: a slice of the real Mooncake trace through the router to sim workers shows
cache_aware beating round_robin on cached tokens; a recorded synthetic workload compared across two routers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.procs import ROOT, start_router, start_sim_workers, stop_process

TRACE = ROOT.parent / "shared" / "traces" / "conversation_trace.jsonl"
needs_trace = pytest.mark.skipif(not TRACE.exists(), reason="the Mooncake trace is not beside the repo (../shared)")


def replay(policy: str, out: Path, requests: int = 300) -> dict:
    # Trace blocks cut from 512 to 16 tokens; the sim charges each token as 32 (time and KV bytes).
    urls, sim = start_sim_workers(8, "--sim-speedup", "10", "--sim-token-scale", "32", "--no-cache-generated")
    try:
        router, rproc = start_router(urls, "--policy", policy, "--prefix-tokens", "8")
        try:
            r = subprocess.run([sys.executable, "-m", "loadgen", "replay", str(TRACE), "--url", router,
                                "--block-tokens", "16", "--max-requests", str(requests), "--speedup", "8",
                                "--max-output-tokens", "8", "--out", str(out), "--quiet"],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-2000:]
        finally:
            stop_process(rproc)
    finally:
        stop_process(sim)
    return json.loads((out / "summary.json").read_text())


@needs_trace
def test_trace_slice_cache_aware_beats_round_robin(tmp_path):
    ca = replay("cache_aware", tmp_path / "ca")
    rr = replay("round_robin", tmp_path / "rr")
    for s in (ca, rr):
        assert s["requests"] == 300 and s["errors"] == 0 and len(s["per_worker"]) == 8
        for key in ("cached_token_ratio", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "e2e_p50_s", "max_mean_load"):
            assert s[key] is not None
    assert ca["cached_token_ratio"] > 1.3 * rr["cached_token_ratio"]  # measured: 0.070 vs 0.037
    assert (tmp_path / "ca" / "requests.csv").exists() and (tmp_path / "ca" / "ttft_cdf.png").exists()


def test_compare_mode_and_synthetic_workload(tmp_path):
    """`loadgen compare` runs one recorded synthetic workload against two routers, each with its own cold sim
    fleet, and writes one combined report."""
    procs = []
    try:
        fleets = {}
        for name in ("record", "cache_aware", "round_robin"):
            urls, sim = start_sim_workers(2, "--sim-speedup", "20")
            procs.append(sim)
            url, router = start_router(urls, "--policy", "round_robin" if name == "record" else name)
            procs.append(router)
            fleets[name] = url
        rec = tmp_path / "zipf.jsonl"
        r = subprocess.run([sys.executable, "-m", "loadgen", "synth", "zipf", "--url", fleets["record"],
                            "--requests", "30", "--rate", "30", "--seed", "4", "--record", str(rec), "--quiet"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert len(rec.read_text().splitlines()) == 30
        r = subprocess.run([sys.executable, "-m", "loadgen", "compare", str(rec), "--speedup", "4", "--out",
                            str(tmp_path / "c"), "--quiet", "--url", f"cache_aware={fleets['cache_aware']}",
                            "--url", f"round_robin={fleets['round_robin']}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        summary = json.loads((tmp_path / "c" / "summary.json").read_text())
        assert set(summary) == {"cache_aware", "round_robin"}
        assert all(s["requests"] == 30 and s["errors"] == 0 for s in summary.values())
        assert summary["cache_aware"]["cached_token_ratio"] > summary["round_robin"]["cached_token_ratio"]
        table = (tmp_path / "c" / "summary.md").read_text()
        assert "| cache_aware |" in table and "| round_robin |" in table
        assert (tmp_path / "c" / "requests-cache_aware.csv").exists()
    finally:
        for proc in procs:
            stop_process(proc)
