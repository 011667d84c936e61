"""Paged KV with the real SmolLM2 model: greedy tokens equal the model's own without any cache (one request,
batched decode, chunked prefill, prefix hits), and running requests that share a cached prefix hold it once."""

from __future__ import annotations

import threading

import pytest
import torch

from worker.engine.engine import Engine, EngineConfig
from worker.engine.runner import ModelRunner
from worker.engine.sampling import SamplingParams
from worker.engine.sequence import SeqEvent, Sequence

pytestmark = pytest.mark.model
B = 16


@pytest.fixture(scope="module")
def runner(loaded_model):
    return ModelRunner(loaded_model)


def submit(engine: Engine, ids: list[int], max_tokens: int, on_event=None) -> tuple[Sequence, threading.Event]:
    done = threading.Event()

    def sink(ev: SeqEvent) -> None:
        if on_event:
            on_event(ev)
        if ev.finished:
            assert ev.error is None, ev.error
            done.set()

    seq = Sequence(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=frozenset()), None,
                   sink)
    engine.submit(seq)
    return seq, done


@torch.inference_mode()
def greedy_without_cache(model, ids: list[int], n: int) -> list[int]:
    """The reference: every token from a full forward over everything before it, no KV kept at all."""
    out = list(ids)
    for _ in range(n):
        out.append(int(model(input_ids=torch.tensor([out]), use_cache=False).logits[0, -1].argmax()))
    return out[len(ids):]


def test_tokens_equal_the_model_without_cache_alone_batched_chunked_and_on_hits(runner):
    tok = runner.loaded.tokenizer
    system = ("You answer in one short sentence. Rules: parcels of class 4 travel by route 9, parcels of class 5 by "
              "route 2, heavy parcels by rail, fragile parcels by van, and letters by air mail. Question: ")
    prompts = [tok(system + q, add_special_tokens=False).input_ids
               for q in ("Which route for class 4?", "What is a parcel?", "Say hello.")]
    assert len(prompts[0]) > 3 * B
    n = 12
    want = [greedy_without_cache(runner.model, p, n) for p in prompts]
    # 24 tokens a step: every prompt is prefilled in chunks, a chunk beside the decoding requests' tokens.
    e = Engine(runner, EngineConfig(block_size=B, cache_bytes=1 << 28, max_batch_tokens=24))
    e.start()
    try:
        seq, done = submit(e, prompts[0], n)
        assert done.wait(120)
        assert seq.output_ids == want[0] and seq.num_cached_tokens == 0  # alone, chunked
        batched = e.runner.batched_steps
        runs = [submit(e, p, n) for p in prompts]  # the first hits its whole prompt's blocks, the others the system
        for s, d in runs:
            assert d.wait(120)
        assert [s.output_ids for s, _ in runs] == want
        assert runs[0][0].num_cached_tokens == (len(prompts[0]) - 1) // B * B
        assert all(s.num_cached_tokens > 0 for s, _ in runs)
        assert e.runner.batched_steps - batched >= n // 2  # they really decoded together
    finally:
        e.stop()


def test_running_requests_sharing_a_cached_prefix_hold_it_once(runner):
    """8 requests on a 2,000-token cached prefix: the KV pages in use stay within 1.1 x (prefix + 8 x (suffix +
    generated)) tokens of KV while all 8 run."""
    e = Engine(runner, EngineConfig(block_size=B, cache_bytes=1 << 30, cache_generated=False))
    e.start()
    page_bytes = runner.kv_bytes_per_token * B
    prefix = [1000 + (i * 7919) % 30000 for i in range(2000)]
    suffix, generated, n = 16, 24, 8
    try:
        _, done = submit(e, prefix, 1)
        assert done.wait(300)
        assert e.runner.pool.num_used == len(e.cache) == 2000 // B  # the prefix's blocks, nothing else
        peak = {"pages": 0, "running": 0}

        def sample(_ev: SeqEvent) -> None:  # on the engine thread, after each step's tokens
            if e.num_running == n:
                peak["running"] = n
                peak["pages"] = max(peak["pages"], e.runner.pool.num_used)

        runs = [submit(e, prefix + [31000 + 100 * k + j for j in range(suffix)], generated, sample) for k in range(n)]
        for s, d in runs:
            assert d.wait(300)
        assert all(s.num_cached_tokens == 2000 for s, _ in runs)
        assert peak["running"] == n
        held = peak["pages"] * page_bytes
        needed = (2000 + n * (suffix + generated)) * runner.kv_bytes_per_token
        print(f"KV held with {n} running: {held / 2**20:.1f} MiB, tokens' own KV {needed / 2**20:.1f} MiB, "
              f"ratio {held / needed:.3f}")
        assert held <= 1.1 * needed
    finally:
        e.stop()
