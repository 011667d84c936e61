"""The prefix doctor's promise, end to end: the ceiling it estimates for traffic with a prefix-cache killer fixed is
within 2% of the cached-token ratio measured by replaying the fixed traffic through the real router (cache_aware,
default settings) in front of two sim workers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from harness.procs import sim_cluster
from loadgen.doctor.findings import analyze
from loadgen.doctor.traffic import load_traffic
from loadgen.replay import Job, replay
from loadgen.synth import generate
from protocol.modelfiles import load_tokenizer, resolve_model_path

N = 200
RATE = 2.0  # requests per second of log time: a timestamp killer's second is shared by ~2 requests
SPEEDUP = 12.0  # the 100 s log replays in ~8 s
SEED = 14


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path(None))


@pytest.fixture(scope="module")
def cluster():
    with sim_cluster(2, "--sim-speedup", "20") as (_, router):
        yield router


def write_log(path: Path, killer: str, fixed: bool) -> list[dict]:
    recs = [r.model_dump() for r in generate("killers", N, RATE, seed=SEED, killer=killer, fixed=fixed)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


@pytest.mark.parametrize("killer", ["timestamp", "tools"])
def test_estimated_ceiling_after_the_fix_matches_the_replayed_fixed_traffic(killer, cluster, tokenizer, tmp_path):
    write_log(tmp_path / "broken.jsonl", killer, False)
    broken = analyze(load_traffic(tmp_path / "broken.jsonl", tokenizer), 16, tokenizer)
    est = broken.ceiling_fixed
    assert broken.findings, "the doctor saw no killer"
    assert broken.ceiling < est - 0.3, (broken.ceiling, est)  # the killer matters

    recs = write_log(tmp_path / "fixed.jsonl", killer, True)
    fixed = analyze(load_traffic(tmp_path / "fixed.jsonl", tokenizer), 16, tokenizer)
    # A cache salt per case: no block cached by another case's prompts can hit.
    jobs = [Job(r["timestamp"] / 1000, r["endpoint"], {**r["body"], "cache_salt": f"case-{killer}"}) for r in recs]
    results = asyncio.run(replay(cluster, jobs, speedup=SPEEDUP, timeout_s=60))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    prompt = sum(r.prompt_tokens for r in results)
    assert prompt == fixed.prompt_tokens  # the doctor tokenized the prompts exactly as the workers did
    measured = sum(r.cached_tokens for r in results) / prompt
    print(f"\n{killer}: ceiling now {broken.ceiling:.4f}, estimated after the fix {est:.4f}, "
          f"fixed traffic's own ceiling {fixed.ceiling:.4f}, measured on router + 2 sim workers {measured:.4f} "
          f"({len({r.worker for r in results})} workers served)")
    assert abs(measured - est) <= 0.02, (measured, est)
