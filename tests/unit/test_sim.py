"""The sim backend: the real engine and block cache on the GPU cost model, with the real tokenizer."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from protocol.modelfiles import default_model_path
from worker.engine.engine import Engine, EngineConfig
from worker.engine.sampling import Sampler, SamplingParams
from worker.engine.sequence import Sequence
from worker.metrics import WorkerMetrics
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


def test_a_request_queued_behind_a_long_prompt_hits_the_chunks_computed_before_it_starts(loaded):
    """Both are queued before the first step: the long prompt takes every step's budget, so the second one is
    admitted (and looks the cache up) with the long prompt's last chunk and finds its 40 computed blocks. A
    scheduler that admitted it at once, or a cache that took blocks only when a whole prompt was done, gives 0."""
    runner = SimRunner(loaded, GpuProfile(), speedup=1e6)
    engine = Engine(runner, EngineConfig(block_size=16, cache_bytes=1 << 30, max_batch_tokens=64))
    long = list(range(1000, 1000 + 16 * 40 + 5))
    results, done = {}, threading.Event()

    def submit(name, ids):
        def on_event(ev):
            if ev.finished:
                results[name] = ev
                if len(results) == 2:
                    done.set()
        engine.submit(Sequence(ids, SamplingParams(max_tokens=2, temperature=0.0), None, on_event))

    submit("long", long)
    submit("behind", long[:-5] + [7, 8, 9])
    engine.start()
    try:
        assert done.wait(30)
        assert results["long"].cached_tokens == 0 and results["behind"].cached_tokens == 16 * 40
    finally:
        engine.stop()


def test_token_scale_charges_more_bytes_and_time(loaded):
    """Each prompt token stands for `token_scale` tokens: in cache bytes, and in the simulated GPU time of prefill
    (new tokens and the context they attend to) and decode (the context read per step); a generated token is
    one token (offline, harness.fleet_sim counts the same). The time checked is
    the cost model's own account (`busy_s`), not the wall clock."""
    p = GpuProfile()
    # A huge speedup: the runner still accounts the simulated seconds but hardly sleeps.
    one = SimRunner(loaded, p, speedup=1e6, token_scale=1.0)
    many = SimRunner(loaded, p, speedup=1e6, token_scale=32.0)
    assert many.kv_bytes_per_token == 32 * one.kv_bytes_per_token
    charged = {}
    for scale, runner in ((1, one), (32, many)):
        seq = Sequence(list(range(1000, 1100)), SamplingParams(max_tokens=4, temperature=0.0), None,
                       lambda ev: None)
        runner.forward(seq, seq.prompt_ids[:60])  # two prefill chunks: the second attends to the first
        runner.forward(seq, seq.prompt_ids[60:])
        prefill = runner.busy_s
        runner.decode([seq])
        charged[scale] = (prefill, runner.busy_s - prefill)
        seq.num_computed += 9  # ten generated tokens in all: each is one real token, whatever the scale
        before = runner.busy_s
        runner.decode([seq])
        assert runner.busy_s - before == pytest.approx(p.step_overhead_s + p.decode_s([100 * scale + 10]),
                                                       rel=1e-9)
        expected_prefill = (2 * p.step_overhead_s + p.prefill_s(60 * scale, 0)
                            + p.prefill_s(40 * scale, 60 * scale))
        assert prefill == pytest.approx(expected_prefill, rel=1e-9)
        assert charged[scale][1] == pytest.approx(p.step_overhead_s + p.decode_s([100 * scale]), rel=1e-9)
    assert charged[32][0] > 20 * charged[1][0]  # 0.216 s vs 0.0086 s: prefill cost follows the scaled tokens
    assert charged[32][1] > charged[1][1]  # a decode step reads 32x the context


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
    assert e.scheduler.output_weight == 1 / 32  # an answer's token is one real token, a prompt token 32


def test_the_sim_clock_runs_on_from_the_previous_work_so_the_engines_own_time_does_not_add_to_it(loaded):
    """Between and within steps the engine spends CPU time of its own (scheduling, sampling, a wait for the GIL
    among 32 replicas in one process). A GPU's step overhead is already in the profile, so the sim must absorb
    that time, not add it: 20 decode steps with 4 ms of work between them take the charged time, where sleeping
    each charge afresh took ~60% longer. After `idle()` the clock restarts: a pause is not credited."""
    runner = SimRunner(loaded, GpuProfile(), speedup=1.0)
    seq = Sequence(list(range(1000, 1100)), SamplingParams(max_tokens=4, temperature=0.0), None, lambda ev: None)
    seq.num_computed = 100
    t0, charged0 = time.perf_counter(), runner.busy_s
    for _ in range(20):
        end = time.perf_counter() + 0.004
        while time.perf_counter() < end:  # the engine's own Python, on the CPU
            pass
        runner.decode([seq])
    wall, charged = time.perf_counter() - t0, runner.busy_s - charged0
    assert 0.1 < charged < 0.15  # 20 x (1.5 ms overhead + 4.8 ms weights + context)
    assert charged <= wall < 1.3 * charged

    runner.idle()
    time.sleep(0.05)
    t0 = time.perf_counter()
    runner.forward(seq, list(range(40)))  # 1.5 ms + 40 tokens at 18k/s: ~3.7 ms
    assert time.perf_counter() - t0 >= 0.95 * (runner.busy_s - charged)


@contextmanager
def running(runner: SimRunner) -> Iterator[Engine]:
    engine = Engine(runner, EngineConfig(block_size=16, cache_bytes=1 << 30))
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


def test_the_engine_tells_the_sim_when_it_runs_out_of_work(loaded):
    runner = SimRunner(loaded, GpuProfile(), speedup=100.0)
    with running(runner) as engine:
        run(engine, list(range(1000, 1100)), max_tokens=2)
        deadline = time.monotonic() + 5
        while runner._due is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runner._due is None


def test_the_sim_samples_its_filler_token_without_a_softmax_over_the_vocabulary(loaded):
    """Any sampling of the sim's logits picks the filler (its only finite logit): the sim's sampler returns it
    at once, as the real sampler would."""
    runner = SimRunner(loaded, GpuProfile(), speedup=1e6)
    seq = Sequence(list(range(1000, 1010)), SamplingParams(max_tokens=1), None, lambda ev: None)
    logits = runner.forward(seq, seq.prompt_ids)
    for params in (SamplingParams(max_tokens=1, temperature=0.0), SamplingParams(max_tokens=1, temperature=0.7,
                                                                                  top_p=0.5, top_k=5, seed=3)):
        assert runner.sampler(params)(logits) == Sampler(params, runner.device)(logits) == runner.filler_id


def test_the_sim_reports_its_simulated_gpu_seconds(loaded):
    runner = SimRunner(loaded, GpuProfile(), speedup=1e6)
    with running(runner) as engine:
        run(engine, list(range(1000, 1300)), max_tokens=3)
        value = WorkerMetrics(engine).registry.get_sample_value("prefixroute_worker_simulated_busy_seconds_total")
        assert value == runner.busy_s > 0
