"""The sim backend: the real engine and block cache on the GPU cost model, with the real tokenizer."""

from __future__ import annotations

import threading

import pytest

from protocol.modelfiles import default_model_path
from worker.engine.engine import Engine, EngineConfig
from worker.engine.sampling import SamplingParams
from worker.engine.sequence import Sequence
from worker.sim import GpuProfile, SimRunner, load_sim


def test_cost_model_is_monotone_and_documented_scale():
    p = GpuProfile()
    assert p.prefill_s(2000, 0) < p.prefill_s(4000, 0) < p.prefill_s(4000, 8000)
    assert 0.08 < p.prefill_s(2000, 0) < 0.2  # ~2k tokens in ~0.1 s on an H100 for an 8B model
    assert p.decode_s([1000] * 8) < p.decode_s([1000] * 64) < 0.02
    assert 400_000 < p.kv_capacity_bytes // p.kv_bytes_per_token < 450_000


@pytest.fixture(scope="module")
def loaded():
    return load_sim(str(default_model_path()), None, GpuProfile())


def run(engine, ids, max_tokens=4):
    done, events = threading.Event(), []
    seq = Sequence(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0), None,
                   lambda ev: (events.append(ev), ev.finished and done.set()))
    engine.submit(seq)
    assert done.wait(30)
    return events[-1]


def test_hits_skip_simulated_prefill_and_cache_is_charged_profile_bytes(loaded):
    runner = SimRunner(loaded, GpuProfile(), speedup=100.0)
    blocks = 64
    engine = Engine(runner, EngineConfig(block_size=16, cache_bytes=blocks * 16 * runner.kv_bytes_per_token))
    engine.start()
    try:
        a = list(range(1000, 1000 + 16 * 40 + 5))
        first = run(engine, a, max_tokens=1)  # one token: the simulated time is all prefill
        busy_cold = runner.busy_s
        second = run(engine, a[:-5] + [7, 8, 9], max_tokens=1)
        busy_warm = runner.busy_s - busy_cold
        assert first.cached_tokens == 0 and second.cached_tokens == 16 * 40
        assert busy_warm < busy_cold / 5
        assert first.completion_tokens == 1 and second.finish_reason == "length"
        # 40 + 40 new blocks do not fit in 64: LRU eviction within the profile-charged budget
        run(engine, list(range(5000, 5000 + 16 * 40 + 1)))
        assert engine.cache.used_bytes <= engine.cache.capacity_bytes
        assert engine.cache.stats.evicted_blocks > 0
    finally:
        engine.stop()


def test_token_scale_charges_more_bytes_and_time(loaded):
    one, many = SimRunner(loaded, GpuProfile(), token_scale=1.0), SimRunner(loaded, GpuProfile(), token_scale=32.0)
    assert many.kv_bytes_per_token == 32 * one.kv_bytes_per_token


def test_build_sim_replicas_and_cache_in_tokens():
    from worker.__main__ import build_sim
    from worker.settings import parse_args

    servers = build_sim(parse_args(["--backend", "sim", "--replicas", "3", "--port", "30000", "--cache-tokens",
                                    "1000", "--sim-token-scale", "32", "--worker-id", "gpu"]))
    assert [s.settings.port for s in servers] == [30000, 30001, 30002]
    assert [s.settings.name for s in servers] == ["gpu-0", "gpu-1", "gpu-2"]
    e = servers[0].engine
    assert e.cache.capacity_bytes // e.runner.kv_bytes_per_token == 1000
    assert e.config.max_num_seqs == 256 and servers[0].engine is not servers[1].engine
